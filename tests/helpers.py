"""Bounded waits for trial tests on the real reactor, for what runs in
another thread or process (a camera's thread, ffmpeg): nothing here polls.

A test says when something happened (L{Events.notify}, called where frames,
chunks, states or log events reach the reactor thread, or L{Arrivals}, a
list that does so on each append), and a wait resumes at that moment; its
only timer is its bound.  Code that takes a clock is driven on one instead
(task.Clock, tests/fakes/inmemory.py), with no waiting at all.
"""

import time

from twisted.internet import defer, reactor
from twisted.python.failure import Failure

from pistreaming.mpegts import PACKET, video_pes_start


class _Wait:
    def __init__(self, predicate, what, timeout, clock, done):
        self.predicate = predicate
        self.what = what
        self.timeout = timeout
        self.clock = clock
        self.done = done
        self.deferred = defer.Deferred()
        self.timer = None
        self.finished = False

    def check(self, later=True):
        """Fire if the condition holds (or raised); whether it has fired.

        Fired from a notify (C{later}), the test goes on at the reactor's
        next turn, not inside the code under test that said what happened
        (which may not have finished what it was doing)."""
        if self.finished:  # by a notify made while this one's callbacks ran
            return True
        try:
            if not self.predicate():
                return False
        except Exception:
            failure = Failure()
            self.finish(lambda d: d.errback(failure), later)
        else:
            self.finish(lambda d: d.callback(None), later)
        return True

    def expire(self):
        self.timer = None
        self.finish(lambda d: d.errback(AssertionError(
            f"timed out after {self.timeout}s waiting for {self.what}")), later=False)

    def finish(self, fire, later):
        self.finished = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.done(self)
        if later:
            self.clock.callLater(0, fire, self.deferred)
        else:
            fire(self.deferred)


class Events:
    """Conditions on what the reactor thread is told, checked each time it
    is told something (L{notify}), never on a timer."""

    def __init__(self, clock=reactor):
        self._clock = clock
        self._waiting = []

    def notify(self, *ignored, **also_ignored):
        """Something happened: fire the waits whose condition now holds.
        (Takes and ignores any arguments, so that it can be a callback or a
        log observer itself.)"""
        for wait in list(self._waiting):
            wait.check()

    def until(self, predicate, timeout, what):
        """A Deferred that fires once C{predicate()} is true (checked now and
        at each L{notify}), or fails with AssertionError after C{timeout}
        seconds."""
        wait = _Wait(predicate, what, timeout, self._clock, self._waiting.remove)
        self._waiting.append(wait)
        if not wait.check(later=False):
            wait.timer = self._clock.callLater(timeout, wait.expire)
        return wait.deferred


class Arrivals(list):
    """A list whose appends are events (of C{events}, its own by default)."""

    def __init__(self, events=None):
        super().__init__()
        self.events = Events() if events is None else events

    def append(self, item):
        super().append(item)
        self.events.notify()

    def until(self, predicate, timeout, what):
        """As L{Events.until}."""
        return self.events.until(predicate, timeout, what)


def from_threads_taken(clock=reactor):
    """A Deferred that fires once the reactor has run every call that threads
    handed it (callFromThread) before this one: the calls run in order."""
    d = defer.Deferred()
    clock.callFromThread(d.callback, None)
    return d


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


def collect_pictures(ws, count, timeout=10.0):
    """The stream's binary messages, read from C{ws} (a websocket-client
    connection, past the header) until they hold C{count} pictures, for at
    most C{timeout} seconds; each must be whole TS packets.  (The daemon
    sends each picture whole, so the last one decodes.)"""
    chunks, pictures = [], 0
    deadline = time.monotonic() + timeout
    while pictures < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{pictures} pictures of {count} within {timeout}s"
        ws.settimeout(left)
        opcode, data = ws.recv_data()
        assert opcode == 0x2, f"opcode {opcode}, not a binary message"
        assert len(data) % PACKET == 0 and len(data) > 0
        assert all(data[i] == 0x47 for i in range(0, len(data), PACKET))
        chunks.append(data)
        pictures += sum(1 for i in range(0, len(data), PACKET)
                        if video_pes_start(data[i:i + PACKET]))
    return b"".join(chunks)
