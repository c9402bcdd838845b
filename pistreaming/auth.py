"""Who may watch: HTTP Basic authentication against a file of salted hashes.

The password file has a line per user, ``name:hash``, where the hash is
``pbkdf2-sha256$ITERATIONS$SALT$KEY`` (salt and key in unpadded base64);
``pistream-passwd`` (pistreaming.passwd) writes it.  The daemon reads it
again when it changes, so users can be added without a restart.  If it is
deleted or goes bad while the daemon runs (a broken edit), the users read
before stay and keep working: the daemon logs an error at once, again at
most once a minute while logins go on and the file stays bad, and a line
when it reads the file fine again.

The checking is Twisted's cred: a Portal with a credentials checker for
IUsernamePassword, and a realm that hands out the protected resource.
:class:`Gate` stands in front of the whole site (page, player, stats and
the stream at /stream); the stream's own port asks the same
:class:`Authenticator` during the WebSocket handshake.

A wrong or missing password gets 401 at once; wrong ones are logged with
the address and user name.  Checking a password costs a hash of
``ITERATIONS`` rounds on a thread (hashlib releases the GIL; the daemon's
threads for it are nicer than the stream's: pistreaming.lowpriority), so
what may be hashed is decided *before* hashing, and anything over a limit
is answered at once without hashing:

* An address (counted by :func:`pistreaming.admission.address_key`: an
  IPv6 address by its /64, which one host can rotate through) that failed
  more than ``FREE_FAILURES`` times in ``FAILURE_WINDOW`` is refused with
  :class:`TooManyAttempts` (429, ``Retry-After``) until its back-off is over:
  1 s after its 4th failure, then 2, 4, 8, up to ``MAX_DELAY`` seconds,
  counted from its last failure.
* At most ``CHECKS_PER_ADDRESS`` checks from one address may be hashing or
  waiting for a thread at once (429, ``Retry-After: 1``), and at most
  ``CHECKS`` from all addresses together (503, ``Retry-After: 1``): the
  hashing never queues without bound, and guesses from many addresses
  cannot take all the threads.
* A user's name does not show in the answer time: an unknown name is
  hashed against a stored hash made up at start (same iterations as the
  file's users, a random key no password gives), through the same limits.
* A password found right is remembered (as a keyed hash) for ``REMEMBER``
  seconds, so that a page's requests do not each pay for the hashing; the
  same name and password arriving while they are being hashed wait for
  that one hash instead of starting another (such a wait still counts
  among the address's checks, unless the user logged in from there before).

A user who logged in before keeps working while someone else guesses.  The
pair of an address (its key) and a user name that logged in successfully is
remembered for ``TRUST`` seconds (the ``TRUSTED_PAIRS`` most recent).  For
such a pair, failures are counted twice: for the address, as always, and
for the pair itself; the pair is refused only when the *pair* failed too
often, so guesses under other names from its address (a shared NAT, the
same /64) do not lock it out.  Guessing that user's own password from that
address still meets the pair's back-off, so it is no faster than anywhere
else (we cannot tell the user from a guesser before hashing, so such a
guesser does hold that user up).  Known pairs also have ``RESERVED_CHECKS``
checks of their own beyond ``CHECKS``, so that a flood of guesses from
elsewhere cannot make them wait or get 503.  A name that never logged in
from an address that is failing is refused like any attempt from it: until
the password is hashed it is indistinguishable from the next guess.  The
remembered-password shortcut comes after the back-off check, so it cannot
be used to test guesses without limit.

Refusals are logged once when a run of them starts at an address (or
overall, for 503), then as a count at most once a minute while they go on.
"""

import base64
import binascii
import collections
import hashlib
import hmac
import math
import os
import secrets
import time

from twisted.cred import credentials as creds
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server, util
from twisted.web.guard import BasicCredentialFactory
from zope.interface import implementer

from pistreaming.admission import address_key

SCHEME = "pbkdf2-sha256"
ITERATIONS = 200_000
REALM = b"pistream"

