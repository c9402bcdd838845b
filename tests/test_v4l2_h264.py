"""V4L2 webcams with --codec h264: a camera's own H.264 is copied unless the
picture must change; otherwise the hardware encoder (a V4L2 memory-to-memory
device that encodes H.264, where ffmpeg has h264_v4l2m2m) or libx264
encodes it, and the description the daemon logs says which and why.

The devices are the hardware edge: the kernel's answers to the V4L2 ioctls
are stood in for (with the kernel's struct layouts), and so is the one
function that asks the machine for a hardware encoder.  ffmpeg is real: it
must take the arguments it is given.  (No v4l2loopback on this kernel: the
copy path is streamed end to end from a file of H.264 in
tests/test_encoder_h264.py.)"""

import errno
import os
import struct
import subprocess
from fractions import Fraction

import pytest

from pistreaming.camera import v4l2
from pistreaming.camera.picture import Picture
from pistreaming.encoder import ffmpeg_command
from pistreaming.frames import FrameGeometry
from pistreaming.options import find_ffmpeg

FFMPEG = find_ffmpeg("ffmpeg")

# linux/videodev2.h
CAPTURE, OUTPUT, CAPTURE_MPLANE, OUTPUT_MPLANE = 1, 2, 9, 10
CAP_META_CAPTURE, CAP_STREAMING = 0x00800000, 0x04000000


def code(fourcc):
    return struct.unpack("<I", fourcc.encode())[0]


class Device:
    def __init__(self, card, caps, queues, driver="uvcvideo"):
        #: {buffer type: {fourcc: {(width, height): [fps, ...]}}}
        self.card, self.caps, self.queues, self.driver = card, caps, queues, driver


class Machine:
    """The kernel's answers for some /dev/video nodes, as the kernel gives
    them: filled-in structs, EINVAL past the end of a list or for a queue
    the device does not have, ENOTTY from what is not V4L2."""

    def __init__(self, devices, refused=()):
        self.devices = devices
        self.refused = set(refused)
        self.fds = {}
        self.asked = []

    def open(self, path):
        if path in self.refused:
            raise v4l2.DeviceError("permission denied (is this user in the 'video' group?)")
        fd = os.open(os.devnull, os.O_RDONLY)
        self.fds[fd] = path
        return fd

    def ioctl(self, fd, request, arg):
        device = self.devices.get(self.fds.get(fd))
        if device is None:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        if request == v4l2.VIDIOC_QUERYCAP:
            caps = device.caps | CAP_STREAMING
            return v4l2.CAPABILITY.pack(device.driver.encode(), device.card.encode(),
                                        b"platform:x", 0x60100, caps | v4l2.CAP_DEVICE_CAPS,
                                        caps)
        if request == v4l2.VIDIOC_ENUM_FMT:
            index, kind, *_ = v4l2.FMTDESC.unpack(arg)
            self.asked.append((self.fds[fd], kind))
            names = list(device.queues.get(kind, {}))
            if index >= len(names):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return v4l2.FMTDESC.pack(index, kind, 0, names[index].encode(),
                                     code(names[index]), 0)
        queue = device.queues.get(CAPTURE, {})
        if request == v4l2.VIDIOC_ENUM_FRAMESIZES:
            index, pixelformat, *_ = v4l2.FRMSIZEENUM.unpack(arg)
            sizes = list(self._sizes(queue, pixelformat))
            if index >= len(sizes):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            w, h = sizes[index]
            return v4l2.FRMSIZEENUM.pack(index, pixelformat, v4l2.DISCRETE, w, h, 0, 0, 0, 0)
        if request == v4l2.VIDIOC_ENUM_FRAMEINTERVALS:
            index, pixelformat, w, h, *_ = v4l2.FRMIVALENUM.unpack(arg)
            rates = self._sizes(queue, pixelformat).get((w, h))
            if rates is None or index >= len(rates):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            interval = 1 / Fraction(rates[index])
            return v4l2.FRMIVALENUM.pack(index, pixelformat, w, h, v4l2.DISCRETE,
                                         interval.numerator, interval.denominator,
                                         0, 0, 0, 0)
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    @staticmethod
    def _sizes(queue, pixelformat):
        for name, sizes in queue.items():
            if code(name) == pixelformat:
                return sizes
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def encoders(self):
        return v4l2.m2m_h264_encoders(sorted(self.devices) + sorted(self.refused),
                                      ioctl=self.ioctl, open_device=self.open)

    def webcam(self, path):
        return v4l2.query_device(path, ioctl=self.ioctl, open_device=self.open)


