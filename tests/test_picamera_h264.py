"""H.264 from the legacy picamera's own encoder: the fake (tests/fakes/picamera.py)
records format='h264' as picamera 1.13 does (buffer by buffer, camera.frame
saying what each is), and PiCameraSource.run_h264 joins the buffers into
access units that real ffmpeg decodes."""

import subprocess
import threading
import time
import types

import pytest

from pistreaming.camera.picamera_source import AccessUnits, PiCameraSource, h264_level
from pistreaming.camera.picture import Picture
from tests.fakes import picamera as fake
from tests.test_picamera2_h264 import Units, in_thread, nal_types

# Not a multiple of 32: picamera pads the frames, the encoder crops them.
WIDTH, HEIGHT, RATE = 328, 240, 30


@pytest.fixture(autouse=True)
def camera_present():
    fake.hardware.reset()
    yield
    fake.hardware.reset()


def encoding(keyframe_interval=0.3, bitrate=400_000, profile="baseline"):
    return types.SimpleNamespace(bitrate=bitrate, keyframe_interval=keyframe_interval,
                                 framerate=RATE, profile=profile)


def source():
    return PiCameraSource(fake, Picture(WIDTH, HEIGHT, RATE))


def run_h264(count, settings=None, on_unit=None, src=None):
    stopping = threading.Event()
    out = Units(stopping, count, on_unit)
    (src or source()).run_h264(out, stopping, settings or encoding())
    return out


