"""The fan-out's direct-socket fast path (pistreaming.fanout), on real
loopback sockets and the installed Twisted: it reads private attributes of
Twisted's TCP transport, and these tests fail if it silently switches off
or sends out of order."""

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, reactor
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from pistreaming.broadcast import StreamFactory
from pistreaming.fanout import StartCache, direct_socket, prepare
from pistreaming.frames import stream_header
from pistreaming.mpegts import Chunk
from tests.helpers import with_timeout

HEADER = stream_header(640, 480)


def numbered(number, keyframe=False):
    """A chunk of two TS packets that says its number."""
    data = b"".join(b"\x47" + number.to_bytes(4, "big") + bytes(183) for _ in range(2))
    return Chunk(data, picture=True, keyframe=keyframe)


class Viewer(WebSocketClientProtocol):
    """Fires C{received(n)} once it has C{n} messages."""

    def __init__(self):
        super().__init__()
        self.messages = []
        self._waiting = []

    def onMessage(self, payload, isBinary):
        self.messages.append(payload)
        for n, d in list(self._waiting):
            if len(self.messages) >= n:
                self._waiting.remove((n, d))
                d.callback(None)

    def received(self, n):
        if len(self.messages) >= n:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append((n, d))
        return d


class Spy:
    """Counts the calls and bytes of a function, and calls it."""

    def __init__(self, function):
        self.function = function
        self.calls = 0
        self.bytes = 0

    def __call__(self, data):
        self.calls += 1
        self.bytes += len(data)
        return self.function(data)


class DirectSocketTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def connect(self, factory):
        port = yield endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        clients = WebSocketClientFactory(f"ws://127.0.0.1:{number}/", reactor=reactor)
        clients.protocol = Viewer
        client = yield endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", number).connect(clients)
        yield with_timeout(client.received(1), 10, "the header")
        (protocol, viewer), = factory.fanout.viewers.items()
        self.addCleanup(self.close, client, protocol)
        return client, viewer

    def close(self, client, protocol):
        gone = defer.DeferredList([client.is_closed, protocol.is_closed])
        client.transport.abortConnection()
        protocol.transport.abortConnection()
        return gone

    @defer.inlineCallbacks
    def test_a_viewer_keeping_up_gets_each_frame_from_the_kernel_at_once(self):
        factory = StreamFactory(HEADER, reactor)
        client, viewer = yield self.connect(factory)
        # The fast path is on for a plain TCP connection ...
        assert viewer.socket is not None, "Twisted's TCP transport is not one the fast path knows"
        assert viewer.direct
        sent = viewer.sock_send = Spy(viewer.sock_send)
        written = viewer.transport.write = Spy(viewer.transport.write)
        chunks = [numbered(i, keyframe=i == 0) for i in range(10)]
        for chunk in chunks:
            factory.fanout.broadcast(chunk)
        yield with_timeout(client.received(11), 10, "the chunks")
        # ... and every frame went through socket.send, none through the
        # transport's buffer.
        assert sent.calls == 10
        assert sent.bytes == sum(len(prepare(c.data).payloadHybi) for c in chunks)
        assert written.calls == 0
        assert client.messages[1:] == [c.data for c in chunks]
        assert viewer.direct

    @defer.inlineCallbacks
    def test_what_waits_in_the_transport_goes_first(self):
        # While the transport's own buffer holds something, a frame given to
        # the kernel directly would overtake it: the fast path must see it
        # (Twisted's private attributes mean what the fan-out reads).
        factory = StreamFactory(HEADER, reactor)
        client, viewer = yield self.connect(factory)
        viewer.transport.write(prepare(b"waiting").payloadHybi)
        sent = viewer.sock_send = Spy(viewer.sock_send)
        chunks = [numbered(i, keyframe=i == 0) for i in range(3)]
        for chunk in chunks:
            factory.fanout.broadcast(chunk)
        assert sent.calls == 0
        yield with_timeout(client.received(5), 10, "the chunks")
        assert client.messages[1:] == [b"waiting"] + [c.data for c in chunks]

    @defer.inlineCallbacks
    def test_a_newcomer_gets_the_start_through_the_socket_too(self):
        factory = StreamFactory(HEADER, reactor)
        for i in range(3):
            factory.fanout.broadcast(numbered(i, keyframe=i == 0))
        client, viewer = yield self.connect(factory)
        yield with_timeout(client.received(3), 10, "the start")
        # the starting point, then the pictures since in one message
        assert client.messages[1:] == [numbered(0).data, numbered(1).data + numbered(2).data]
        assert viewer.direct and viewer.socket is not None


def test_other_transports_take_the_ordinary_path():
    assert direct_socket(StringTransport()) is None


def test_the_start_cache_holds_what_a_decoder_needs_from_its_last_start():
    cache = StartCache(limit=1000)
    cache.add(Chunk(b"x" * 10, picture=True), None)
    assert cache.chunks == []  # nothing a decoder could start at yet
    start = Chunk(b"k" * 10, picture=True, keyframe=True)
    after = Chunk(b"p" * 10, picture=True)
    cache.add(start, "s")
    cache.add(after, "a")
    assert cache.chunks == [(start, "s"), (after, "a")] and cache.size == 20
    cache.add(Chunk(b"p" * 990, picture=True), None)
    assert cache.chunks == [] and cache.size == 0  # no start for far too long
