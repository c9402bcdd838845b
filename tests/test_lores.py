"""MPEG-1 on demand from the camera's second, smaller stream (picamera2's
lores): with --codec h264 and picamera2, the camera also gives raw YUV420
frames at most 640 pixels a side, and the MPEG-1 that viewers without an
H.264 decoder get is encoded from those, at that size, copied out of the
camera only while that encoder runs; a camera without such a stream keeps
the decoding of the H.264.

The fake picamera2 (tests/fake_picamera2.py) stands in for the camera, with
picamera2's rules for lores; the service is built in-process on a
SpawningReactor with the camera's thread played by the test; the last test
runs the real daemon on the fake camera, real ffmpeg, real sockets."""

import json
import subprocess
from fractions import Fraction
import threading
import time
import types
import urllib.request

import numpy as np
import pytest
import websocket
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure

from pistreaming.camera import service as camera_service
from pistreaming.camera.output import LoresOutput
from pistreaming.camera.picamera2_source import LORES_MOST, Picamera2Source, lores_size
from pistreaming.camera.picture import Picture
from pistreaming.encoder import output_args
from pistreaming.frames import stream_header
from pistreaming.h264 import is_idr, parse_message
from pistreaming.mpegts import PESAssembler
from pistreaming.ondemand import STOP_AFTER, lores_command
from tests.daemon import Daemon
from tests.fake_picamera2 import (ENCODER_PROCESS_NAME, JUNK, QUADRANTS, U_HALVES, V_HALVES,
                                  Rig, flipped, scene, write_shims, yuv420_buffer)
from tests.fakes.inmemory import Network, RecordingPool
from tests.helpers import collect_pictures
from tests.test_camera_service_h264 import Pool
from tests.test_service import ServiceCase, options
from tests.test_service_h264 import ScriptedCamera, libx264_ts
from tests.test_stream import decode_last_picture, decoded_frames, ffmpeg_children, pictures_in

ENCODING = types.SimpleNamespace(bitrate=500_000, keyframe_interval=1.0, framerate=30,
                                 profile="baseline")


