"""How video reaches viewers: one stream, fanned out to every open viewer.

The fan-out knows a stream of chunks and, of each chunk, only whether it
begins a picture (``chunk.picture``) and whether a decoder can start at it
(``chunk.keyframe``: for MPEG-1 a sequence header and an intra picture; for
H.264 it would be an IDR with its SPS/PPS).  Who may watch (the handshake's
Host, Origin and password, flood limits, the number of viewers) is decided
before a viewer gets here (pistreaming.broadcast).

Each chunk is framed once (an Autobahn prepared message, never compressed)
and the same bytes are written to every viewer.

What a decoder needs to start (the chunks since the latest point it can
start at) is kept, and a newcomer gets it right after the stream's header,
so its first picture shows at once and it is at live straight after.

Each viewer has a bounded backlog.  While its connection takes what is
written, chunks go straight to it.  When the connection pushes back (the
transport's buffer is full), chunks wait in the viewer's queue; if the queue
grows past the limit, the viewer skips ahead: what waits is dropped (the
picture already on its way is completed) and nothing more is queued until
the next point where a decoder can start.  What a viewer receives is thus
always decodable, and no viewer slows any other.  A viewer that takes
nothing for ``stuck_timeout`` seconds is closed.

The direct-socket fast path
---------------------------

A viewer that keeps up, on a plain TCP connection (Twisted's
C{twisted.internet.tcp.Server}), gets each frame from the kernel at once:
one C{socket.send}, as Node.js's libuv does, instead of C{transport.write},
which appends to Twisted's buffer and waits for the reactor's next write
event.  It may do so only when nothing waits in the transport's own buffer,
which it reads from three private attributes of Twisted's
C{FileDescriptor} (``_tempDataLen``, ``offset``, ``dataBuffer``; the same
from Twisted 22.4 to now).  Whatever the kernel does not take goes through
C{transport.write}, with its backpressure.  When the transport is anything
else (TLS, a test's fake) or lacks those attributes, every frame goes
through C{transport.write}: correct, only slower.  tests/test_fanout.py
fails if the fast path switches off on the pinned Twisted.
"""

import collections
import errno
import json
import socket

from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from twisted.application.internet import TimerService
from twisted.internet import defer, tcp
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from pistreaming.mpegts import Chunk

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008

#: Twisted's FileDescriptor attributes the fast path reads (see above).
TRANSPORT_BUFFER = ("_tempDataLen", "offset", "dataBuffer", "disconnecting")

log = Logger(namespace="pistreaming.fanout")


def prepare(data, binary=True):
    """C{data} framed once as a server's WebSocket message (unmasked, never
    compressed), to be written as it is to any number of viewers."""
    return PreparedMessage(data, binary, False, True)


class StartCache:
    """What a newcomer needs first: the chunks since the last point a
    decoder can start at (bounded in bytes; empty until there is one)."""

    def __init__(self, limit):
        self.limit = limit
        self.chunks = []
        self.size = 0

    def reset(self):
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


def direct_socket(transport):
    """The socket of a plain TCP transport whose buffer the fast path may
    look at (Twisted's FileDescriptor, 22.4 to now), or None: then every
    frame goes through transport.write (TLS, tests' fakes, other transports)."""
    if type(transport) is not tcp.Server:
        return None
    if not all(hasattr(transport, name) for name in TRANSPORT_BUFFER):
        return None
    sock = transport.getHandle()
    return sock if isinstance(sock, socket.socket) else None


def transport_idle(t):
    """Nothing waits in the buffer of C{t} (Twisted's FileDescriptor), and
    it is open: the kernel may be given a frame directly."""
    return (not t._tempDataLen and t.offset == len(t.dataBuffer)
            and t.connected and not t.disconnecting)


