"""H.264 from picamera2's own encoder: the fake's H264Encoder (an ffmpeg child
playing the Pi's hardware encoder, or on a "Pi 5" the libav encoder behind
the same name) mirrors picamera2's API, and Picamera2Source.run_h264 turns
what it gives into access units that real ffmpeg decodes."""

import json
import os
import subprocess
import sys
import threading
import time
import types

import pytest

from pistreaming.camera.picamera2_source import Picamera2Source, access_unit_output
from pistreaming.camera.picture import Picture
from tests.fake_picamera2 import ENCODER_PROCESS_NAME, Rig, write_shims

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEIGHT, RATE = 320, 240, 30


def nal_types(au):
    """The types of the NAL units of an Annex-B access unit, in order."""
    types_, i = [], 0
    while True:
        i = au.find(b"\x00\x00\x01", i)
        if i < 0 or i + 3 >= len(au):
            return types_
        types_.append(au[i + 3] & 0x1F)
        i += 3


def sps_profile(au):
    i = au.find(b"\x00\x00\x01\x67")
    return au[i + 4] if i >= 0 else None


def decoded_pictures(units, tmp_path):
    """How many pictures ffmpeg decodes from the access units, failing on any error."""
    path = tmp_path / "stream.h264"
    path.write_bytes(b"".join(units))
    done = subprocess.run(
        ["ffmpeg", "-v", "error", "-xerror", "-f", "h264", "-i", str(path),
         "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "gray", "-"],
        capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    return len(done.stdout) // (WIDTH * HEIGHT)


def encoding(keyframe_interval=0.5, bitrate=500_000, profile="baseline"):
    return types.SimpleNamespace(bitrate=bitrate, keyframe_interval=keyframe_interval,
                                 framerate=RATE, profile=profile)


class Units:
    """An output that keeps each access unit and stops the run after C{count}."""

    def __init__(self, stopping, count, on_unit=None):
        self.units = []
        self.stopping = stopping
        self.count = count
        self.on_unit = on_unit
        self._arrived = threading.Condition()

    def access_unit(self, data, keyframe, captured_at):
        if len(self.units) >= self.count:
            return  # after the stop was asked for
        with self._arrived:
            self.units.append((data, keyframe, captured_at, time.time(),
                               threading.current_thread().name))
            self._arrived.notify_all()
        if self.on_unit is not None:
            self.on_unit(len(self.units))
        if len(self.units) >= self.count:
            self.stopping.set()

    def wait_for(self, count, timeout=10):
        """Block until C{count} access units have come (the encoder's thread
        says so), or C{timeout} seconds have passed."""
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.units) >= count, timeout)
        return len(self.units) >= count

    @property
    def data(self):
        return [u[0] for u in self.units]


def run_h264(rig, count, settings=None, on_unit=None, source=None):
    source = source or Picamera2Source(rig.picamera2, rig.libcamera, Picture(WIDTH, HEIGHT, RATE))
    stopping = threading.Event()
    out = Units(stopping, count, on_unit)
    source.run_h264(out, stopping, settings or encoding())
    return out