RAW = {"YU12": {}, "NV12": {}}
#: A Raspberry Pi 4's codec nodes (bcm2835-codec), multiplanar: the decoder
#: takes H.264 on its output queue, the encoder gives it on its capture queue.
PI4 = {
    "/dev/video10": Device("bcm2835-codec-decode", v4l2.CAP_VIDEO_M2M_MPLANE,
                           {OUTPUT_MPLANE: {"H264": {}, "MJPG": {}}, CAPTURE_MPLANE: RAW},
                           driver="bcm2835-codec"),
    "/dev/video11": Device("bcm2835-codec-encode", v4l2.CAP_VIDEO_M2M_MPLANE,
                           {OUTPUT_MPLANE: RAW, CAPTURE_MPLANE: {"H264": {}}},
                           driver="bcm2835-codec"),
    "/dev/video12": Device("bcm2835-codec-isp", v4l2.CAP_VIDEO_M2M_MPLANE,
                           {OUTPUT_MPLANE: RAW, CAPTURE_MPLANE: RAW}, driver="bcm2835-codec"),
    "/dev/video0": Device("USB Camera", v4l2.CAP_VIDEO_CAPTURE,
                          {CAPTURE: {"H264": {(1280, 720): [30]}}}),
    "/dev/video1": Device("USB Camera", CAP_META_CAPTURE, {}),
}
#: A Raspberry Pi 5: an HEVC decoder, no encoder.
PI5 = {
    "/dev/video19": Device("rpivid", v4l2.CAP_VIDEO_M2M_MPLANE,
                           {OUTPUT_MPLANE: {"S265": {}}, CAPTURE_MPLANE: RAW}, driver="rpivid"),
}
#: A single-planar encoder (as i.MX's coda is).
CODA = {
    "/dev/video2": Device("CODA960", v4l2.CAP_VIDEO_M2M,
                          {OUTPUT: RAW, CAPTURE: {"H264": {}, "MPG4": {}}}, driver="coda"),
}


# -- the hardware encoder -----------------------------------------------------------

def test_a_pis_encoder_is_found_by_what_its_capture_queue_gives():
    machine = Machine(PI4)
    assert machine.encoders() == [("/dev/video11", "bcm2835-codec-encode")]
    # the decoder's H.264 (on its output queue) is not taken for an encoder;
    # only capture queues were asked, and the webcam and its metadata node
    # were not asked at all
    assert {kind for _, kind in machine.asked} == {CAPTURE_MPLANE}
    assert not {path for path, _ in machine.asked} & {"/dev/video0", "/dev/video1"}


def test_a_single_planar_encoder_is_found_too():
    machine = Machine(CODA)
    assert machine.encoders() == [("/dev/video2", "CODA960")]
    assert machine.asked == [("/dev/video2", CAPTURE)] * 3


def test_no_encoder_on_a_pi_5_and_nodes_that_cannot_be_opened_are_passed_over():
    assert Machine(PI5).encoders() == []
    machine = Machine(dict(PI4), refused=["/dev/video31"])
    machine.devices["/dev/video30"] = None  # not V4L2 at all: ENOTTY
    assert machine.encoders() == [("/dev/video11", "bcm2835-codec-encode")]


def test_this_machine_has_no_hardware_encoder_and_says_so():
    # No /dev/video* here: nothing is found, and why is said.
    assert v4l2.m2m_h264_encoders() == []
    device, why = v4l2.find_hardware_encoder(FFMPEG)
    assert device is None
    assert why == "no V4L2 memory-to-memory device here encodes H.264"


def test_ffmpegs_encoders_are_listed():
    names = v4l2.ffmpeg_encoders(FFMPEG)
    assert {"libx264", "mpeg1video"} <= names
    assert all(" " not in name for name in names)
    assert v4l2.ffmpeg_encoders("/nonexistent/ffmpeg") == set()


# -- the decision --------------------------------------------------------------------

