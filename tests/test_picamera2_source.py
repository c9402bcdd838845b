"""The picamera2 path, driven by a fake (tests/fake_picamera2.py) that mirrors
picamera2's API, its row stride and its padding; and at the end the real
daemon streaming from that fake through real ffmpeg to a real viewer."""

import json
import subprocess
import threading
import time
import types

import numpy as np
import pytest
from twisted.internet import defer, reactor
from twisted.trial import unittest

from pistreaming.camera import CameraUnavailable, choose_source
from pistreaming.camera.picamera2_source import FrameLayout, Picamera2Source
from pistreaming.camera.picamera_source import PiCameraSource
from pistreaming.camera.picture import Picture
from pistreaming.camera.service import CameraService
from pistreaming.camera.testpattern import TestPattern
from pistreaming.frames import FrameGeometry
from pistreaming.h264 import parse_message
from pistreaming.options import Config
from tests.daemon import Daemon
from tests.fake_picamera2 import (
    JUNK, QUADRANTS, Rig, flipped, frame_number, scene, write_shims, yuv420_buffer)
from tests.helpers import Arrivals, Events, collect_pictures, with_timeout
from tests.test_stream import connect, decode_last_picture, read_header


def padded_frame(buffer, size, stride, geometry):
    return FrameLayout(size, stride, geometry).padded(buffer)


