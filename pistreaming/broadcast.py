"""The WebSocket side: every viewer gets the stream header, then the video.

The factory owns the set of open viewers.  Each chunk of MPEG-TS packets from
the encoder is framed once (an Autobahn prepared message, never compressed)
and the same bytes are written to every viewer.

What a decoder needs to start (the latest sequence header and intra picture,
and the pictures since) is kept, and a newcomer gets it right after the
header, so its first picture shows at once and it is at live straight after.

Each viewer has a bounded backlog.  While its connection takes what is
written, chunks go straight to it.  When the connection pushes back (the
transport's buffer is full), chunks wait in the viewer's queue; if the queue
grows past the limit, the viewer skips ahead: what waits is dropped (the
picture already on its way is completed) and nothing more is queued until
the next point where a decoder can start.  What a viewer receives is thus
always decodable, and no viewer slows any other.  A viewer that takes
nothing for ``stuck_timeout`` seconds is closed.

Viewers have nothing to say.  Every frame a viewer sends counts (messages'
frames, continuations, pings, pongs, closes), and so does every byte: one
that sends more than FLOOD_FRAMES frames in FLOOD_WINDOW seconds, or more
than INCOMING_RATE bytes a second (averaged, INCOMING_BURST at once), is
closed with 1008 and what it sends next is not even parsed.

The handshake is checked before anything else: its Host header must be a
name this daemon answers to (DNS rebinding; 421), then Autobahn's checks,
the Origin and the password.  Every refusal is an HTTP answer with a fixed
status line and the standard headers.  On the stream's own port, a
connection that has not sent its whole request yet is *pending*
(L{pistreaming.admission}); connections over its caps are dropped at once.
"""

import collections
import errno
import json
import math
import socket

from urllib.parse import urlsplit

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.cred.error import UnauthorizedLogin
from twisted.application import service
from twisted.internet import defer, task, tcp
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import http
from zope.interface import implementer

from pistreaming import auth
from pistreaming.admission import address_key
from pistreaming.auth import address_of
from pistreaming.hosts import HostPolicy, host_name
from pistreaming.mpegts import Chunk

#: Viewers never need to send anything; anything bigger than this is refused.
MAX_INCOMING = 4096

#: The subprotocol of clients (the page) that also want status messages:
#: JSON text messages such as {"viewers": 3} or {"camera": "unavailable", ...}.
STATUS_PROTOCOL = "pistream"

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN_LATER = 1013

#: A viewer that sends more than this many frames of any kind (a browser
#: sends a pong every autoPingInterval, 10 s) in FLOOD_WINDOW seconds is
#: closed: viewers have nothing to say.
FLOOD_FRAMES = 20
FLOOD_MESSAGES = FLOOD_FRAMES  # its old name
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


class StartCache:
    """What a newcomer needs first: the chunks since the last point a
    decoder can start at (bounded in bytes; empty until there is one)."""

    def __init__(self, limit):
        self.limit = limit
        self.chunks = []
        self.size = 0

    def add(self, chunk, message):
        if chunk.keyframe:
            self.chunks = []
            self.size = 0
        elif not self.chunks:
            return  # no starting point yet: nothing a newcomer could decode
        self.chunks.append((chunk, message))
        self.size += len(chunk)
        if self.size > self.limit:  # no starting point for far too long
            self.chunks = []
            self.size = 0

    def clear(self):
        self.chunks = []
        self.size = 0


def _direct_socket(transport):
    """The socket of a plain TCP transport whose buffer this module may look
    at (Twisted's FileDescriptor, 22.4 to now), or None: then every frame
    goes through transport.write (TLS, tests' fakes, other transports)."""
    if type(transport) is not tcp.Server:
        return None
    if not all(hasattr(transport, name)
               for name in ("_tempDataLen", "offset", "dataBuffer", "disconnecting")):
        return None
    sock = transport.getHandle()
    return sock if isinstance(sock, socket.socket) else None


