"""The WebSocket broadcaster and its viewers.

Autobahn clients talk to the stream's factory in memory (twisted.test.iosim,
tests/fakes/inmemory.py), on a Clock: each connection moves its bytes when
the test says, a viewer can stop reading, and time passes only when the test
advances it.  One test runs over real loopback sockets: the direct-socket
send path and the stream under /stream on the HTTP port.
"""

import json

from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket import protocol as websocket_protocol
from twisted.internet import defer, endpoints, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pistreaming.broadcast import MAX_INCOMING, StreamFactory
from pistreaming.fanout import BroadcastService
from pistreaming.frames import stream_header
from pistreaming.mpegts import Chunk
from tests.fakes.inmemory import Client, Network
from tests.helpers import with_timeout

HEADER = stream_header(640, 480)


def packets(n, fill, picture=False, keyframe=False):
    """A chunk of C{n} TS packets (not real video: the broadcaster only
    looks at the chunk's flags)."""
    data = b"".join(b"\x47" + bytes([fill]) * 187 for _ in range(n))
    return Chunk(data, picture=picture or keyframe, keyframe=keyframe)


def numbered(i, picture=True, keyframe=False, packets_per_chunk=4):
    """Chunk C{i}, its number in the bytes after the sync byte."""
    body = b"\x47" + i.to_bytes(2, "big") + bytes(185)
    return Chunk(body * packets_per_chunk, picture=picture or keyframe, keyframe=keyframe)


def number_of(payload):
    return int.from_bytes(payload[1:3], "big")


def make_factory(clock, **settings):
    """The stream's factory on C{clock}, with C{settings} (as service.py gives them)."""
    return StreamFactory(HEADER, clock, **settings)


