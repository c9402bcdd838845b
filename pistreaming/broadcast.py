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
"""

import collections
import errno
import json
import socket

from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.cred.error import UnauthorizedLogin
from twisted.application import service
from twisted.internet import defer, task, tcp
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from pistreaming.auth import address_of
from pistreaming.mpegts import Chunk

#: Viewers never need to send anything; anything bigger than this is refused.
MAX_INCOMING = 4096

#: The subprotocol of clients (the page) that also want status messages:
#: JSON text messages such as {"viewers": 3} or {"camera": "unavailable", ...}.
STATUS_PROTOCOL = "pistream"

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN_LATER = 1013

#: A viewer that sends more than this many messages (or pings) in
#: FLOOD_WINDOW seconds is closed: viewers have nothing to say.
FLOOD_MESSAGES = 20
FLOOD_WINDOW = 10.0

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


class ViewerProtocol(WebSocketServerProtocol):
    viewer = None
    wants_status = False

    def onConnect(self, request):
        factory = self.factory
        origin = request.headers.get("origin")
        if origin is not None and not factory.origin_allowed(
                origin, request.headers.get("host", "")):
            log.warn("viewer {peer}: refused a page from {origin} (not this site's origin "
                     "nor in --allow-origin)", peer=self.peer, origin=origin[:200])
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        protocol = STATUS_PROTOCOL if STATUS_PROTOCOL in request.protocols else None
        self.wants_status = protocol is not None
        if factory.authenticator is None:
            return protocol
        authorization = request.headers.get("authorization", "").encode("latin-1", "replace")
        d = factory.authenticator.authenticate(
            authorization, address_of(self.transport.getPeer()), "the stream")

        def refused(failure):
            failure.trap(UnauthorizedLogin)
            raise ConnectionDeny(401, "a user name and password are needed")

        return d.addCallbacks(lambda user: protocol, refused)

    def onOpen(self):
        self._heard = collections.deque()
        self.factory.add_viewer(self)

    def _heard_from(self):
        # Viewers have nothing to say; what they send is dropped, and one that
        # keeps sending is closed.
        now = self.factory.reactor.seconds()
        heard = self._heard
        heard.append(now)
        while heard and heard[0] < now - FLOOD_WINDOW:
            heard.popleft()
        if len(heard) > FLOOD_MESSAGES and self.state == WebSocketProtocol.STATE_OPEN:
            log.warn("viewer {peer} sent {count} messages in {window:.0f}s; closing it",
                     peer=self.peer, count=len(heard), window=FLOOD_WINDOW)
            heard.clear()
            self.sendCloseFrame(code=CLOSE_POLICY, reasonUtf8=b"viewers do not send")

    def onMessage(self, payload, isBinary):
        self._heard_from()

    def onPing(self, payload):
        self._heard_from()
        super().onPing(payload)

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

    def __init__(self, header, reactor, send_buffer=None, start_cache_limit=4 * 1024 * 1024):
        """
        @param header: the first message each viewer gets (C{b'jsmp'} + size).
        @param send_buffer: the kernel send buffer (SO_SNDBUF) for viewer
            sockets, so that a slow viewer's backlog shows here instead of
            hiding in the kernel; None leaves the system's default.
        """
        super().__init__(server=None, reactor=reactor)
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
