"""The WebSocket broadcaster, over real loopback sockets with Autobahn clients."""

import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, reactor, task
from twisted.trial import unittest

from pistreaming.broadcast import MAX_INCOMING, BroadcastService, StreamFactory
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


class ServerCase(unittest.TestCase):
    """A StreamFactory on a real port, and Autobahn clients to watch it."""

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


class BroadcastTests(ServerCase):
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
        # Twice the limit: all of it reaches the daemon before it closes, so
        # the close frame is not lost to a reset of a connection with data
        # still unread (which a far bigger message could provoke).
        loud.sendMessage(b"x" * (2 * MAX_INCOMING), isBinary=True)
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


def numbered(i, picture=True, keyframe=False, packets_per_chunk=4):
    """Chunk C{i}, its number in the bytes after the sync byte."""
    body = b"\x47" + i.to_bytes(2, "big") + bytes(185)
    return Chunk(body * packets_per_chunk, picture=picture or keyframe, keyframe=keyframe)


def number_of(payload):
    return int.from_bytes(payload[1:3], "big")


class StartCacheTests(ServerCase):
    @defer.inlineCallbacks
    def test_a_newcomer_gets_the_latest_starting_point_and_what_followed(self):
        before_any = numbered(0)
        self.factory.broadcast(before_any)  # nothing a decoder could start at yet
        k1, p1, p2 = numbered(1, keyframe=True), numbered(2), numbered(3, picture=False)
        for chunk in (k1, p1, p2):
            self.factory.broadcast(chunk)
        (first,) = yield self.connect(1)
        # the header, the starting point on its own (shown the moment it
        # arrives), then what followed it in one message (live at once)
        yield wait_until(lambda: len(first.messages) == 3, 5, what="the cached start")
        assert [m for m, _ in first.messages] == [HEADER, k1.data, p1.data + p2.data]
        k2 = numbered(4, keyframe=True)
        self.factory.broadcast(k2)
        (second,) = yield self.connect(1)
        yield wait_until(lambda: len(second.messages) == 2, 5, what="the new start")
        assert [m for m, _ in second.messages] == [HEADER, k2.data]
        # and the first viewer got everything since it came, once
        yield wait_until(lambda: len(first.messages) == 4, 5, what="k2 at the first viewer")
        assert first.messages[3][0] == k2.data
        assert len(first.messages) == 4 and len(second.messages) == 2


class StatusTests(ServerCase):
    @defer.inlineCallbacks
    def test_viewers_that_ask_get_status_messages_and_others_only_video(self):
        plain, = yield self.connect(1)
        self.clients.setSessionParameters(
            url=f"ws://127.0.0.1:{self.port.getHost().port}/", protocols=["pistream"])
        page, = yield self.connect(1)
        assert page.websocket_protocol_in_use == "pistream"
        self.factory.set_status(camera="unavailable", why="no frame for 4.1s")
        self.factory.broadcast(numbered(1, keyframe=True))
        yield wait_until(lambda: any(m == numbered(1).data for m, _ in page.messages), 5,
                         what="video at the page")
        texts = [json.loads(m) for m, binary in page.messages if not binary]
        assert {"viewers": 2} in texts
        assert {"camera": "unavailable", "why": "no frame for 4.1s"} in texts
        assert all(binary for _, binary in plain.messages)
        # a page that comes later is told the camera's state at once
        late, = yield self.connect(1)
        yield wait_until(lambda: any(not b for _, b in late.messages), 5, what="status")
        assert {"camera": "unavailable", "why": "no frame for 4.1s"} in [
            json.loads(m) for m, b in late.messages if not b]


class SlowViewerTests(ServerCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.factory.send_buffer = 16 * 1024
        self.factory.backlog_limit = 40 * 1024

    @defer.inlineCallbacks
    def stream(self, count, start=0, per_tick=10):
        """Broadcast pictures of two chunks each (a picture start, then the
        rest), a starting point every 10 pictures; a few per reactor turn."""
        for i in range(start, start + count):
            picture = i // 2
            self.factory.broadcast(numbered(
                i, picture=i % 2 == 0, keyframe=i % 2 == 0 and picture % 10 == 0))
            if i % per_tick == 0:
                yield task.deferLater(reactor, 0.001, lambda: None)

    @defer.inlineCallbacks
    def test_a_slow_viewer_skips_to_decodable_points_and_slows_nobody(self):
        healthy, slow = yield self.connect(2)
        slow.transport.pauseProducing()  # it stops reading from its socket
        yield self.stream(3000)
        server_side = [p.viewer for p in self.factory.viewers]
        assert max(v.skips for v in server_side) >= 1
        assert all(v.queued <= self.factory.backlog_limit for v in server_side)
        # The healthy viewer got everything, in order.
        yield wait_until(lambda: len(healthy.messages) == 3001, 10, what="all at healthy")
        assert [number_of(m) for m, _ in healthy.messages[1:]] == list(range(3000))
        # The slow one reads again: what it gets is decodable.
        slow.transport.resumeProducing()
        yield self.stream(40, start=3000)
        yield wait_until(lambda: slow.messages and number_of(slow.messages[-1][0]) == 3039,
                         10, what="the slow viewer at live")
        got = [number_of(m) for m, _ in slow.messages[1:]]
        assert got == sorted(got) and len(got) < 3040
        for before, after in zip(got, got[1:]):
            if after != before + 1:
                # a gap ends at a starting point ...
                assert after % 2 == 0 and (after // 2) % 10 == 0, (before, after)
                # ... and begins after a whole picture
                assert before % 2 == 1, (before, after)
        assert all(n - 1 in got for n in got if n % 2 == 1 and n > got[0])

    @defer.inlineCallbacks
    def test_a_viewer_that_takes_nothing_is_closed(self):
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        # Long enough that the stuck viewer is still there once the stream
        # has filled its connection (3000 pictures take a second or more on a
        # busy machine); then short, so that it is closed.
        self.factory.stuck_timeout = 60
        service = BroadcastService(self.factory, reactor)
        service.check_interval = 0.1
        service.startService()
        self.addCleanup(service.stopService)
        healthy, stuck = yield self.connect(2)
        stuck.transport.pauseProducing()
        yield self.stream(3000)
        assert [p.viewer.paused for p in self.factory.viewers].count(True) == 1
        self.factory.stuck_timeout = 0.5
        yield wait_until(lambda: len(self.factory.viewers) == 1, 10, what="the stuck viewer closed")
        assert any("took nothing" in e.get("log_format", "") for e in events)
        yield wait_until(lambda: len(healthy.messages) == 3001, 10, what="all at healthy")
        assert healthy.closed is None
