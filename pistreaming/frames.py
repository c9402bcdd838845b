"""Geometry of raw YUV420 frames as cameras deliver them.

picamera (and our test pattern, which mimics it) pads each raw frame: the
width is rounded up to a multiple of 32 and the height to a multiple of 16.
The Y plane is ``padded_width * padded_height`` bytes, then the U and V planes
each ``(padded_width // 2) * (padded_height // 2)`` bytes.  The encoder is told
the padded size and crops the picture back to the real one.
"""

import struct
from dataclasses import dataclass

#: JSMpeg's stream header: magic, then width and height as big-endian uint16.
JSMPEG_MAGIC = b"jsmp"


def stream_header(width, height):
    """The 8-byte message every viewer gets first: b'jsmp' + width + height."""
    return JSMPEG_MAGIC + struct.pack(">HH", width, height)


def round_up(value, multiple):
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class FrameGeometry:
    """Size of the picture and of the padded raw YUV420 frame that carries it."""

    width: int
    height: int

    @property
    def padded_width(self):
        return round_up(self.width, 32)

    @property
    def padded_height(self):
        return round_up(self.height, 16)

    @property
    def y_size(self):
        return self.padded_width * self.padded_height

    @property
    def uv_size(self):
        return (self.padded_width // 2) * (self.padded_height // 2)

    @property
    def frame_size(self):
        """Bytes in one padded raw frame."""
        return self.y_size + 2 * self.uv_size

    @property
    def crop_filter(self):
        """The ffmpeg video filter that recovers the real picture."""
        return f"crop={self.width}:{self.height}:0:0"