#: How long a password found right is remembered (seconds).
REMEMBER = 600.0
#: Failures from one address within this many seconds count together...
FAILURE_WINDOW = 300.0
#: ...and past this many, the address is refused for 1 s, 2 s, 4 s... up to
#: MAX_DELAY after its last failure.
FREE_FAILURES = 3
MAX_DELAY = 16.0
#: Password checks one address may have hashing or waiting for a thread at once...
CHECKS_PER_ADDRESS = 2
#: ...and all addresses together (about the cores a Pi has).
CHECKS = 4
#: Further checks only for users who logged in from their address before.
RESERVED_CHECKS = 2
#: How long (seconds) a user who logged in from an address is known there,
#: and how many such pairs are kept (the most recent).
TRUST = 30 * 86400.0
TRUSTED_PAIRS = 1000
#: A password file gone bad is reported at most this often (seconds)...
COMPLAIN_EVERY = 60.0
#: ...and so are the counts of refused attempts.
REFUSALS_EVERY = 60.0
#: Addresses whose failures (or refusals) are kept track of, at most.
TRACKED = 10_000

log = Logger()


class PasswordFileError(Exception):
    """The password file cannot be read or is not in the expected form."""


class TooManyAttempts(cred_error.UnauthorizedLogin):
    """Refused before the password was looked at.

    C{status} is 429 (this address failed too often lately, or has too many
    checks under way) or 503 (too many checks under way in all);
    C{retry_after} is the whole seconds until it may try again (at least 1).
    A subclass of UnauthorizedLogin, so that code that only knows that still
    refuses; it should answer with C{status} and a C{Retry-After} header."""

    def __init__(self, status, retry_after, reason):
        super().__init__(reason)
        self.status = status
        self.retry_after = max(1, int(retry_after))
        self.reason = reason


def _b64(data):
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text):
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password, salt=None, iterations=ITERATIONS):
    """The stored form of C{password} (str): a fresh salt unless given."""
    salt = os.urandom(16) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{SCHEME}${iterations}${_b64(salt)}${_b64(key)}"


def verify_password(password, stored):
    """Whether C{password} matches the stored hash (a constant-time compare)."""
    try:
        scheme, iterations, salt, key = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = _unb64(key)
        got = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), _unb64(salt),
                                  int(iterations))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, expected)


def parse_password_file(text, path="password file"):
    """{user: stored hash} from the file's text; PasswordFileError if malformed."""
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        parts = stored.split("$")
        if not sep or not user or len(parts) != 4 or parts[0] != SCHEME \
                or not parts[1].isdigit():
            raise PasswordFileError(
                f"{path}, line {number}: not NAME:{SCHEME}$ITERATIONS$SALT$KEY "
                "(write it with pistream-passwd)")
        users[user] = stored
    return users


class PasswordFile:
    """A password file, read again whenever it changes on disk.

    C{clock} (an IReactorTime; the Authenticator gives it its reactor if
    none) times the complaints about a file gone bad."""

    def __init__(self, path, clock=None):
        self.path = os.path.abspath(path)
        self.clock = clock
        self._stamp = None
        self._bad = None  # (stamp, error) of a version of the file found malformed
        self._users = {}
        self._broken_since = None
        self._complained = None
        self._read()  # a missing or malformed file is an error at start

    def _now(self):
        return self.clock.seconds() if self.clock is not None else time.monotonic()

    def _read(self):
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return
            if self._bad is not None and self._bad[0] == stamp:
                raise PasswordFileError(self._bad[1])  # not parsed again for each login
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PasswordFileError(f"{self.path}: {(e.strerror or str(e)).lower()}") from None
        except UnicodeDecodeError:
            error = f"{self.path}: not UTF-8 text"
            self._bad = (stamp, error)
            raise PasswordFileError(error) from None
        try:
            self._users = parse_password_file(text, self.path)
        except PasswordFileError as e:
            self._bad = (stamp, str(e))
            raise
        self._stamp = stamp
        self._bad = None

    def users(self):
        """{user: stored hash}; if the file went bad, the last good contents."""
        try:
            self._read()
        except PasswordFileError as e:
            self._complain(str(e))
        else:
            if self._broken_since is not None:
                self._broken_since = None
                log.info("password file {path}: read again ({count} users)", path=self.path,
                         count=len(self._users))
        return self._users

    def _complain(self, error):
        now = self._now()
        if self._broken_since is None:
            self._broken_since = now
        elif now - self._complained < COMPLAIN_EVERY:
            return
        self._complained = now
        log.error("password file: {error}; keeping the {count} users read before "
                  "(said at most once a minute)", error=error, count=len(self._users))


