"""Small helpers for trial tests on the real reactor; every wait is bounded."""

from twisted.internet import defer, reactor, task


def wait_until(predicate, timeout=10.0, interval=0.02, what="condition"):
    """A Deferred that fires once C{predicate()} is true, or fails after C{timeout}s."""
    deadline = reactor.seconds() + timeout

    def check():
        if predicate():
            return True
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        return task.deferLater(reactor, interval, check)

    return defer.maybeDeferred(check)


def with_timeout(d, timeout, what="operation"):
    """C{d}, failing with AssertionError if it has not fired within C{timeout}s."""
    result = defer.Deferred()
    timer = reactor.callLater(
        timeout, lambda: result.called or result.errback(
            AssertionError(f"{what} did not finish within {timeout}s")))

    def done(value):
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(value)
        return None

    d.addBoth(done)
    return result
