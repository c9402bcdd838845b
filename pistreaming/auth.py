"""Who may watch: HTTP Basic authentication against a file of salted hashes.

The password file has a line per user, ``name:hash``, where the hash is
``pbkdf2-sha256$ITERATIONS$SALT$KEY`` (salt and key in unpadded base64);
``pistream-passwd`` (pistreaming.passwd) writes it.  The daemon reads it
again when it changes, so users can be added without a restart.

The checking is Twisted's cred: a Portal with a credentials checker for
IUsernamePassword, and a realm that hands out the protected resource.
:class:`Gate` stands in front of the whole site (page, player, stats and
the stream at /stream); the stream's own port asks the same
:class:`Authenticator` during the WebSocket handshake.

A wrong or missing password gets 401 and is logged with the address it came
from; an address that keeps giving wrong passwords waits longer and longer
for each answer (up to ``MAX_DELAY`` seconds), which slows guessing down
without blocking anyone else.  Hashing runs on a thread (hashlib releases the GIL),
and a password that was right is remembered (as a keyed hash) for a while,
so that a page's requests do not each pay for the hashing.
"""

import base64
import binascii
import collections
import hashlib
import hmac
import os
import secrets

from twisted.cred import credentials as creds
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web import resource, util
from twisted.web.guard import BasicCredentialFactory
from zope.interface import implementer

SCHEME = "pbkdf2-sha256"
ITERATIONS = 200_000
REALM = b"pistream"

#: How long a password found right is remembered (seconds).
REMEMBER = 600.0
#: Failures from one address within this many seconds count together...
FAILURE_WINDOW = 300.0
#: ...and past this many, each answer is delayed: 1 s, 2 s, 4 s... up to MAX_DELAY.
FREE_FAILURES = 3
MAX_DELAY = 16.0

log = Logger()


class PasswordFileError(Exception):
    """The password file cannot be read or is not in the expected form."""


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
    """A password file, read again whenever it changes on disk."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self._stamp = None
        self._users = {}
        self.users()  # a missing or malformed file is an error at start

    def _read(self):
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PasswordFileError(f"{self.path}: {e.strerror.lower()}") from None
        self._users = parse_password_file(text, self.path)
        self._stamp = stamp

    def users(self):
        """{user: stored hash}; if the file went bad, the last good contents."""
        if self._stamp is None:
            self._read()
        else:
            try:
                self._read()
            except PasswordFileError as e:
                log.error("password file: {error}; keeping the users read before",
                          error=str(e))
        return self._users


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Twisted cred checker: usernames and passwords against a PasswordFile."""

    credentialInterfaces = (creds.IUsernamePassword,)

    def __init__(self, password_file, reactor, remember=REMEMBER):
        self.password_file = password_file
        self.reactor = reactor
        self.remember = remember
        self._key = secrets.token_bytes(32)
        self._known = {}  # keyed hash of user and password -> until when

    def _token(self, username, password):
        return hmac.new(self._key, username + b"\0" + password, hashlib.sha256).digest()

    def requestAvatarId(self, credentials):
        username, password = credentials.username, credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        try:
            name = username.decode("utf-8")
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return defer.fail(cred_error.UnauthorizedLogin())
        stored = self.password_file.users().get(name)
        if stored is None:
            return defer.fail(cred_error.UnauthorizedLogin())
        now = self.reactor.seconds()
        token = self._token(username, password + stored.encode())
        if self._known.get(token, 0) > now:
            return defer.succeed(name)
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                              verify_password, text, stored)

        def checked(ok):
            if not ok:
                raise cred_error.UnauthorizedLogin()
            self._forget_old(now)
            self._known[token] = now + self.remember
            return name

        return d.addCallback(checked)

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


class Authenticator:
    """Checks the Authorization header of a request or a WebSocket handshake,
    logs failures with their address, and slows down addresses that keep
    failing."""

    def __init__(self, password_file, reactor):
        self.reactor = reactor
        self.checker = PasswordFileChecker(password_file, reactor)
        self.factory = BasicCredentialFactory(REALM)
        self.failures = collections.defaultdict(collections.deque)  # address -> times

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
        C{authorization} (the header's value; by default the user's name),
        or it fails with UnauthorizedLogin, late if C{address} keeps failing."""
        credentials = self._decode(authorization)
        if credentials is None:
            d = defer.fail(cred_error.UnauthorizedLogin())
        else:
            d = defer.maybeDeferred(login or self.checker.requestAvatarId, credentials)
        d.addErrback(self._failed, address, what,
                     credentials.username if credentials is not None else None)
        return d

    def _failed(self, failure, address, what, username):
        failure.trap(cred_error.UnauthorizedLogin)
        if username is None:
            # No credentials yet: what a browser's first request looks like
            # (the 401 makes it ask).  Answered at once, not counted.
            log.info("{what} from {address} without credentials: 401", what=what,
                     address=address)
            return failure
        now = self.reactor.seconds()
        times = self.failures[address]
        while times and times[0] < now - FAILURE_WINDOW:
            times.popleft()
        times.append(now)
        if len(self.failures) > 10_000:  # many addresses: forget the quiet ones
            for other in [a for a, t in self.failures.items() if not t or t[-1] < now - 60]:
                del self.failures[other]
        count = len(times)
        delay = 0.0 if count <= FREE_FAILURES else min(MAX_DELAY, 2.0 ** (count - FREE_FAILURES - 1))
        user = "user " + username.decode("utf-8", "replace")[:64]
        log.warn("authentication failed for {what} from {address} ({user}; wrong {count} "
                 "times in {window:.0f} min){delayed}", what=what, address=address,
                 user=user, count=count, window=FAILURE_WINDOW / 60,
                 delayed=f"; answering in {delay:g}s" if delay else "")
        d = defer.Deferred()
        self.reactor.callLater(delay, d.errback, failure)
        return d


class Gate(resource.Resource):
    """Stands in front of the site: only requests with the right credentials
    reach it; others get 401 with a Basic challenge."""

    def __init__(self, root, authenticator):
        super().__init__()
        self.authenticator = authenticator
        self.portal = Portal(SiteRealm(root), [authenticator.checker])
        self.root = root

    def _guarded(self, request):
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
            return Unauthorized(self.authenticator.challenge())

        return util.DeferredResource(d.addCallbacks(allowed, refused))

    def getChildWithDefault(self, path, request):
        # The whole path is left for the site behind the gate.
        request.postpath.insert(0, request.prepath.pop())
        return self._guarded(request)

    def render(self, request):
        return self._guarded(request).render(request)


class Unauthorized(resource.Resource):
    isLeaf = True

    def __init__(self, challenge):
        super().__init__()
        self.challenge = challenge

    def render(self, request):
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", self.challenge)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        body = b"401 this camera needs a user name and password\n"
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body


def address_of(peer):
    """The host of a Twisted address (IPv4Address, IPv6Address; anything else
    as text): what failures are counted by and logs name."""
    return getattr(peer, "host", str(peer))
