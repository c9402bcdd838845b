"""The picamera path, driven by a fake that mirrors picamera's recording API.

tests/fakes/picamera.py stands in for the legacy picamera library: the same
calls, the same padding (with junk in it), the same errors.  The frames go
through the real camera service, and in the last test through the real
daemon and real ffmpeg.
"""

import os
import subprocess
import pytest
from twisted.internet import defer, reactor
from twisted.trial import unittest

from pistreaming.camera import CameraUnavailable, choose_source
from pistreaming.camera.picamera_source import PiCameraSource
from pistreaming.camera.picture import Picture
from pistreaming.camera.service import CameraService
from pistreaming.camera.testpattern import TestPattern
from pistreaming.frames import FrameGeometry
from pistreaming.options import Config
from tests.daemon import Daemon
from tests.fakes import picamera as fake
from tests.helpers import Arrivals, Events, collect_pictures, from_threads_taken, with_timeout

FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")


def importer(present=True, busy=False, missing=False):
    fake.hardware.reset(present=present, busy=busy)

    def import_module(name):
        if name != "picamera":  # picamera2 and libcamera: not on this machine
            raise ImportError(f"No module named {name!r}")
        if missing:
            raise ImportError("No module named 'picamera'")
        return fake

    return import_module


class ChoosingTests(unittest.TestCase):
    def test_auto_takes_the_camera_when_one_answers(self):
        source, why = choose_source(Config(camera="auto"), importer())
        assert isinstance(source, PiCameraSource)
        assert why.startswith("a camera answered through picamera; skipped picamera2: ")
        # The probe let go of the camera, so the source can open it.
        assert fake.hardware.open_camera is None and fake.hardware.opened == 1

    def test_auto_falls_back_to_the_test_pattern_and_says_why(self):
        source, why = choose_source(Config(camera="auto"), importer(present=False))
        assert isinstance(source, TestPattern)
        assert why.startswith("no camera: picamera2: ")
        assert "; picamera: no camera answered (Camera is not enabled." in why
        source, why = choose_source(Config(camera="auto"), importer(missing=True))
        assert isinstance(source, TestPattern)
        assert "the picamera library is not installed" in why

    def test_asking_for_picamera_without_a_camera_refuses_to_start(self):
        with pytest.raises(CameraUnavailable) as e:
            choose_source(Config(camera="picamera"), importer(busy=True))
        assert str(e.value) == ("--camera picamera: no camera answered "
                                "(Failed to enable connection: Out of resources)")

    def test_the_test_pattern_is_used_when_asked_for_even_with_a_camera(self):
        source, _ = choose_source(Config(camera="test"), importer())
        assert isinstance(source, TestPattern)
        assert fake.hardware.opened == 0