@implementer(IPushProducer)
class Viewer:
    """One open connection's sending state.  Registered as the producer of
    the connection's transport, which pauses it when its buffer is full."""

    def __init__(self, protocol, factory, now):
        self.protocol = protocol
        self.factory = factory
        self.transport = protocol.transport
        self.socket = _direct_socket(self.transport)
        self.peer = protocol.peer
        self.connected_since = now
        self.queue = collections.deque()
        self.queued = 0
        self.paused = False
        self.paused_since = None
        self.skipping = False
        self.bytes_sent = 0
        self.skips = 0
        self.status = protocol.wants_status
        self.sock_send = self.socket.send if self.socket is not None else None
        self._refresh()

    def _refresh(self):
        # Whether frames may go straight to the socket (StreamFactory.broadcast).
        self.direct = (self.socket is not None and not self.paused
                       and not self.queue and not self.skipping)

    # IPushProducer: called by the transport
    def pauseProducing(self):
        if not self.paused:
            self.paused = True
            self.paused_since = self.factory.reactor.seconds()
            self._refresh()

    def resumeProducing(self):
        self.paused = False
        self.paused_since = None
        self._flush()
        self._refresh()

    def stopProducing(self):
        self.queue.clear()
        self.queued = 0
        self._refresh()

    def offer(self, chunk, message):
        if self.skipping:
            if not chunk.keyframe:
                return
            self.skipping = False
        if not self.paused and not self.queue:
            self._send(chunk, message)
        else:
            self.queue.append((chunk, message))
            self.queued += len(chunk)
            if self.queued > self.factory.backlog_limit:
                self._skip_ahead()
        self._refresh()

    def _send(self, chunk, message):
        data = message.payloadHybi  # the frame, as Autobahn prepared it once
        if self.socket is not None and self.transport_idle():
            sent = self.send_now(data)
            if sent == len(data):
                self.bytes_sent += len(chunk)
                self.factory.bytes_sent += len(chunk)
                return
            data = data[sent:]
        self.transport.write(data)
        self.bytes_sent += len(chunk)
        self.factory.bytes_sent += len(chunk)

    def transport_idle(self):
        """Nothing waits in the transport's buffer (Twisted's FileDescriptor)."""
        t = self.transport
        return (not t._tempDataLen and t.offset == len(t.dataBuffer)
                and t.connected and not t.disconnecting)

    def send_now(self, data):
        """Give C{data} to the kernel now, as Node.js's libuv does (one system
        call, no poller changes): how much it took.  Only call when the
        transport is idle; what the kernel does not take must then go
        through transport.write (and its backpressure)."""
        try:
            return self.sock_send(data)
        except OSError as e:
            return self.send_failed(e)

    def send_failed(self, error):
        if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            self.socket = None  # let Twisted find the error and close
            self._refresh()
        return 0

    def _flush(self):
        while self.queue and not self.paused:
            chunk, message = self.queue.popleft()
            self.queued -= len(chunk)
            self._send(chunk, message)

    def _skip_ahead(self):
        # Keep the rest of the picture already partly sent (the chunks before
        # the first picture start), drop the rest, wait for a starting point.
        # If a starting point is already queued and what follows it fits,
        # resume there at once.
        kept = collections.deque()
        while self.queue and not self.queue[0][0].picture:
            kept.append(self.queue.popleft())
        queued = list(self.queue)
        starts = [i for i, (chunk, _) in enumerate(queued) if chunk.keyframe]
        restart = queued[starts[-1]:] if starts else []
        kept_size = sum(len(chunk) for chunk, _ in kept)
        if kept_size + sum(len(chunk) for chunk, _ in restart) > self.factory.backlog_limit:
            restart = []
        dropped = sum(len(chunk) for chunk, _ in queued) - sum(len(c) for c, _ in restart)
        self.queue = kept
        self.queue.extend(restart)
        self.queued = sum(len(chunk) for chunk, _ in self.queue)
        self.skipping = not restart
        self._refresh()
        self.skips += 1
        self.factory.skips += 1
        log.info("viewer {peer} fell behind; skipped {dropped} bytes to the next "
                 "picture a decoder can start at", peer=self.peer, dropped=dropped)

    def backlog(self):
        return self.queued

    def describe(self, now):
        return {
            "address": self.peer,
            "connected_since": self.connected_since,
            "connected_for": round(now - self.connected_since, 3),
            "bytes_sent": self.bytes_sent,
            "backlog": self.queued,
            "stalled": self.paused,
            "skips": self.skips,
        }


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
    """A timer Autobahn may cancel after it ran."""

    __slots__ = ("delayed",)

    def __init__(self, delayed):
        self.delayed = delayed

    def cancel(self):
        if self.delayed.active():
            self.delayed.cancel()


class ReactorTimers:
    """Autobahn's protocol timers (the opening handshake's timeout, the
    close's, the pings) on the factory's reactor: Autobahn's own batched
    timer uses txaio's global one, which a test's clock is not."""

    def __init__(self, reactor):
        self.reactor = reactor

    def call_later(self, delay, function, *args, **kwargs):
        return _Call(self.reactor.callLater(delay, function, *args, **kwargs))