def _usual_iterations(users):
    counts = collections.Counter()
    for stored in users.values():
        parts = stored.split("$")
        if len(parts) == 4 and parts[1].isdigit():
            counts[int(parts[1])] += 1
    return counts.most_common(1)[0][0] if counts else ITERATIONS


class _Attempt:
    __slots__ = ("name", "password", "token", "stored", "known")

    def __init__(self, name, password, token, stored, known):
        self.name, self.password, self.token = name, password, token
        self.stored, self.known = stored, known


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Twisted cred checker: usernames and passwords against a PasswordFile.

    C{run_in_thread(f, *args)} runs the hashing and returns a Deferred of its
    result; by default it is the reactor's thread pool."""

    credentialInterfaces = (creds.IUsernamePassword,)

    def __init__(self, password_file, reactor, remember=REMEMBER, run_in_thread=None):
        self.password_file = password_file
        self.reactor = reactor
        self.remember = remember
        if run_in_thread is None:
            def run_in_thread(f, *args):
                return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        self.run_in_thread = run_in_thread
        self._key = secrets.token_bytes(32)
        # What an unknown user is checked against: no password gives this key.
        self._dummy_salt = _b64(os.urandom(16))
        self._dummy_key = _b64(os.urandom(32))
        self._iterations = (None, ITERATIONS)  # (users dict, its usual iteration count)
        self._known = {}  # keyed hash of user and password -> until when
        self._checking = {}  # keyed hash -> Deferreds waiting for the hash under way

    def _token(self, username, password):
        return hmac.new(self._key, username + b"\0" + password, hashlib.sha256).digest()

    def _dummy(self, users):
        if self._iterations[0] is not users:
            self._iterations = (users, _usual_iterations(users))
        return f"{SCHEME}${self._iterations[1]}${self._dummy_salt}${self._dummy_key}"

    def _attempt(self, credentials):
        username, password = credentials.username, credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        try:
            name = username.decode("utf-8")
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return None
        users = self.password_file.users()
        stored = users.get(name)
        known = stored is not None
        if not known:
            stored = self._dummy(users)
        token = self._token(username, password + stored.encode())
        return _Attempt(name, text, token, stored, known)

    def work(self, credentials):
        """What checking C{credentials} takes: "remembered" (the password is
        remembered as right), "joining" (the same name and password are
        being hashed now: it waits for that) or "hash"."""
        attempt = self._attempt(credentials)
        if attempt is None:
            return "hash"  # refused without hashing, but counted like a check
        if self._known.get(attempt.token, 0) > self.reactor.seconds() and attempt.known:
            return "remembered"
        return "joining" if attempt.token in self._checking else "hash"

    def requestAvatarId(self, credentials):
        attempt = self._attempt(credentials)
        if attempt is None:
            return defer.fail(cred_error.UnauthorizedLogin())
        now = self.reactor.seconds()
        token = attempt.token
        if self._known.get(token, 0) > now and attempt.known:
            return defer.succeed(attempt.name)
        if token in self._checking:
            waiting = defer.Deferred()
            self._checking[token].append(waiting)
            return waiting
        self._checking[token] = []
        d = defer.maybeDeferred(self.run_in_thread, verify_password, attempt.password,
                                attempt.stored)

        def checked(result):
            waiting = self._checking.pop(token, [])
            if isinstance(result, Failure):
                outcome = result
            elif result is True and attempt.known:
                self._forget_old(now)
                self._known[token] = self.reactor.seconds() + self.remember
                outcome = attempt.name
            else:
                outcome = Failure(cred_error.UnauthorizedLogin())
            for other in waiting:
                if isinstance(outcome, Failure):
                    other.errback(outcome)
                else:
                    other.callback(outcome)
            return outcome

        return d.addBoth(checked)

    def _forget_old(self, now):
        if len(self._known) > 1000:
            self._known = {k: v for k, v in self._known.items() if v > now}