class InMemoryCase(unittest.TestCase):
    """A StreamFactory on a Clock, and in-memory Autobahn clients to watch it."""

    settings = {}

    def setUp(self):
        self.clock = task.Clock()
        self.factory = make_factory(self.clock, **self.settings)
        self.fanout = self.factory.fanout
        self.network = Network(self.factory, self.clock)

    def connect(self, n=1, **kwargs):
        connections = [self.network.connect(**kwargs) for _ in range(n)]
        for c in connections:
            assert c.client.messages[:1] == [(HEADER, True)], c.client.messages
        return connections

    def broadcast(self, *chunks):
        for chunk in chunks:
            self.fanout.broadcast(chunk)
        self.network.flush()

    def stop(self, service):
        stopped = []
        service.stopService().addCallback(stopped.append)
        self.network.advance(service.close_timeout)
        assert stopped == [None]

    def log_events(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events


class BroadcastTests(InMemoryCase):
    def test_a_new_viewer_first_gets_the_8_byte_header(self):
        (viewer,) = self.connect(1)
        assert viewer.client.messages == [(b"jsmp\x02\x80\x01\xe0", True)]

    def test_every_viewer_gets_every_chunk_in_order_framed_once(self):
        viewers = self.connect(5)
        framed = []
        original = websocket_protocol.PreparedMessage.__init__

        def counting(message, payload, *args, **kwargs):
            framed.append(payload)
            return original(message, payload, *args, **kwargs)

        self.patch(websocket_protocol.PreparedMessage, "__init__", counting)
        chunks = [packets(3, i) for i in range(10)]
        self.broadcast(*chunks)
        for v in viewers:
            assert v.client.messages == [(HEADER, True)] + [(c.data, True) for c in chunks]
        # framed once per chunk, not once per viewer
        assert framed == [c.data for c in chunks]
        assert self.fanout.bytes_sent == 5 * sum(map(len, chunks))

    def test_a_viewer_that_left_is_no_longer_sent_to(self):
        a, b = self.connect(2)
        a.client.transport.loseConnection()
        self.network.flush()
        assert len(self.fanout.viewers) == 1
        self.broadcast(packets(1, 9))
        assert len(b.client.messages) == 2
        assert len(a.client.messages) == 1

    def test_with_no_viewers_the_stream_is_discarded(self):
        self.fanout.broadcast(packets(2, 1))
        assert self.fanout.bytes_discarded == 376
        assert self.fanout.bytes_sent == 0

    def test_what_viewers_send_is_ignored_and_big_messages_close_them(self):
        quiet, loud = self.connect(2)
        quiet.client.sendMessage(b"hello")
        loud.client.sendMessage(b"x" * (MAX_INCOMING + 1), isBinary=True)
        self.network.flush()
        assert loud.client.closed is not None and loud.client.closed[0] == 1009  # too big
        self.broadcast(packets(1, 2))
        assert quiet.client.messages[1:] == [(packets(1, 2).data, True)]
        assert quiet.client.closed is None
        # a message at the limit is not too big (only ignored)
        (fine,) = self.connect(1)
        fine.client.sendMessage(b"x" * MAX_INCOMING, isBinary=True)
        self.network.flush()
        assert fine.client.closed is None

    def test_stopping_closes_every_viewer_with_going_away(self):
        viewers = self.connect(3)
        service = BroadcastService(self.fanout, self.clock)
        service.startService()
        stopped = service.stopService()
        self.network.flush()
        assert [v.client.closed[0] for v in viewers] == [1001] * 3
        assert not self.fanout.viewers
        # The daemon waits close_timeout for the viewers' answers, no more.
        fired = []
        stopped.addCallback(fired.append)
        self.clock.advance(BroadcastService.close_timeout - 0.01)
        assert not fired
        self.clock.advance(0.01)
        assert fired == [None]

    def test_stopping_cuts_off_viewers_that_do_not_answer_the_close(self):
        (deaf,) = self.connect(1)
        deaf.transport.reading = False  # it reads nothing more, so never answers
        service = BroadcastService(self.fanout, self.clock)
        service.startService()
        stopped = service.stopService()
        fired = []
        stopped.addCallback(fired.append)
        self.network.advance(BroadcastService.close_timeout)
        assert fired == [None]
        assert deaf.transport.disconnecting
        self.network.flush()
        assert not self.fanout.viewers


class StartCacheTests(InMemoryCase):
    def test_a_newcomer_gets_the_latest_starting_point_and_what_followed(self):
        before_any = numbered(0)
        self.fanout.broadcast(before_any)  # nothing a decoder could start at yet
        (early,) = self.connect(1)
        assert early.client.messages == [(HEADER, True)]
        k1, p1, p2 = numbered(1, keyframe=True), numbered(2), numbered(3, picture=False)
        self.broadcast(k1, p1, p2)
        (first,) = self.connect(1)
        # the header, the starting point on its own (shown the moment it
        # arrives), then what followed it in one message (live at once)
        assert [m for m, _ in first.client.messages] == [HEADER, k1.data, p1.data + p2.data]
        k2 = numbered(4, keyframe=True)
        self.broadcast(k2)
        (second,) = self.connect(1)
        assert [m for m, _ in second.client.messages] == [HEADER, k2.data]
        # and the first viewer got everything since it came, once
        assert [m for m, _ in first.client.messages] == [
            HEADER, k1.data, p1.data + p2.data, k2.data]


class StatusTests(InMemoryCase):
    def test_viewers_that_ask_get_status_messages_and_others_only_video(self):
        (plain,) = self.connect(1)
        (page,) = self.connect(1, protocols=["pistream"])
        assert page.client.websocket_protocol_in_use == "pistream"
        self.fanout.set_status(camera="unavailable", why="no frame for 4.1s")
        self.broadcast(numbered(1, keyframe=True))
        texts = [json.loads(m) for m in page.client.texts()]
        assert texts == [{"viewers": 2}, {"camera": "unavailable", "why": "no frame for 4.1s"}]
        assert page.client.binary() == [HEADER, numbered(1).data]
        assert all(binary for _, binary in plain.client.messages)
        # the same status again says nothing; a change says only what changed
        self.fanout.set_status(camera="unavailable", why="no frame for 4.1s")
        self.fanout.set_status(camera="ok", why="no frame for 4.1s")
        self.network.flush()
        assert [json.loads(m) for m in page.client.texts()][2:] == [{"camera": "ok"}]
        # a page that comes later is told the camera's state at once
        self.fanout.set_status(camera="unavailable", why="no frame for 4.1s")
        (late,) = self.connect(1, protocols=["pistream"])
        assert [json.loads(m) for m in late.client.texts()] == [
            {"camera": "unavailable", "why": "no frame for 4.1s"}, {"viewers": 3}]
        self.network.flush()
        assert [json.loads(m) for m in page.client.texts()][2:] == [
            {"camera": "ok"}, {"camera": "unavailable"}, {"viewers": 3}]


class SlowViewerTests(InMemoryCase):
    settings = {"backlog_limit": 40 * 1024}
    #: What the slow viewer's connection holds before it pushes back.
    send_buffer = 16 * 1024

    def stream(self, count, start=0, per_flush=10, gop=10):
        """Broadcast pictures of two chunks each (a picture start, then the
        rest), a starting point every C{gop} pictures; what waits moves
        every C{per_flush} chunks."""
        for i in range(start, start + count):
            picture = i // 2
            self.fanout.broadcast(numbered(
                i, picture=i % 2 == 0, keyframe=i % 2 == 0 and picture % gop == 0))
            if i % per_flush == 0:
                self.network.flush()
        self.network.flush()

    def check_slow_viewer(self, gop, send_buffer):
        healthy, slow = self.connect(2, capacity=send_buffer)
        slow.transport.reading = False  # it stops reading from its socket
        self.stream(3000, gop=gop)
        server_side = [p.viewer for p in self.fanout.viewers]
        assert max(v.skips for v in server_side) >= 1
        assert all(v.queued <= self.fanout.backlog_limit for v in server_side)
        # what waits for the slow viewer is bounded: its connection's buffer
        # (one chunk past it, at most) and the backlog limit
        assert slow.transport.waiting() <= send_buffer + 2 * 1024
        # The healthy viewer got everything, in order, without a skip.
        assert [number_of(m) for m, _ in healthy.client.messages[1:]] == list(range(3000))
        assert healthy.server.viewer.skips == 0
        # The slow one reads again: what it gets is decodable.
        slow.transport.reading = True
        self.stream(40, start=3000, gop=gop)
        got = [number_of(m) for m, _ in slow.client.messages[1:]]
        assert got[-1] == 3039
        assert got == sorted(got) and len(got) < 3040
        gaps = 0
        for before, after in zip(got, got[1:]):
            if after != before + 1:
                gaps += 1
                # a gap ends at a starting point ...
                assert after % 2 == 0 and (after // 2) % gop == 0, (before, after)
                # ... and begins after a whole picture
                assert before % 2 == 1, (before, after)
        assert gaps >= 1
        assert all(n - 1 in got for n in got if n % 2 == 1 and n > got[0])

    def test_a_slow_viewer_skips_to_decodable_points_and_slows_nobody(self):
        # Starting points close together: one is queued already when it
        # skips.  Its connection fills up after a picture's second chunk.
        self.check_slow_viewer(gop=10, send_buffer=self.send_buffer)

    def test_a_slow_viewer_waits_for_the_next_decodable_point(self):
        # starting points further apart than the backlog holds: it skips,
        # then takes nothing until the next one comes.  Its connection fills
        # up after a picture's first chunk: the rest of that picture is
        # still sent.
        self.check_slow_viewer(gop=60, send_buffer=self.send_buffer - 756)

    def test_a_viewer_that_takes_nothing_is_closed(self):
        events = self.log_events()
        service = BroadcastService(self.fanout, self.clock)
        service.startService()
        self.addCleanup(self.stop, service)
        healthy, stuck = self.connect(2, capacity=self.send_buffer)
        stuck.transport.reading = False
        self.stream(3000)
        assert [p.viewer.paused for p in self.fanout.viewers].count(True) == 1
        timeout = self.fanout.stuck_timeout
        # Up to stuck_timeout it stays (the checks come every check_interval) ...
        self.network.advance(timeout, step=0.25)
        assert len(self.fanout.viewers) == 2
        assert not any("took nothing" in e.get("log_format", "") for e in events)
        # ... then it is closed (1008); it does not answer, so after the close
        # handshake's timeout it is cut off.
        self.network.advance(service.check_interval + 1.0, step=0.25)
        assert len(self.fanout.viewers) == 1
        assert any("took nothing" in e.get("log_format", "") for e in events)
        assert [number_of(m) for m, _ in healthy.client.messages[1:]] == list(range(3000))
        assert healthy.client.closed is None


class LoopbackTests(unittest.TestCase):
    """Real sockets: a viewer of the stream's own port gets each frame
    straight from the kernel (the direct-socket path), and one of the HTTP
    port's /stream the same bytes."""

    timeout = 30

    @defer.inlineCallbacks
    def test_the_stream_on_its_own_port_and_under_stream_on_the_http_port(self):
        from pistreaming.options import Config
        from pistreaming.web import make_site
        factory = make_factory(reactor)
        site = make_site(Config(codec="mpeg1", ffmpeg="/usr/bin/ffmpeg"), factory, player=b"//",
                         reactor=reactor)
        listen = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen
        stream_port = yield listen(factory)
        self.addCleanup(stream_port.stopListening)
        http_port = yield listen(site)
        self.addCleanup(http_port.stopListening)

        viewers = []
        for port, path in ((stream_port, "/"), (http_port, "/stream")):
            number = port.getHost().port
            clients = WebSocketClientFactory(f"ws://127.0.0.1:{number}{path}", reactor=reactor)
            clients.protocol = Counting
            viewer = yield endpoints.TCP4ClientEndpoint(
                reactor, "127.0.0.1", number).connect(clients)
            self.addCleanup(viewer.transport.abortConnection)
            viewers.append(viewer)
        direct, via_http = viewers
        for viewer in viewers:
            yield with_timeout(viewer.received(1), 5, "the header")
        assert len(factory.fanout.viewers) == 2  # the header comes once the viewer is added
        chunks = [numbered(i, keyframe=i == 0) for i in range(20)]
        for chunk in chunks:
            factory.fanout.broadcast(chunk)
        for viewer in viewers:
            yield with_timeout(viewer.received(21), 5, "the chunks")
        expected = [(HEADER, True)] + [(c.data, True) for c in chunks]
        assert direct.messages == expected
        assert via_http.messages == expected
        assert factory.fanout.bytes_sent == 2 * sum(map(len, chunks))


class Counting(Client):
    """A real-socket viewer whose C{received(n)} fires once it has C{n} messages."""

    def __init__(self):
        super().__init__()
        self._waiting = []

    def onMessage(self, payload, isBinary):
        super().onMessage(payload, isBinary)
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



def test_autobahns_timers_run_in_batches_never_early():
    """Each viewer's pings and their timeouts: one reactor call per 0.2 s
    batch, not one per timer, each timer at most 0.2 s late and never early;
    a batch whose timers were all cancelled leaves no call behind."""
    from pistreaming.broadcast import ReactorTimers
    clock = task.Clock()
    timers = ReactorTimers(clock)
    ran = []
    for i in range(100):  # a hundred viewers' pings, due within one batch
        timers.call_later(10.001 + i / 1000, ran.append, i)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10.09)
    assert ran == []  # none early
    clock.advance(0.12)  # by the end of their batch (10.2 s), all of them
    assert ran == list(range(100))
    late = [timers.call_later(5, ran.append, "late") for _ in range(3)]
    for call in late:
        call.cancel()
    assert clock.getDelayedCalls() == []
    late[0].cancel()  # Autobahn may cancel again, or after it ran: harmless
    clock.advance(6)
    assert ran[-1] == 99
