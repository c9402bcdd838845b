"""USB webcams (V4L2): what the device is asked, and what ffmpeg is told.

With a real V4L2 device that this test can feed (v4l2loopback), the daemon
streams from it end to end.  Where the kernel offers none (no module, or a
container), the V4L2 queries are driven by a stand-in for the kernel's ioctls
with the kernel's struct layouts, ffmpeg's v4l2 input is checked against the
real ffmpeg, and tests/test_filesource.py streams the same ffmpeg-reads-it-
itself path end to end from a file.
"""

import errno
import fcntl
import glob
import os
import select
import signal
import struct
import subprocess
import time
from fractions import Fraction

import pytest
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pistreaming.camera import CameraUnavailable, choose_source, v4l2
from pistreaming.camera.picture import Picture
from pistreaming.encoder import Encoder, ffmpeg_command, output_args
from pistreaming.frames import FrameGeometry
from pistreaming.options import Config, find_ffmpeg
from tests.daemon import ROOT, Daemon, twistd_command
from tests.helpers import Arrivals, with_timeout
from tests.test_stream import collect, connect, decoded_frames, read_header

FFMPEG = find_ffmpeg("ffmpeg")


def test_ioctl_numbers_are_the_kernels():
    # From linux/videodev2.h: they encode each struct's size, so a wrong
    # layout here would ask the kernel for something else.
    assert v4l2.VIDIOC_QUERYCAP == 0x80685600
    assert v4l2.VIDIOC_ENUM_FMT == 0xC0405602
    assert v4l2.VIDIOC_ENUM_FRAMESIZES == 0xC02C564A
    assert v4l2.VIDIOC_ENUM_FRAMEINTERVALS == 0xC034564B


# -- a stand-in for the kernel's side of the V4L2 ioctls ---------------------------

def code(fourcc):
    return struct.unpack("<I", fourcc.encode())[0]


class Kernel:
    """Answers V4L2 ioctls for one described device, as the kernel does:
    filled-in structs, and EINVAL past the end of each list."""

    def __init__(self, formats, card="HD Webcam C270", capture=True):
        #: {fourcc: {(width, height): [fps, ...]}}
        self.formats = formats
        self.card = card
        self.capture = capture
        self.calls = []

    def ioctl(self, fd, request, arg):
        self.calls.append(request)
        if request == v4l2.VIDIOC_QUERYCAP:
            caps = v4l2.CAP_VIDEO_CAPTURE if self.capture else 0x00800000  # META_CAPTURE
            return v4l2.CAPABILITY.pack(b"uvcvideo", self.card.encode(), b"usb-0000:01:00.0-1.3",
                                        0x60100, caps | v4l2.CAP_DEVICE_CAPS | 0x04000000, caps)
        if request == v4l2.VIDIOC_ENUM_FMT:
            index, kind, *_ = v4l2.FMTDESC.unpack(arg)
            assert kind == v4l2.BUF_TYPE_VIDEO_CAPTURE
            names = list(self.formats)
            if index >= len(names):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            description = {"YUYV": b"YUYV 4:2:2", "MJPG": b"Motion-JPEG"}.get(names[index], b"?")
            return v4l2.FMTDESC.pack(index, kind, 0, description, code(names[index]), 0)
        if request == v4l2.VIDIOC_ENUM_FRAMESIZES:
            index, pixelformat, *_ = v4l2.FRMSIZEENUM.unpack(arg)
            sizes = list(self._format(pixelformat))
            if index >= len(sizes):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            w, h = sizes[index]
            return v4l2.FRMSIZEENUM.pack(index, pixelformat, v4l2.DISCRETE, w, h, 0, 0, 0, 0)
        if request == v4l2.VIDIOC_ENUM_FRAMEINTERVALS:
            index, pixelformat, w, h, *_ = v4l2.FRMIVALENUM.unpack(arg)
            rates = self._format(pixelformat).get((w, h))
            if rates is None or index >= len(rates):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            interval = 1 / Fraction(rates[index])
            return v4l2.FRMIVALENUM.pack(index, pixelformat, w, h, v4l2.DISCRETE,
                                         interval.numerator, interval.denominator, 0, 0, 0, 0)
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def _format(self, pixelformat):
        for name, sizes in self.formats.items():
            if code(name) == pixelformat:
                return sizes
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def query(self, path="/dev/video0"):
        return v4l2.query_device(path, ioctl=self.ioctl,
                                 open_device=lambda path: os.open(os.devnull, os.O_RDONLY))


#: A typical cheap webcam: raw YUYV is slow at large sizes (USB bandwidth),
#: motion JPEG is fast.
WEBCAM = {
    "YUYV": {(640, 480): [30, 15, 5], (1280, 720): [10, 5]},
    "MJPG": {(640, 480): [30, 15], (1280, 720): [30, 15], (1920, 1080): [30]},
}


