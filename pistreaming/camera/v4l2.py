"""USB webcams and any other V4L2 capture device, read by ffmpeg itself.

At start the device is asked (with the V4L2 ioctls ffmpeg would use) which
pixel formats, sizes and frame rates it offers.  If none gives the configured
size at the configured rate the daemon refuses to start, saying what the
device does offer; otherwise ffmpeg is told to ask for exactly that
(``-f v4l2 -input_format F -video_size WxH -framerate R``).  No Python thread
touches the frames: ffmpeg reads the device, scales to the configured size (in
case a driver hands over another one, so the stream header stays true),
flips, and encodes.

With ``--codec h264`` (L{choose_h264}): a camera that gives H.264 itself at
the size and rate asked for is copied, not encoded again, unless a flip or
an annotation changes the picture.  Otherwise ffmpeg encodes raw (or motion
JPEG) frames with the hardware encoder, where ffmpeg has ``h264_v4l2m2m``
and a V4L2 memory-to-memory device encodes H.264 (``/dev/video11`` on a
Raspberry Pi), and with libx264 where not.  The source's description (which
the daemon logs at start) says which, and why.
"""

import errno
import fcntl
import glob
import os
import re
import struct
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction



# -- the kernel's interface (linux/videodev2.h) ------------------------------

def _ioc(direction, number, size):
    return (direction << 30) | (size << 16) | (ord("V") << 8) | number


_READ, _READ_WRITE = 2, 3

#: struct v4l2_capability: driver[16], card[32], bus_info[32], version,
#: capabilities, device_caps, reserved[3]
CAPABILITY = struct.Struct("16s32s32sIII12x")
#: struct v4l2_fmtdesc: index, type, flags, description[32], pixelformat,
#: mbus_code, reserved[3]
FMTDESC = struct.Struct("III32sII12x")
#: struct v4l2_frmsizeenum: index, pixel_format, type, then discrete
#: (width, height) or stepwise (min/max/step width, min/max/step height),
#: reserved[2]
FRMSIZEENUM = struct.Struct("III6I8x")
#: struct v4l2_frmivalenum: index, pixel_format, width, height, type, then
#: discrete (numerator, denominator) or stepwise (min, max, step fractions),
#: reserved[2]
FRMIVALENUM = struct.Struct("IIIII6I8x")

VIDIOC_QUERYCAP = _ioc(_READ, 0, CAPABILITY.size)
VIDIOC_ENUM_FMT = _ioc(_READ_WRITE, 2, FMTDESC.size)
VIDIOC_ENUM_FRAMESIZES = _ioc(_READ_WRITE, 74, FRMSIZEENUM.size)
VIDIOC_ENUM_FRAMEINTERVALS = _ioc(_READ_WRITE, 75, FRMIVALENUM.size)

CAP_VIDEO_CAPTURE = 0x00000001
CAP_VIDEO_M2M_MPLANE = 0x00004000
CAP_VIDEO_M2M = 0x00008000
CAP_DEVICE_CAPS = 0x80000000
BUF_TYPE_VIDEO_CAPTURE = 1
BUF_TYPE_VIDEO_CAPTURE_MPLANE = 9
DISCRETE, CONTINUOUS, STEPWISE = 1, 2, 3

#: V4L2 pixel formats ffmpeg's v4l2 input takes, by its -input_format name,
#: in the order we prefer them: raw formats first (nothing to decode), then
#: motion JPEG.
FFMPEG_FORMATS = {
    "YU12": "yuv420p",
    "YUYV": "yuyv422",
    "UYVY": "uyvy422",
    "NV12": "nv12",
    "MJPG": "mjpeg",
    "JPEG": "mjpeg",
}

#: The V4L2 pixel format of H.264 (access units in Annex B), and the name of
#: ffmpeg's -input_format for it.
H264 = "H264"
FFMPEG_H264 = "h264"

#: A device rate this close to the configured one counts as the same
#: (webcams list e.g. 30 where 29.97 is asked, or 1/30.0003 s).
RATE_TOLERANCE = Fraction(1, 100)


class DeviceError(Exception):
    """The device cannot be used; the message says why, in one line."""


def fourcc(code):
    return struct.pack("<I", code).decode("ascii", "replace")


def _text(raw):
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# -- what a device offers ----------------------------------------------------