@implementer(IRealm)
class SiteRealm:
    """Every user who logs in gets the whole site."""

    def __init__(self, root):
        self.root = root

    def requestAvatar(self, avatarId, mind, *interfaces):
        if resource.IResource in interfaces:
            return resource.IResource, self.root, lambda: None
        raise NotImplementedError()


def _delay(count):
    """How long an address that failed C{count} times is refused after its last failure."""
    return 0.0 if count <= FREE_FAILURES else min(MAX_DELAY, 2.0 ** (count - FREE_FAILURES - 1))


def _printable(text, limit=64):
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class _Refusals:
    __slots__ = ("address", "count", "since")

    def __init__(self, address, since):
        self.address, self.count, self.since = address, 0, since


class Authenticator:
    """Checks the Authorization header of a request or a WebSocket handshake,
    logs failures with their address, refuses addresses that keep failing,
    and keeps the hashing to a few checks at a time (see the module's
    docstring)."""

    def __init__(self, password_file, reactor, run_in_thread=None, checks=CHECKS,
                 checks_per_address=CHECKS_PER_ADDRESS, reserved_checks=RESERVED_CHECKS):
        self.reactor = reactor
        if getattr(password_file, "clock", False) is None:
            password_file.clock = reactor
        self.checker = PasswordFileChecker(password_file, reactor, run_in_thread=run_in_thread)
        self.factory = BasicCredentialFactory(REALM)
        self.checks = checks
        self.checks_per_address = checks_per_address
        self.reserved_checks = reserved_checks
        #: address key, or (address key, user) for a known pair -> failure times
        self.failures = collections.OrderedDict()
        #: (address key, user) that logged in -> until when it is known
        self.trusted = collections.OrderedDict()
        self.checking = {}  # address key or known pair -> checks under way
        self.shared = 0  # checks under way within CHECKS
        self.reserved = 0  # checks under way within RESERVED_CHECKS
        self.refusals = {}  # address key, pair or "overall" -> _Refusals
        self._summing_up = None

    def challenge(self):
        return b"Basic realm=\"" + REALM + b"\""

    def _decode(self, authorization):
        if not authorization:
            return None
        scheme, _, response = authorization.partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            return self.factory.decode(response.strip(), None)
        except cred_error.LoginFailed:
            return None

    def authenticate(self, authorization, address, what, login=None):
        """A Deferred: what C{login} gives for the credentials in
        C{authorization} (the header's value; by default the user's name).
        It fails with UnauthorizedLogin (401) if they are missing or wrong,
        or with L{TooManyAttempts} (429 or 503, C{retry_after} seconds) if
        they were not checked: see the module's docstring."""
        credentials = self._decode(authorization)
        if credentials is None:
            # No credentials yet: what a browser's first request looks like
            # (the 401 makes it ask).  Answered at once, not counted.
            log.info("{what} from {address} without credentials: 401", what=what,
                     address=address)
            return defer.fail(cred_error.UnauthorizedLogin())
        username = credentials.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        key = address_key(address)
        now = self.reactor.seconds()
        trusted = self._is_trusted((key, username), now)
        bucket = (key, username) if trusted else key
        wait = self._backoff(bucket, now)
        if wait:
            return self._refuse(bucket, address, username, trusted, what, TooManyAttempts(
                429, wait, "too many failed attempts"))
        work = getattr(self.checker, "work", None)
        work = "hash" if work is None else work(credentials)
        slot = None
        if work == "hash" or (work == "joining" and not trusted):
            slot = self._take_slot(bucket, trusted, hashing=work == "hash")
            if isinstance(slot, TooManyAttempts):
                return self._refuse("overall" if slot.status == 503 else bucket, address,
                                    username, trusted, what, slot)
        d = defer.maybeDeferred(login or self.checker.requestAvatarId, credentials)
        if slot is not None:
            d.addBoth(self._release, bucket, slot)
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(key, username),
                       errbackArgs=(address, key, username, trusted, what, work == "hash"))
        return d

    # -- who is known where ------------------------------------------------

    def _is_trusted(self, pair, now):
        until = self.trusted.get(pair)
        if until is None:
            return False
        if until <= now:
            del self.trusted[pair]
            return False
        return True

    def _succeeded(self, result, key, username):
        pair = (key, username)
        self.trusted[pair] = self.reactor.seconds() + TRUST
        self.trusted.move_to_end(pair)
        while len(self.trusted) > TRUSTED_PAIRS:
            self.trusted.popitem(last=False)
        self.failures.pop(pair, None)  # the user got it right in the end
        return result

    # -- failures and back-off -----------------------------------------------

    def _recent(self, bucket, now):
        times = self.failures.get(bucket)
        if times is None:
            return None
        while times and times[0] <= now - FAILURE_WINDOW:
            times.popleft()
        if not times:
            del self.failures[bucket]
            return None
        return times

    def _backoff(self, bucket, now):
        """Whole seconds until C{bucket} may try again, or 0 if it may now."""
        times = self._recent(bucket, now)
        if times is None or len(times) <= FREE_FAILURES:
            return 0
        until = times[-1] + _delay(len(times))
        return math.ceil(until - now) if until > now else 0

    def _count_failure(self, bucket, now):
        times = self._recent(bucket, now)
        if times is None:
            times = self.failures[bucket] = collections.deque()
        times.append(now)
        self.failures.move_to_end(bucket)
        # Forget the addresses that have been quiet the longest: those quiet
        # for a minute are past their back-off, and there are at most TRACKED.
        while self.failures:
            oldest, old_times = next(iter(self.failures.items()))
            if len(self.failures) <= TRACKED and old_times[-1] >= now - 60:
                break
            del self.failures[oldest]
        return len(times)

    def _failed(self, failure, address, key, username, trusted, what, counted):
        failure.trap(cred_error.UnauthorizedLogin)
        if failure.check(TooManyAttempts) or not counted:
            # Refused (logged already), or it shared the hash of a check
            # under way, which counts and logs it.
            return failure
        now = self.reactor.seconds()
        count = self._count_failure(key, now)
        if trusted:
            count = self._count_failure((key, username), now)
        delay = _delay(count)
        user = "user " + _printable(username)
        if trusted:
            user += ", who logged in from there before"
        log.warn("authentication failed for {what} from {address} ({user}; wrong {count} "
                 "times in {window:.0f} min){refusing}", what=what, address=address,
                 user=user, count=count, window=FAILURE_WINDOW / 60,
                 refusing=f"; refusing it for {delay:g}s" if delay else "")
        return failure

    # -- checks under way ------------------------------------------------------

    def _take_slot(self, bucket, trusted, hashing):
        """"shared", "reserved" or (if it is to wait for a hash under way,
        not C{hashing}) "joining", now counted; or the TooManyAttempts to
        answer."""
        held = self.checking.get(bucket, 0)
        if held >= self.checks_per_address:
            return TooManyAttempts(429, 1, "too many password checks at once")
        if not hashing:
            slot = "joining"
        elif self.shared < self.checks:
            self.shared += 1
            slot = "shared"
        elif trusted and self.reserved < self.reserved_checks:
            self.reserved += 1
            slot = "reserved"
        else:
            return TooManyAttempts(503, 1, "too many password checks at once")
        self.checking[bucket] = held + 1
        return slot

    def _release(self, result, bucket, slot):
        held = self.checking.pop(bucket, 0)
        if held > 1:
            self.checking[bucket] = held - 1
        if slot == "shared":
            self.shared -= 1
        elif slot == "reserved":
            self.reserved -= 1
        return result

    # -- refusals ----------------------------------------------------------------

    def _refuse(self, bucket, address, username, trusted, what, error):
        now = self.reactor.seconds()
        if bucket not in self.refusals and len(self.refusals) >= TRACKED:
            bucket = "overall"  # too many to name: counted together
        refusals = self.refusals.get(bucket)
        if refusals is None:
            if bucket == "overall":
                name = "all addresses" if error.status == 503 else "many addresses"
            else:
                name = address + (f" (user {_printable(username)})" if trusted else "")
            refusals = self.refusals[bucket] = _Refusals(name, now)
            if error.status == 503:
                log.warn("authentication for {what} from {address}: {checks} password checks "
                         "under way, the most there may be; answering 503 to more",
                         what=what, address=address, checks=self.shared + self.reserved)
            else:
                log.warn("authentication for {what} from {address}: {reason}; refusing for "
                         "{seconds}s", what=what, address=refusals.address,
                         reason=error.reason, seconds=error.retry_after)
            if self._summing_up is None:
                self._summing_up = self.reactor.callLater(REFUSALS_EVERY, self._sum_up)
        refusals.count += 1
        return defer.fail(error)

    def _sum_up(self):
        """Log how many attempts were refused in the last minute, per address;
        forget the addresses that were not refused any more."""
        self._summing_up = None
        now = self.reactor.seconds()
        for bucket, refusals in list(self.refusals.items()):
            if refusals.count:
                log.warn("authentication from {address}: refused {count} attempts in the "
                         "last {seconds:.0f}s (too many)", address=refusals.address,
                         count=refusals.count, seconds=now - refusals.since)
                refusals.count = 0
                refusals.since = now
            else:
                del self.refusals[bucket]
        if self.refusals:
            self._summing_up = self.reactor.callLater(REFUSALS_EVERY, self._sum_up)


