"""Password checking under attack: what may be hashed is decided before
hashing, per address (an IPv6 /64 counts as one) and overall; a user who
logged in before keeps working; unknown names cost what known ones do; a
password file gone bad is complained about once a minute."""

import base64
import gc

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.test.requesthelper import DummyRequest

from pistreaming import auth
from pistreaming.auth import (Authenticator, Gate, PasswordFile, TooManyAttempts,
                              hash_password)

ITERATIONS = 1000  # the limits, not the hashing, are under test


class Threads:
    """Stands for the thread pool: hashes start when the test says so."""

    def __init__(self):
        self.waiting = []
        self.started = 0

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.waiting.append((d, f, args))
        self.started += 1
        return d

    def finish(self):
        waiting, self.waiting = self.waiting, []
        for d, f, args in waiting:
            d.callback(f(*args))


@pytest.fixture
def logged(monkeypatch):
    lines = []
    monkeypatch.setattr(auth, "log", Logger(observer=lambda e: lines.append(formatEvent(e))))
    return lines


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "passwd"
    path.write_text(f"alice:{hash_password('wonder land', iterations=ITERATIONS)}\n"
                    f"carol:{hash_password('singer', iterations=ITERATIONS)}\n")
    return path


@pytest.fixture
def setup(users, logged):
    clock = task.Clock()
    threads = Threads()
    return Authenticator(PasswordFile(str(users)), clock, run_in_thread=threads), clock, threads


def basic(user, password):
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def attempt(authenticator, user, password, address):
    """The outcome: [] while it is being checked, then [user name] or [Failure]."""
    outcome = []
    d = authenticator.authenticate(basic(user, password), address, "/index.html")
    d.addBoth(outcome.append)
    return outcome


def refused(outcome, status):
    return bool(len(outcome) == 1 and not isinstance(outcome[0], str)
                and outcome[0].check(TooManyAttempts) and outcome[0].value.status == status)


def wrong(outcome):
    return bool(len(outcome) == 1 and not isinstance(outcome[0], str)
                and outcome[0].check(UnauthorizedLogin) and not outcome[0].check(TooManyAttempts))


def test_parallel_guesses_from_one_address_are_refused_before_hashing(setup, logged):
    authenticator, clock, threads = setup
    outcomes = [attempt(authenticator, "mallory", f"guess {i}", "203.0.113.5")
                for i in range(60)]
    assert threads.started == 2 and len(threads.waiting) == 2
    assert sum(refused(o, 429) for o in outcomes) == 58
    assert {o[0].value.retry_after for o in outcomes if refused(o, 429)} == {1}
    threads.finish()
    assert sum(wrong(o) for o in outcomes) == 2

    # Keep guessing, 60 at a time, twice a second for 20 s: the back-off
    # (from the 4th failure: 1 s, 2 s, 4 s... up to 16 s) lets only a few through.
    retry_afters = []
    for _ in range(40):
        clock.advance(0.5)
        outcomes = [attempt(authenticator, "mallory", f"guess {i}", "203.0.113.5")
                    for i in range(60)]
        threads.finish()
        retry_afters += [o[0].value.retry_after for o in outcomes if refused(o, 429)]
        assert all(wrong(o) or refused(o, 429) for o in outcomes)
    assert threads.started <= 10
    assert len(retry_afters) >= 40 * 60 - 10
    assert 16 in retry_afters and max(retry_afters) == 16 and min(retry_afters) >= 1
    # One line when the refusals start, then a count at most once a minute.
    starts = [line for line in logged if "; refusing for" in line]
    assert len(starts) == 1 and "from 203.0.113.5: too many password checks at once" in starts[0]
    assert len([line for line in logged if "refused" in line and "attempts in the last" in line]) == 0
    clock.advance(60)
    (summed,) = [line for line in logged if "attempts in the last" in line]
    assert "203.0.113.5: refused" in summed
    failed = [line for line in logged if "authentication failed" in line]
    assert len(failed) == threads.started and "(user mallory; wrong 1 times in 5 min)" in failed[0]