def decoded_pictures(units, tmp_path):
    path = tmp_path / "stream.h264"
    path.write_bytes(b"".join(units))
    done = subprocess.run(
        ["ffmpeg", "-v", "error", "-xerror", "-f", "h264", "-i", str(path),
         "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "gray", "-"],
        capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    return len(done.stdout) // (WIDTH * HEIGHT)


# -- the fake mirrors picamera 1.13 ---------------------------------------------------

def test_h264_options_are_checked_as_picamera_checks_them():
    camera = fake.PiCamera(resolution=(1920, 1080), framerate=30)
    try:
        with pytest.raises(fake.PiCameraRuntimeError, match="not recording"):
            camera.frame
        with pytest.raises(fake.PiCameraNotRecording):
            camera.request_key_frame()
        for options, error, message in [
                ({"profile": "extended"}, fake.PiCameraValueError, "Invalid H.264 profile extended"),
                ({"level": "5"}, fake.PiCameraValueError, "Invalid H.264 level 5"),
                ({"bitrate": 30_000_000}, fake.PiCameraValueError,
                 "bitrate 30000000 exceeds 25000000 which is the limit"),
                ({"level": "3.1"}, fake.PiCameraValueError, "exceeds macroblock limit"),
                ({"keyframes": 3}, TypeError, "unexpected keyword argument"),
        ]:
            with pytest.raises(error, match=message):
                camera.start_recording(Units(threading.Event(), 1), format="h264", **options)
        camera.framerate = 31  # 1080p at level 4: 30 fps at most
        with pytest.raises(fake.PiCameraValueError, match="macroblocks/s limit"):
            camera.start_recording(Units(threading.Event(), 1), format="h264", profile="baseline")
        assert fake.hardware.encoders == []
    finally:
        camera.close()
    assert h264_level(1920, 1080, 30) == "4" and h264_level(1920, 1080, 31) == "4.2"


def test_a_picture_larger_than_a_buffer_is_joined_from_its_pieces():
    # As MMAL gives a big key frame: SPS and PPS, then pieces, the last complete.
    class Camera:
        frame = None

    got = []
    output = types.SimpleNamespace(
        access_unit=lambda data, keyframe, at: got.append((data, keyframe, at)))
    camera = Camera()
    units = AccessUnits(camera, output, clock=lambda: 100.0)
    units.offset = 99.0  # the camera's clock is 99 s behind the epoch
    sps_pps = b"\0\0\0\1\x67\x42" + b"\0\0\0\1\x68\xce"
    pieces = [b"\0\0\0\1\x65" + b"\x11" * 65531, b"\x22" * 65536, b"\x33" * 100]
    script = [(sps_pps, fake.PiVideoFrameType.sps_header, True, 900_000)]
    script += [(p, fake.PiVideoFrameType.key_frame, i == 2, 950_000) for i, p in enumerate(pieces)]
    script += [(b"\0\0\0\1\x41\x9a", fake.PiVideoFrameType.frame, True, 983_333)]
    for data, kind, complete, timestamp in script:
        camera.frame = fake.PiVideoFrame(0, kind, 0, 0, 0, timestamp, complete)
        assert units.write(data) == len(data)
    assert got == [(sps_pps + b"".join(pieces), True, 99.95),
                   (b"\0\0\0\1\x41\x9a", False, 99.983333)]


# -- the source --------------------------------------------------------------------

def test_access_units_decode_with_sps_pps_before_each_idr(tmp_path):
    started = time.time()
    out = run_h264(20)  # an I-frame every 9 pictures
    units = out.units
    assert len(units) == 20
    for i, (data, keyframe, captured_at, arrived, thread) in enumerate(units):
        types_ = nal_types(data)
        assert keyframe == (i % 9 == 0) == (5 in types_), (i, types_)
        assert types_[:3] == [7, 8, 5] if keyframe else set(types_) == {1}
        assert started - 0.1 < captured_at <= arrived + 0.001
        assert arrived - captured_at < 0.5
    assert {u[4] for u in units} == {"fake picamera encoder"}  # MMAL's callback thread
    assert decoded_pictures(out.data, tmp_path) == 20
    (recording,) = fake.hardware.recordings
    assert recording["format"] == "h264"
    assert recording["options"] == {"inline_headers": True, "profile": "baseline",
                                    "bitrate": 400_000, "intra_period": 9, "level": "4"}
    assert fake.hardware.open_camera is None
    assert fake.hardware.encoders[0].process.poll() is not None


def test_request_keyframe_makes_the_next_access_unit_an_idr(tmp_path):
    src = source()
    asked = []

    def on_unit(count):
        if count in (4, 10):
            asked.append(src.request_keyframe())

    out = run_h264(15, encoding(keyframe_interval=10.0), on_unit, src)
    keyframes = [i for i, u in enumerate(out.units) if u[1]]
    assert asked == [True, True]
    assert keyframes[0] == 0 and len(keyframes) == 3
    # (Pictures already in the encoder come first: up to two here.)
    assert keyframes[1] in (4, 5, 6) and keyframes[2] in (10, 11, 12), keyframes
    for i in keyframes:
        assert nal_types(out.units[i][0])[:3] == [7, 8, 5]
    assert decoded_pictures(out.data, tmp_path) == 15
    assert src.request_keyframe() is False


def test_stop_is_prompt_and_releases_the_camera():
    src = source()
    stopping = threading.Event()
    out = Units(stopping, 10**9)
    thread, outcome = in_thread(src.run_h264, out, stopping, encoding())
    assert out.wait_for(4)
    asked = time.monotonic()
    stopping.set()
    thread.join(5)
    assert outcome == {"value": None} and time.monotonic() - asked < 1.0
    assert fake.hardware.open_camera is None
    assert fake.hardware.encoders[0].process.poll() is not None


def test_an_error_of_the_output_surfaces_and_the_camera_is_closed():
    class Broken:
        def access_unit(self, data, keyframe, captured_at):
            raise ValueError("no room")

    with pytest.raises(ValueError, match="no room"):
        source().run_h264(Broken(), threading.Event(), encoding())
    assert fake.hardware.open_camera is None


def test_an_encoder_that_dies_goes_quiet_and_stop_still_works():
    src = source()
    stopping = threading.Event()
    out = Units(stopping, 10**9)
    thread, outcome = in_thread(src.run_h264, out, stopping, encoding())
    assert out.wait_for(3)
    reader = [t for t in threading.enumerate() if t.name == "fake picamera encoder"]
    fake.hardware.encoders[0].process.kill()
    # The encoder's output ends; the thread that read it (MMAL's callback
    # thread, the only one that gives units) ends with it.
    for t in reader:
        t.join(5)
    assert reader and not any(t.is_alive() for t in reader)
    assert thread.is_alive() and outcome == {}  # quiet, not failed: the service sees a stall
    stopping.set()
    thread.join(5)
    assert outcome == {"value": None}
    assert fake.hardware.open_camera is None


def test_the_daemon_streams_the_legacy_cameras_own_h264(tmp_path):
    """--codec h264 with the legacy picamera: the camera's encoder, no ffmpeg
    of the daemon's, and what a viewer gets decodes at the configured size
    (picamera's encoder pads to 16 rows and crops back in the SPS)."""
    import json
    import os
    from pistreaming.h264 import parse_message
    from tests.daemon import Daemon
    from tests.test_stream import connect
    width, height = 1296, 730
    fakes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")
    with Daemon("--resolution", f"{width}x{height}", "--framerate", "30", "--codec", "h264",
                camera="picamera", env={"PYTHONPATH": fakes, "FAKE_PICAMERA": "present"}
                ) as daemon:
        ws = connect(f"ws://127.0.0.1:{daemon.http_port}/stream")
        try:
            description = json.loads(ws.recv())["stream"]
            units = [parse_message(ws.recv()) for _ in range(15)]
        finally:
            ws.close()
        assert not daemon.search(r"encoder process: ffmpeg pid")
    assert (description["width"], description["height"]) == (width, height)
    assert units[0].keyframe
    path = tmp_path / "camera.h264"
    path.write_bytes(b"".join(u.access_unit for u in units))
    done = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                           "stream=width,height,nb_read_frames", "-of", "json", str(path)],
                          capture_output=True, check=True, text=True)
    (stream,) = json.loads(done.stdout)["streams"]
    assert (stream["width"], stream["height"], int(stream["nb_read_frames"])) == (
        width, height, 15)
