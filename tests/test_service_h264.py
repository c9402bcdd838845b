"""The daemon with --codec h264, built in-process on a MemoryReactorClock:
what viewers of /stream receive, newcomers in the middle of a group of
pictures, a stream whose size changes, the stream's own port, the figures.

ffmpeg does not run inside these tests: its output is real H.264 in MPEG-TS,
made once by ffmpeg's libx264 for the module, and handed to the encoder's
process protocol as ffmpeg would write it."""

import json
import subprocess

import pytest

from pistreaming.camera import service as camera_service
from pistreaming.encoder import output_args
from pistreaming.mpegts import PESAssembler
from pistreaming.service import makeService
from pistreaming.h264 import is_idr, nal_types, parse_message
from tests.fakes.inmemory import Network
from tests.test_camera_service_h264 import Pool
from tests.test_service import ServiceCase, Source, http, options

SPS, PPS = 7, 8


def libx264_ts(size, frames, gop):
    """C{frames} pictures of a moving test picture at C{size}, as the
    daemon's ffmpeg writes them (its own output arguments: libx264, SPS/PPS
    before every IDR, MPEG-TS), with an IDR every C{gop} pictures."""
    args = output_args(30, 800_000, codec="h264", keyframe_interval=gop / 30)
    assert args[-1] == "pipe:1"
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30",
         "-frames:v", str(frames), *args[:-1], "-"],
        check=True, capture_output=True).stdout


@pytest.fixture(scope="class")
def streams(request):
    request.cls.small = libx264_ts("320x240", 30, 10)
    request.cls.large = libx264_ts("640x360", 10, 10)
    request.cls.long = libx264_ts("320x240", 120, 10)


def packets(ts):
    return [ts[i:i + 188] for i in range(0, len(ts), 188)]


class Watching:
    def pictures(self, client):
        return [parse_message(payload) for payload, binary in client.messages if binary]

    def descriptions(self, client):
        return [json.loads(payload)["stream"] for payload, binary in client.messages
                if not binary and b'"stream"' in payload]


