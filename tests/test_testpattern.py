"""The built-in test pattern: a camera-like source of padded YUV420 frames."""

import threading
import time

from pistreaming import stamp
from pistreaming.camera.testpattern import TestPattern
from pistreaming.camera.picture import Picture
from pistreaming.frames import FrameGeometry

STAMP = time.mktime((2026, 11, 24, 12, 34, 56, 0, 0, -1)) + 0.5


def planes(frame, geometry):
    g = geometry
    y = frame[:g.y_size]
    u = frame[g.y_size:g.y_size + g.uv_size]
    return y, u


def test_frames_have_picameras_padded_layout():
    for size in [(640, 480), (800, 600), (1296, 730)]:
        pattern = TestPattern(Picture(*size, 24))
        g = FrameGeometry(*size)
        frame = pattern.render(0, STAMP)
        assert len(frame) == g.frame_size
        y, _ = planes(frame, g)
        # padding columns and rows are black, outside the picture
        for row in range(0, g.height, 37):
            assert set(y[row * g.padded_width + g.width:(row + 1) * g.padded_width]) <= {16}
        assert set(y[g.height * g.padded_width:]) <= {16}


def test_the_picture_moves():
    pattern = TestPattern(Picture(320, 240, 24))
    a = pattern.render(0, STAMP)
    b = pattern.render(5, STAMP)
    changed = sum(1 for x, y in zip(a, b) if x != y)
    assert changed > len(a) // 10


def test_the_clock_shows_the_time():
    pattern = TestPattern(Picture(320, 240, 24))
    g = pattern.geometry
    a = pattern.render(0, STAMP)
    b = pattern.render(0, STAMP + 3600)  # an hour later: the hour digits change
    band = slice(pattern._text_top * g.padded_width,
                 (pattern._text_top + pattern._digit_h) * g.padded_width)
    assert a[band] != b[band]
    assert 235 in a[band] and 16 in a[band]  # white digits on black


def test_flips_mirror_the_picture_inside_the_padding():
    size = (800, 600)  # padded to 800x608
    g = FrameGeometry(*size)
    plain = TestPattern(Picture(*size, 24)).render(3, STAMP)
    both = TestPattern(Picture(*size, 24, vflip=True, hflip=True)).render(3, STAMP)
    w, pw = g.width, g.padded_width
    # (The stamp strip at the top, for machines, is never flipped.)
    for row in (100, 300, 499):
        original = plain[row * pw:row * pw + w]
        mirrored = both[(g.height - 1 - row) * pw:(g.height - 1 - row) * pw + w]
        assert mirrored == original[::-1]
    for frame in (plain, both):
        assert stamp.read(frame, pw, w, g.height) == stamp.Stamp.at(STAMP, 3)


def test_every_frame_carries_a_readable_stamp_of_its_capture():
    for size in [(640, 480), (1296, 730), (320, 240)]:
        pattern = TestPattern(Picture(*size, 30))
        g = pattern.geometry
        for number in (0, 1, 65_537):
            frame = pattern.render(number, STAMP + number / 30)
            found = stamp.read(frame, g.padded_width, g.width, g.height)
            assert found == stamp.Stamp.at(STAMP + number / 30, number)
            assert found.frame == number % 65_536
            assert abs(found.seconds_near(STAMP) - (STAMP + number / 30)) < 0.001


def test_run_writes_frames_at_the_rate_until_stopped():
    pattern = TestPattern(Picture(160, 120, 25))
    written = []
    stopping = threading.Event()

    class Output:
        def write(self, data, captured_at=None):
            written.append(len(data))
            if len(written) == 10:
                stopping.set()

    started = time.monotonic()
    pattern.run(Output(), stopping)
    took = time.monotonic() - started
    assert len(written) == 10
    assert set(written) == {FrameGeometry(160, 120).frame_size}
    assert 0.3 < took < 2.0  # nine intervals of 40 ms, bounded above generously