@implementer(IPushProducer)
class Viewer:
    """One open connection's sending state.  Registered as the producer of
    the connection's transport, which pauses it when its buffer is full."""

    def __init__(self, protocol, fanout, now, status=False):
        """
        @param protocol: the viewer's open WebSocket (Autobahn's protocol).
        @param status: whether it wants status messages.
        """
        self.protocol = protocol
        self.fanout = fanout
        self.transport = protocol.transport
        self.socket = direct_socket(self.transport)
        self.peer = protocol.peer
        self.connected_since = now
        self.queue = collections.deque()
        self.queued = 0
        self.paused = False
        self.paused_since = None
        self.skipping = False
        self.bytes_sent = 0
        self.skips = 0
        self.status = status
        self.sock_send = self.socket.send if self.socket is not None else None
        self._refresh()

    def _refresh(self):
        # Whether frames may go straight to the socket (Fanout.broadcast).
        self.direct = (self.socket is not None and not self.paused
                       and not self.queue and not self.skipping)

    # IPushProducer: called by the transport
    def pauseProducing(self):
        if not self.paused:
            self.paused = True
            self.paused_since = self.fanout.reactor.seconds()
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

    def send_header(self, message, restart):
        """The stream's header (a prepared message), ahead of anything queued.

        @param restart: whether the viewer then waits for a picture its
            decoder can start at (what is queued is dropped): with a new
            header, older pictures are of no use."""
        if restart:
            self.queue.clear()
            self.queued = 0
            self.skipping = True
        self.transport.write(message.payloadHybi)
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
            if self.queued > self.fanout.backlog_limit:
                self._skip_ahead()
        self._refresh()

    def _send(self, chunk, message):
        data = message.payloadHybi  # the frame, as Autobahn prepared it once
        if self.socket is not None and transport_idle(self.transport):
            sent = self.send_now(data)
            if sent == len(data):
                self.bytes_sent += len(chunk)
                self.fanout.bytes_sent += len(chunk)
                return
            data = data[sent:]
        self.transport.write(data)
        self.bytes_sent += len(chunk)
        self.fanout.bytes_sent += len(chunk)

    def send_now(self, data):
        """Give C{data} to the kernel now (one system call, no poller
        changes): how much it took.  Only call when the transport is idle;
        what the kernel does not take must then go through transport.write
        (and its backpressure)."""
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
        if kept_size + sum(len(chunk) for chunk, _ in restart) > self.fanout.backlog_limit:
            restart = []
        dropped = sum(len(chunk) for chunk, _ in queued) - sum(len(c) for c, _ in restart)
        self.queue = kept
        self.queue.extend(restart)
        self.queued = sum(len(chunk) for chunk, _ in self.queue)
        self.skipping = not restart
        self._refresh()
        self.skips += 1
        self.fanout.skips += 1
        log.info("viewer {peer} fell behind; skipped {dropped} bytes to the next "
                 "picture a decoder can start at", peer=self.peer, dropped=dropped)

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