@dataclass
class FrameSize:
    """Sizes of one pixel format: one size (discrete) or a range (stepwise)."""

    min_width: int
    max_width: int
    step_width: int
    min_height: int
    max_height: int
    step_height: int
    #: Frame rates for this size (discrete), or None if the device lists none.
    rates: "list | None" = None
    #: Rates as a range (min, max) when the device gives intervals stepwise.
    rate_range: "tuple | None" = None

    @property
    def discrete(self):
        return self.min_width == self.max_width and self.min_height == self.max_height

    def fits(self, width, height):
        return (self.min_width <= width <= self.max_width
                and self.min_height <= height <= self.max_height
                and (width - self.min_width) % max(1, self.step_width) == 0
                and (height - self.min_height) % max(1, self.step_height) == 0)

    def describe(self):
        if self.discrete:
            size = f"{self.min_width}x{self.min_height}"
        else:
            size = f"{self.min_width}x{self.min_height}..{self.max_width}x{self.max_height}"
        if self.rates:
            return size + "@" + "/".join(_rate_shown(r) for r in sorted(self.rates, reverse=True))
        if self.rate_range:
            low, high = self.rate_range
            return f"{size}@{_rate_shown(low)}..{_rate_shown(high)}"
        return size


@dataclass
class PixelFormat:
    fourcc: str
    description: str
    sizes: list = field(default_factory=list)

    @property
    def ffmpeg_name(self):
        return FFMPEG_FORMATS.get(self.fourcc)


@dataclass
class DeviceInfo:
    path: str
    driver: str
    card: str
    formats: list = field(default_factory=list)

    def offers(self):
        """What the device offers, in one line."""
        parts = []
        for fmt in self.formats:
            name = fmt.ffmpeg_name or fmt.fourcc.strip()
            sizes = ", ".join(s.describe() for s in fmt.sizes) or "no sizes listed"
            parts.append(f"{name} {sizes}")
        return "; ".join(parts) or "no formats"


def _rate_shown(rate):
    """A frame rate as people read it: "30", "29.97"."""
    rate = Fraction(rate)
    if rate.denominator == 1:
        return str(rate.numerator)
    return f"{float(rate):.2f}".rstrip("0").rstrip(".")


def _rate_of(numerator, denominator):
    """The frame rate of a V4L2 frame interval (seconds per frame)."""
    if not numerator or not denominator:
        return None
    return Fraction(denominator, numerator)


def query_device(path, ioctl=fcntl.ioctl, open_device=None):
    """What the V4L2 device at C{path} is and offers.

    @param ioctl: C{fcntl.ioctl}, or a stand-in with the kernel's behaviour.
    @raise DeviceError: with a one-line reason.
    """
    if open_device is None:
        open_device = _open_device
    fd = open_device(path)
    try:
        try:
            caps = CAPABILITY.unpack(ioctl(fd, VIDIOC_QUERYCAP, bytes(CAPABILITY.size)))
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                raise DeviceError("not a V4L2 device") from None
            raise DeviceError(e.strerror) from None
        driver, card, _bus, _version, capabilities, device_caps = caps
        if capabilities & CAP_DEVICE_CAPS:
            capabilities = device_caps
        info = DeviceInfo(path, _text(driver), _text(card))
        if not capabilities & CAP_VIDEO_CAPTURE:
            raise DeviceError(
                f"not a video capture device ({info.card}; webcams often have a second "
                "/dev/video node for metadata: try another)"
            )
        info.formats = _formats(fd, ioctl)
        return info
    finally:
        os.close(fd)


def _open_device(path):
    if not os.path.exists(path):
        raise DeviceError("no such device")
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except PermissionError:
        raise DeviceError("permission denied (is this user in the 'video' group?)") from None
    except OSError as e:
        raise DeviceError(e.strerror) from None


def _enumerate(fd, ioctl, request, pack, limit=256):
    """Replies of an ENUM ioctl for index 0, 1, ... until the kernel says EINVAL."""
    replies = []
    for index in range(limit):
        try:
            replies.append(ioctl(fd, request, pack(index)))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOTTY):
                break
            raise DeviceError(f"the device failed to answer ({e.strerror})") from None
    return replies


