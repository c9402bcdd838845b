"""USB webcams and any other V4L2 capture device, read by ffmpeg itself.

At start the device is asked (with the V4L2 ioctls ffmpeg would use) which
pixel formats, sizes and frame rates it offers.  If none gives the configured
size at the configured rate the daemon refuses to start, saying what the
device does offer; otherwise ffmpeg is told to ask for exactly that
(``-f v4l2 -input_format F -video_size WxH -framerate R``).  No Python thread
touches the frames: ffmpeg reads the device, scales to the configured size (in
case a driver hands over another one, so the stream header stays true),
flips, and encodes.
"""

import errno
import fcntl
import os
import struct
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
CAP_DEVICE_CAPS = 0x80000000
BUF_TYPE_VIDEO_CAPTURE = 1
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


class V4L2Source:
    """A V4L2 capture device that ffmpeg reads itself."""

    name = "v4l2"

    def __init__(self, info, input_format, picture):
        """
        @param picture: the L{pistreaming.camera.picture.Picture} to read.
        """
        self.info = info
        self.input_format = input_format
        self.picture = picture
        self.geometry = picture.geometry

    @property
    def device(self):
        return self.info.path

    def describe(self):
        g = self.geometry
        return (f"V4L2 device {self.device} ({self.info.card}), {self.input_format} "
                f"{g.width}x{g.height} at {_rate_shown(self.picture.framerate)} fps")

    def ffmpeg_input(self):
        """(ffmpeg input arguments, filters) that read the device."""
        p = self.picture
        args = [
            "-f", "v4l2", "-input_format", self.input_format,
            "-video_size", p.size, "-framerate", p.rate_text,
            "-i", self.device,
            "-map", "0:v:0",
        ]
        filters = [f"scale={p.width}:{p.height}", *p.flip_filters]
        return args, filters


def open_source(path, picture, ioctl=fcntl.ioctl):
    """A L{V4L2Source} for the device at C{path} giving C{picture} (a
    L{pistreaming.camera.picture.Picture}), or L{DeviceError}."""
    info = query_device(path, ioctl=ioctl)
    input_format = choose_format(info, picture.width, picture.height, picture.framerate)
    return V4L2Source(info, input_format, picture)