class Gate(resource.Resource):
    """Stands in front of the site: only requests with the right credentials
    reach it; others get 401 with a Basic challenge, or 429/503 with
    Retry-After if they were refused without being checked."""

    def __init__(self, root, authenticator):
        super().__init__()
        self.authenticator = authenticator
        self.portal = Portal(SiteRealm(root), [authenticator.checker])
        self.root = root

    def _guarded(self, request):
        # A client may hang up while its password is hashed: then there is
        # no one to answer (Twisted refuses to finish such a request).
        gone = []
        request.notifyFinish().addErrback(gone.append)
        address = address_of(request.getClientAddress())
        what = request.uri.decode("ascii", "replace")[:200]
        d = self.authenticator.authenticate(
            request.getHeader(b"authorization"), address, what,
            login=lambda credentials: self.portal.login(credentials, None, resource.IResource))

        def allowed(login):
            interface, avatar, logout = login
            return avatar

        def refused(failure):
            failure.trap(cred_error.UnauthorizedLogin)
            if failure.check(TooManyAttempts):
                error = failure.value
                return Refused(error.status, error.retry_after,
                               self.authenticator.challenge() if error.status == 429 else None)
            return Unauthorized(self.authenticator.challenge())

        def answer(child):
            return _Gone() if gone else child

        return util.DeferredResource(d.addCallbacks(allowed, refused).addCallback(answer))

    def getChildWithDefault(self, path, request):
        # The whole path is left for the site behind the gate.
        request.postpath.insert(0, request.prepath.pop())
        return self._guarded(request)

    def render(self, request):
        return self._guarded(request).render(request)