class CaptureTests(unittest.TestCase):
    """The camera's threads are real (picamera's encoder thread and the
    service's capture thread); each wait resumes when the frame or the
    camera state it waits for reaches the reactor, bounded."""

    timeout = 30

    def setUp(self):
        fake.hardware.reset()
        events = Events()
        self.frames = Arrivals(events)
        self.states = Arrivals(events)  # the camera's states, as viewers are told

    def start(self, width=640, height=480, rate=30, vflip=False, hflip=False):
        source = PiCameraSource(fake, Picture(width, height, rate, vflip=vflip, hflip=hflip))
        geometry = FrameGeometry(width, height)
        service = CameraService(source, geometry.frame_size,
                                lambda frame, captured_at: self.frames.append(frame), reactor,
                                on_state=lambda state, why: self.states.append(state))
        service.retry_delays = (0.05,)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service, geometry

    @defer.inlineCallbacks
    def test_padded_frames_arrive_whole_with_the_asked_size_rate_and_flips(self):
        service, geometry = self.start(1296, 730, 30, vflip=True, hflip=True)
        yield self.frames.until(lambda: len(self.frames) >= 5, 10, "five frames")
        (recording,) = fake.hardware.recordings
        assert recording == {"resolution": (1296, 730), "framerate": 30,
                             "vflip": True, "hflip": True, "format": "yuv"}
        assert geometry.frame_size == 1312 * 736 * 3 // 2
        assert all(len(f) == geometry.frame_size for f in self.frames)
        assert self.frames[0] == fake.render(0, 1296, 730)
        assert self.frames[4] == fake.render(4, 1296, 730)
        yield with_timeout(service.stopService(), 3, "camera stop")
        assert fake.hardware.open_camera is None  # released

    @defer.inlineCallbacks
    def test_stop_releases_the_camera_promptly(self):
        service, _ = self.start()
        yield self.frames.until(lambda: self.frames, 10, "a frame")
        camera = fake.hardware.open_camera
        encoder_thread = camera._recording.thread  # picamera's, which calls write
        started = reactor.seconds()
        yield with_timeout(service.stopService(), 3, "camera stop")
        assert reactor.seconds() - started < 1
        assert camera.closed and not camera.recording
        assert not encoder_thread.is_alive()
        count = len(self.frames)
        # Whatever the camera's threads handed over before they ended has
        # been taken by now: nothing comes after the stop.
        yield from_threads_taken()
        assert len(self.frames) == count

    @defer.inlineCallbacks
    def test_an_error_in_the_recording_is_retried_with_the_camera_reopened(self):
        service, geometry = self.start()
        yield self.frames.until(lambda: self.frames, 10, "a frame")
        # The output raises inside picamera's thread; picamera hands the error
        # back from wait_recording, the source closes the camera, and the
        # service opens it again after a pause.
        original = service.output.write
        calls = []

        def failing(buf):
            calls.append(1)
            if len(calls) == 1:
                raise OSError("disk on fire")
            return original(buf)

        service.output.write = failing
        yield self.states.until(lambda: self.states == ["ok", "unavailable", "ok"], 10,
                                "the camera given up, then delivering again")
        assert fake.hardware.opened == 2 and len(fake.hardware.recordings) == 2
        before = len(self.frames)
        yield self.frames.until(lambda: len(self.frames) > before + 3, 10, "frames again")
        assert len(self.flushLoggedErrors(OSError)) == 1

    @defer.inlineCallbacks
    def test_a_short_write_is_an_error_as_in_picamera(self):
        service, _ = self.start()
        yield self.frames.until(lambda: self.frames, 10, "a frame")
        service.output.write = lambda buf: 10
        yield self.states.until(lambda: "unavailable" in self.states, 10, "the failure")
        assert service.failures >= 1
        errors = self.flushLoggedErrors(fake.PiCameraIOError)
        assert errors and all("Failed to write" in str(e.value) for e in errors)


def decode(ts_bytes, tmp_path):
    path = tmp_path / "picamera.ts"
    path.write_bytes(ts_bytes)
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "gray", "pipe:1"],
                         capture_output=True, timeout=60, check=True).stdout
    return out


def test_the_daemon_streams_the_camera_cropped_clean_at_1296x730(tmp_path):
    """auto picks the (fake) camera; its padded, junk-edged frames come out of
    the real ffmpeg at 1296x730 with straight edges and no junk."""
    import websocket
    from tests.test_stream import read_header
    width, height = 1296, 730
    env = {"PYTHONPATH": FAKES, "FAKE_PICAMERA": "present"}
    with Daemon("--resolution", f"{width}x{height}", "--framerate", "15",
                "--bitrate", "2M", camera="auto", env=env) as daemon:
        assert daemon.search(r"camera: picamera chosen \(a camera answered through picamera;")
        ws = websocket.create_connection(f"ws://127.0.0.1:{daemon.http_port}/stream",
                                         timeout=10)
        try:
            assert read_header(ws) == (width, height)
            data = collect_pictures(ws, 8)
        finally:
            ws.close()
    luma = decode(data, tmp_path)
    assert len(luma) >= width * height and len(luma) % (width * height) == 0
    picture = luma[-width * height:]
    for y in (2, height // 2 + 100, height - 3):
        row = picture[y * width:(y + 1) * width]
        if abs(row[0] - fake.BAND) < 30:
            continue  # the moving band is on this row
        # dark left half, bright right half, the edge where it belongs
        assert abs(row[10] - fake.PICTURE_DARK) < 20, (y, row[10])
        assert abs(row[width - 10] - fake.PICTURE_BRIGHT) < 20, (y, row[width - 10])
        edge = next(x for x in range(width) if row[x] > (fake.PICTURE_DARK + fake.PICTURE_BRIGHT) / 2)
        assert abs(edge - width // 2) <= 2, (y, edge)
        # the last columns are picture, not the camera's white padding
        assert max(row[-4:]) < fake.JUNK_LUMA - 30, (y, row[-4:])


def test_asking_for_picamera_on_a_machine_without_one_stops_with_one_line():
    env = {"PYTHONPATH": FAKES, "FAKE_PICAMERA": "absent"}
    daemon = Daemon(camera="picamera", env=env)
    result = daemon.run_to_exit(timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "twistd pistream: error: --camera picamera: no camera answered (Camera is not "
        "enabled. Try running 'sudo raspi-config' and ensure that the camera has been "
        "enabled.)"]
