"""/stats.json and /metrics after a known sequence of events.

In-process: the whole service (makeService) on a MemoryReactorClock, a
stand-in ffmpeg whose output the test writes, the camera's thread played by
the test, viewers in memory; every figure is exact.  One end-to-end check
reads both documents from a running daemon."""

import json
import re
import signal
import urllib.request
from fractions import Fraction

import websocket
from twisted.internet.address import IPv4Address
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from pistreaming.camera import service as camera_service
from pistreaming.options import Config
from pistreaming.service import makeService
from pistreaming.stats import Window
from tests.daemon import Daemon
from tests.fakes.inmemory import Network, RecordingPool, Source, SpawningReactor
from tests.test_stream import read_header

#: The frame rate of the in-process tests (a power of two: exact times).
FPS = 16


def picture(number, framerate, keyframe):
    """One TS packet holding picture C{number}'s whole PES packet, its PTS
    at C{number}/C{framerate} s, as ffmpeg writes them."""
    ticks = round(number * 90000 / framerate)
    pts = bytes([0x21 | ((ticks >> 29) & 0x0E), (ticks >> 22) & 0xFF,
                 ((ticks >> 14) & 0xFE) | 1, (ticks >> 7) & 0xFF, ((ticks << 1) & 0xFE) | 1])
    es = (b"\x00\x00\x01\xb3" if keyframe else b"\x00\x00\x01\x00").ljust(184 - 14, b"\xff")
    return b"\x47\x41\x00\x10" + b"\x00\x00\x01\xe0" + (184 - 6).to_bytes(2, "big") \
        + b"\x80\x80\x05" + pts + es


def get(site, path):
    """(head, body) of C{site}'s answer to GET C{path} from this machine."""
    peer = IPv4Address("TCP", "127.0.0.1", 50000)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return head, body


def metric(text, name):
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