class _Gone(resource.Resource):
    """What a request whose client hung up meanwhile is given: nothing."""

    isLeaf = True

    def render(self, request):
        return server.NOT_DONE_YET


def _plain(request, status, body):
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    return b"" if request.method == b"HEAD" else body


class Unauthorized(resource.Resource):
    isLeaf = True

    def __init__(self, challenge):
        super().__init__()
        self.challenge = challenge

    def render(self, request):
        request.setHeader(b"www-authenticate", self.challenge)
        return _plain(request, 401, b"401 this camera needs a user name and password\n")


class Refused(resource.Resource):
    """429 (with the Basic challenge, so browsers keep asking) or 503 for a
    login refused before it was checked, with Retry-After."""

    isLeaf = True

    def __init__(self, status, retry_after, challenge=None):
        super().__init__()
        self.status = status
        self.retry_after = retry_after
        self.challenge = challenge

    def render(self, request):
        request.setHeader(b"retry-after", b"%d" % self.retry_after)
        if self.challenge is not None:
            request.setHeader(b"www-authenticate", self.challenge)
        if self.status == 429:
            body = b"429 too many attempts; try again in %d s\n" % self.retry_after
        else:
            body = b"503 too busy checking passwords; try again in %d s\n" % self.retry_after
        return _plain(request, self.status, body)


def address_of(peer):
    """The host of a Twisted address (IPv4Address, IPv6Address; anything else
    as text): what failures are logged with (and, by their
    L{address_key}, counted by)."""
    return getattr(peer, "host", str(peer))