def test_a_refused_address_may_try_again_after_retry_after(setup):
    authenticator, clock, threads = setup
    for i in range(4):
        outcome = attempt(authenticator, "mallory", f"guess {i}", "203.0.113.5")
        threads.finish()
        assert wrong(outcome)
    outcome = attempt(authenticator, "mallory", "guess 5", "203.0.113.5")
    assert refused(outcome, 429) and outcome[0].value.retry_after == 1
    clock.advance(1)
    outcome = attempt(authenticator, "mallory", "guess 6", "203.0.113.5")
    threads.finish()
    assert wrong(outcome)
    outcome = attempt(authenticator, "mallory", "guess 7", "203.0.113.5")
    assert refused(outcome, 429) and outcome[0].value.retry_after == 2


def test_addresses_in_one_ipv6_64_are_counted_together(setup):
    authenticator, clock, threads = setup
    outcomes = [attempt(authenticator, "mallory", f"guess {i}", f"2001:db8:1:2::{i:x}")
                for i in range(1, 61)]
    assert threads.started == 2
    assert sum(refused(o, 429) for o in outcomes) == 58
    threads.finish()
    for i in range(3):  # two more failures: past FREE_FAILURES, refused for a while
        clock.advance(0.1)
        outcome = attempt(authenticator, "mallory", f"again {i}", f"2001:db8:1:2:{i}::1")
        threads.finish()
    outcome = attempt(authenticator, "mallory", "guess", "2001:db8:1:2:ffff::1")
    assert refused(outcome, 429)
    # The next /64 is someone else.
    outcome = attempt(authenticator, "mallory", "guess", "2001:db8:1:3::1")
    assert threads.waiting and not outcome


def test_a_flood_from_many_addresses_gets_503_and_nothing_queues(setup, logged):
    authenticator, clock, threads = setup
    outcomes = [attempt(authenticator, "mallory", f"guess {i}", f"198.51.{i // 250}.{i % 250}")
                for i in range(1000)]
    assert len(threads.waiting) == auth.CHECKS == 4
    assert sum(refused(o, 503) for o in outcomes) == 996
    assert {o[0].value.retry_after for o in outcomes if refused(o, 503)} == {1}
    threads.finish()
    assert sum(wrong(o) for o in outcomes) == 4
    # The next ones are checked again.
    attempt(authenticator, "mallory", "guess", "198.51.200.1")
    assert len(threads.waiting) == 1
    (start,) = [line for line in logged if "answering 503" in line]
    assert "4 password checks under way" in start
    clock.advance(60)
    (summed,) = [line for line in logged if "attempts in the last" in line]
    assert "all addresses: refused 996 attempts" in summed
    clock.advance(60)  # none refused in that minute: nothing more to say
    assert len([line for line in logged if "attempts in the last" in line]) == 1
    assert not clock.getDelayedCalls()


def test_a_user_who_logged_in_before_gets_in_during_a_flood(setup):
    authenticator, clock, threads = setup
    outcome = attempt(authenticator, "alice", "wonder land", "192.0.2.7")
    threads.finish()
    assert outcome == ["alice"]
    clock.advance(auth.REMEMBER + 1)  # the remembered password is forgotten: it is hashed again

    flood = [attempt(authenticator, "mallory", f"guess {i}", f"198.51.100.{i}")
             for i in range(200)]
    assert len(threads.waiting) == 4
    stranger = attempt(authenticator, "carol", "singer", "192.0.2.99")  # never logged in here
    assert refused(stranger, 503)
    outcome = attempt(authenticator, "alice", "wonder land", "192.0.2.7")
    assert len(threads.waiting) == 5  # alice's check started at once
    threads.finish()
    assert outcome == ["alice"]
    assert sum(refused(o, 503) for o in flood) == 196