@pytest.mark.usefixtures("streams")
class H264ServiceTests(Watching, ServiceCase):
    def build_h264(self, *args):
        service = self.build("--codec", "h264", "--framerate", "30", *args)
        self.start()
        self.ffmpeg = self.reactor.spawned[-1][0]
        return service

    def ffmpeg_writes(self, ts):
        """ffmpeg writes C{ts} (whole pictures' packets)."""
        self.ffmpeg.childDataReceived(1, ts)

    def test_ffmpeg_is_asked_for_h264_in_mpeg_ts(self):
        self.build_h264("--keyframe-interval", "1.5", "--x264-preset", "medium")
        _, executable, args, _ = self.reactor.spawned[-1]
        assert "libx264" in args and "mpegts" in args
        assert args[args.index("-g") + 1] == "45"  # 1.5 s at 30 fps
        assert args[args.index("-preset") + 1] == "medium"
        assert args[args.index("-tune") + 1] == "zerolatency"  # no B-frames, no lookahead

    def test_a_viewer_gets_the_description_then_pictures_from_a_keyframe(self):
        service = self.build_h264()
        network = Network(service.site, self.reactor, port=8082)
        early = network.connect(path="/stream")
        assert early.client.messages == []  # nothing is known of the stream yet
        self.ffmpeg_writes(self.small)
        network.flush()
        first = early.client.messages[0]
        assert first[1] is False  # text: the description
        (description,) = self.descriptions(early.client)
        assert description["codec"] == "h264"
        assert (description["width"], description["height"]) == (320, 240)
        assert description["codecs"].startswith("avc1.64")
        assert description["profile"] == "High"  # x264's, without B-frames
        pictures = self.pictures(early.client)
        assert len(pictures) == 30
        assert pictures[0].keyframe and is_idr(pictures[0].access_unit)
        assert [p.keyframe for p in pictures].count(True) == 3
        for p in pictures:
            assert p.keyframe == is_idr(p.access_unit)
            if p.keyframe:  # a decoder can start here
                assert {SPS, PPS} <= set(nal_types(p.access_unit))

    def test_a_newcomer_in_mid_group_gets_the_keyframe_and_every_picture_since(self):
        service = self.build_h264()
        network = Network(service.site, self.reactor, port=8082)
        all_packets = packets(self.small)
        self.ffmpeg_writes(b"".join(all_packets[:len(all_packets) * 2 // 3]))
        live = network.connect(path="/stream")
        sent_so_far = service.h264.access_units
        newcomer = self.pictures(live.client)
        assert self.descriptions(live.client)
        assert newcomer[0].keyframe
        assert not any(p.keyframe for p in newcomer[1:])
        # the keyframe of the current group and every picture since: live at once
        assert 1 <= len(newcomer) <= 10
        assert len(newcomer) == sent_so_far - 10 * ((sent_so_far - 1) // 10)
        # each picture its own message, as it was sent live
        assert all(nal_types(p.access_unit).count(9) <= 1 for p in newcomer)
        self.ffmpeg_writes(b"".join(all_packets[len(all_packets) * 2 // 3:]))
        network.flush()
        assert len(self.pictures(live.client)) == len(newcomer) + 30 - sent_so_far

    def test_a_new_size_is_described_again_and_viewers_restart_at_its_keyframe(self):
        service = self.build_h264()
        network = Network(service.site, self.reactor, port=8082)
        viewer = network.connect(path="/stream")
        self.ffmpeg_writes(self.small)
        self.ffmpeg_writes(self.large)  # the camera came back at another size
        network.flush()
        sizes = [(d["width"], d["height"]) for d in self.descriptions(viewer.client)]
        assert sizes == [(320, 240), (640, 360)]
        # after the second description, the first picture is a keyframe
        kinds = []
        for payload, binary in viewer.client.messages:
            kinds.append("description" if not binary else
                         "key" if parse_message(payload).keyframe else "delta")
        second = [i for i, k in enumerate(kinds) if k == "description"][1]
        assert kinds[second + 1] == "key"
        # and a newcomer now starts with the new size only
        newcomer = network.connect(path="/stream")
        assert [(d["width"], d["height"]) for d in self.descriptions(newcomer.client)] == [
            (640, 360)]

    def test_the_streams_own_port_serves_mpeg1_made_on_demand(self):
        service = self.build_h264()
        self.ffmpeg_writes(self.small)
        (ws_port,) = [factory for _, factory, _, _ in self.reactor.tcpServers
                      if factory is not service.site]
        assert ws_port is service.mpeg1_factory
        assert len(self.reactor.spawned) == 1  # the H.264 encoder only
        viewer = Network(ws_port, self.reactor).connect()
        # the original demo's stream: jsmp and the pictures' size, then MPEG-TS
        assert viewer.client.binary() == [b"jsmp\x01\x40\x00\xf0"]  # 320x240
        assert viewer.client.closed is None
        _, _, args, _ = self.reactor.spawned[-1]
        assert len(self.reactor.spawned) == 2
        assert args[args.index("-f") + 1] == "h264" and "mpeg1video" in args
        assert service.factory.turned_away == 0

    def test_the_figures_say_codec_profile_level_and_keyframe_interval(self):
        service = self.build_h264("--keyframe-interval", "0.5")
        self.ffmpeg_writes(self.small)
        figures = service.stats.gather()["stream"]
        assert figures["codec"] == "h264"
        assert figures["profile"] == "High"
        assert figures["level"] and figures["codecs"].startswith("avc1.")
        assert figures["keyframe_interval_setting"] == 0.5
        assert figures["keyframes"] == 3
        answer = http(service.site, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b'pistream_stream_info{codec="h264"' in answer
        assert b"pistream_keyframes_total 3.0" in answer

    def test_h264_is_the_default(self):
        service = makeService(options(), reactor=self.reactor, source=Source(),
                              player=b"//")
        self.service = service
        self.start()
        assert service.h264 is not None and service.on_demand is not None
        assert service.fanout.header is None  # the description comes with the SPS/PPS
        assert service.stats.gather()["stream"]["codec"] == "h264"

    def test_mpeg1_is_untouched(self):
        service = self.build("--codec", "mpeg1")
        self.start()
        assert service.h264 is None
        assert service.fanout.header[:4] == b"jsmp"
        assert service.stats.gather()["stream"]["codec"] == "mpeg1"
        assert "profile" not in service.stats.gather()["stream"]


    def test_a_corrupt_picture_is_dropped_and_the_page_told_until_a_keyframe(self):
        service = self.build_h264()
        network = Network(service.site, self.reactor, port=8082)
        page = network.connect(path="/stream", protocols=["pistream"])
        all_packets = packets(self.small)
        self.ffmpeg_writes(b"".join(all_packets[:len(all_packets) // 3]))
        network.flush()
        before = len(self.pictures(page.client))
        assert before >= 3 and not self.pictures(page.client)[-1].keyframe
        # ffmpeg's next picture arrives damaged: its slice's NAL header has
        # the forbidden bit set (as a corrupted transfer can leave it)
        service.h264.feed(b"\x00\x00\x00\x01\xe1" + bytes(40), None)
        self.ffmpeg_writes(b"".join(all_packets[len(all_packets) // 3:]))
        network.flush()
        statuses = [json.loads(t) for t in page.client.texts() if b'"video"' in t]
        assert [s["video"] for s in statuses] == ["corrupt", "ok"]
        assert statuses[0]["why"]
        after = self.pictures(page.client)[before:]
        # nothing between the damage and the next keyframe: no decoder is fed
        # a picture whose reference it never got
        assert after and after[0].keyframe
        assert service.stats.gather()["stream"]["access_units_dropped"] >= 1

    def test_a_slow_viewer_skips_to_a_keyframe_and_slows_nobody(self):
        service = self.build_h264("--backlog", "16k")
        network = Network(service.site, self.reactor, port=8082)
        healthy = network.connect(path="/stream")
        slow = network.connect(path="/stream", capacity=8 * 1024)
        viewer_of = {v.transport: v for v in service.fanout.viewers.values()}
        slow.transport.reading = False  # it stops reading from its socket
        all_packets = packets(self.long)
        cut = len(all_packets) * 3 // 4
        self.ffmpeg_writes(b"".join(all_packets[:cut]))
        network.flush()
        assert viewer_of[healthy.transport].skips == 0
        assert viewer_of[slow.transport].skips >= 1
        assert viewer_of[slow.transport].queued <= service.fanout.backlog_limit
        slow.transport.reading = True
        network.flush()
        rest = all_packets[cut:]
        for i in range(0, len(rest), 10):  # in time: the network moves meanwhile
            self.ffmpeg_writes(b"".join(rest[i:i + 10]))
            network.flush()
        live = self.pictures(healthy.client)
        assert len(live) == 120  # the healthy viewer lost nothing
        got = self.pictures(slow.client)
        assert 10 < len(got) < 120
        # what it got decodes: each run of consecutive pictures begins at a
        # keyframe (the first run, and every one after a skip)
        index = {p.access_unit: i for i, p in enumerate(live)}
        assert len(index) == 120  # every picture differs
        starts, previous = [], None
        for p in got:
            i = index[p.access_unit]
            if previous is None or i != previous + 1:
                starts.append(p)
            previous = i
        assert len(starts) >= 2
        assert all(p.keyframe for p in starts)
        assert index[got[-1].access_unit] == 119  # and it is live again


@pytest.mark.usefixtures("streams")
class CameraEncoderTests(Watching, ServiceCase):
    """A camera with its own H.264 encoder (picamera2, picamera): no ffmpeg;
    the test plays the camera's encoder thread with real access units."""

    def setUp(self):
        super().setUp()
        Pool.pools = []
        self.patch(camera_service, "ThreadPool", Pool)

    def build_camera(self, *args):
        self.camera = ScriptedCamera()
        self.camera.clock = self.reactor
        self.service = makeService(
            options("--codec", "h264", "--framerate", "30", *args), reactor=self.reactor,
            source=self.camera, player=b"//")
        self.start()
        (self.run_,) = Pool.pools[-1].runs
        return self.service

    def camera_gives(self, ts):
        units = PESAssembler().feed(ts)
        for data, pts in units:
            self.run_.output.access_unit(data, is_idr(data), 1_700_000_000 + pts)

    def test_no_ffmpeg_runs_and_the_camera_is_asked_for_what_the_options_say(self):
        self.build_camera("--bitrate", "1.5M", "--keyframe-interval", "1")
        assert self.reactor.spawned == []
        encoding = self.run_.encoding
        assert (encoding.bitrate, encoding.keyframe_interval, encoding.framerate) == (
            1_500_000, 1.0, 30)
        assert encoding.profile == "baseline"

    def test_viewers_get_the_cameras_pictures_and_a_newcomer_asks_for_a_keyframe(self):
        service = self.build_camera()
        network = Network(service.site, self.reactor, port=8082)
        first = network.connect(path="/stream")
        all_packets = packets(self.small)
        self.camera_gives(b"".join(all_packets[:len(all_packets) // 2]))
        network.flush()
        (description,) = self.descriptions(first.client)
        assert (description["width"], description["height"]) == (320, 240)
        got = self.pictures(first.client)
        assert got[0].keyframe and len(got) >= 10
        assert abs(got[0].capture_time - 1_700_000_000) < 60  # the camera's own times
        asked = len(self.camera.asked)
        self.reactor.advance(2)
        network.connect(path="/stream")  # a newcomer: one keyframe asked for
        assert len(self.camera.asked) == asked + 1
        network.connect(path="/stream")  # another at once: asked within the second
        self.reactor.advance(1)
        assert len(self.camera.asked) <= asked + 2
        figures = service.stats.gather()
        assert figures["encoder"]["where"] == "camera"
        assert figures["stream"]["codec"] == "h264" and figures["stream"]["keyframes"] >= 1


class ScriptedCamera:
    """A camera with its own H.264 encoder, played by the test."""

    name = "scripted"
    encodes_h264 = True

    def __init__(self):
        self.asked = []

    def describe(self):
        return "a scripted camera with an H.264 encoder"

    def run(self, output, stopping):
        raise AssertionError("the raw path is not for --codec h264")

    def run_h264(self, output, stopping, encoding):
        raise AssertionError("runs on the test's say-so only")

    def request_keyframe(self):
        self.asked.append(self.clock.seconds())
        return True
