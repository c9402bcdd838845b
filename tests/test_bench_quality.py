"""What bench/quality's figures rest on: each decoded picture is compared
with the very frame it shows.

- The frame number ffmpeg writes into a frame's strip reads back, also after
  a lossy encoder at a low bit rate, and a damaged strip reads as unknown
  rather than as another number.
- Pictures are matched to the looped clip's frames across the loop, an
  unreadable picture takes its place between readable neighbours, and
  repeated or missing frames are counted, not hidden.
"""

import importlib.machinery
import importlib.util
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    path = os.path.join(ROOT, "bench", "quality")
    loader = importlib.machinery.SourceFileLoader("bench_quality", path)
    spec = importlib.util.spec_from_loader("bench_quality", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


quality = load_bench()
WIDTH, HEIGHT = 320, 64  # the strip is 256x16 at the top left


def strip_frames(count, encode=()):
    """C{count} frames of testsrc2 with their numbers in the strip,
    through C{encode} (ffmpeg output options) and back: their luma."""
    make = ["ffmpeg", "-v", "error", "-f", "lavfi",
            "-i", f"testsrc2=s={WIDTH}x{HEIGHT}:r=30",
            "-vf", ",".join(["format=yuv420p", *quality.strip_filters()]),
            "-frames:v", str(count)]
    if encode:
        coded = subprocess.run(make + list(encode) + ["-f", "mpegts", "pipe:1"],
                               capture_output=True, check=True, timeout=60).stdout
        raw = subprocess.run(["ffmpeg", "-v", "error", "-f", "mpegts", "-i", "pipe:0",
                              "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
                             input=coded, capture_output=True, check=True, timeout=60).stdout
    else:
        raw = subprocess.run(make + ["-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
                             capture_output=True, check=True, timeout=60).stdout
    size = WIDTH * HEIGHT
    return [raw[i:i + size] for i in range(0, len(raw) - size + 1, size)]


def test_each_frame_carries_its_number():
    frames = strip_frames(40)
    assert [quality.read_number(f, WIDTH) for f in frames] == list(range(40))


@pytest.mark.parametrize("encode", [
    ["-c:v", "libx264", "-preset", "ultrafast", "-b:v", "40k", "-maxrate", "40k",
     "-bufsize", "20k"],
    ["-c:v", "mpeg1video", "-b:v", "40k", "-bf", "0"],
], ids=["h264", "mpeg1"])
def test_the_number_survives_a_starved_encoder(encode):
    frames = strip_frames(40, encode)
    assert [quality.read_number(f, WIDTH) for f in frames] == list(range(40))


def test_a_damaged_strip_is_unknown_not_another_number():
    frame = bytearray(strip_frames(6)[5])
    # the first block (bit 0 of 5: white) painted black: 4 would pass the
    # number's bits but not its check
    for y in range(16):
        frame[y * WIDTH:y * WIDTH + 16] = bytes(16)
    assert quality.read_number(bytes(frame), WIDTH) is None


def test_pictures_are_matched_across_the_loop():
    indices, repeated, missing = quality.align([298, 299, 0, 1], 300)
    assert (indices, repeated, missing) == ([298, 299, 0, 1], 0, 0)


def test_an_unreadable_picture_between_agreeing_neighbours_is_placed():
    indices, repeated, missing = quality.align([10, None, None, 13, None], 300)
    # the last one has no readable neighbour after it: left out
    assert indices == [10, 11, 12, 13, None]
    assert (repeated, missing) == (0, 0)


def test_neighbours_that_disagree_leave_it_out_and_the_gap_is_counted():
    indices, repeated, missing = quality.align([10, None, 15, 15, 16], 300)
    assert indices == [10, None, 15, 15, 16]
    assert (repeated, missing) == (1, 3)  # 15 twice; of 11-14, one may be the unread picture