def test_a_user_who_logged_in_before_is_not_held_up_by_guesses_from_her_address(setup):
    authenticator, clock, threads = setup
    assert attempt(authenticator, "alice", "wonder land", "192.0.2.7") == [] \
        and threads.finish() is None
    # Someone behind the same NAT guesses other names.
    for i in range(6):
        attempt(authenticator, f"user{i}", "guess", "192.0.2.7")
        threads.finish()
    assert refused(attempt(authenticator, "mallory", "guess", "192.0.2.7"), 429)
    # carol never logged in from there: she cannot be told from the guesser yet.
    assert refused(attempt(authenticator, "carol", "singer", "192.0.2.7"), 429)
    # alice can, remembered password or not.
    assert attempt(authenticator, "alice", "wonder land", "192.0.2.7") == ["alice"]
    clock.advance(auth.REMEMBER + 1)
    outcome = attempt(authenticator, "alice", "wonder land", "192.0.2.7")
    threads.finish()
    assert outcome == ["alice"]


def test_guessing_a_known_users_password_from_her_address_is_still_slowed(setup):
    authenticator, clock, threads = setup
    attempt(authenticator, "alice", "wonder land", "192.0.2.7")
    threads.finish()
    outcomes = []
    for i in range(10):  # the 4th failure, at 0.4 s, refuses the pair until 1.4 s
        clock.advance(0.1)
        outcomes.append(attempt(authenticator, "alice", f"guess {i}", "192.0.2.7"))
        threads.finish()
    assert threads.started == 1 + 4  # her login, then 3 free failures and one more
    assert all(refused(o, 429) for o in outcomes[4:])
    # The remembered right password does not let guesses through the back-off.
    assert refused(attempt(authenticator, "alice", "wonder land", "192.0.2.7"), 429)


def test_an_unknown_user_costs_one_hash_like_a_known_one(setup):
    authenticator, clock, threads = setup
    known = attempt(authenticator, "alice", "not it", "192.0.2.1")
    unknown = attempt(authenticator, "nobody", "not it", "192.0.2.2")
    assert threads.started == 2
    (_, f1, (_, stored_known)), (_, f2, (_, stored_unknown)) = threads.waiting
    assert f1 is f2 is auth.verify_password
    assert stored_known.split("$")[:2] == stored_unknown.split("$")[:2] \
        == ["pbkdf2-sha256", str(ITERATIONS)]
    threads.finish()
    assert wrong(known) and wrong(unknown)
    assert str(known[0].value) == str(unknown[0].value)
    # Through the same limits: guessing unknown names is refused like known ones.
    for i in range(4):
        attempt(authenticator, f"nobody{i}", "x", "192.0.2.2")
        threads.finish()
    assert refused(attempt(authenticator, "nobody", "x", "192.0.2.2"), 429)
    assert threads.started == 2 + 3


def test_the_same_name_and_password_at_once_are_hashed_once(setup, logged):
    authenticator, clock, threads = setup
    # The same guess 60 times at once: one hash, one wait for it, 58 refused.
    outcomes = [attempt(authenticator, "mallory", "guess", "203.0.113.5") for _ in range(60)]
    assert threads.started == 1
    assert sum(refused(o, 429) for o in outcomes) == 58
    threads.finish()
    assert sum(wrong(o) for o in outcomes) == 2
    assert len([line for line in logged if "authentication failed" in line]) == 1
    # A browser's first login, its requests at once: the same for it.
    outcomes = [attempt(authenticator, "alice", "wonder land", "192.0.2.7") for _ in range(3)]
    assert threads.started == 2 and refused(outcomes[2], 429)
    threads.finish()
    assert outcomes[:2] == [["alice"]] * 2
    # Once she has logged in from there, they all wait for the one hash.
    clock.advance(auth.REMEMBER + 1)
    outcomes = [attempt(authenticator, "alice", "wonder land", "192.0.2.7") for _ in range(5)]
    assert threads.started == 3
    threads.finish()
    assert outcomes == [["alice"]] * 5