#: A webcam that encodes H.264 at 720p and 1080p, and gives MJPEG and YUYV.
H264_WEBCAM = {
    "YUYV": {(640, 480): [30]},
    "MJPG": {(1280, 720): [30], (1920, 1080): [30]},
    "H264": {(1280, 720): [30], (1920, 1080): [30]},
}


def webcam(formats):
    machine = Machine({"/dev/video0": Device("HD Pro Webcam C920", v4l2.CAP_VIDEO_CAPTURE,
                                             {CAPTURE: formats})})
    return machine.webcam("/dev/video0")


class Hardware:
    """Stands in for find_hardware_encoder, counting its calls."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.answer


PI_ENCODER = ("/dev/video11", "bcm2835-codec-encode")
NO_ENCODER = (None, "no V4L2 memory-to-memory device here encodes H.264")


def test_the_cameras_own_h264_is_copied_when_nothing_changes_the_picture():
    hardware = Hardware(PI_ENCODER)
    plan = v4l2.choose_h264(webcam(H264_WEBCAM), Picture(1280, 720, 30), False, hardware)
    assert (plan.input_format, plan.encoder) == ("h264", "copy")
    assert plan.why == ("H.264 copied as the camera encodes it at 1280x720 at 30 fps, not "
                        "encoded again (its keyframes and bit rate are the camera's)")
    assert hardware.calls == 0  # no encoder needed: none looked for


@pytest.mark.parametrize("flips,annotate,said", [
    ({"hflip": True}, False, "--hflip changes the picture"),
    ({"vflip": True, "hflip": True}, False, "--hflip and --vflip change the picture"),
    ({}, True, "--annotate changes the picture"),
])
def test_a_changed_picture_is_encoded_again_from_raw_or_mjpeg(flips, annotate, said):
    picture = Picture(1280, 720, 30, **flips)
    plan = v4l2.choose_h264(webcam(H264_WEBCAM), picture, annotate, Hardware(PI_ENCODER))
    assert (plan.input_format, plan.encoder) == ("mjpeg", "h264_v4l2m2m")
    assert plan.why == (
        "H.264 encoded from mjpeg by the hardware encoder (bcm2835-codec-encode at "
        f"/dev/video11, ffmpeg's h264_v4l2m2m): {said}, so the camera's own H.264 "
        "cannot be copied")
    plan = v4l2.choose_h264(webcam(H264_WEBCAM), picture, annotate, Hardware(NO_ENCODER))
    assert (plan.input_format, plan.encoder) == ("mjpeg", "libx264")
    assert plan.why.startswith("H.264 encoded from mjpeg by libx264 in ffmpeg: " + said)
    assert plan.why.endswith(", and no V4L2 memory-to-memory device here encodes H.264")


def test_a_camera_without_h264_at_the_size_is_encoded():
    plan = v4l2.choose_h264(webcam(H264_WEBCAM), Picture(640, 480, 30), False,
                            Hardware(NO_ENCODER))
    assert (plan.input_format, plan.encoder) == ("yuyv422", "libx264")
    assert "the camera gives H.264, but not at 640x480 at 30 fps" in plan.why
    no_h264 = {"MJPG": {(1280, 720): [30]}}
    plan = v4l2.choose_h264(webcam(no_h264), Picture(1280, 720, 30), False,
                            Hardware(PI_ENCODER))
    assert (plan.input_format, plan.encoder) == ("mjpeg", "h264_v4l2m2m")
    assert plan.why.endswith(": the camera gives no H.264")


def test_a_camera_that_gives_only_h264_is_decoded_to_be_flipped():
    only = {"H264": {(1920, 1080): [30]}}
    plan = v4l2.choose_h264(webcam(only), Picture(1920, 1080, 30, vflip=True), False,
                            Hardware(NO_ENCODER))
    assert (plan.input_format, plan.encoder) == ("h264", "libx264")
    with pytest.raises(v4l2.DeviceError) as e:
        v4l2.choose_h264(webcam(only), Picture(1280, 720, 30), False, Hardware(NO_ENCODER))
    assert str(e.value) == ("HD Pro Webcam C920 cannot give 1280x720 at 30 fps; it offers: "
                            "H264 1920x1080@30")


# -- what ffmpeg is told --------------------------------------------------------------

def open_webcam(picture, codec, annotate=False, hardware=NO_ENCODER):
    """open_source on the real node /dev/null, the stand-in kernel answering
    for it as the H.264 webcam."""
    machine = Machine({os.devnull: Device("HD Pro Webcam C920", v4l2.CAP_VIDEO_CAPTURE,
                                          {CAPTURE: H264_WEBCAM})})

    def ioctl(fd, request, arg):
        machine.fds[fd] = os.devnull
        return machine.ioctl(fd, request, arg)

    return v4l2.open_source(os.devnull, picture, ioctl=ioctl, codec=codec,
                            annotate=annotate, ffmpeg=FFMPEG, find_encoder=Hardware(hardware))


def test_a_copied_camera_is_read_as_h264_and_copied_into_mpegts():
    source = open_webcam(Picture(1280, 720, 30), "h264")
    assert source.h264_encoder == "copy"
    assert source.describe() == (
        f"V4L2 device {os.devnull} (HD Pro Webcam C920), h264 1280x720 at 30 fps; "
        "H.264 copied as the camera encodes it at 1280x720 at 30 fps, not encoded again "
        "(its keyframes and bit rate are the camera's)")
    args, filters = video_input = source.ffmpeg_input("h264")
    assert args == ["-f", "v4l2", "-input_format", "h264", "-video_size", "1280x720",
                    "-framerate", "30/1", "-i", os.devnull, "-map", "0:v:0"]
    assert filters == []
    command = ffmpeg_command(FFMPEG, source.geometry, 30, 800_000, video_input,
                             codec="h264", keyframe_interval=2.0)
    assert command[5 + len(args):] == [
        "-c:v", "copy", "-f", "mpegts", "-muxdelay", "0", "-muxpreload", "0",
        "-flush_packets", "1", "-omit_video_pes_length", "0", "pipe:1"]
    # the same camera in MPEG-1 decodes its H.264
    args, filters = source.ffmpeg_input("mpeg1")
    assert filters == ["scale=1280:720"]
    assert "mpeg1video" in ffmpeg_command(FFMPEG, source.geometry, 30, 800_000, (args, filters))


def test_a_flipped_camera_is_encoded_by_the_encoder_chosen():
    source = open_webcam(Picture(1280, 720, 30, hflip=True), "h264", hardware=PI_ENCODER)
    assert source.h264_encoder == "h264_v4l2m2m" and source.input_format == "mjpeg"
    video_input = source.ffmpeg_input("h264")
    assert video_input == (
        ["-f", "v4l2", "-input_format", "mjpeg", "-video_size", "1280x720",
         "-framerate", "30/1", "-i", os.devnull, "-map", "0:v:0"],
        ["scale=1280:720", "hflip"])
    command = ffmpeg_command(FFMPEG, source.geometry, 30, 800_000, video_input, codec="h264")
    assert command[command.index("-vf") + 1] == "scale=1280:720,hflip"
    assert command[command.index("-c:v") + 1] == "h264_v4l2m2m"
    assert "--hflip changes the picture" in source.describe()


def test_mpeg1_opens_the_camera_as_before():
    source = open_webcam(Picture(1280, 720, 30), "mpeg1")
    assert source.h264 is None and source.input_format == "mjpeg"
    assert source.describe() == (
        f"V4L2 device {os.devnull} (HD Pro Webcam C920), mjpeg 1280x720 at 30 fps")


@pytest.mark.parametrize("picture,hardware", [
    (Picture(1280, 720, 30), NO_ENCODER),                 # copy
    (Picture(1280, 720, 30, vflip=True), PI_ENCODER),     # h264_v4l2m2m
    (Picture(640, 480, 30), NO_ENCODER),                  # libx264
])
def test_ffmpeg_takes_the_commands(picture, hardware):
    # Run the real ffmpeg with each command on a "device" that is not one:
    # every option parses, and it is the v4l2 input that fails on the node.
    source = open_webcam(picture, "h264", hardware=hardware)
    command = ffmpeg_command(FFMPEG, source.geometry, 30, 800_000, source.ffmpeg_input("h264"),
                             codec="h264")
    result = subprocess.run(command, capture_output=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    err = result.stderr.decode()
    assert result.returncode != 0
    assert "video4linux2" in err and "VIDIOC_QUERYCAP" in err, err
    assert "Unrecognized option" not in err and "Option not found" not in err, err