class ViewerProtocol(WebSocketServerProtocol):
    viewer = None
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
        pending = factory.pending
        if pending is None or came_through_http_port(self.transport, factory):
            return  # the HTTP port's channel counted it while it read the request
        key = address_key(address_of(self.transport.getPeer()))
        if pending.admit(key):
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

    def _release_pending(self):
        key, self._pending_key = self._pending_key, None
        if key is not None:
            self.factory.pending.release(key)

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
                self.failHandshake("the request is too big", 431)
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
                self.failHandshake("the request's headers are too big", 431)
            return
        self._request_seen = True
        self._release_pending()
        if end + 4 > MAX_REQUEST:
            return self.failHandshake("the request's headers are too big", 431)
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

    #: Bytes a viewer may have waiting before it skips ahead (set from the
    #: options: about a second of video by default).
    backlog_limit = 256 * 1024
    #: Seconds a viewer may take nothing before it is closed.
    stuck_timeout = 10.0

    #: Checks credentials in the handshake (pistreaming.auth), or None.
    authenticator = None
    #: Origins (besides the page's own) that may open the stream; "*": any.
    allow_origins = ()
    #: At most this many viewers at once (0: no limit).
    max_viewers = 0

    #: Which Host headers the handshake may carry (pistreaming.hosts).
    hosts = None
    #: Counts the stream port's connections until their request is in
    #: (pistreaming.admission.PendingConnections), or None.
    pending = None

    def __init__(self, header, reactor, send_buffer=None, start_cache_limit=4 * 1024 * 1024,
                 backlog_limit=256 * 1024, stuck_timeout=10.0, authenticator=None,
                 allow_origins=(), max_viewers=0, hosts=None, pending=None):
        """
        @param header: the first message each viewer gets (C{b'jsmp'} + size).
        @param send_buffer: the kernel send buffer (SO_SNDBUF) for viewer
            sockets, so that a slow viewer's backlog shows here instead of
            hiding in the kernel; None leaves the system's default.
        @param start_cache_limit: bytes kept for newcomers, at most.
        @param backlog_limit: bytes a viewer may have waiting before it
            skips ahead.
        @param stuck_timeout: seconds a viewer may take nothing.
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
        self.backlog_limit = backlog_limit
        self.stuck_timeout = stuck_timeout
        self.authenticator = authenticator
        self.allow_origins = tuple(allow_origins)
        self.max_viewers = max_viewers
        self.hosts = hosts if hosts is not None else HostPolicy()
        self.pending = pending
        self._refusals_logged = {}  # address key -> when its refusal was last logged
        self.header = header
        self.send_buffer = send_buffer
        self.viewers = {}  # protocol -> Viewer
        self.start_cache = StartCache(start_cache_limit)
        self.status = {}
        self.bytes_discarded = 0
        self.bytes_sent = 0
        self.bytes_in = 0
        self.skips = 0
        self.viewers_total = 0
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
        if self.max_viewers and len(self.viewers) >= self.max_viewers:
            log.warn("viewer {peer} turned away: {viewers} watching, {most} at most",
                     peer=protocol.peer, viewers=len(self.viewers), most=self.max_viewers)
            self.turned_away += 1
            protocol.sendCloseFrame(
                code=CLOSE_TRY_AGAIN_LATER,
                reasonUtf8=f"too many viewers ({self.max_viewers} at most)".encode())
            return
        viewer = Viewer(protocol, self, self.reactor.seconds())
        transport = protocol.transport
        # On the HTTP port the web server's channel is still the transport's
        # producer; the stream takes over.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(viewer, True)
        if self.send_buffer:
            self._set_send_buffer(transport)
        # A picture goes out at once, whole: Nagle's algorithm would hold its
        # last segment until the viewer acknowledged the ones before (with a
        # delayed ACK, tens of milliseconds).
        if hasattr(transport, "setTcpNoDelay"):
            try:
                transport.setTcpNoDelay(True)
            except OSError:
                pass
        protocol.viewer = viewer
        self.viewers[protocol] = viewer
        self.viewers_total += 1
        protocol.sendMessage(self.header, isBinary=True)
        if self.start_cache.chunks:
            # What a decoder needs to start: first the starting point itself
            # (the sequence header and intra picture, as it was framed for
            # everyone), which the page can decode and show the moment it
            # arrives, without waiting for the rest; then, in one message,
            # every picture since, which brings the page to live.
            (first, first_message), *since = self.start_cache.chunks
            viewer.offer(first, first_message)
            if since:
                rest = Chunk(b"".join(chunk.data for chunk, _ in since),
                             picture=since[0][0].picture, keyframe=False, pts=since[0][0].pts)
                viewer.offer(rest, self.prepareMessage(rest.data, isBinary=True,
                                                       doNotCompress=True))
        if viewer.status and self.status:
            protocol.sendMessage(json.dumps(self.status).encode(), isBinary=False)
        log.info("viewer {peer} connected; {viewers} watching",
                 peer=protocol.peer, viewers=len(self.viewers))
        self._tell_viewers({"viewers": len(self.viewers)})

    def _set_send_buffer(self, transport):
        try:
            handle = transport.getHandle()
        except AttributeError:
            return
        if isinstance(handle, socket.socket):
            try:
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
            except OSError:
                pass

    def remove_viewer(self, protocol):
        viewer = self.viewers.pop(protocol, None)
        if viewer is None:
            return
        viewer.stopProducing()
        log.info("viewer {peer} left; {viewers} watching",
                 peer=protocol.peer, viewers=len(self.viewers))
        self._tell_viewers({"viewers": len(self.viewers)})

    # the stream
    def broadcast(self, chunk):
        """Send C{chunk} (a L{pistreaming.mpegts.Chunk}) to every open viewer."""
        size = len(chunk)
        self.bytes_in += size
        message = self.prepareMessage(chunk.data, isBinary=True, doNotCompress=True)
        self.start_cache.add(chunk, message)
        if not self.viewers:
            self.bytes_discarded += size
            return
        # The common case inline (this loop is the daemon's hot path): a
        # viewer keeping up, on a plain TCP socket, gets the frame from the
        # kernel at once.  Anything else takes Viewer.offer.
        data = message.payloadHybi
        whole = len(data)
        is_open = WebSocketProtocol.STATE_OPEN
        sent = 0
        for protocol, viewer in self.viewers.items():
            if protocol.state != is_open:
                continue
            if viewer.direct:
                t = viewer.transport
                if (not t._tempDataLen and t.offset == len(t.dataBuffer)
                        and t.connected and not t.disconnecting):
                    try:
                        taken = viewer.sock_send(data)
                    except OSError as e:
                        taken = viewer.send_failed(e)
                    if taken != whole:  # the rest waits in the transport
                        t.write(data[taken:] if taken else data)
                    viewer.bytes_sent += size
                    sent += 1
                    continue
            viewer.offer(chunk, message)
        self.bytes_sent += sent * size

    def set_status(self, **status):
        """Tell viewers that asked for status (the page) what changed."""
        changed = {k: v for k, v in status.items() if self.status.get(k) != v}
        if not changed:
            return
        self.status.update(changed)
        self._tell_viewers(changed)

    def _tell_viewers(self, message):
        payload = json.dumps(message).encode()
        for protocol, viewer in self.viewers.items():
            if viewer.status and protocol.state == WebSocketProtocol.STATE_OPEN:
                protocol.sendMessage(payload, isBinary=False)

    def close_stuck(self):
        """Close viewers that have taken nothing for C{stuck_timeout} seconds."""
        now = self.reactor.seconds()
        for protocol, viewer in list(self.viewers.items()):
            if viewer.paused_since is not None and now - viewer.paused_since > self.stuck_timeout:
                log.warn("viewer {peer} took nothing for {seconds:.0f}s; closing it",
                         peer=viewer.peer, seconds=now - viewer.paused_since)
                viewer.paused_since = None
                if protocol.state == WebSocketProtocol.STATE_OPEN:
                    protocol.sendCloseFrame(
                        code=CLOSE_POLICY,
                        reasonUtf8=b"not reading the stream")
                else:
                    protocol.dropConnection(abort=True)

    def close_all(self, reason="server shutting down"):
        # sendClose() only lets applications use 1000 and 3000-4999; 1001
        # ("going away") is the code that says what happens here.
        for protocol in list(self.viewers):
            if protocol.state == WebSocketProtocol.STATE_OPEN:
                protocol.sendCloseFrame(code=CLOSE_GOING_AWAY, reasonUtf8=reason.encode())

    def describe(self):
        now = self.reactor.seconds()
        return [viewer.describe(now) for viewer in self.viewers.values()]


class BroadcastService(service.Service):
    """Watches for stuck viewers, and closes every viewer's WebSocket when
    the daemon stops."""

    name = "broadcast"
    log = Logger()
    #: How long viewers get to answer the close before they are cut off.
    close_timeout = 0.5
    check_interval = 1.0

    def __init__(self, factory, reactor):
        self.factory = factory
        self.reactor = reactor
        self._watch = None

    def startService(self):
        super().startService()
        self.log.info("broadcast: MPEG-TS to WebSocket viewers, header {header}",
                      header=self.factory.header.hex())
        self._watch = task.LoopingCall(self.factory.close_stuck)
        self._watch.clock = self.reactor
        self._watch.start(self.check_interval, now=False)

    def stopService(self):
        super().stopService()
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        viewers = list(self.factory.viewers)
        if not viewers:
            return defer.succeed(None)
        self.log.info("closing {viewers} viewer connections", viewers=len(viewers))
        self.factory.close_all()
        d = defer.Deferred()

        def cut_off():
            # A normal close (FIN after what is buffered), not an abort: an
            # abort's RST would make the viewer's kernel discard the close
            # frame it has not read yet.  Exiting closes whatever remains.
            for viewer in viewers:
                if viewer.transport is not None:
                    viewer.dropConnection(abort=False)
            d.callback(None)

        self.reactor.callLater(self.close_timeout, cut_off)
        return d