def test_the_device_is_read_as_the_kernel_describes_it():
    info = Kernel(WEBCAM).query()
    assert (info.driver, info.card) == ("uvcvideo", "HD Webcam C270")
    assert [(f.fourcc, f.ffmpeg_name) for f in info.formats] == [
        ("YUYV", "yuyv422"), ("MJPG", "mjpeg")]
    sizes = info.formats[0].sizes
    assert [(s.min_width, s.min_height, s.rates) for s in sizes] == [
        (640, 480, [30, 15, 5]), (1280, 720, [10, 5])]
    assert info.offers() == ("yuyv422 640x480@30/15/5, 1280x720@10/5; "
                             "mjpeg 640x480@30/15, 1280x720@30/15, 1920x1080@30")


@pytest.mark.parametrize("size,rate,chosen", [
    ((640, 480), 30, "yuyv422"),    # raw when it can: nothing to decode
    ((1280, 720), 10, "yuyv422"),
    ((1280, 720), 30, "mjpeg"),     # raw cannot go that fast at this size
    ((1920, 1080), 30, "mjpeg"),
    ((640, 480), Fraction(30000, 1001), "yuyv422"),  # 29.97 asked, 30 offered
])
def test_the_format_that_gives_the_size_and_rate_is_chosen(size, rate, chosen):
    assert v4l2.choose_format(Kernel(WEBCAM).query(), *size, rate) == chosen


def test_a_size_or_rate_the_device_cannot_give_is_refused_saying_what_it_offers():
    info = Kernel(WEBCAM).query()
    with pytest.raises(v4l2.DeviceError) as e:
        v4l2.choose_format(info, 1920, 1080, 60)
    assert str(e.value) == (
        "HD Webcam C270 cannot give 1920x1080 at 60 fps; it offers: "
        "yuyv422 640x480@30/15/5, 1280x720@10/5; "
        "mjpeg 640x480@30/15, 1280x720@30/15, 1920x1080@30")
    with pytest.raises(v4l2.DeviceError, match="cannot give 800x600 at 30 fps"):
        v4l2.choose_format(info, 800, 600, 30)


def test_a_metadata_node_is_not_taken_for_a_camera():
    with pytest.raises(v4l2.DeviceError, match="not a video capture device"):
        Kernel(WEBCAM, capture=False).query("/dev/video1")


def test_a_device_that_lists_no_format_ffmpeg_takes_is_refused():
    info = Kernel({"H264": {(1920, 1080): [30]}}).query()
    with pytest.raises(v4l2.DeviceError, match="cannot give 1920x1080 at 30 fps"):
        v4l2.choose_format(info, 1920, 1080, 30)


# -- the real kernel, for what this machine has ------------------------------------

def test_a_missing_device_or_one_that_is_not_v4l2_is_refused():
    with pytest.raises(v4l2.DeviceError, match="^no such device$"):
        v4l2.query_device("/dev/video-that-is-not-there")
    # /dev/null answers the V4L2 query as any non-V4L2 file does: ENOTTY
    with pytest.raises(v4l2.DeviceError, match="^not a V4L2 device$"):
        v4l2.query_device(os.devnull)


@pytest.mark.parametrize("camera,message", [
    ("v4l2:/dev/video-that-is-not-there",
     "twistd pistream: error: --camera v4l2:/dev/video-that-is-not-there: no such device"),
    ("v4l2:/dev/null", "twistd pistream: error: --camera v4l2:/dev/null: not a V4L2 device"),
])
def test_the_daemon_refuses_a_bad_device_with_one_line(camera, message):
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "pistream", "--camera", camera],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines() == [message]


# -- what ffmpeg is told -----------------------------------------------------------

def webcam_source(**flips):
    info = Kernel(WEBCAM).query("/dev/video2")
    return v4l2.V4L2Source(info, "mjpeg", Picture(1280, 720, 30, **flips))


def test_ffmpeg_asks_the_device_for_the_size_and_rate_and_scales_to_be_sure():
    source = webcam_source(hflip=True, vflip=True)
    args, filters = source.ffmpeg_input()
    assert args == ["-f", "v4l2", "-input_format", "mjpeg", "-video_size", "1280x720",
                    "-framerate", "30/1", "-i", "/dev/video2", "-map", "0:v:0"]
    assert filters == ["scale=1280:720", "hflip", "vflip"]
    command = ffmpeg_command("/usr/bin/ffmpeg", FrameGeometry(1280, 720), 30, 800_000,
                             source.ffmpeg_input())
    assert command[:5] == ["/usr/bin/ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error"]
    assert command[5:5 + len(args)] == args
    assert command[5 + len(args):7 + len(args)] == ["-vf", "scale=1280:720,hflip,vflip"]
    # The output half is the raw path's, flag for flag.
    assert command[7 + len(args):] == output_args(30, 800_000)
    assert "pipe:0" not in command


def test_ffmpegs_v4l2_input_takes_those_arguments():
    # Run the real ffmpeg with them on a file that is not a device: the
    # options parse, and it is the v4l2 input that opens the path and fails.
    args, filters = webcam_source().ffmpeg_input()
    args[args.index("/dev/video2")] = os.devnull
    result = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", *args,
         "-vf", ",".join(filters), "-f", "null", "-"],
        capture_output=True, timeout=30)
    err = result.stderr.decode()
    assert result.returncode != 0
    assert "video4linux2" in err and "VIDIOC_QUERYCAP" in err, err
    assert "Unrecognized option" not in err and "Option not found" not in err


