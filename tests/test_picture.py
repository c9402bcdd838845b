"""The one settings object every source is given (pistreaming.camera.picture)."""

from fractions import Fraction

from pistreaming.camera.picture import Picture, rate_text
from pistreaming.options import Config


def test_it_is_built_once_from_the_options():
    config = Config(ffmpeg="/usr/bin/ffmpeg", width=800, height=600,
                    framerate=Fraction(30000, 1001), vflip=True)
    picture = Picture.of(config)
    assert picture == Picture(800, 600, Fraction(30000, 1001), vflip=True, hflip=False)
    assert (picture.geometry.padded_width, picture.geometry.padded_height) == (800, 608)
    assert picture.size == "800x600"


def test_ffmpeg_gets_the_exact_rate():
    assert rate_text(24) == "24/1"
    assert Picture(640, 480, Fraction(30000, 1001)).rate_text == "30000/1001"
    assert Picture(640, 480, 25).framerate == Fraction(25)


def test_the_flip_filters_are_horizontal_then_vertical():
    assert Picture(640, 480, 25).flip_filters == []
    assert Picture(640, 480, 25, vflip=True).flip_filters == ["vflip"]
    assert Picture(640, 480, 25, hflip=True).flip_filters == ["hflip"]
    assert Picture(640, 480, 25, vflip=True, hflip=True).flip_filters == ["hflip", "vflip"]
