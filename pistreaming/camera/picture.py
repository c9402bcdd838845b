"""What every source is asked for: one settings object, built once from
the options (L{Picture.of}), and the ffmpeg texts that derive from it."""

from dataclasses import dataclass
from fractions import Fraction

from pistreaming.frames import FrameGeometry


def rate_text(rate):
    """ffmpeg's text of a frame rate (for ``-r``, ``-framerate``, ``fps=``):
    the exact fraction, e.g. ``30000/1001`` or ``24/1``."""
    rate = Fraction(rate)
    return f"{rate.numerator}/{rate.denominator}"


@dataclass(frozen=True)
class Picture:
    """The picture a source delivers: its size, frame rate (a Fraction)
    and which way it is flipped."""

    width: int
    height: int
    framerate: Fraction
    vflip: bool = False
    hflip: bool = False

    def __post_init__(self):
        object.__setattr__(self, "framerate", Fraction(self.framerate))

    @classmethod
    def of(cls, config):
        """The picture the options (a L{pistreaming.options.Config}) ask for."""
        return cls(config.width, config.height, config.framerate, config.vflip, config.hflip)

    @property
    def geometry(self):
        """The L{FrameGeometry} of the picture's raw frames."""
        return FrameGeometry(self.width, self.height)

    @property
    def size(self):
        """C{WIDTHxHEIGHT}."""
        return f"{self.width}x{self.height}"

    @property
    def rate_text(self):
        """ffmpeg's text of the frame rate (L{rate_text})."""
        return rate_text(self.framerate)

    @property
    def flip_filters(self):
        """ffmpeg's video filters that flip the picture as asked: none, one
        or both (in that order: horizontal, then vertical)."""
        return (["hflip"] if self.hflip else []) + (["vflip"] if self.vflip else [])