class FailingDeviceTests(unittest.TestCase):
    """When ffmpeg cannot read the device (unplugged, busy), the log says so in
    ffmpeg's own words, and ffmpeg is tried again with backoff."""

    timeout = 30

    @defer.inlineCallbacks
    def test_ffmpegs_complaint_about_the_device_is_logged(self):
        events = Arrivals()
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def failures():
            return [e for e in events if "how" in e and "stderr" in e]

        source = webcam_source()
        args, filters = source.ffmpeg_input()
        args[args.index("/dev/video2")] = os.devnull  # a "device" that fails like a gone one
        encoder = Encoder(ffmpeg_command(FFMPEG, source.geometry, 30, 800_000, (args, filters)),
                          lambda chunk: None, reactor, reads_stdin=False)
        encoder.first_restart_delay = 0.05
        encoder.startService()
        try:
            yield events.until(lambda: len(failures()) >= 2, 10, "ffmpeg to fail twice")
        finally:
            yield with_timeout(encoder.stopService(), 3, "encoder stop")
        assert encoder.restarts >= 2
        assert failures()[0]["how"] == "exited with code 1"
        assert "VIDIOC_QUERYCAP" in failures()[0]["stderr"]
        assert "Inappropriate ioctl for device" in failures()[0]["stderr"]


# -- a real V4L2 device: v4l2loopback, fed by ffmpeg ---------------------------------

def loopback_devices():
    """The v4l2loopback devices here (by their driver's name)."""
    found = []
    for path in sorted(glob.glob("/dev/video*")):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            reply = fcntl.ioctl(fd, v4l2.VIDIOC_QUERYCAP, bytes(v4l2.CAPABILITY.size))
        except OSError:
            continue
        finally:
            os.close(fd)
        if v4l2.CAPABILITY.unpack(reply)[0].split(b"\0")[0] == b"v4l2 loopback":
            found.append(path)
    return found


LOOPBACK = loopback_devices()
needs_loopback = pytest.mark.skipif(
    not LOOPBACK, reason="no v4l2loopback device here (modprobe v4l2loopback "
                         "where the kernel has the module); the file source "
                         "covers the ffmpeg-reads-it path end to end")


def wrote_a_frame(ffmpeg, seconds):
    """Whether C{ffmpeg} (run with C{-progress pipe:1}) reports, within
    C{seconds}, a frame written to its output: its first progress report
    comes right after its first frame."""
    deadline = time.monotonic() + seconds
    out = ffmpeg.stdout.fileno()
    pending = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([out], [], [], left)[0]:
            return False
        data = os.read(out, 4096)
        if not data:
            return False  # ffmpeg ended
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if line.startswith(b"frame=") and int(line[6:] or 0) >= 1:
                return True


@pytest.fixture
def fed_loopback():
    """A v4l2loopback device that ffmpeg feeds with a 640x480 30 fps test
    picture, from ffmpeg's first frame on (its progress report says when)."""
    device = LOOPBACK[0]
    producer = subprocess.Popen(
        [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-nostats",
         "-progress", "pipe:1", "-re",
         "-f", "lavfi", "-i", "testsrc=size=640x480:rate=30",
         "-pix_fmt", "yuyv422", "-f", "v4l2", device],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert wrote_a_frame(producer, 10), f"ffmpeg wrote no frame to {device}"
        # The device offers what the producer feeds it.
        assert v4l2.choose_format(v4l2.query_device(device), 640, 480, 30)
        yield device
    finally:
        os.killpg(producer.pid, signal.SIGTERM)
        producer.wait(10)
        producer.stdout.close()


@needs_loopback
def test_the_daemon_streams_a_real_v4l2_device(fed_loopback, tmp_path):
    with Daemon("--resolution", "640x480", "--framerate", "30",
                camera=f"v4l2:{fed_loopback}") as daemon:
        assert daemon.search(r"camera: v4l2 chosen")
        ws = connect(f"ws://127.0.0.1:{daemon.http_port}/stream")
        try:
            assert read_header(ws) == (640, 480)
            data = collect(ws, 3.0)
        finally:
            ws.close()
    frames = decoded_frames(data, tmp_path)
    assert {(f["width"], f["height"]) for f in frames} == {(640, 480)}
    assert len(frames) >= 30


@needs_loopback
def test_a_size_the_real_device_cannot_give_is_refused_with_one_line(fed_loopback):
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "pistream", "--camera", f"v4l2:{fed_loopback}",
                            "--resolution", "1920x1080", "--framerate", "60"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 1
    (line,) = result.stderr.decode().strip().splitlines()
    assert line.startswith(f"twistd pistream: error: --camera v4l2:{fed_loopback}: ")
    assert "cannot give 1920x1080 at 60 fps; it offers: " in line


def test_choose_source_turns_a_device_error_into_a_start_error():
    with pytest.raises(CameraUnavailable) as e:
        choose_source(Config(camera="v4l2:/dev/null"))
    assert str(e.value) == "--camera v4l2:/dev/null: not a V4L2 device"