class Fanout:
    """The open viewers, and the stream sent to each of them."""

    def __init__(self, header, reactor, send_buffer=None, start_cache_limit=4 * 1024 * 1024,
                 backlog_limit=256 * 1024, stuck_timeout=10.0, join_start=True,
                 on_newcomer=None):
        """
        @param header: the first message each viewer gets (for MPEG-1,
            C{b'jsmp'} + size, binary), or None while there is none yet
            (H.264 before the camera's first SPS/PPS: L{set_header}).
        @param reactor: the clock (C{seconds}) of connection times and stalls.
        @param send_buffer: the kernel send buffer (SO_SNDBUF) for viewer
            sockets, so that a slow viewer's backlog shows here instead of
            hiding in the kernel; None leaves the system's default.
        @param start_cache_limit: bytes kept for newcomers, at most.
        @param backlog_limit: bytes a viewer may have waiting before it
            skips ahead.
        @param stuck_timeout: seconds a viewer may take nothing before it is
            closed (L{close_stuck}).
        @param join_start: whether a newcomer gets the chunks after the
            starting point as one message (a byte stream such as MPEG-TS),
            or each as it was framed (H.264: one message per picture).
        @param on_newcomer: called with no arguments when a viewer is added
            (the camera may then be asked for a keyframe).
        """
        self.header = None
        self.header_message = None
        self.join_start = join_start
        self.on_newcomer = on_newcomer
        self.reactor = reactor
        self.send_buffer = send_buffer
        self.backlog_limit = backlog_limit
        self.stuck_timeout = stuck_timeout
        self.viewers = {}  # protocol -> Viewer
        self.start_cache = StartCache(start_cache_limit)
        self.status = {}
        self.bytes_discarded = 0
        self.bytes_sent = 0
        self.bytes_in = 0
        self.skips = 0
        self.viewers_total = 0
        if header is not None:
            self.set_header(header)

    # viewers
    def add(self, protocol, status=False):
        """C{protocol}'s WebSocket is open: send it the header, then what a
        decoder needs to start, then the stream.

        @param status: whether it also wants status messages (JSON text).
        """
        viewer = Viewer(protocol, self, self.reactor.seconds(), status)
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
        if self.header_message is not None:
            # A byte stream (MPEG-TS) goes out from the next chunk on, as
            # its decoder finds its own starting point; a stream of
            # pictures (H.264) from a picture its decoder can start at.
            viewer.send_header(self.header_message, restart=not self.join_start)
        if self.start_cache.chunks and self.header_message is not None:
            # What a decoder needs to start: first the starting point itself
            # (as it was framed for everyone), which the page can decode and
            # show the moment it arrives, without waiting for the rest; then
            # every chunk since (in one message where the stream is a byte
            # stream), which brings the page to live.
            (first, first_message), *since = self.start_cache.chunks
            viewer.offer(first, first_message)
            if since and not self.join_start:
                for chunk, message in since:
                    viewer.offer(chunk, message)
            elif since:
                rest = Chunk(b"".join(chunk.data for chunk, _ in since),
                             picture=since[0][0].picture, keyframe=False, pts=since[0][0].pts)
                viewer.offer(rest, prepare(rest.data))
        if viewer.status and self.status:
            protocol.sendMessage(json.dumps(self.status).encode(), isBinary=False)
        log.info("viewer {peer} connected; {viewers} watching",
                 peer=protocol.peer, viewers=len(self.viewers))
        self._tell_viewers({"viewers": len(self.viewers)})
        if self.on_newcomer is not None:
            self.on_newcomer()
        return viewer

    def set_header(self, header, binary=True):
        """What each viewer gets first: sent now to every open viewer (the
        stream's configuration changed, or is known at last), and to each
        newcomer before anything else.

        Where the header changes, what a decoder needed to start with the
        old one is of no use with the new one: newcomers wait for the next
        starting point."""
        if header == self.header:
            return
        had_one = self.header is not None
        self.header = header
        self.header_message = prepare(header, binary)
        if had_one:
            self.start_cache.reset()
        for protocol, viewer in self.viewers.items():
            if protocol.state == WebSocketProtocol.STATE_OPEN:
                viewer.send_header(self.header_message, restart=True)

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

    def remove(self, protocol):
        """C{protocol}'s WebSocket closed (a no-op if it was never added)."""
        viewer = self.viewers.pop(protocol, None)
        if viewer is None:
            return
        viewer.stopProducing()
        log.info("viewer {peer} left; {viewers} watching",
                 peer=protocol.peer, viewers=len(self.viewers))
        self._tell_viewers({"viewers": len(self.viewers)})

    # the stream
    def broadcast(self, chunk):
        """Send C{chunk} (a L{pistreaming.mpegts.Chunk}: bytes, and whether
        a picture and a decoder can start at it) to every open viewer."""
        size = len(chunk)
        self.bytes_in += size
        message = prepare(chunk.data)
        self.start_cache.add(chunk, message)
        if not self.viewers:
            self.bytes_discarded += size
            return
        # The common case inline (this loop is the daemon's hot path): a
        # viewer keeping up, on a plain TCP socket, gets the frame from the
        # kernel at once (the module's docstring).  Anything else takes
        # Viewer.offer.
        data = message.payloadHybi
        whole = len(data)
        is_open = WebSocketProtocol.STATE_OPEN
        sent = 0
        for protocol, viewer in self.viewers.items():
            if protocol.state != is_open:
                continue
            if viewer.direct:
                t = viewer.transport
                # transport_idle(t), inline
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


class BroadcastService(TimerService):
    """Closes stuck viewers (every C{check_interval} seconds, on
    C{reactor}'s clock), and every viewer's WebSocket when the daemon stops."""

    name = "broadcast"
    #: How long viewers get to answer the close before they are cut off.
    close_timeout = 0.5

    def __init__(self, fanout, reactor, check_interval=1.0):
        super().__init__(check_interval, fanout.close_stuck)
        self.clock = reactor
        self.fanout = fanout
        self.reactor = reactor

    @property
    def check_interval(self):
        return self.step

    @check_interval.setter
    def check_interval(self, seconds):
        self.step = seconds

    def startService(self):
        header = self.fanout.header
        if header is None:
            log.info("broadcast: the stream to WebSocket viewers, its header once the "
                     "stream describes itself")
        else:
            log.info("broadcast: the stream to WebSocket viewers, header {header}",
                     header=header.hex())
        super().startService()

    def stopService(self):
        stopped = super().stopService()
        viewers = list(self.fanout.viewers)
        if not viewers:
            return stopped
        log.info("closing {viewers} viewer connections", viewers=len(viewers))
        self.fanout.close_all()
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