def _formats(fd, ioctl):
    formats = []
    for reply in _enumerate(fd, ioctl, VIDIOC_ENUM_FMT,
                            lambda i: FMTDESC.pack(i, BUF_TYPE_VIDEO_CAPTURE, 0, b"", 0, 0)):
        _index, _type, _flags, description, pixelformat, _mbus = FMTDESC.unpack(reply)
        fmt = PixelFormat(fourcc(pixelformat), _text(description))
        fmt.sizes = _sizes(fd, ioctl, pixelformat)
        formats.append(fmt)
    return formats


def _sizes(fd, ioctl, pixelformat):
    sizes = []
    for reply in _enumerate(fd, ioctl, VIDIOC_ENUM_FRAMESIZES,
                            lambda i: FRMSIZEENUM.pack(i, pixelformat, 0, 0, 0, 0, 0, 0, 0)):
        _index, _fmt, kind, *values = FRMSIZEENUM.unpack(reply)
        if kind == DISCRETE:
            width, height = values[0], values[1]
            size = FrameSize(width, width, 1, height, height, 1)
        else:
            min_w, max_w, step_w, min_h, max_h, step_h = values
            if kind == CONTINUOUS:
                step_w = step_h = 1
            size = FrameSize(min_w, max_w, step_w, min_h, max_h, step_h)
        if size.discrete:
            _rates(fd, ioctl, pixelformat, size)
        sizes.append(size)
        if kind != DISCRETE:
            break  # a range is the only entry
    return sizes


def _rates(fd, ioctl, pixelformat, size):
    rates = []
    for reply in _enumerate(
            fd, ioctl, VIDIOC_ENUM_FRAMEINTERVALS,
            lambda i: FRMIVALENUM.pack(i, pixelformat, size.min_width, size.min_height,
                                       0, 0, 0, 0, 0, 0, 0)):
        _index, _fmt, _w, _h, kind, *values = FRMIVALENUM.unpack(reply)
        if kind == DISCRETE:
            rate = _rate_of(values[0], values[1])
            if rate is not None:
                rates.append(rate)
        else:
            fastest = _rate_of(values[0], values[1])  # the shortest interval
            slowest = _rate_of(values[2], values[3])
            if fastest is not None and slowest is not None:
                size.rate_range = (slowest, fastest)
            break
    size.rates = rates or None


# -- choosing what to ask for ------------------------------------------------

def _rate_close(offered, wanted):
    return abs(Fraction(offered) - wanted) <= wanted * RATE_TOLERANCE


def _size_can(size, width, height, rate):
    if not size.fits(width, height):
        return False
    if size.rates:
        return any(_rate_close(r, rate) for r in size.rates)
    if size.rate_range:
        low, high = size.rate_range
        return low * (1 - RATE_TOLERANCE) <= rate <= high * (1 + RATE_TOLERANCE)
    return True  # rates not listed: ffmpeg asks, and the driver decides


def offers_at(info, fourcc_name, width, height, rate):
    """Whether the device gives C{fourcc_name} frames at C{width}x{height}
    and C{rate}."""
    rate = Fraction(rate)
    return any(_size_can(s, width, height, rate)
               for f in info.formats if f.fourcc == fourcc_name for s in f.sizes)


def choose_format(info, width, height, rate):
    """The ffmpeg -input_format that gives C{width}x{height} at C{rate}.

    @raise DeviceError: saying what the device offers, if none does.
    """
    rate = Fraction(rate)
    usable = [f for f in info.formats if f.ffmpeg_name]
    usable.sort(key=lambda f: list(FFMPEG_FORMATS).index(f.fourcc))
    for fmt in usable:
        if any(_size_can(s, width, height, rate) for s in fmt.sizes):
            return fmt.ffmpeg_name
    raise DeviceError(
        f"{info.card or 'the device'} cannot give {width}x{height} at "
        f"{_rate_shown(rate)} fps; it offers: {info.offers()}"
    )


# -- H.264: the camera's own, the hardware encoder's, or x264's ---------------

def _fourccs(fd, ioctl, buf_type):
    """The pixel formats of one of a device's queues."""
    return [fourcc(FMTDESC.unpack(reply)[4]) for reply in _enumerate(
        fd, ioctl, VIDIOC_ENUM_FMT, lambda i: FMTDESC.pack(i, buf_type, 0, b"", 0, 0))]


