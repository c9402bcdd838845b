"""Who may watch: the WebSocket factory and protocol in front of the fan-out.

A viewer's connection is admitted here and then handed to the fan-out
(L{pistreaming.fanout}), which sends it the stream and knows nothing of
what follows.

The handshake is checked before anything else: its Host header must be a
name this daemon answers to (DNS rebinding; 421), then Autobahn's checks,
the Origin and the password.  Every refusal is an HTTP answer with a fixed
status line and the standard headers.  On the stream's own port, a
connection that has not sent its whole request yet is *pending*
(L{pistreaming.admission}); connections over its caps are dropped at once.
Past C{--max-viewers}, an opened WebSocket is closed at once (1013).

Viewers have nothing to say.  Every frame a viewer sends counts (messages'
frames, continuations, pings, pongs, closes), and so does every byte: one
that sends more than FLOOD_FRAMES frames in FLOOD_WINDOW seconds, or more
than INCOMING_RATE bytes a second (averaged, INCOMING_BURST at once), is
closed with 1008 and what it sends next is not even parsed.
"""

import collections
import math

from urllib.parse import urlsplit

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.cred.error import UnauthorizedLogin
from twisted.logger import Logger
from twisted.web import http

from pistreaming import auth
from pistreaming.admission import address_key
from pistreaming.auth import address_of
from pistreaming.fanout import CLOSE_POLICY, Fanout
from pistreaming.hosts import HostPolicy, host_name

#: Viewers never need to send anything; anything bigger than this is refused.
MAX_INCOMING = 4096

#: The subprotocol of clients (the page) that also want status messages:
#: JSON text messages such as {"viewers": 3} or {"camera": "unavailable", ...}.
STATUS_PROTOCOL = "pistream"

CLOSE_TRY_AGAIN_LATER = 1013

#: A viewer that sends more than this many frames of any kind (a browser
#: sends a pong every autoPingInterval, 10 s) in FLOOD_WINDOW seconds is
#: closed: viewers have nothing to say.
FLOOD_FRAMES = 20
FLOOD_WINDOW = 10.0

#: Bytes a second a viewer may send, on average (a token bucket that holds
#: INCOMING_BURST bytes, two seconds' worth): a browser sends a pong now
#: and then and its close, a few bytes each.  The handshake counts too.
INCOMING_RATE = 16 * 1024
INCOMING_BURST = 32 * 1024

#: The handshake's request line and headers, at most (Twisted Web's limit).
MAX_REQUEST = 16 * 1024

#: The fixed reason phrase of each status a refused handshake may get;
#: nothing the client sent goes into the status line.
REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 421: "Misdirected Request", 426: "Upgrade Required",
    429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
SERVER = "pistream"

# Module-level: Autobahn's classes carry their own (level-filtered) loggers in
# a class attribute named "log", which must not be replaced.
log = Logger(namespace="pistreaming.broadcast")



def origin_matches_host(origin, host):
    """Whether a browser's Origin header names the same site as the Host
    header of the request (the page's own origin).  A port is compared when
    either side gives one; the scheme only sets the default port."""
    try:
        parts = urlsplit(origin)
        origin_host, origin_port = parts.hostname, parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not origin_host:
        return False
    default = 443 if parts.scheme == "https" else 80
    origin_port = origin_port or default
    try:
        host_parts = urlsplit("//" + host)
        host_name, host_port = host_parts.hostname, host_parts.port
    except ValueError:
        return False
    if not host_name or host_name != origin_host.lower():
        return False
    if host_port is None:
        # No port in Host: the request came to the scheme's default port (or
        # through a proxy that dropped it); the origin must use a default one.
        return origin_port in (80, 443)
    return host_port == origin_port