def in_thread(function, *args):
    """Runs C{function} on a thread; the result: (thread, outcome dict)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function(*args)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# -- the fake mirrors picamera2 ---------------------------------------------------

def test_the_encoders_take_picamera2s_arguments_and_defaults():
    rig = Rig()
    encoder = rig.picamera2.encoders.H264Encoder()
    assert (encoder.bitrate, encoder.repeat, encoder.iperiod, encoder.framerate,
            encoder.qp, encoder.profile) == (None, True, None, None, None, None)
    libav = rig.picamera2.encoders.LibavH264Encoder()
    assert (libav.bitrate, libav.repeat, libav.iperiod, libav.framerate,
            libav.qp, libav.profile) == (None, True, 30, 30, None, None)
    # On a Pi 5 the name H264Encoder is the libav encoder.
    assert Rig(pi5=True).picamera2.encoders.H264Encoder.__name__ == "LibavH264Encoder"
    assert rig.picamera2.encoders.H264Encoder.__name__ == "H264Encoder"
    with pytest.raises(RuntimeError, match="Must pass Output"):
        encoder.output = object()
    with pytest.raises(RuntimeError, match="Encoder already stopped"):
        encoder.stop()
    with pytest.raises(ValueError, match="Invalid format"):
        encoder.format = "H264"


@pytest.mark.parametrize("pi5", [False, True])
def test_an_unknown_profile_fails_when_recording_starts_as_in_picamera2(pi5):
    rig = Rig(pi5=pi5)
    camera = rig.picamera2.Picamera2(0)
    try:
        with pytest.raises(RuntimeError, match="Camera has not been configured"):
            camera.start_encoder(rig.picamera2.encoders.H264Encoder(), rig.picamera2.outputs.Output())
        camera.configure(camera.create_video_configuration(
            main={"size": (WIDTH, HEIGHT), "format": "YUV420"}))
        for profile, message in [("extended-ish", "Profile extended-ish not recognised"),
                                 (66, "Profile should be a string value")]:
            encoder = rig.picamera2.encoders.H264Encoder(profile=profile)
            with pytest.raises(RuntimeError, match=message):
                camera.start_recording(encoder, rig.picamera2.outputs.Output())
        assert rig.encoders == []  # no encoder child was started
    finally:
        camera.close()


def test_a_file_output_gets_a_stream_that_starts_at_a_keyframe(tmp_path):
    rig = Rig()
    camera = rig.picamera2.Picamera2(0)
    camera.configure(camera.create_video_configuration(
        main={"size": (WIDTH, HEIGHT), "format": "YUV420"}))
    encoder = rig.picamera2.encoders.H264Encoder(bitrate=300_000, iperiod=10)

    class Counted(rig.picamera2.outputs.FileOutput):
        """FileOutput as it is, and an event after 12 of its frames."""
        frames = 0
        enough = threading.Event()

        def outputframe(self, frame, *args, **kwargs):
            super().outputframe(frame, *args, **kwargs)
            Counted.frames += 1
            if Counted.frames >= 12:
                Counted.enough.set()

    camera.start_recording(encoder, Counted(str(tmp_path / "out.h264")))
    assert Counted.enough.wait(10), f"{Counted.frames} frames in 10 s"
    camera.stop_recording()
    camera.close()
    data = (tmp_path / "out.h264").read_bytes()
    assert nal_types(data)[:3] == [7, 8, 5]
    # The encoder's nominal frame rate came from the sensor's limits, as in picamera2.
    assert encoder.framerate == pytest.approx(30, abs=0.01)
    done = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-f", "h264",
                           "-i", str(tmp_path / "out.h264"), "-f", "null", "-"],
                          capture_output=True)
    assert done.returncode == 0, done.stderr


def test_the_shims_expose_picamera2s_encoders_and_outputs(tmp_path):
    write_shims(tmp_path)
    script = ("import picamera2, libcamera\n"
              "from picamera2.encoders import H264Encoder\n"
              "from picamera2.outputs import Output, FileOutput\n"
              "assert picamera2.encoders.H264Encoder is H264Encoder\n"
              "assert issubclass(FileOutput, Output) and libcamera.Transform\n"
              "print(H264Encoder.__name__, picamera2.Picamera2.global_camera_info()[0]['Model'])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]),
               FAKE_PICAMERA2=json.dumps({"pi5": True, "model": "imx219"}))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["LibavH264Encoder", "imx219"]


# -- the source --------------------------------------------------------------------

@pytest.mark.parametrize("pi5", [False, True])
def test_access_units_decode_with_sps_pps_before_each_idr_every_keyframe_interval(pi5, tmp_path):
    rig = Rig(pi5=pi5)
    started = time.time()
    out = run_h264(rig, 20, encoding(keyframe_interval=0.3))  # a keyframe every 9 pictures
    units = out.units
    assert len(units) == 20
    for i, (data, keyframe, captured_at, arrived, thread) in enumerate(units):
        types_ = nal_types(data)
        assert keyframe == (5 in types_), (i, types_)
        # The IDRs are at 0, 9, 18, each with SPS and PPS before it; no SEI
        # from the Pi's hardware encoder.
        assert keyframe == (i % 9 == 0), (i, types_)
        if keyframe:
            assert types_[types_.index(7):types_.index(5)][:2] == [7, 8]
        else:
            assert set(types_) == {1}
        assert 6 not in types_ or pi5
        # The capture time is the camera's, a little before the picture arrives.
        assert started - 0.1 < captured_at <= arrived + 0.001
        assert arrived - captured_at < 0.5
    # picamera2's encoder thread calls the output (on a Pi 5, the camera's thread).
    assert {u[4] for u in units} == {"fake picamera2" if pi5 else "fake H264Encoder"}
    assert sps_profile(units[0][0]) == 66  # baseline: no B-frames
    assert decoded_pictures(out.data, tmp_path) == 20
    assert rig.open == set() and rig.closed == 1
    (encoder,) = rig.encoders
    assert encoder._ffmpeg.process.poll() is not None  # the child was reaped
    # (On a Pi 5 libx264's ultrafast preset makes baseline without being told.)
    assert (encoder.iperiod, encoder.bitrate, encoder.profile, encoder.repeat) == \
        (9, 500_000, None if pi5 else "baseline", True)


@pytest.mark.parametrize("pi5", [False, True])
def test_request_keyframe_makes_the_next_access_unit_an_idr(pi5, tmp_path):
    rig = Rig(pi5=pi5)
    source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(WIDTH, HEIGHT, RATE))
    asked = []

    def on_unit(count):
        if count in (5, 12):
            asked.append((count, source.request_keyframe()))

    out = run_h264(rig, 18, encoding(keyframe_interval=10.0), on_unit=on_unit, source=source)
    keyframes = [i for i, u in enumerate(out.units) if u[1]]
    # Asked for after the 5th and the 12th picture: the 6th and the 13th are IDRs
    # (the one after, where a picture was already in the encoder).
    assert asked == [(5, True), (12, True)]
    assert keyframes[0] == 0 and len(keyframes) == 3
    assert keyframes[1] in (5, 6) and keyframes[2] in (12, 13), keyframes
    for i in keyframes:
        assert [t for t in nal_types(out.units[i][0]) if t != 6][:2] == [7, 8]
    assert decoded_pictures(out.data, tmp_path) == 18
    assert source.request_keyframe() is False  # not recording any more


def test_an_older_picamera2_without_profiles_or_forced_keyframes_still_records():
    # picamera2 before 0.3.17 takes no profile; before 0.3.32 it has no force_key_frame.
    rig = Rig()

    class OldEncoder(rig.picamera2.encoders.H264Encoder):
        force_key_frame = None

        def __init__(self, bitrate=None, repeat=False, iperiod=None, framerate=None,
                     enable_sps_framerate=False, qp=None):
            super().__init__(bitrate, repeat, iperiod, framerate, enable_sps_framerate, qp)

    rig.picamera2.encoders.H264Encoder = OldEncoder
    source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(WIDTH, HEIGHT, RATE))
    answers = []
    out = run_h264(rig, 3, on_unit=lambda n: answers.append(source.request_keyframe()),
                   source=source)
    assert answers == [False, False, False]
    assert out.units[0][1] and nal_types(out.units[0][0])[:3] == [7, 8, 5]


def test_stop_is_prompt_and_closes_the_camera_and_the_encoder():
    rig = Rig()
    source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(WIDTH, HEIGHT, RATE))
    stopping = threading.Event()
    out = Units(stopping, 10**9)
    thread, outcome = in_thread(source.run_h264, out, stopping, encoding())
    assert out.wait_for(5)
    asked = time.monotonic()
    stopping.set()
    thread.join(5)
    assert not thread.is_alive() and outcome == {"value": None}
    assert time.monotonic() - asked < 1.0
    assert rig.open == set()
    assert all(e._ffmpeg.process.poll() is not None for e in rig.encoders)


def test_the_encoders_child_is_named_for_benchmarks_and_lavfi_draws_no_frame(tmp_path):
    rig = Rig(picture="lavfi")
    names = []

    def on_unit(count):
        if count == 1:
            (encoder,) = rig.encoders
            with open(f"/proc/{encoder._ffmpeg.pid}/cmdline", "rb") as f:
                names.append(f.read().split(b"\0")[0].decode())

    out = run_h264(rig, 20, on_unit=on_unit)
    assert names == [ENCODER_PROCESS_NAME]
    assert rig.frames > 0 and rig.drawn == 0  # no raw frame crossed Python
    assert [i for i, u in enumerate(out.units) if u[1]] == [0, 15]
    assert decoded_pictures(out.data, tmp_path) == 20


def test_the_bitrate_is_the_encoders():
    # A moving picture (lavfi), at two bit rates.
    sizes = {}
    for bitrate in (150_000, 1_200_000):
        out = run_h264(Rig(picture="lavfi"), 24, encoding(bitrate=bitrate, keyframe_interval=1.0))
        sizes[bitrate] = sum(len(u[0]) for u in out.units[1:]) * 8 / (23 / RATE)
    assert sizes[1_200_000] > 3 * sizes[150_000]
    assert 0.4 * 1_200_000 < sizes[1_200_000] < 2.0 * 1_200_000, sizes


@pytest.mark.parametrize("pi5", [False, True])
def test_a_failing_encoder_surfaces_or_goes_quiet_and_the_camera_is_closed(pi5):
    rig = Rig(pi5=pi5)
    source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(WIDTH, HEIGHT, RATE))
    stopping = threading.Event()
    out = Units(stopping, 10**9)
    thread, outcome = in_thread(source.run_h264, out, stopping, encoding())
    assert out.wait_for(3)
    camera_loops = [t for t in threading.enumerate() if t.name == "fake picamera2"]
    rig.encoders[0]._ffmpeg.process.kill()  # the encoder dies
    thread.join(2 if not pi5 else 0.5)
    if not pi5:
        # The V4L2 encoder's thread ends: the capture loop raises.
        assert not thread.is_alive()
        assert "H.264 encoder stopped" in str(outcome["error"])
    else:
        # libav encodes on the camera's thread, whose loop then ends: no
        # more pictures (the camera service sees a stall); stop still works.
        assert thread.is_alive()
        # The camera's thread (the only one that hands pictures on, with
        # libav) has ended.
        for loop in camera_loops:
            loop.join(5)
        assert camera_loops and not any(loop.is_alive() for loop in camera_loops)
        assert thread.is_alive() and "error" not in outcome
        stopping.set()
        thread.join(5)
        assert outcome == {"value": None}
    assert rig.open == set()


def test_an_error_of_the_output_surfaces_from_the_capture_loop():
    rig = Rig()
    source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(WIDTH, HEIGHT, RATE))

    class Broken:
        def access_unit(self, data, keyframe, captured_at):
            raise ValueError("no room")

    with pytest.raises(ValueError, match="no room"):
        source.run_h264(Broken(), threading.Event(), encoding())
    assert rig.open == set()
    # The encoder's thread was not killed by it: it stopped when asked.
    assert not rig.encoders[0].thread.is_alive()


def test_capture_times_come_from_the_sensor_timestamps():
    class Encoder:
        firsttimestamp = 1_000_000_000  # us since boot

    taker = access_unit_output(Rig().picamera2.outputs.Output)(
        None, Encoder(), clock=lambda: 5000.0, boot_clock=lambda: 1000.25)
    assert taker.captured_at(200_000) == pytest.approx(5000.0 - 0.05)
    assert taker.captured_at(None) == 5000.0
    assert taker.captured_at(-30_000_000) == 5000.0  # not believed: 30 s old
    Encoder.firsttimestamp = None
    assert taker.captured_at(200_000) == 5000.0


def test_with_lavfi_raw_captures_get_the_moving_picture_too():
    # So that a raw path (--codec mpeg1) has as much to encode as the camera's encoder.
    rig = Rig(picture="lavfi")
    camera = rig.picamera2.Picamera2(0)
    camera.configure(camera.create_video_configuration(
        main={"size": (WIDTH, HEIGHT), "format": "YUV420"}))
    camera.start()
    try:
        frames = [camera.capture_buffer("main") for _ in range(3)]
    finally:
        camera.close()
    stride = rig.configurations[0]["main"]["stride"]
    assert all(len(f) == stride * HEIGHT * 3 // 2 for f in frames)
    assert len({f.tobytes() for f in frames}) == 3