def _device_number(path):
    found = re.search(r"(\d+)$", path)
    return (int(found.group(1)) if found else -1, path)


def m2m_h264_encoders(paths=None, ioctl=fcntl.ioctl, open_device=None):
    """The V4L2 memory-to-memory devices that encode H.264: [(path, card)].

    Such a device (VIDIOC_QUERYCAP: V4L2_CAP_VIDEO_M2M or _M2M_MPLANE) takes
    raw pictures on its output queue and gives H.264 on its capture queue;
    a decoder is the other way round.  ffmpeg's h264_v4l2m2m finds the
    device itself, the same way.

    @param paths: the device nodes to ask; by default every /dev/video*.
    """
    if open_device is None:
        open_device = _open_device
    if paths is None:
        paths = sorted(glob.glob("/dev/video*"), key=_device_number)
    found = []
    for path in paths:
        try:
            fd = open_device(path)
        except DeviceError:
            continue
        try:
            reply = ioctl(fd, VIDIOC_QUERYCAP, bytes(CAPABILITY.size))
            _driver, card, _bus, _version, capabilities, device_caps = CAPABILITY.unpack(reply)
            if capabilities & CAP_DEVICE_CAPS:
                capabilities = device_caps
            if capabilities & CAP_VIDEO_M2M_MPLANE:
                kind = BUF_TYPE_VIDEO_CAPTURE_MPLANE
            elif capabilities & CAP_VIDEO_M2M:
                kind = BUF_TYPE_VIDEO_CAPTURE
            else:
                continue
            if H264 in _fourccs(fd, ioctl, kind):
                found.append((path, _text(card)))
        except (OSError, DeviceError):
            continue
        finally:
            os.close(fd)
    return found


def ffmpeg_encoders(ffmpeg, timeout=30):
    """The names of the encoders the C{ffmpeg} executable has (an empty set
    if it cannot say)."""
    try:
        result = subprocess.run([ffmpeg, "-hide_banner", "-nostdin", "-encoders"],
                                stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    names = set()
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        # " V....D libx264   libx264 H.264 / AVC ...": flags, name, description
        parts = line.split(None, 2)
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] in "VAS":
            names.add(parts[1])
    return names


def find_hardware_encoder(ffmpeg):
    """Whether ffmpeg can encode H.264 in hardware here: (device, card) of
    the V4L2 encoder it would use, or (None, why not).

    This asks the machine (its devices, then ffmpeg); tests stand in for it.
    """
    devices = m2m_h264_encoders()
    if not devices:
        return None, "no V4L2 memory-to-memory device here encodes H.264"
    if "h264_v4l2m2m" not in ffmpeg_encoders(ffmpeg):
        device, card = devices[0]
        return None, f"{ffmpeg} has no h264_v4l2m2m encoder for {card} at {device}"
    return devices[0]


@dataclass(frozen=True)
class H264Plan:
    """How H.264 is made of a V4L2 camera's pictures."""

    #: ffmpeg's -input_format for the camera.
    input_format: str
    #: "copy" (the camera's own H.264), "h264_v4l2m2m" or "libx264"
    #: (L{pistreaming.encoder.H264_ENCODERS}).
    encoder: str
    #: Which, and why, in words (for the log).
    why: str


def choose_h264(info, picture, annotate=False, find_encoder=None):
    """How to give H.264 of C{picture} (a
    L{pistreaming.camera.picture.Picture}) from the device C{info} describes.

    @param annotate: whether the picture gets an annotation (--annotate).
    @param find_encoder: called with no argument, only if the picture has to
        be encoded: (device, card) of a hardware encoder, or (None, why not)
        (L{find_hardware_encoder}).
    @raise DeviceError: saying what the device offers, if nothing gives the
        size at the rate.
    """
    width, height, rate = picture.width, picture.height, Fraction(picture.framerate)
    shown = f"{width}x{height} at {_rate_shown(rate)} fps"
    own = offers_at(info, H264, width, height, rate)
    changes = (["--hflip"] if picture.hflip else []) + (["--vflip"] if picture.vflip else [])
    if annotate:
        changes.append("--annotate")
    if own and not changes:
        return H264Plan(FFMPEG_H264, "copy",
                        f"H.264 copied as the camera encodes it at {shown}, not encoded "
                        "again (its keyframes and bit rate are the camera's)")
    try:
        input_format = choose_format(info, width, height, rate)
    except DeviceError:
        if not own:
            raise
        input_format = FFMPEG_H264  # decoded by ffmpeg, to be changed and encoded again
    if own:
        reason = (f"{' and '.join(changes)} change{'s' if len(changes) == 1 else ''} "
                  "the picture, so the camera's own H.264 cannot be copied")
    elif any(f.fourcc == H264 for f in info.formats):
        reason = f"the camera gives H.264, but not at {shown}"
    else:
        reason = "the camera gives no H.264"
    device, text = (find_encoder or (lambda: (None, "no hardware encoder was looked for")))()
    if device is not None:
        return H264Plan(input_format, "h264_v4l2m2m",
                        f"H.264 encoded from {input_format} by the hardware encoder "
                        f"({text} at {device}, ffmpeg's h264_v4l2m2m): {reason}")
    return H264Plan(input_format, "libx264",
                    f"H.264 encoded from {input_format} by libx264 in ffmpeg: {reason}, "
                    f"and {text}")


