"""The WebSocket broadcaster, over real loopback sockets with Autobahn clients."""

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest
from twisted.web import server

from pistreaming.broadcast import BroadcastService, StreamFactory
from pistreaming.frames import stream_header
from pistreaming.mpegts import Chunk
from tests.helpers import wait_until, with_timeout

HEADER = stream_header(640, 480)


class Viewer(WebSocketClientProtocol):
    def __init__(self):
        super().__init__()
        self.messages = []
        self.closed = None

    def onMessage(self, payload, isBinary):
        self.messages.append((payload, isBinary))

    def onClose(self, wasClean, code, reason):
        self.closed = (code, reason)


def packets(n, fill, picture=False, keyframe=False):
    """A chunk of C{n} TS packets (not real video: the broadcaster only
    looks at the chunk's flags)."""
    data = b"".join(b"\x47" + bytes([fill]) * 187 for _ in range(n))
    return Chunk(data, picture=picture or keyframe, keyframe=keyframe)


class BroadcastTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.factory = StreamFactory(HEADER, reactor)
        self.port = yield endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(self.factory)
        self.addCleanup(self.port.stopListening)
        self.clients = WebSocketClientFactory(
            f"ws://127.0.0.1:{self.port.getHost().port}/", reactor=reactor)
        self.clients.protocol = Viewer
        self.clients.viewers = []
        self.addCleanup(self.disconnect_all)

    def disconnect_all(self):
        for v in self.clients.viewers:
            if v.transport is not None:
                v.transport.abortConnection()
        return wait_until(lambda: not self.factory.viewers, 5, what="server to see them go")

    @defer.inlineCallbacks
    def connect(self, n, url=None, port=None):
        endpoint = endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port or self.port.getHost().port)
        viewers = []
        for _ in range(n):
            viewer = yield endpoint.connect(self.clients)
            viewers.append(viewer)
        self.clients.viewers.extend(viewers)
        yield wait_until(lambda: all(v.messages for v in viewers), 5, what="headers")
        return viewers

    @defer.inlineCallbacks
    def test_a_new_viewer_first_gets_the_8_byte_header(self):
        (viewer,) = yield self.connect(1)
        assert viewer.messages == [(b"jsmp\x02\x80\x01\xe0", True)]

    @defer.inlineCallbacks
    def test_every_viewer_gets_every_chunk_in_order(self):
        viewers = yield self.connect(5)
        prepared = []
        original = self.factory.prepareMessage

        def counting(*args, **kwargs):
            prepared.append(args)
            return original(*args, **kwargs)

        self.factory.prepareMessage = counting
        chunks = [packets(3, i) for i in range(10)]
        for chunk in chunks:
            self.factory.broadcast(chunk)
        yield wait_until(lambda: all(len(v.messages) == 11 for v in viewers), 5,
                         what="all chunks at all viewers")
        for v in viewers:
            assert v.messages == [(HEADER, True)] + [(c.data, True) for c in chunks]
        # framed once per chunk, not once per viewer
        assert len(prepared) == len(chunks)
        assert self.factory.bytes_sent == 5 * sum(map(len, chunks))

    @defer.inlineCallbacks
    def test_a_viewer_that_left_is_no_longer_sent_to(self):
        a, b = yield self.connect(2)
        a.transport.loseConnection()
        yield wait_until(lambda: len(self.factory.viewers) == 1, 5, what="a to leave")
        self.factory.broadcast(packets(1, 9))
        yield wait_until(lambda: len(b.messages) == 2, 5, what="b to get the chunk")
        assert len(a.messages) == 1

    def test_with_no_viewers_the_stream_is_discarded(self):
        self.factory.broadcast(packets(2, 1))
        assert self.factory.bytes_discarded == 376
        assert self.factory.bytes_sent == 0

    @defer.inlineCallbacks
    def test_what_viewers_send_is_ignored_and_big_messages_close_them(self):
        quiet, loud = yield self.connect(2)
        quiet.sendMessage(b"hello")
        loud.sendMessage(b"x" * 100_000, isBinary=True)
        yield wait_until(lambda: loud.closed is not None, 5, what="loud viewer closed")
        assert loud.closed[0] == 1009  # message too big
        self.factory.broadcast(packets(1, 2))
        yield wait_until(lambda: len(quiet.messages) == 2, 5, what="quiet viewer's chunk")
        assert quiet.closed is None

    @defer.inlineCallbacks
    def test_the_stream_is_also_served_under_stream_on_the_http_port(self):
        from pistreaming.web import make_site
        from pistreaming.options import Config
        site = make_site(Config(ffmpeg="/usr/bin/ffmpeg"), self.factory, player=b"//")
        http = yield endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(http.stopListening)
        direct, = yield self.connect(1)
        self.clients.setSessionParameters(
            url=f"ws://127.0.0.1:{http.getHost().port}/stream")
        via_http, = yield self.connect(1, port=http.getHost().port)
        assert via_http.messages == [(HEADER, True)]
        self.factory.broadcast(packets(2, 3))
        yield wait_until(lambda: len(via_http.messages) == 2 and len(direct.messages) == 2,
                         5, what="chunk on both ports")
        assert via_http.messages[1] == direct.messages[1]

    @defer.inlineCallbacks
    def test_stopping_closes_every_viewer_with_going_away(self):
        viewers = yield self.connect(3)
        service = BroadcastService(self.factory, reactor)
        service.startService()
        started = reactor.seconds()
        yield with_timeout(service.stopService(), 3, "broadcast stop")
        assert reactor.seconds() - started < 1
        yield wait_until(lambda: all(v.closed for v in viewers), 3, what="closes")
        assert [v.closed[0] for v in viewers] == [1001] * 3
