"""--annotate: text (and a clock) drawn on the picture by ffmpeg's drawtext."""

import os
import stat
import subprocess
import time

import numpy as np
import pytest
from twisted.python import usage

from pistreaming.annotate import (
    AnnotationUnavailable, check_drawtext, drawtext_filter, find_font, font_size)
from pistreaming.encoder import ffmpeg_command, output_args
from pistreaming.frames import FrameGeometry
from pistreaming.options import Options, find_ffmpeg
from tests.daemon import Daemon
from tests.test_filesource import make_clip
from tests.test_stream import collect, connect, read_header

FFMPEG = find_ffmpeg("ffmpeg")


def render(vf, width=480, height=240):
    """One frame of a flat grey picture through the filter C{vf}, as grey bytes."""
    result = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "lavfi",
         "-i", f"color=c=0x303030:size={width}x{height}:rate=1", "-vf", vf,
         "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
        capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    return np.frombuffer(result.stdout, np.uint8).reshape(height, width)


def test_the_text_arrives_exactly_as_typed_with_strftime_codes_expanded(tmp_path):
    font = find_font()
    typed = "it's 100%% a\\b,[c];{d}=e: 'q' \"r\" ü  %Y "
    # What strftime makes of it, drawn from a file with expansion off: the
    # reference that no escaping stands between.
    literal = typed.replace("%%", "%").replace("%Y", time.strftime("%Y"))
    (tmp_path / "text.txt").write_text(literal, encoding="utf-8")
    ours = render(drawtext_filter(typed, font, 240))
    size = font_size(240)
    reference = render(
        f"drawtext=fontfile={font}:textfile={tmp_path / 'text.txt'}:expansion=none:"
        f"fontsize={size}:fontcolor=white:box=1:boxcolor=black@0.6:"
        f"boxborderw={max(2, size // 4)}:x=(w-text_w)/2:y={size // 2}")
    assert (ours != 0x30).sum() > 1000  # something was drawn
    assert (ours == reference).all()


def test_the_annotation_follows_the_crop_on_the_raw_path():
    geometry = FrameGeometry(1296, 730)
    text = drawtext_filter("%H:%M:%S", find_font(), 730)
    command = ffmpeg_command(FFMPEG, geometry, 30, 800_000, filters=[text])
    assert command[command.index("-vf") + 1] == f"crop=1296:730:0:0,{text}"
    assert command[command.index("-vf") + 2:] == output_args(30, 800_000)


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options.config


def test_the_option_carries_the_text_and_a_font():
    config = parse("--annotate", "Garden %H:%M")
    assert config.annotate == "Garden %H:%M"
    assert os.path.isfile(config.font)
    assert parse().annotate is None


def test_an_empty_text_is_refused():
    with pytest.raises(usage.UsageError, match="--annotate: the text is empty"):
        parse("--annotate", "  ")


def test_without_a_font_it_says_what_to_install(tmp_path):
    with pytest.raises(AnnotationUnavailable, match=r"apt install fonts-dejavu-core"):
        find_font(candidates=[str(tmp_path / "none.ttf")], fc_match=str(tmp_path / "no-fc"))


def test_an_ffmpeg_without_drawtext_is_named(tmp_path):
    # What an ffmpeg built without libfreetype answers.
    ffmpeg = tmp_path / "ffmpeg"
    ffmpeg.write_text("#!/bin/sh\necho \"Unknown filter 'drawtext'.\"\n")
    ffmpeg.chmod(ffmpeg.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(AnnotationUnavailable, match="has no drawtext filter"):
        check_drawtext(str(ffmpeg))
    check_drawtext(FFMPEG)  # Debian's has it


def decoded_pictures(ts_bytes, width, height, tmp_path):
    path = tmp_path / "stream.ts"
    path.write_bytes(ts_bytes)
    result = subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "gray",
         "pipe:1"], capture_output=True, timeout=60, check=True)
    return np.frombuffer(result.stdout, np.uint8).reshape(-1, height, width)


def stream_of(clip, tmp_path, seconds, *args):
    with Daemon("--resolution", "480x240", "--framerate", "25", "--bitrate", "2M", *args,
                camera=f"file:{clip}") as daemon:
        ws = connect(f"ws://127.0.0.1:{daemon.http_port}/stream")
        try:
            read_header(ws)
            data = collect(ws, seconds)
        finally:
            ws.close()
    return decoded_pictures(data, 480, 240, tmp_path)


def test_the_clock_keeps_time_in_the_stream(tmp_path):
    clip = make_clip(tmp_path / "flat.mp4", "color=c=0x303030:size=480x240:rate=25")
    pictures = stream_of(clip, tmp_path, 2.5, "--annotate", "%H:%M:%S")
    band = font_size(240) * 2
    first, last = pictures[0], pictures[-1]
    assert np.abs(first[:band].astype(int) - last[:band]).max() > 100  # the seconds moved on
    assert np.abs(first[band:].astype(int) - last[band:]).max() < 16  # the rest did not


def test_the_text_stays_upright_at_the_top_when_the_picture_is_turned(tmp_path):
    clip = make_clip(tmp_path / "flat.mp4", "color=c=0x303030:size=480x240:rate=25")
    pictures = stream_of(clip, tmp_path, 1.5, "--annotate", "Garden cam", "--rotation", "180")
    band = font_size(240) * 2
    reference = render(drawtext_filter("Garden cam", find_font(), 240))
    got = pictures[-1].astype(int)
    assert np.abs(got[:band] - reference[:band]).mean() < 4
    assert np.abs(got[-band:] - 0x30).max() < 16  # nothing drawn upside down below