class FFmpegInput(tuple):
    """(ffmpeg input arguments, filters), as every source's C{ffmpeg_input()}
    gives them, and how ffmpeg makes H.264 of that input: C{h264_encoder}
    (L{pistreaming.encoder.ffmpeg_command} reads it)."""

    def __new__(cls, args, filters, h264_encoder="libx264"):
        self = super().__new__(cls, (args, filters))
        self.h264_encoder = h264_encoder
        return self


class V4L2Source:
    """A V4L2 capture device that ffmpeg reads itself."""

    name = "v4l2"

    def __init__(self, info, input_format, picture, h264=None):
        """
        @param picture: the L{pistreaming.camera.picture.Picture} to read.
        @param h264: the L{H264Plan}, when the stream is H.264.
        """
        self.info = info
        self.input_format = input_format
        self.picture = picture
        self.geometry = picture.geometry
        self.h264 = h264

    @property
    def device(self):
        return self.info.path

    @property
    def h264_encoder(self):
        """How ffmpeg makes H.264 of this camera (libx264 unless planned)."""
        return self.h264.encoder if self.h264 is not None else "libx264"

    def describe(self):
        g = self.geometry
        text = (f"V4L2 device {self.device} ({self.info.card}), {self.input_format} "
                f"{g.width}x{g.height} at {_rate_shown(self.picture.framerate)} fps")
        if self.h264 is not None:
            text += "; " + self.h264.why
        return text

    def ffmpeg_input(self, codec=None):
        """(ffmpeg input arguments, filters) that read the device, as an
        L{FFmpegInput}.  The camera's own H.264, copied, has no filters (the
        picture is not decoded); with C{codec="mpeg1"} it is decoded."""
        p = self.picture
        args = [
            "-f", "v4l2", "-input_format", self.input_format,
            "-video_size", p.size, "-framerate", p.rate_text,
            "-i", self.device,
            "-map", "0:v:0",
        ]
        if self.h264_encoder == "copy" and codec != "mpeg1":
            return FFmpegInput(args, [], "copy")
        filters = [f"scale={p.width}:{p.height}", *p.flip_filters]
        return FFmpegInput(args, filters, self.h264_encoder)


def open_source(path, picture, ioctl=fcntl.ioctl, codec="mpeg1", annotate=False,
                ffmpeg="ffmpeg", find_encoder=None):
    """A L{V4L2Source} for the device at C{path} giving C{picture} (a
    L{pistreaming.camera.picture.Picture}), or L{DeviceError}.

    @param codec: "mpeg1" or "h264" (then see L{choose_h264}).
    @param annotate: whether the picture is annotated (--annotate).
    @param ffmpeg: the ffmpeg executable (asked whether it has h264_v4l2m2m).
    @param find_encoder: a stand-in for L{find_hardware_encoder}, for tests.
    """
    info = query_device(path, ioctl=ioctl)
    if codec == "h264":
        plan = choose_h264(info, picture, annotate,
                           find_encoder or (lambda: find_hardware_encoder(ffmpeg)))
        return V4L2Source(info, plan.input_format, picture, h264=plan)
    input_format = choose_format(info, picture.width, picture.height, picture.framerate)
    return V4L2Source(info, input_format, picture)