def expected_frame(planes, geometry):
    """C{planes} as the encoder takes them: padded to 32x16, black outside."""
    g = geometry
    luma = (g.width, g.height, g.padded_width, g.padded_height, 16)
    chroma = (g.width // 2, g.height // 2, g.padded_width // 2, g.padded_height // 2, 128)
    out = []
    for plane, (w, h, pw, ph, pad) in zip(planes, (luma, chroma, chroma)):
        padded = np.full((ph, pw), pad, np.uint8)
        rows, cols = min(plane.shape[0], h), min(plane.shape[1], w)
        padded[:rows, :cols] = plane[:rows, :cols]
        out.append(padded.tobytes())
    return b"".join(out)


class Frames:
    """An output that keeps what it is given and stops the loop after C{count}."""

    def __init__(self, stopping, count):
        self.frames = []
        self.times = []
        self.stopping = stopping
        self.count = count

    def write(self, data):
        self.frames.append(data)
        self.times.append(time.monotonic())
        if len(self.frames) >= self.count:
            self.stopping.set()


# -- the layout: libcamera's stride in, picamera's padding out ------------------

@pytest.mark.parametrize("size,stride", [
    ((1296, 730), 1344),   # stride wider than the padded width (1312), odd chroma rows
    ((640, 480), 640),     # nothing to do
    ((1920, 1080), 1920),  # rows line up, 8 padding rows to add
    ((800, 600), 832),
    ((100, 50), 112),      # stride narrower than the padded width (128)
])
def test_frames_are_relaid_from_the_cameras_stride_into_the_padded_layout(size, stride):
    geometry = FrameGeometry(*size)
    planes = scene(*size, number=7)
    buffer = yuv420_buffer(planes, stride)
    assert len(buffer) == stride * size[1] * 3 // 2
    frame = padded_frame(buffer, size, stride, geometry)
    assert len(frame) == geometry.frame_size
    assert frame == expected_frame(planes, geometry)
    assert JUNK not in frame[:geometry.y_size]  # none of the row junk got in


@pytest.mark.parametrize("size,stride", [((1296, 730), 1344), ((1920, 1080), 1920)])
def test_one_layout_serves_frame_after_frame(size, stride):
    geometry = FrameGeometry(*size)
    layout = FrameLayout(size, stride, geometry)
    first = layout.padded(yuv420_buffer(scene(*size, number=1), stride))
    second = layout.padded(yuv420_buffer(scene(*size, number=2), stride))
    assert first == expected_frame(scene(*size, number=1), geometry)
    assert second == expected_frame(scene(*size, number=2), geometry)


def test_a_frame_as_a_2d_array_or_bytes_comes_out_the_same():
    size, stride = (1296, 730), 1344
    buffer = yuv420_buffer(scene(*size), stride)
    geometry = FrameGeometry(*size)
    as_1d = padded_frame(buffer, size, stride, geometry)
    as_2d = padded_frame(buffer.reshape((730 * 3 // 2, stride)), size, stride, geometry)
    as_bytes = padded_frame(buffer.tobytes(), size, stride, geometry)
    assert as_1d == as_2d == as_bytes


def test_a_picture_of_another_size_is_cut_or_bordered_to_fit():
    geometry = FrameGeometry(640, 480)
    bigger = scene(656, 496)
    frame = padded_frame(yuv420_buffer(bigger, 704), (656, 496), 704, geometry)
    assert frame == expected_frame(bigger, geometry)
    smaller = scene(600, 440)
    frame = padded_frame(yuv420_buffer(smaller, 640), (600, 440), 640, geometry)
    y = np.frombuffer(frame[:geometry.y_size], np.uint8).reshape(480, 640)
    assert (y[:440, :600] == smaller[0]).all()
    assert set(y[:, 600:].ravel()) == {16} and set(y[440:].ravel()) == {16}


def test_a_short_buffer_is_an_error_not_a_garbled_picture():
    buffer = yuv420_buffer(scene(640, 480), 640)[:-1]
    with pytest.raises(ValueError, match="picamera2 gave 460799 bytes"):
        padded_frame(buffer, (640, 480), 640, FrameGeometry(640, 480))


# -- the source against the fake camera -----------------------------------------

def run_source(rig, count, width=1296, height=730, framerate=30, **flips):
    source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(width, height, framerate, **flips))
    stopping = threading.Event()
    out = Frames(stopping, count)
    source.run(out, stopping)
    return out


def unpadded_planes(frame, geometry):
    """(Y, U, V) 2-D arrays of the picture inside a padded frame."""
    g = geometry
    y = np.frombuffer(frame[:g.y_size], np.uint8).reshape(g.padded_height, g.padded_width)
    u = np.frombuffer(frame[g.y_size:g.y_size + g.uv_size], np.uint8)
    v = np.frombuffer(frame[g.y_size + g.uv_size:], np.uint8)
    shape = (g.padded_height // 2, g.padded_width // 2)
    return (y[:g.height, :g.width], u.reshape(shape)[:g.height // 2, :g.width // 2],
            v.reshape(shape)[:g.height // 2, :g.width // 2])


def test_the_camera_is_asked_for_yuv420_at_the_size_rate_and_flips():
    rig = Rig()
    run_source(rig, 2, 1296, 730, 25, vflip=True, hflip=False)
    (config,) = rig.configurations
    assert config["use_case"] == "video"
    assert config["main"]["format"] == "YUV420"
    assert config["main"]["size"] == (1296, 730)
    assert config["main"]["stride"] == 1344
    assert config["controls"]["FrameDurationLimits"] == (40000, 40000)
    assert (config["transform"].vflip, config["transform"].hflip) == (True, False)


def test_frames_arrive_whole_in_order_at_the_rate_and_the_camera_is_closed():
    rig = Rig()
    out = run_source(rig, 16, framerate=30)
    geometry = FrameGeometry(1296, 730)
    assert len(out.frames) == 16
    numbers = []
    for frame in out.frames:
        assert len(frame) == geometry.frame_size
        y, u, v = unpadded_planes(frame, geometry)
        number = frame_number(y[0])
        numbers.append(number)
        expected = scene(1296, 730, number)
        assert (y == expected[0]).all() and (u == expected[1]).all() and (v == expected[2]).all()
    assert numbers == sorted(numbers) and len(set(numbers)) == 16
    rate = (len(out.times) - 1) / (out.times[-1] - out.times[0])
    assert 25 < rate < 36, rate
    assert (rig.opened, rig.closed, rig.open) == (1, 1, set())


@pytest.mark.parametrize("flips", [dict(hflip=True), dict(vflip=True),
                                   dict(hflip=True, vflip=True)])
def test_flips_are_the_cameras_own(flips):
    rig = Rig()
    (frame,) = run_source(rig, 1, 800, 600, **flips).frames
    y, u, v = unpadded_planes(frame, FrameGeometry(800, 600))
    # The fake draws the flipped picture itself, as libcamera would; the frame
    # number it wrote sits in the first pixels of the flipped picture.
    number = frame_number((np.flip(y, 1) if flips.get("hflip") else y)[
        -1 if flips.get("vflip") else 0])
    want = flipped(scene(800, 600, number), flips.get("hflip", False), flips.get("vflip", False))
    assert (y == want[0]).all() and (u == want[1]).all() and (v == want[2]).all()
    top_left = QUADRANTS[1 if flips.get("vflip") else 0][1 if flips.get("hflip") else 0]
    assert y[100, 100] == top_left


def test_capture_array_and_capture_request_give_the_same_frames_as_capture_buffer():
    rig = Rig()
    camera = rig.picamera2.Picamera2(0)
    try:
        config = camera.create_video_configuration(
            main={"size": (1296, 730), "format": "YUV420"},
            controls={"FrameDurationLimits": (20000, 20000)})
        camera.configure(config)
        stream = camera.stream_configuration("main")
        camera.start()
        geometry = FrameGeometry(1296, 730)
        buffer = camera.capture_buffer("main")
        array = camera.capture_array("main")
        request = camera.capture_request()
        try:
            from_request = request.make_buffer("main")
        finally:
            request.release()
        assert buffer.ndim == 1 and array.shape == (1095, 1344)
        for got in (buffer, array, from_request):
            frame = padded_frame(got, stream["size"], stream["stride"], geometry)
            y, _, _ = unpadded_planes(frame, geometry)
            assert frame == expected_frame(scene(1296, 730, frame_number(y[0])), geometry)
        camera.stop()
    finally:
        camera.close()


class AskingRig(Rig):
    """A Rig that says (C{asked}, an Event) when its C{count}th capture is asked for."""

    def __init__(self, count, **kwargs):
        self.count = count
        self.asked = threading.Event()
        super().__init__(**kwargs)

    @property
    def captures_asked(self):
        return self._captures_asked

    @captures_asked.setter
    def captures_asked(self, number):
        self._captures_asked = number
        if number >= self.count:
            self.asked.set()


def test_stop_is_prompt_even_when_the_camera_stops_delivering():
    rig = AskingRig(4)
    rig.stall_after = 3
    source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(320, 240, 30))
    stopping = threading.Event()
    out = Frames(stopping, 1000)
    thread = threading.Thread(target=source.run, args=(out, stopping))
    thread.start()
    # The camera has given its 3 frames and the source waits on a 4th that
    # never comes (asked for, while the camera is silent).
    try:
        assert rig.asked.wait(5), "no 4th capture asked for"
        assert len(out.frames) == 3
        started = time.monotonic()
    finally:
        stopping.set()  # (a failed check above must not leave the thread running)
        thread.join(2)
    assert not thread.is_alive()
    assert time.monotonic() - started < source.poll_interval + 0.5
    assert rig.open == set() and rig.closed == 1


def test_a_failing_capture_raises_and_closes_the_camera():
    rig = Rig()
    rig.fail_after = 2
    with pytest.raises(RuntimeError, match="timed out"):
        run_source(rig, 100, 320, 240)
    assert rig.open == set() and rig.closed == 1


def test_a_camera_that_cannot_give_yuv420_is_an_error_not_a_garbled_picture():
    rig = Rig()
    rig.format = "YUYV"
    with pytest.raises(RuntimeError, match="picamera2 gives YUYV, not YUV420"):
        run_source(rig, 1, 320, 240)
    assert rig.open == set()


def test_a_camera_in_use_elsewhere_raises():
    rig = Rig()
    other = rig.picamera2.Picamera2(0)
    try:
        with pytest.raises(RuntimeError, match="did not complete"):
            run_source(rig, 1, 320, 240)
    finally:
        other.close()


class ServiceTests(unittest.TestCase):
    """picamera2 feeds the same camera service as picamera: frames cross to the
    reactor, and a failing camera is retried."""

    timeout = 30

    @defer.inlineCallbacks
    def test_frames_reach_the_reactor_and_a_failure_is_retried(self):
        rig = Rig()
        rig.fail_after = 5
        source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(320, 240, 30))
        events = Events()
        got = Arrivals(events)
        states = Arrivals(events)
        service = CameraService(source, FrameGeometry(320, 240).frame_size,
                                lambda frame, captured_at: got.append(frame), reactor,
                                on_state=lambda state, why: states.append(state))
        service.retry_delays = (0.1,)
        service.startService()
        try:
            yield states.until(lambda: "unavailable" in states, 10, "a camera failure")
            assert service.failures >= 1
            rig.fail_after = None
            before = len(got)
            yield got.until(lambda: len(got) >= before + 10, 10, "frames after the retry")
        finally:
            yield with_timeout(service.stopService(), 5, "camera service stop")
        assert rig.opened >= 2 and rig.open == set()
        assert {len(f) for f in got} == {FrameGeometry(320, 240).frame_size}
        # The failure was logged (with its traceback), as the service does.
        assert self.flushLoggedErrors(RuntimeError)


# -- choosing the camera ----------------------------------------------------------

def config(camera):
    return Config(camera=camera, width=640, height=480)


def picamera_stub():
    """Just enough of the legacy picamera for its probe to find a camera."""
    class PiCamera:
        def close(self):
            pass
    return types.SimpleNamespace(PiCamera=PiCamera)


def modules(rig=None, picamera=None):
    def import_module(name):
        if name == "picamera" and picamera is not None:
            return picamera
        if rig is not None:
            return rig.import_module(name)
        raise ImportError(f"No module named {name!r}")
    return import_module


def test_auto_prefers_picamera2_when_libcamera_finds_a_camera():
    rig = Rig(model="imx708")
    source, why = choose_source(config("auto"), modules(rig, picamera_stub()))
    assert isinstance(source, Picamera2Source)
    assert why == "libcamera finds a camera (imx708) for picamera2"
    assert rig.opened == 0  # found, not opened: that is the capture loop's job


def test_the_pi_camera_is_taken_and_usb_webcams_are_left_to_v4l2():
    rig = Rig(cameras=1, usb=1)
    source, _ = choose_source(config("auto"), modules(rig))
    assert isinstance(source, Picamera2Source) and source.camera_num == 1
    stopping = threading.Event()
    source.run(Frames(stopping, 1), stopping)
    assert rig.opened_numbers == [1]
    source, why = choose_source(config("auto"), modules(Rig(cameras=0, usb=1)))
    assert isinstance(source, TestPattern)
    assert why.startswith("no camera: picamera2: libcamera finds only USB cameras "
                          "(use --camera v4l2:/dev/videoN for those)")


def test_auto_falls_back_to_picamera_and_says_why_picamera2_was_skipped():
    source, why = choose_source(config("auto"), modules(Rig(cameras=0), picamera_stub()))
    assert isinstance(source, PiCameraSource)
    assert why == ("a camera answered through picamera; "
                   "skipped picamera2: libcamera finds no camera")


def test_auto_falls_back_to_the_test_pattern_saying_why_for_each_camera():
    source, why = choose_source(config("auto"), modules())
    assert isinstance(source, TestPattern)
    assert why == ("no camera: picamera2: the picamera2 library is not installed "
                   "(No module named 'picamera2'); picamera: the picamera library is "
                   "not installed (No module named 'picamera')")


def test_asking_for_picamera2_without_a_camera_refuses_to_start():
    with pytest.raises(CameraUnavailable) as e:
        choose_source(config("picamera2"), modules(Rig(cameras=0), picamera_stub()))
    assert str(e.value) == "--camera picamera2: libcamera finds no camera"


def test_a_library_that_is_not_picamera2_is_skipped_not_fatal():
    # e.g. a module of that name that has no Picamera2 class
    source, why = choose_source(config("auto"), lambda name: types.SimpleNamespace())
    assert isinstance(source, TestPattern)
    assert why.startswith("no camera: picamera2: picamera2 cannot list cameras")


# -- end to end: the daemon, streaming from the fake camera ---------------------------
# (tests.fake_picamera2.write_shims: picamera2, picamera2.encoders,
# picamera2.outputs and libcamera packages that hand out the fake)

def test_the_daemon_streams_the_camera_upright_at_its_size_and_rate(tmp_path):
    write_shims(tmp_path)
    width, height, rate = 1296, 730, 15
    with Daemon("--resolution", f"{width}x{height}", "--framerate", str(rate),
                "--bitrate", "2M", "--rotation", "180", camera="auto",
                env={"PYTHONPATH": str(tmp_path), "FAKE_PICAMERA2": '{"stride_align": 64}'}
                ) as daemon:
        assert daemon.search(r"camera: picamera2 chosen \(libcamera finds a camera \(imx708\)")
        ws = connect(f"ws://127.0.0.1:{daemon.http_port}/stream")
        try:
            assert read_header(ws) == (width, height)
            data = collect_pictures(ws, 8)
        finally:
            ws.close()
    y, u, v = decode_last_picture(data, width, height, tmp_path)
    y = np.frombuffer(y, np.uint8).reshape(height, width)
    # Turned by 180 degrees: the bottom right quadrant is now top left, and so
    # on; each quadrant is even all the way across (no shear from the stride).
    for row, col, value in [(0.25, 0.25, QUADRANTS[1][1]), (0.25, 0.75, QUADRANTS[1][0]),
                            (0.75, 0.25, QUADRANTS[0][1]), (0.75, 0.75, QUADRANTS[0][0])]:
        r, c = int(row * height), int(col * width)
        patch = y[r - 60:r + 60, c - 120:c + 120].astype(int)
        assert abs(patch.mean() - value) < 6 and patch.max() - patch.min() < 24, \
            (row, col, value, patch.mean(), patch.min(), patch.max())


def test_with_codec_h264_the_daemon_streams_the_cameras_own_h264(tmp_path):
    """--codec h264: picamera2's H264Encoder (the fake's runs outside the
    daemon, as the Pi's hardware does), no ffmpeg of the daemon's own, and
    the camera's picture, upright, in what a viewer decodes."""
    write_shims(tmp_path)
    width, height = 640, 480
    with Daemon("--resolution", f"{width}x{height}", "--framerate", "30", "--codec", "h264",
                "--rotation", "180", camera="picamera2",
                env={"PYTHONPATH": str(tmp_path)}) as daemon:
        ws = connect(f"ws://127.0.0.1:{daemon.http_port}/stream")
        try:
            description = json.loads(ws.recv())["stream"]
            units = [ws.recv() for _ in range(20)]
        finally:
            ws.close()
        children = [pid for pid in daemon.pids() if pid != daemon.process.pid]
        names = []
        for pid in children:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    names.append(f.read().split(b"\0")[0])
            except FileNotFoundError:
                pass
    assert (description["width"], description["height"]) == (width, height)
    assert description["profile"] == "Constrained Baseline"
    assert b"ffmpeg" not in names  # only the camera's (stand-in) encoder runs
    messages = [parse_message(unit) for unit in units]
    assert messages[0].keyframe
    # capture times are the camera's, converted to the epoch: about now
    assert all(abs(m.capture_time - time.time()) < 30 for m in messages)
    stream = tmp_path / "camera.h264"
    stream.write_bytes(b"".join(m.access_unit for m in messages))
    raw = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(stream),
                          "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"],
                         check=True, capture_output=True).stdout
    frame = width * height * 3 // 2
    assert len(raw) == 20 * frame
    y = np.frombuffer(raw[-frame:][:width * height], np.uint8).reshape(height, width)
    # turned by 180 degrees: the bottom right quadrant is now top left
    for row, col, value in [(0.25, 0.25, QUADRANTS[1][1]), (0.25, 0.75, QUADRANTS[1][0]),
                            (0.75, 0.25, QUADRANTS[0][1]), (0.75, 0.75, QUADRANTS[0][0])]:
        r, c = int(row * height), int(col * width)
        patch = y[r - 40:r + 40, c - 80:c + 80].astype(int)
        assert abs(patch.mean() - value) < 8, (row, col, value, patch.mean())