class FiguresTests(unittest.TestCase):
    def setUp(self):
        RecordingPool.pools = []
        self.patch(camera_service, "ThreadPool", RecordingPool)
        self.reactor = SpawningReactor(ends_on=(signal.SIGTERM, signal.SIGKILL))
        # (Config, not Options: a rate MPEG-1 cannot carry, but exact in binary)
        config = Config(codec="mpeg1", ffmpeg="/usr/bin/ffmpeg", width=320, height=240,
                        framerate=Fraction(FPS), bitrate=400_000)
        self.service = makeService(config, reactor=self.reactor, source=Source(),
                                   player=b"//")
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.stop)
        (pool,) = RecordingPool.pools
        (self.camera,) = pool.threads
        self.pictures = 0  # pictures of the current ffmpeg

    def stop(self):
        self.service.stopService()
        self.reactor.advance(10)

    def second_of_video(self, viewers=()):
        """16 frames, one every 1/16 s: each captured 1/64 s before it is
        written to ffmpeg, and out of ffmpeg 1/128 s later as one picture of
        188 bytes (a starting point each second).  (Times exact in binary,
        so that the seconds add up exactly.)"""
        proto = self.service.encoder.process
        for _ in range(FPS):
            now = self.reactor.seconds()
            self.camera.output.write(bytes(self.camera.output.frame_size),
                                     captured_at=now - 1 / 64)
            self.reactor.advance(1 / 128)
            proto.outReceived(picture(self.pictures, FPS, keyframe=self.pictures % FPS == 0))
            self.pictures += 1
            self.reactor.advance(1 / FPS - 1 / 128)
            for viewer in viewers:
                viewer.flush()

    def test_the_figures_follow_what_happened(self):
        service, reactor = self.service, self.reactor
        self.second_of_video()  # nobody watches
        before = json.loads(get(service.site, b"/stats.json")[1])
        assert before["viewers"] == {"max": None, "count": 0, "total": 0, "list": []}
        assert before["broadcast"]["bytes_sent"] == 0
        assert before["broadcast"]["bytes_discarded"] == FPS * 188

        # Two viewers come; the first leaves.
        network = Network(service.factory, reactor)
        first = network.connect(host="192.0.2.1")
        self.second_of_video([first])
        second = network.connect(host="192.0.2.2")
        first.client.transport.loseConnection()
        first.flush()
        # ffmpeg is killed once, and comes back after 0.25 s.
        (_, _, _, transport), = reactor.spawned
        transport.end(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        reactor.advance(0.25)
        self.pictures = 0
        connected_at = reactor.seconds()
        for _ in range(6):  # the rates' window (5 s) past the kill
            self.second_of_video([second])

        head, body = get(service.site, b"/stats.json")
        assert b"\r\nContent-Type: application/json" in head
        now = json.loads(body)
        viewers = now["viewers"]
        assert (viewers["count"], viewers["total"]) == (1, 2)
        (only,) = viewers["list"]
        assert only["address"] == second.server.peer
        assert only["connected_for"] == round(reactor.seconds() - connected_at + 0.25, 3)
        # its start (the last second's pictures) and six seconds of video
        assert only["bytes_sent"] == FPS * 188 + 6 * FPS * 188
        assert (only["skips"], only["backlog"]) == (0, 0)
        encoder = now["encoder"]
        assert encoder["restarts"] == 1
        assert now["camera"]["source"] == "scripted" and now["camera"]["state"] == "ok"
        frames = 8 * FPS
        assert (now["camera"]["frames_captured"], encoder["frames_in"]) == (frames, frames)
        assert now["camera"]["frames_dropped"] == encoder["frames_dropped"] == 0
        assert now["frames_dropped_before_encoder"] == 0
        assert encoder["bytes_in"] == frames * 320 * 240 * 3 // 2
        assert encoder["bytes_out"] == now["broadcast"]["bytes_in"] == frames * 188
        # the first viewer got its start (a second of pictures) and a second
        assert now["broadcast"]["bytes_sent"] == 2 * FPS * 188 + only["bytes_sent"]
        assert now["stream"]["fps"] == FPS
        assert now["stream"]["bitrate"] == FPS * 188 * 8
        assert now["uptime"] == round(reactor.seconds(), 3)
        for stage, ms in (("camera_to_encoder", 15.6), ("encoder", 7.8)):
            assert now["latency_ms"][stage] == {"count": frames, "p50": ms, "p95": ms, "max": ms}

        # /metrics says the same, in Prometheus' text format.
        head, body = get(service.site, b"/metrics")
        assert b"\r\nContent-Type: text/plain" in head
        text = body.decode()
        assert metric(text, "pistream_viewers") == 1
        assert metric(text, "pistream_viewers_connected_total") == 2
        assert metric(text, "pistream_encoder_restarts_total") == 1
        assert metric(text, "pistream_camera_up") == 1
        assert metric(text, "pistream_encoder_frames_total") == frames
        assert metric(text, 'pistream_frames_dropped_total{where="encoder"}') == 0
        assert metric(text, 'pistream_frames_dropped_total{where="camera"}') == 0
        assert metric(text, "pistream_sent_bytes_total") == now["broadcast"]["bytes_sent"]
        assert metric(text, "pistream_framerate_per_second") == FPS
        assert metric(text, 'pistream_stage_latency_seconds{quantile="0.5",stage="encoder"}') \
            == 0.0078  # 1/128 s, shown to a tenth of a millisecond

    def test_frames_dropped_before_the_encoder_are_counted_where_they_were_dropped(self):
        encoder = self.service.encoder
        frame = bytes(self.camera.output.frame_size)
        # ffmpeg has not taken the last frame: the next is dropped by the encoder
        encoder.process.pauseProducing()
        self.camera.output.write(frame)
        encoder.process.resumeProducing()
        # the reactor busy elsewhere: the camera's hand-off keeps two, drops three
        self.reactor.holding = True
        for _ in range(5):
            self.camera.output.write(frame)
        self.reactor.take_from_threads()
        assert encoder.frames_in == 2
        now = json.loads(get(self.service.site, b"/stats.json")[1])
        assert (now["camera"]["frames_dropped"], now["encoder"]["frames_dropped"]) == (3, 1)
        assert now["frames_dropped_before_encoder"] == 4
        text = get(self.service.site, b"/metrics")[1].decode()
        assert metric(text, 'pistream_frames_dropped_total{where="camera"}') == 3
        assert metric(text, 'pistream_frames_dropped_total{where="encoder"}') == 1


def test_a_running_daemon_serves_both_documents():
    with Daemon("--resolution", "320x240", "--framerate", "24") as daemon:
        ws = websocket.create_connection(f"ws://127.0.0.1:{daemon.http_port}/stream",
                                         timeout=10)
        try:
            read_header(ws)
            ws.recv()  # video: ffmpeg runs
            with urllib.request.urlopen(daemon.base_url + "stats.json", timeout=10) as r:
                assert r.headers["Content-Type"] == "application/json"
                figures = json.loads(r.read())
            with urllib.request.urlopen(daemon.base_url + "metrics", timeout=10) as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                text = r.read().decode()
        finally:
            ws.close()
    assert figures["viewers"]["count"] == 1 and figures["camera"]["source"] == "test"
    assert figures["encoder"]["pid"] is not None and figures["encoder"]["frames_in"] > 0
    assert metric(text, "pistream_viewers") == 1
    assert metric(text, "pistream_encoder_pictures_total") > 0


def test_a_window_holds_its_last_minute_whether_or_not_anyone_asks():
    # Ten minutes of pictures at 30 fps, and no one reading /stats.json: the
    # daemon's memory must not fill up with the latency samples.
    window = Window(span=60)
    for number in range(30 * 600):
        window.add(number / 30, 0.004)
    assert abs(len(window.samples) - 60 * 30) <= 1
    assert abs(window.summary(600)["count"] - 60 * 30) <= 1