def quadrant_means(y, width, height):
    """The mean luma of each quadrant's middle: top left, top right, bottom
    left, bottom right."""
    y = np.frombuffer(y, np.uint8)[:width * height].reshape(height, width).astype(int)
    h, w = height // 4, width // 4
    return [round(y[r * 2 * h + h // 2:r * 2 * h + h * 3 // 2,
                    c * 2 * w + w // 2:c * 2 * w + w * 3 // 2].mean()) for r in (0, 1)
            for c in (0, 1)]


# -- the size asked for ----------------------------------------------------------

def test_the_lores_stream_is_at_most_640_a_side_with_the_main_streams_shape():
    for main, lores in [((1920, 1080), (640, 360)), ((1280, 720), (640, 360)),
                        ((1296, 730), (640, 360)), ((1296, 972), (640, 480)),
                        ((800, 600), (640, 480)), ((720, 1280), (360, 640)),
                        ((640, 480), (640, 480)), ((320, 240), (320, 240))]:
        assert lores_size(*main) == lores, main
        width, height = lores
        assert width % 2 == 0 and height % 2 == 0 and max(lores) <= LORES_MOST
        assert width <= main[0] and height <= main[1]
        assert abs(height - width * main[1] / main[0]) <= 2  # the same shape
    assert lores_size(4094, 32) == (640, 4)  # even, however thin
    # Landscape and larger than that: 640 wide, a multiple of 64 (and 128):
    # rows with no padding (picamera2's optimal alignment for YUV420).
    assert lores_size(1920, 1080)[0] % 128 == 0


# -- the fake keeps picamera2's rules for lores ------------------------------------

def test_the_fake_checks_and_fills_in_lores_as_picamera2_and_libcamera_do():
    rig = Rig(stride_align=256)
    camera = rig.picamera2.Picamera2(0)
    try:
        config = camera.create_video_configuration(
            main={"size": (960, 540), "format": "YUV420"}, lores={"size": (641, 361)})
        assert config["lores"] == {"format": "YUV420", "size": (640, 360), "preserve_ar": False}
        assert config["main"]["preserve_ar"] is True
        with pytest.raises(ValueError, match="Bad key 'fps'"):
            camera.create_video_configuration(lores={"size": (320, 240), "fps": 30})
        with pytest.raises(RuntimeError, match="Display stream lores was not defined"):
            camera.create_video_configuration(display="lores")
        for lores, message in [({"size": (1280, 540)}, "may not exceed main stream"),
                               ({"size": (320, 180), "format": "RGB888"}, "must be YUV"),
                               ({"size": (320, 180), "format": "H264"}, "Bad format H264")]:
            with pytest.raises(RuntimeError, match=message):
                camera.configure(camera.create_video_configuration(
                    main={"size": (960, 540), "format": "YUV420"}, lores=lores))
        camera.configure(config)
        lores = camera.stream_configuration("lores")
        # its own stride: the width aligned as the main stream's is
        assert (lores["size"], lores["stride"], lores["framesize"]) == (
            (640, 360), 768, 768 * 360 * 3 // 2)
        assert camera.stream_configuration("main")["stride"] == 1024
    finally:
        camera.close()
    # A Pi 5 takes an RGB lores; libcamera clamps lores to a main it shrank.
    rig = Rig(pi5=True, adjust_size=lambda size: (480, 270))
    camera = rig.picamera2.Picamera2(0)
    try:
        camera.configure(camera.create_video_configuration(
            main={"size": (960, 540), "format": "YUV420"},
            lores={"size": (640, 360), "format": "RGB888"}))
        assert camera.stream_configuration("lores")["size"] == (480, 270)
    finally:
        camera.close()
    # A camera whose libcamera gives one processed stream only.
    camera = Rig(output_streams=1).picamera2.Picamera2(0)
    try:
        with pytest.raises(RuntimeError, match="Invalid camera configuration"):
            camera.configure(camera.create_video_configuration(
                main={"size": (960, 540), "format": "YUV420"}, lores={"size": (640, 360)}))
    finally:
        camera.close()


def test_the_null_encoder_on_lores_hands_the_cameras_own_buffer_for_the_call_only():
    rig = Rig(stride_align=256)
    camera = rig.picamera2.Picamera2(0)
    frames, kept, streams = [], [], []
    arrived = threading.Event()

    class Keeper(rig.picamera2.outputs.Output):
        def outputframe(self, frame, keyframe=True, timestamp=None, packet=None, audio=False):
            frames.append((bytes(frame), keyframe, timestamp))
            kept.append(frame)
            if len(frames) >= 3:
                arrived.set()

        def _add_stream(self, *args, **kwargs):
            streams.append((args, kwargs))

    try:
        camera.configure(camera.create_video_configuration(
            main={"size": (960, 540), "format": "YUV420"}, lores={"size": (640, 360)}))
        camera.start()
        for _ in range(3):  # three frames come (capture_request waits for each)
            camera.capture_request().release()
        assert rig.lores_drawn == 0 and rig.frames > 0  # nothing asked for it yet
        encoder = rig.picamera2.encoders.Encoder()
        camera.start_encoder(encoder, Keeper(), name="lores")  # while it runs
        assert arrived.wait(5)
        camera.stop_encoder(encoder)
        drawn = rig.lores_drawn
        for _ in range(3):
            camera.capture_request().release()
        assert rig.lores_drawn == drawn  # stopped: no more of that stream
    finally:
        camera.close()
    assert streams == [(("video", "rawvideo"), {
        "pix_fmt": "yuv420p", "rate": Fraction(1000000, 30), "width": 640, "height": 360})]
    data, keyframe, timestamp = frames[1]
    assert keyframe and timestamp > 0 and len(data) == 768 * 360 * 3 // 2
    # the stride's surplus is junk, the picture the scene at lores size
    luma = np.frombuffer(data, np.uint8)[:768 * 360].reshape(360, 768)
    assert (luma[:, 640:] == JUNK).all()
    assert quadrant_means(luma[:, :640].tobytes(), 640, 360) == [
        QUADRANTS[0][0], QUADRANTS[0][1], QUADRANTS[1][0], QUADRANTS[1][1]]
    with pytest.raises(ValueError, match="released"):
        bytes(kept[0])  # the camera's memory was only lent


# -- the hand-off to the reactor ---------------------------------------------------

def test_the_hand_off_copies_only_what_the_reactor_will_take():
    streams, delivered, waiting = [], [], []
    output = LoresOutput(lambda *s: streams.append(s), lambda *f: delivered.append(f),
                         lambda f, *a: waiting.append((f, a)))
    frame = bytearray(640 * 360 * 3 // 2 + 100)  # (a buffer may be longer)
    output.frame(frame, 1.0)  # before the camera said what it gives: nothing
    output.stream((640, 360), 640)
    output.frame(frame, 1.0)  # not wanted: nothing
    output.wanted.set()
    for n in range(4):
        frame[0] = n
        output.frame(frame, 2.0 + n)
    for f, a in waiting:  # the reactor takes what waited
        f(*a)
    assert streams == [((640, 360), 640)]
    assert [(data[0], len(data), at) for data, at in delivered] == [
        (0, 640 * 360 * 3 // 2, 2.0), (1, 640 * 360 * 3 // 2, 3.0)]
    assert (output.frames_captured, output.frames_dropped) == (2, 2)  # two waited at most
    frame[0] = 9
    assert delivered[0][0][0] == 0  # a copy, not the camera's memory
    with pytest.raises(ValueError, match="it needs 345600"):
        output.frame(bytes(1000))
    output.frame(frame, 7.0)  # (a failed one is not left waiting)
    assert output.frames_captured == 3


# -- the source: picamera2 with its own encoder, and lores --------------------------

class Units:
    """An access-unit output for run_h264, with a lores hand-off."""

    def __init__(self):
        self.units = []
        self.streams = []
        self.frames = []
        self.changed = threading.Condition()
        self.lores = LoresOutput(self._stream, self._frame, lambda f, *a: f(*a))

    def _stream(self, size, stride):
        with self.changed:
            self.streams.append((size, stride))
            self.changed.notify_all()

    def _frame(self, data, captured_at):
        with self.changed:
            self.frames.append((data, captured_at, time.time()))
            self.changed.notify_all()

    def access_unit(self, data, keyframe, captured_at):
        with self.changed:
            self.units.append((data, keyframe))
            self.changed.notify_all()

    def wait(self, predicate, timeout=10):
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), "timed out"


def running(source, out):
    stopping = threading.Event()
    outcome = {}

    def run():
        try:
            source.run_h264(out, stopping, ENCODING)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return stopping, thread, outcome


def test_the_camera_gives_lores_frames_only_while_they_are_wanted():
    rig = Rig(stride_align=256)
    source = Picamera2Source(rig.picamera2, rig.libcamera,
                             Picture(960, 540, 30, vflip=True, hflip=True))
    out = Units()
    stopping, thread, outcome = running(source, out)
    try:
        out.wait(lambda: len(out.units) >= 6)
        config = rig.configurations[-1]
        assert config["lores"]["size"] == (640, 360) and config["lores"]["format"] == "YUV420"
        assert out.streams == [((640, 360), 768)]
        assert out.frames == [] and rig.lores_drawn == 0  # nothing copied, nothing mapped
        out.lores.wanted.set()
        out.wait(lambda: len(out.frames) >= 4)
        out.lores.wanted.clear()
        # The capture loop looks every poll_interval (0.1 s): 12 pictures
        # later (0.4 s at 30 fps) it has stopped the lores stream.
        units = len(out.units)
        out.wait(lambda: len(out.units) >= units + 12)
        copied, mapped, units = len(out.frames), rig.lores_drawn, len(out.units)
        out.wait(lambda: len(out.units) >= units + 6)  # H.264 goes on...
        assert len(out.frames) == copied and rig.lores_drawn == mapped  # ...lores does not
    finally:
        stopping.set()
        thread.join(5)
    assert outcome == {} and rig.open == set()
    data, captured_at, arrived = out.frames[-1]
    assert len(data) == 768 * 360 * 3 // 2
    assert arrived - 0.5 < captured_at <= arrived  # the sensor's time
    # The picture turned by 180 degrees (the flips), at 640x360.
    y = np.frombuffer(data, np.uint8)[:768 * 360].reshape(360, 768)[:, :640]
    assert quadrant_means(y.tobytes(), 640, 360) == [
        QUADRANTS[1][1], QUADRANTS[1][0], QUADRANTS[0][1], QUADRANTS[0][0]]
    assert out.units[0][1] and len(rig.encoders) == 1


@pytest.mark.parametrize("camera", ["one stream only", "picamera2 before 0.3.10"])
def test_a_camera_without_lores_records_h264_and_says_so(camera):
    rig = Rig(output_streams=1 if camera == "one stream only" else 2)
    if camera == "picamera2 before 0.3.10":
        # start_encoder had no name: only the encode stream could be encoded
        start_encoder = rig.picamera2.Picamera2.start_encoder

        def old_start_encoder(self, encoder=None, output=None, pts=None, quality=None,
                              **name):
            if name.get("name") is not None:
                raise TypeError("start_encoder() got an unexpected keyword argument 'name'")
            return start_encoder(self, encoder, output, pts, quality)
        rig.picamera2.Picamera2.start_encoder = old_start_encoder
    source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(960, 540, 30))
    out = Units()
    out.lores.wanted.set()  # a viewer waits
    stopping, thread, outcome = running(source, out)
    try:
        out.wait(lambda: (None, None) in out.streams and len(out.units) >= 5)
    finally:
        stopping.set()
        thread.join(5)
    assert outcome == {} and out.frames == []
    if camera == "one stream only":
        assert out.streams == [(None, None)]
        assert rig.configurations[-1]["lores"] is None
    else:
        assert out.streams == [((640, 360), 640), (None, None)]  # given up when tried


# -- the service: the on-demand encoder's input ------------------------------------

def lores_frames(count, size, stride):
    """C{count} frames of the scene at C{size}, laid out as libcamera does."""
    return [yuv420_buffer(flipped(scene(*size, n), False, False), stride).tobytes()
            for n in range(count)]


@pytest.fixture(scope="class")
def encoded(request):
    """MPEG-1 made by the daemon's own lores command of raw frames (stride
    768, so it crops), and H.264 from a camera, at 960x540."""
    frames = lores_frames(15, (640, 360), 768)
    request.cls.raw = frames
    request.cls.mpeg1 = subprocess.run(
        lores_command("ffmpeg", 30, 800_000, (640, 360), 768), input=b"".join(frames),
        check=True, capture_output=True, timeout=60).stdout
    request.cls.h264 = libx264_ts("960x540", 10, 10)


class LoresCamera(ScriptedCamera):
    lores_size = (640, 360)


@pytest.mark.usefixtures("encoded")
class LoresServiceTests(ServiceCase):
    def setUp(self):
        super().setUp()
        Pool.pools = []
        self.patch(camera_service, "ThreadPool", Pool)

    def build_camera(self, *args):
        self.camera = LoresCamera()
        self.camera.clock = self.reactor
        from pistreaming.service import makeService
        self.service = makeService(
            options("--codec", "h264", "--framerate", "30", "--resolution", "960x540", *args),
            reactor=self.reactor, source=self.camera, player=b"//")
        self.start()
        self.network = Network(self.service.site, self.reactor, port=8082)
        return self.service

    def run_(self):
        return Pool.pools[-1].runs[-1]

    def camera_gives_h264(self):
        for data, pts in PESAssembler().feed(self.h264):
            self.run_().output.access_unit(data, is_idr(data), 1_700_000_000 + pts)
        self.network.flush()

    def figures(self):
        return self.service.stats.gather()

    def on_demand(self):
        proto, _, args, transport = self.reactor.spawned[-1]
        assert "mpeg1video" in args
        return proto, args, transport

    def leave(self, connection):
        connection.client.transport.loseConnection()
        self.network.flush()

    def test_mpeg1_viewers_get_the_lores_stream_copied_only_while_its_encoder_runs(self):
        service = self.build_camera()
        lores = self.run_().output.lores
        # until the camera says what it gives, nothing starts for a viewer
        early = self.network.connect(path="/stream?codec=mpeg1")
        assert early.client.binary() == [stream_header(640, 360)]
        assert self.reactor.spawned == [] and self.figures()["mpeg1_on_demand"]["input"] is None
        self.leave(early)
        lores.stream((640, 360), 768)  # (from the camera's thread)
        assert self.reactor.spawned == [] and not lores.wanted.is_set()
        figures = self.figures()
        assert (figures["mpeg1_on_demand"]["input"], figures["mpeg1_on_demand"]["width"],
                figures["mpeg1_on_demand"]["height"]) == ("lores", 640, 360)
        assert figures["camera"]["lores"] == {"width": 640, "height": 360, "copying": False,
                                              "frames": 0, "frames_dropped": 0}
        lores.frame(self.raw[0])  # not wanted: not even copied
        assert lores.frames_captured == 0

        h264_viewer = self.network.connect(path="/stream")
        self.camera_gives_h264()
        (ws_port,) = [factory for _, factory, _, _ in self.reactor.tcpServers
                      if factory is not service.site]
        demo = Network(ws_port, self.reactor).connect(path="/")
        assert demo.client.binary() == [stream_header(640, 360)]
        proto, args, transport = self.on_demand()
        assert args[args.index("-f") + 1] == "rawvideo"
        assert args[args.index("-video_size") + 1] == "768x360"
        assert args[args.index("-vf") + 1] == "crop=640:360:0:0"
        assert transport.written == []  # no H.264 start cache for it
        assert lores.wanted.is_set() and self.figures()["camera"]["lores"]["copying"]
        for frame in self.raw:
            lores.frame(frame)
        self.camera_gives_h264()  # H.264 goes on to its viewers, not to this ffmpeg
        assert transport.written == self.raw
        proto.childDataReceived(1, self.mpeg1)
        demo.flush()
        assert pictures_in(b"".join(demo.client.binary()[1:])) == 15
        assert len([m for m in h264_viewer.client.binary()]) >= 2 * 10
        figures = self.figures()
        assert (figures["mpeg1_on_demand"]["frames_in"],
                figures["mpeg1_on_demand"]["access_units_in"]) == (15, 0)
        assert figures["camera"]["lores"]["frames"] == 15

        demo.client.transport.loseConnection()
        demo.flush()
        self.reactor.advance(STOP_AFTER)
        assert transport.stdin_closed and not lores.wanted.is_set()
        lores.frame(self.raw[0])
        assert lores.frames_captured == 15 and len(transport.written) == 15
        assert not self.figures()["camera"]["lores"]["copying"]

    def test_a_camera_that_gives_no_lores_after_all_has_its_h264_decoded(self):
        self.build_camera()
        lores = self.run_().output.lores
        lores.stream((640, 360), 640)
        viewer = self.network.connect(path="/stream?codec=mpeg1", protocols=["pistream"])
        _, args, first = self.on_demand()
        assert args[args.index("-video_size") + 1] == "640x360" and "-vf" not in args
        self.camera_gives_h264()
        # The camera restarts without its second stream: ffmpeg is started
        # again, decoding the H.264, and the viewer told the new size.
        self.run_().fails(RuntimeError("the camera went away"))
        self.reactor.advance(1)
        self.run_().output.lores.stream(None, None)
        assert first.stdin_closed
        self.reactor.advance(1)
        proto, args, again = self.on_demand()
        assert args[args.index("-f") + 1] == "h264" and len(self.reactor.spawned) == 2
        assert not self.service.camera.lores_wanted
        self.camera_gives_h264()
        assert again.written and parse_message(
            self.service.fanout.start_cache.chunks[0][0].data).keyframe
        headers = [m for m in viewer.client.binary() if m[:4] == b"jsmp"]
        assert headers == [stream_header(640, 360), stream_header(960, 540)]
        assert self.figures()["mpeg1_on_demand"]["input"] == "h264"
        # and back: it gives one again, ffmpeg is started again on it
        self.run_().fails(RuntimeError("again"))
        self.reactor.advance(2)
        self.run_().output.lores.stream((640, 360), 640)
        self.reactor.advance(1)
        _, args, _ = self.on_demand()
        assert args[args.index("-f") + 1] == "rawvideo" and len(self.reactor.spawned) == 3
        assert self.service.camera.lores_wanted and self.run_().output.lores.wanted.is_set()
        self.network.flush()
        assert [m for m in viewer.client.binary() if m[:4] == b"jsmp"][-1] == \
            stream_header(640, 360)
        assert len(self.flushLoggedErrors(RuntimeError)) == 2  # the camera's two failures

    def test_with_codec_mpeg1_there_is_no_lores_stream_at_all(self):
        from pistreaming.service import makeService
        self.patch(camera_service, "ThreadPool", RecordingPool)  # raw frames: run(output, stop)
        camera = LoresCamera()
        camera.clock = self.reactor
        self.service = makeService(options("--codec", "mpeg1", "--resolution", "960x540"),
                                   reactor=self.reactor, source=camera, player=b"//")
        self.start()
        assert self.service.on_demand is None and self.service.camera.lores is None
        assert RecordingPool.pools[-1].threads[-1].function == camera.run
        assert "lores" not in self.figures()["camera"]
        viewer = self.network = Network(self.service.site, self.reactor, port=8082)
        assert viewer.connect(path="/stream?codec=mpeg1").client.binary() == [
            stream_header(960, 540)]
        # and the raw path's configuration asks for no second stream
        rig = Rig()
        picamera2 = rig.picamera2.Picamera2(0)
        try:
            source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(960, 540, 30))
            assert source.configuration(picamera2)["lores"] is None
            assert source.configuration(picamera2, lores=True)["lores"]["size"] == (640, 360)
        finally:
            picamera2.close()

    def test_a_failed_ffmpeg_restarts_on_the_lores_frames_still_copied(self):
        self.build_camera()
        lores = self.run_().output.lores
        lores.stream((640, 360), 768)
        self.network.connect(path="/stream?codec=mpeg1")
        _, _, transport = self.on_demand()
        transport.end(Failure(ProcessTerminated(exitCode=1)))
        lores.frame(self.raw[0])  # while it restarts: dropped, counted
        self.reactor.advance(0.25)
        _, args, again = self.on_demand()
        assert args[args.index("-f") + 1] == "rawvideo" and lores.wanted.is_set()
        lores.frame(self.raw[1])
        assert again.written == [self.raw[1]]
        figures = self.figures()["mpeg1_on_demand"]
        assert (figures["restarts"], figures["frames_in"], figures["frames_dropped"]) == (1, 1, 1)


def test_the_lores_command_reads_libcameras_layout_and_encodes_as_mpeg1_mode_does():
    command = lores_command("/usr/bin/ffmpeg", 30, 1_000_000, (640, 360), 640)
    assert command[-len(output_args(30, 1_000_000)):] == output_args(30, 1_000_000)
    assert " ".join(command[:command.index("-i") + 2]).endswith(
        "-f rawvideo -pix_fmt yuv420p -video_size 640x360 -framerate 30/1 -i pipe:0")
    assert "-vf" not in command


# -- end to end --------------------------------------------------------------------

GRACE = 0.5


def daemons_ffmpeg(daemon):
    """The daemon's own ffmpeg children (not the fake camera's encoder)."""
    found = []
    for pid in ffmpeg_children(daemon):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0].decode() != ENCODER_PROCESS_NAME:
                    found.append(pid)
        except FileNotFoundError:
            pass
    return found


def stats_of(daemon):
    with urllib.request.urlopen(daemon.base_url + "stats.json", timeout=10) as answer:
        return json.load(answer)


class H264Viewer(threading.Thread):
    """Reads the H.264 stream all along, noting when each message came."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(url, timeout=10)
        self.description = json.loads(self.ws.recv())["stream"]
        self.messages = []
        self.stop = False
        self.arrived = threading.Condition()

    def wait_for(self, count, timeout=10):
        """Until C{count} messages have come (bounded)."""
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.messages) >= count, timeout)

    def run(self):
        while not self.stop:
            try:
                opcode, data = self.ws.recv_data()
            except Exception:
                return
            if opcode == websocket.ABNF.OPCODE_BINARY:
                with self.arrived:
                    self.messages.append((time.monotonic(), data))
                    self.arrived.notify_all()


def test_a_ws_port_client_gets_the_cameras_lores_stream_while_h264_goes_on(tmp_path):
    """--codec h264 on picamera2 at 960x540: a client of the original demo
    gets jsmp 640x360 and MPEG-1 pictures of the camera's lores stream (the
    scene, upright, the stride cropped); once it has gone the on-demand
    ffmpeg stops and no lores frame crosses any more; the H.264 viewer's
    pictures come all along and decode."""
    write_shims(tmp_path)
    with Daemon("--codec", "h264", "--resolution", "960x540", "--framerate", "30",
                "--bitrate", "1M", camera="picamera2",
                env={"PYTHONPATH": str(tmp_path), "FAKE_PICAMERA2": '{"stride_align": 256}'},
                prelude=f"import pistreaming.ondemand as o; o.STOP_AFTER = {GRACE}") as daemon:
        daemon.wait_for(r"lores\), 640x360, stride 768", 15)
        h264 = H264Viewer(f"ws://127.0.0.1:{daemon.http_port}/stream")
        h264.start()
        try:
            before = stats_of(daemon)
            assert daemons_ffmpeg(daemon) == []
            assert before["mpeg1_on_demand"]["input"] == "lores"
            assert before["camera"]["lores"]["frames"] == 0

            demo = websocket.create_connection(f"ws://127.0.0.1:{daemon.ws_port}/", timeout=10)
            try:
                assert demo.recv() == stream_header(640, 360)
                data = collect_pictures(demo, 12)
                during = stats_of(daemon)
                assert len(daemons_ffmpeg(daemon)) == 1
            finally:
                demo.close()
            assert during["camera"]["lores"]["copying"] is True
            assert during["mpeg1_on_demand"]["frames_in"] >= 12

            daemon.wait_for(r"MPEG-1 on demand: stopping ffmpeg pid", GRACE + 5)
            daemon.wait_for(r"MPEG-1 on demand: ffmpeg has stopped", 5)
            assert daemons_ffmpeg(daemon) == []
            after = stats_of(daemon)["camera"]["lores"]
            # 12 more H.264 pictures (0.4 s): no lores frame meanwhile
            assert h264.wait_for(len(h264.messages) + 12)
            later = stats_of(daemon)
            count = len(h264.messages)
        finally:
            h264.stop = True
            h264.ws.close()
            h264.join(5)
    frames = decoded_frames(data, tmp_path)
    assert len(frames) >= 10 and {(f["width"], f["height"]) for f in frames} == {(640, 360)}
    y, u, v = decode_last_picture(data, 640, 360, tmp_path)
    assert all(abs(got - want) < 8 for got, want in zip(
        quadrant_means(y, 640, 360),
        [QUADRANTS[0][0], QUADRANTS[0][1], QUADRANTS[1][0], QUADRANTS[1][1]]))
    u = np.frombuffer(u, np.uint8).reshape(180, 320).astype(int)
    v = np.frombuffer(v, np.uint8).reshape(180, 320).astype(int)
    assert abs(u[90, 80] - U_HALVES[0]) < 8 and abs(u[90, 240] - U_HALVES[1]) < 8
    assert abs(v[45, 160] - V_HALVES[0]) < 8 and abs(v[135, 160] - V_HALVES[1]) < 8
    # no lores frame crosses once the on-demand ffmpeg has stopped
    assert after["copying"] is False
    assert later["camera"]["lores"]["frames"] == after["frames"] > 0
    assert later["mpeg1_on_demand"]["running"] is False
    # the H.264 stream went on all along, at its own size, decodable
    assert (h264.description["width"], h264.description["height"]) == (960, 540)
    times = [t for t, _ in h264.messages[:count]]
    assert max(b - a for a, b in zip(times, times[1:])) < 1.0
    assert (len(times) - 1) / (times[-1] - times[0]) > 15  # 30 fps, on a busy machine
    units = [parse_message(m) for _, m in h264.messages[:count]]
    first = next(i for i, m in enumerate(units) if m.keyframe)
    stream = tmp_path / "camera.h264"
    stream.write_bytes(b"".join(m.access_unit for m in units[first:]))
    decoded = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(stream),
                              "-f", "null", "-"], capture_output=True, timeout=60)
    assert decoded.returncode == 0, decoded.stderr