def printable(text, limit=200):
    """C{text} (str or bytes) as printable ASCII, at most C{limit}
    characters: what a client sent, made safe for an answer or a log."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    text = "".join(c if " " <= c <= "~" else "?" for c in str(text))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def came_through_http_port(transport, factory):
    """Whether the connection of C{transport} was accepted by the HTTP port
    (its request already read by the web server's channel and handed over by
    Autobahn's WebSocketResource) rather than by C{factory}'s own port.

    The factory of the listening port that accepted it tells: a TCP
    transport's port (C{server}), or a TLS transport's wrapping factory.
    When neither is there (other transports), the web server's channel
    being the transport's producer tells."""
    port = getattr(transport, "server", None)
    accepted_by = getattr(port, "factory", None)
    if accepted_by is None and hasattr(getattr(transport, "factory", None), "wrappedFactory"):
        accepted_by = transport.factory  # TLS: TLSMemoryBIOFactory
    while hasattr(accepted_by, "wrappedFactory"):
        accepted_by = accepted_by.wrappedFactory
    if accepted_by is not None:
        return accepted_by is not factory
    producer = getattr(transport, "producer", None)
    producer = getattr(producer, "_producer", producer)  # TLS's membrane
    return isinstance(producer, http.HTTPChannel)


class _Call:
    """One timer of L{ReactorTimers}: Autobahn may cancel it after it ran."""

    __slots__ = ("function", "args", "kwargs", "bucket")

    def __init__(self, function, args, kwargs, bucket):
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.bucket = bucket

    def cancel(self):
        bucket, self.bucket = self.bucket, None
        self.function = self.args = self.kwargs = None
        if bucket is not None:
            bucket.cancelled()


class _Bucket:
    """The timers due at the end of one bucket, and the reactor's call that
    runs them (cancelled once none is left)."""

    __slots__ = ("timers", "number", "calls", "live", "delayed")

    def __init__(self, timers, number):
        self.timers = timers
        self.number = number
        self.calls = []
        self.live = 0
        self.delayed = None

    def cancelled(self):
        self.live -= 1
        if not self.live:
            if self.delayed is not None and self.delayed.active():
                self.delayed.cancel()
            self.timers._forget(self)


class ReactorTimers:
    """Autobahn's protocol timers (the opening handshake's timeout, the
    close's, the pings) on the factory's reactor, in batches: Autobahn's own
    batched timer uses txaio's global reactor, which a test's clock is not.

    Each timer is due at the end of the C{bucket} (seconds) it falls in, at
    most C{bucket} late and never early, and every timer of a bucket runs
    from one reactor call: with hundreds of viewers, a ping each every 10 s
    and its timeout would otherwise be as many reactor wake-ups and heap
    entries (Autobahn's own timer batches them too, by 0.2 s)."""

    bucket = 0.2

    def __init__(self, reactor, bucket=None):
        self.reactor = reactor
        if bucket is not None:
            self.bucket = bucket
        self._buckets = {}  # bucket number -> _Bucket

    def call_later(self, delay, function, *args, **kwargs):
        now = self.reactor.seconds()
        number = math.ceil((now + delay) / self.bucket - 1e-9)
        bucket = self._buckets.get(number)
        if bucket is None:
            bucket = self._buckets[number] = _Bucket(self, number)
            bucket.delayed = self.reactor.callLater(
                max(0.0, number * self.bucket - now), self._run, bucket)
        call = _Call(function, args, kwargs, bucket)
        bucket.calls.append(call)
        bucket.live += 1
        return call

    def _forget(self, bucket):
        if self._buckets.get(bucket.number) is bucket:
            del self._buckets[bucket.number]

    def _run(self, bucket):
        self._forget(bucket)
        for call in bucket.calls:
            if call.bucket is None:
                continue  # cancelled
            function, args, kwargs = call.function, call.args, call.kwargs
            call.bucket = call.function = call.args = call.kwargs = None  # ran
            try:
                function(*args, **kwargs)
            except Exception:
                log.failure("a WebSocket timer failed")


class ViewerProtocol(WebSocketServerProtocol):
    viewer = None
    #: Whether the HTTP port accepted the connection (not the stream's own).
    via_http_port = True
    wants_status = False
    #: True once the viewer went over a limit: what it sends is dropped.
    ignoring = False
    #: The address key this connection is counted as pending under, if any.
    _pending_key = None
    #: Whether the handshake's request arrived whole.
    _request_seen = False
    #: Whether the handshake was answered with an error.
    _refused = False
    #: Extra headers for the handshake's error answer (Retry-After).
    _refusal_headers = ()
    #: Whether the refusal was logged already (so failHandshake does not).
    _refusal_logged = False

    # -- the connection -------------------------------------------------

    def connectionMade(self):
        super().connectionMade()
        factory = self.factory
        now = factory.reactor.seconds()
        self._heard = collections.deque()
        self._allowance = INCOMING_BURST
        self._allowance_at = now
        self.via_http_port = factory.handing_over or came_through_http_port(
            self.transport, factory)
        pending = factory.pending
        if pending is None or self.via_http_port:
            return  # the HTTP port's channel counted it while it read the request
        key = address_key(address_of(self.transport.getPeer()))
        if pending.admit(key, self._evicted):
            self._pending_key = key
            return
        factory.refused_pending(key, address_of(self.transport.getPeer()))
        self.ignoring = True
        self._cut()

    def _cut(self, abort=True):
        """Close the connection (at once if C{abort}, else once what is
        written is sent): Autobahn's dropConnection without its log line,
        which would repeat ours (and the client's words)."""
        if self.state == WebSocketProtocol.STATE_CLOSED:
            return
        try:
            self.unregisterProducer()
        except RuntimeError:  # none registered, and the transport minds
            pass
        self.droppedByMe = True
        self.state = WebSocketProtocol.STATE_CLOSED
        txaio.resolve(self.is_closed, self)
        self._closeConnection(abort)

    def _evicted(self):
        # The longest-pending connection, closed to make room for a newer
        # one (pistreaming.admission): it has sent no whole handshake yet.
        self._pending_key = None
        self.ignoring = True
        self._cut()

    def _release_pending(self):
        key, self._pending_key = self._pending_key, None
        if key is not None:
            self.factory.pending.release(key, self._evicted)

    def connectionLost(self, reason):
        self._release_pending()
        super().connectionLost(reason)

    def dataReceived(self, data):
        if self.ignoring:
            return
        now = self.factory.reactor.seconds()
        self._allowance = min(INCOMING_BURST,
                              self._allowance + (now - self._allowance_at) * INCOMING_RATE)
        self._allowance_at = now
        self._allowance -= len(data)
        if self._allowance < 0:
            self._over_limit(f"sent more than {INCOMING_RATE // 1024} KiB/s")
            return
        super().dataReceived(data)

    def _over_limit(self, what):
        """The viewer went over a limit: it is closed (1008), and what it
        sends from now on is dropped unread.  Autobahn's close timeout
        (closeHandshakeTimeout) cuts it off if it does not close itself."""
        if self.ignoring:
            return
        self.ignoring = True
        self.data = b""
        state = self.state
        if state == WebSocketProtocol.STATE_CLOSED:
            return
        log.warn("viewer {peer} {what}; closing it", peer=self.peer, what=what)
        if state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code=CLOSE_POLICY, reasonUtf8=b"viewers do not send")
        elif state == WebSocketProtocol.STATE_CONNECTING:
            self._refusal_logged = True
            if self._request_seen:
                self.failHandshake("data before the handshake's answer", 400)
            else:
                self.failHandshake("the request is too big", 400)
        elif getattr(self, "closeHandshakeTimeoutCall", None) is None:
            self._cut()

    def onCloseHandshakeTimeout(self):
        if self.ignoring:
            # Logged already when it went over the limit.
            self.closeHandshakeTimeoutCall = None
            if self.state != WebSocketProtocol.STATE_CLOSED:
                self._cut()
            return
        super().onCloseHandshakeTimeout()

    # -- frames ---------------------------------------------------------

    def processData(self):
        if self.ignoring:
            self.data = b""
            return False
        return super().processData()

    def onFrameBegin(self):
        # Every frame counts, whatever it is (Autobahn calls this for each
        # frame header it reads, in every version from 22.7 on).
        super().onFrameBegin()
        if self.ignoring or self.state == WebSocketProtocol.STATE_CLOSED:
            return
        now = self.factory.reactor.seconds()
        heard = self._heard
        heard.append(now)
        while heard[0] <= now - FLOOD_WINDOW:
            heard.popleft()
        if len(heard) > FLOOD_FRAMES:
            self._over_limit(f"sent {len(heard)} frames in {FLOOD_WINDOW:.0f}s")

    def onMessage(self, payload, isBinary):
        pass  # viewers have nothing to say; counted as frames

    # -- the handshake --------------------------------------------------

    def processHandshake(self):
        if self._request_seen:
            return  # the request is in; its answer is on its way
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            if len(self.data) > MAX_REQUEST:
                self._request_seen = True
                self._release_pending()
                self.failHandshake("the request's headers are too big", 400)
            return
        self._request_seen = True
        self._release_pending()
        if end + 4 > MAX_REQUEST:
            return self.failHandshake("the request's headers are too big", 400)
        # The Host header, before anything else (Autobahn's own checks, the
        # Origin, the password).
        for host in self._host_values(self.data[:end]):
            if not self.factory.hosts.allows(host):
                name = printable(host_name(host) or host.strip(), 100)
                log.warn("viewer {peer}: refused a request for {host} (not a name this camera "
                         "answers to; --allow-host adds one)", peer=self.peer, host=name)
                self._refusal_logged = True
                return self.failHandshake(
                    f"misdirected request: {name} is not a name this camera answers to; "
                    "add it with --allow-host", 421)
        super().processHandshake()

    @staticmethod
    def _host_values(head):
        """The values of the Host headers in the request's head (bytes);
        [None] when there is none."""
        values = []
        for line in head.split(b"\r\n")[1:]:
            name, colon, value = line.partition(b":")
            if colon and name.strip().lower() == b"host":
                values.append(value.strip())
        return values or [None]

    def onConnect(self, request):
        factory = self.factory
        origin = request.headers.get("origin")
        if origin is not None and not factory.origin_allowed(
                origin, request.headers.get("host", "")):
            log.warn("viewer {peer}: refused a page from {origin} (not this site's origin "
                     "nor in --allow-origin)", peer=self.peer, origin=printable(origin))
            self._refusal_logged = True
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        protocol = STATUS_PROTOCOL if STATUS_PROTOCOL in request.protocols else None
        self.wants_status = protocol is not None
        if factory.authenticator is None:
            return protocol
        authorization = request.headers.get("authorization", "").encode("latin-1", "replace")
        d = factory.authenticator.authenticate(
            authorization, address_of(self.transport.getPeer()), "the stream")
        return d.addCallbacks(lambda user: protocol, self._auth_refused)

    def _auth_refused(self, failure):
        # The authenticator logs failed attempts itself.
        self._refusal_logged = True
        too_many = getattr(auth, "TooManyAttempts", None)
        if too_many is not None and failure.check(too_many):
            error = failure.value
            status = getattr(error, "status", 429)
            if status not in (429, 503):
                status = 429
            retry_after = getattr(error, "retry_after", None)
            if retry_after is not None:
                self._refusal_headers = (
                    ("Retry-After", str(max(1, int(math.ceil(retry_after))))),)
            raise ConnectionDeny(status, "too many attempts; try again later")
        if failure.check(UnauthorizedLogin):
            challenge = getattr(self.factory.authenticator, "challenge", None)
            if challenge is not None:
                value = challenge()
                self._refusal_headers = (("WWW-Authenticate", printable(value)),)
            raise ConnectionDeny(401, "a user name and password are needed")
        log.error("viewer {peer}: checking the password failed: {error}",
                  peer=self.peer, error=printable(repr(failure.value)))
        raise ConnectionDeny(500, "the password could not be checked")

    def succeedHandshake(self, res):
        if self._refused or self.state != WebSocketProtocol.STATE_CONNECTING:
            return  # answered (or gone) while the password was checked
        return super().succeedHandshake(res)

    def failHandshake(self, reason, code=400, responseHeaders=None):
        """Refuse the handshake with an HTTP error answer: a fixed status
        line, the standard headers, and the reason (printable ASCII, cut
        short) in a plain-text body.  Same signature as Autobahn's (22.7
        to now)."""
        if self._refused or self.state == WebSocketProtocol.STATE_CLOSED:
            return
        self._refused = True
        self._release_pending()
        try:
            code = int(code)
        except (TypeError, ValueError):
            code = 500
        if code not in REASONS:
            code = 500 if code >= 500 else 400
        detail = printable(reason)
        self.wasNotCleanReason = detail
        if not self._refusal_logged:
            log.info("viewer {peer}: refused the handshake ({code}): {detail}",
                     peer=self.peer, code=code, detail=detail)
        body = f"{code} {REASONS[code]}: {detail}\n".encode("ascii")
        headers = [
            ("Server", SERVER),
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
        if code == 426:
            headers.append(("Upgrade", "websocket"))
        for name, value in list(responseHeaders or ()) + list(self._refusal_headers):
            headers.append((printable(name, 64), printable(value)))
        head = f"HTTP/1.1 {code} {REASONS[code]}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
        self.sendData(head.encode("ascii") + body)
        self._cut(abort=False)

    def onOpen(self):
        self.factory.add_viewer(self)

    def onClose(self, wasClean, code, reason):
        self.factory.remove_viewer(self)



class StreamFactory(WebSocketServerFactory):
    protocol = ViewerProtocol

    @property
    def viewers(self):
        """The open viewers (the fan-out's: protocol -> viewer)."""
        return self.fanout.viewers

    #: Checks credentials in the handshake (pistreaming.auth), or None.
    authenticator = None
    #: Origins (besides the page's own) that may open the stream; "*": any.
    allow_origins = ()
    #: At most this many viewers at once (0: no limit).
    max_viewers = 0
    #: The other streams' factories whose viewers count towards
    #: C{max_viewers} too (with --codec h264, the H.264 stream's and the
    #: MPEG-1 stream's: one limit for both).
    counted_with = ()

    #: True while the HTTP port's /stream hands a connection over (the
    #: protocol built then came through the HTTP port).
    handing_over = False

    #: Which Host headers the handshake may carry (pistreaming.hosts).
    hosts = None
    #: Counts the stream port's connections until their request is in
    #: (pistreaming.admission.PendingConnections), or None.
    pending = None

    def __init__(self, header, reactor, send_buffer=None, start_cache_limit=4 * 1024 * 1024,
                 backlog_limit=256 * 1024, stuck_timeout=10.0, authenticator=None,
                 allow_origins=(), max_viewers=0, hosts=None, pending=None,
                 codec="mpeg1", on_newcomer=None):
        """
        C{header}, C{reactor}, C{send_buffer}, C{start_cache_limit},
        C{backlog_limit} and C{stuck_timeout} are the fan-out's
        (L{pistreaming.fanout.Fanout}), which this factory builds and hands
        the viewers it admits to (C{self.fanout}).

        @param authenticator: checks the handshake's credentials
            (L{pistreaming.auth.Authenticator}), or None.
        @param allow_origins: origins besides the page's own that may open
            the stream ("*": any).
        @param max_viewers: viewers at once, at most (0: no limit).
        @param hosts: the L{pistreaming.hosts.HostPolicy} the handshake's
            Host header is checked with; None: the default one (IP
            literals, localhost, the machine's names).
        @param pending: the L{pistreaming.admission.PendingConnections}
            that counts connections to the stream's own port until their
            request is in; None: not counted.
        @param codec: "mpeg1" (the C{jsmp} stream: a byte stream, whose
            newcomers get what follows its latest starting point in one
            message) or "h264" (one message per picture).  (With --codec
            h264 the stream's own port, kept for clients of the original
            demo, which decode only MPEG-1, is served by the MPEG-1
            stream's factory: pistreaming.ondemand.)
        @param on_newcomer: the fan-out's (a viewer was added).
        """
        super().__init__(server=SERVER, reactor=reactor)
        # Autobahn's timers (handshake, close, pings) on this reactor.
        self._batched_timer = ReactorTimers(reactor)
        # Served on two ports (the HTTP one, under /stream, and its own), so
        # the Host header's port is not checked against one of them.
        self.externalPort = None
        self.setProtocolOptions(
            maxFramePayloadSize=MAX_INCOMING,
            maxMessagePayloadSize=MAX_INCOMING,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=1,
            # A viewer that breaks the protocol (e.g. too big a message) gets a
            # close frame with the reason code before the TCP connection ends.
            failByDrop=False,
            # A plain HTTP request for the stream gets an error, not a status page.
            webStatus=False,
            autoPingInterval=10,
            autoPingTimeout=10,
        )
        self.codec = codec
        self.fanout = Fanout(header, reactor, send_buffer=send_buffer,
                             start_cache_limit=start_cache_limit,
                             backlog_limit=backlog_limit, stuck_timeout=stuck_timeout,
                             join_start=codec == "mpeg1", on_newcomer=on_newcomer)
        self.authenticator = authenticator
        self.allow_origins = tuple(allow_origins)
        self.max_viewers = max_viewers
        self.hosts = hosts if hosts is not None else HostPolicy()
        self.pending = pending
        self._refusals_logged = {}  # address key -> when its refusal was last logged
        self.turned_away = 0

    def refused_pending(self, key, address):
        """A connection from C{address} was dropped: too many connections
        are pending.  Logged at most once a minute per address (key)."""
        now = self.reactor.seconds()
        logged = self._refusals_logged
        if len(logged) > 1024:
            for old in [k for k, when in logged.items() if now - when >= 60]:
                del logged[old]
        last = logged.get(key)
        if last is not None and now - last < 60:
            return
        logged[key] = now
        pending = self.pending
        if pending.count >= pending.total:
            why = (f"{pending.count} connections have not sent their request "
                   f"({pending.total} at most)")
        else:
            why = (f"{pending.by_address.get(key, 0)} of its connections have not sent their "
                   f"request ({pending.per_address} at most)")
        log.warn("stream port: dropped a connection from {address}: {why}; more are dropped "
                 "without a word for a minute", address=address, why=why)

    def origin_allowed(self, origin, host):
        if "*" in self.allow_origins or origin.lower() in self.allow_origins:
            return True
        return origin_matches_host(origin, host)

    # viewers
    def add_viewer(self, protocol):
        """C{protocol}'s WebSocket opened: hand it to the fan-out, unless
        C{max_viewers} are watching already, on this stream and those it is
        C{counted_with} (then it is closed, 1013)."""
        viewers = len(self.fanout.viewers) + sum(
            len(other.fanout.viewers) for other in self.counted_with)
        if self.max_viewers and viewers >= self.max_viewers:
            log.warn("viewer {peer} turned away: {viewers} watching, {most} at most",
                     peer=protocol.peer, viewers=viewers, most=self.max_viewers)
            self.turned_away += 1
            protocol.sendCloseFrame(
                code=CLOSE_TRY_AGAIN_LATER,
                reasonUtf8=f"too many viewers ({self.max_viewers} at most)".encode())
            return
        self.fanout.add(protocol, status=protocol.wants_status)

    def remove_viewer(self, protocol):
        self.fanout.remove(protocol)