def test_a_deleted_or_broken_password_file_keeps_the_users_and_says_so_once_a_minute(
        setup, users, logged):
    authenticator, clock, threads = setup
    errors = lambda: [line for line in logged if "password file" in line]  # noqa: E731
    users.unlink()
    for i in range(10):
        outcome = attempt(authenticator, "alice", "wonder land", f"192.0.2.{i}")
        threads.finish()
        assert outcome == ["alice"]
        clock.advance(5)
    (line,) = errors()
    assert "no such file or directory; keeping the 2 users read before" in line
    clock.advance(15)  # a minute since the first line
    attempt(authenticator, "alice", "wonder land", "192.0.2.1")
    assert len(errors()) == 2
    users.write_text(f"bob:{hash_password('builder', iterations=ITERATIONS)}\n")
    outcome = attempt(authenticator, "bob", "builder", "192.0.2.1")
    threads.finish()
    assert outcome == ["bob"]
    assert "read again (1 users)" in errors()[-1] and len(errors()) == 3
    users.write_text("bob:plaintext\n")  # a broken edit
    for _ in range(5):
        outcome = attempt(authenticator, "bob", "builder", "192.0.2.1")
        threads.finish()
        assert outcome == ["bob"]
    assert len(errors()) == 4 and "line 1: not NAME:" in errors()[-1]


@pytest.mark.parametrize("status", [429, 503])
def test_the_gate_answers_refusals_with_retry_after(setup, status):
    authenticator, clock, threads = setup
    root = resource.Resource()
    gate = Gate(root, authenticator)
    if status == 503:
        for i in range(4):
            attempt(authenticator, "mallory", f"guess {i}", f"198.51.100.{i}")
    else:
        for i in range(4):
            attempt(authenticator, "mallory", f"guess {i}", "203.0.113.5")
            threads.finish()
    request = DummyRequest([b"index.html"])
    request.uri = b"/index.html"
    request.client = IPv4Address("TCP", "203.0.113.5", 40000)
    request.requestHeaders.setRawHeaders(b"authorization", [basic("carol", "singer")])
    request.render(resource.getChildForRequest(gate, request))
    assert request.responseCode == status
    assert request.responseHeaders.getRawHeaders(b"retry-after") == [b"1"]
    challenge = request.responseHeaders.getRawHeaders(b"www-authenticate")
    assert challenge == ([b'Basic realm="pistream"'] if status == 429 else None)
    assert b"".join(request.written).startswith(b"%d " % status)


class Page(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"the page"


@pytest.mark.parametrize("user, password", [("carol", "singer"), ("carol", "wrong")])
def test_a_request_gone_while_its_password_is_hashed_is_let_go_quietly(setup, user, password):
    # The client hangs up while its password is hashed (slow on a Pi, and
    # the hashing is niced): once the hash is done there is no one to
    # answer, and nothing is written, logged as an error, or left failing.
    authenticator, clock, threads = setup
    root = resource.Resource()
    root.putChild(b"index.html", Page())
    site = server.Site(Gate(root, authenticator))
    channel = site.buildProtocol(IPv4Address("TCP", "203.0.113.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.7", 40000))
    channel.makeConnection(transport)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        channel.dataReceived(b"GET /index.html HTTP/1.1\r\nHost: camera\r\nAuthorization: "
                             + basic(user, password) + b"\r\n\r\n")
        assert len(threads.waiting) == 1 and transport.value() == b""
        channel.connectionLost(Failure(ConnectionDone()))
        threads.finish()
        gc.collect()  # (an unhandled failure left in a Deferred is logged when it goes)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.value() == b""
    assert [e for e in events if e.get("log_failure") is not None
            or e["log_level"] in (LogLevel.error, LogLevel.critical)] == []
