"""--camera file:PATH: a video file streamed in a loop, read by ffmpeg itself.

Clips are made for each test with ffmpeg's lavfi sources.  This is also the
end-to-end test of the path a V4L2 device takes (ffmpeg reads the source
itself, no camera thread) on machines without a V4L2 device.
"""

import os
import subprocess
import time
from fractions import Fraction

import numpy as np
import pytest

from pistreaming.camera import CameraUnavailable, choose_source
from pistreaming.camera.filesource import FileError, FileSource, VideoInfo, probe_file
from pistreaming.camera.picture import Picture
from pistreaming.encoder import ffmpeg_command, output_args
from pistreaming.frames import FrameGeometry
from pistreaming.options import Config, find_ffmpeg
from tests.daemon import ROOT, Daemon, twistd_command
from tests.test_stream import collect, connect, decode_last_picture, decoded_frames, read_header

FFMPEG = find_ffmpeg("ffmpeg")
FFPROBE = os.path.join(os.path.dirname(FFMPEG), "ffprobe")


def make_clip(path, source="testsrc=size=320x240:rate=25", seconds=2, extra=()):
    """A short clip made with one of ffmpeg's lavfi sources."""
    subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "lavfi",
         "-i", source, "-t", str(seconds), *extra, "-y", str(path)],
        check=True, timeout=60)
    return str(path)


def quadrant_clip(path, width=320, height=240):
    """A still picture, dark grey with a white top left quadrant, as a clip."""
    return make_clip(
        path, f"color=c=0x303030:size={width}x{height}:rate=25,"
              f"drawbox=x=0:y=0:w={width // 2}:h={height // 2}:color=white:t=fill",
        extra=["-c:v", "mpeg4", "-q:v", "2"])


# -- the check at start ----------------------------------------------------------

def test_a_video_file_is_probed_for_its_picture(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", extra=["-c:v", "mpeg4"])
    assert probe_file(FFPROBE, clip) == VideoInfo("mpeg4", 320, 240, Fraction(25))


def test_missing_unreadable_and_non_video_files_are_refused(tmp_path):
    with pytest.raises(FileError, match="^no such file$"):
        probe_file(FFPROBE, str(tmp_path / "nothing.mp4"))
    with pytest.raises(FileError, match="^a directory, not a video file$"):
        probe_file(FFPROBE, str(tmp_path))
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 100)
    with pytest.raises(FileError, match=r"^not a video file ffmpeg can read \(Invalid data"):
        probe_file(FFPROBE, str(text))
    sound = make_clip(tmp_path / "beep.wav", "sine=frequency=440:sample_rate=8000")
    with pytest.raises(FileError, match="^no video stream in it$"):
        probe_file(FFPROBE, sound)


@pytest.mark.parametrize("name,content,message", [
    ("missing.mp4", None, "no such file"),
    ("notes.txt", "hello\n", "not a video file ffmpeg can read (Invalid data found "
                             "when processing input)"),
])
def test_the_daemon_refuses_a_bad_file_with_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "pistream", "--camera", f"file:{path}"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines() == [
        f"twistd pistream: error: --camera file:{path}: {message}"]


def test_choose_source_probes_the_file(tmp_path):
    clip = make_clip(tmp_path / "clip.mkv", extra=["-c:v", "mpeg4"])
    source, why = choose_source(Config(camera=f"file:{clip}", ffmpeg=FFMPEG))
    assert isinstance(source, FileSource) and source.info.width == 320
    assert "looped" in source.describe()
    with pytest.raises(CameraUnavailable, match="no such file"):
        choose_source(Config(camera=f"file:{tmp_path}/gone.mkv", ffmpeg=FFMPEG))


# -- what ffmpeg is told ---------------------------------------------------------------

def test_ffmpeg_plays_the_file_in_a_loop_fitted_to_the_size_and_rate():
    source = FileSource("/srv/demo.mp4", VideoInfo("h264", 1920, 1080, Fraction(30)),
                        Picture(640, 480, 25, vflip=True))
    args, filters = source.ffmpeg_input()
    assert args == ["-re", "-stream_loop", "-1", "-i", "/srv/demo.mp4", "-map", "0:V:0"]
    assert filters == [
        "scale=w=2*trunc(min(640/iw\\,480/ih)*iw/2):h=2*trunc(min(640/iw\\,480/ih)*ih/2)",
        "setsar=1", "pad=640:480:(ow-iw)/2:(oh-ih)/2", "vflip", "fps=25/1"]
    command = ffmpeg_command(FFMPEG, FrameGeometry(640, 480), 25, 800_000, (args, filters))
    assert command[-len(output_args(25, 800_000)):] == output_args(25, 800_000)
    assert "frames repeated or dropped" in source.describe()


# -- end to end --------------------------------------------------------------------------

def test_the_daemon_streams_the_file_in_a_loop_at_the_configured_size_and_rate(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", "testsrc=size=320x180:rate=25", seconds=1.5,
                     extra=["-c:v", "mpeg4"])
    with Daemon("--resolution", "640x480", "--framerate", "25", camera=f"file:{clip}") as daemon:
        assert daemon.search(r"camera: file chosen")
        assert daemon.search(r"video file .*clip\.mp4 \(mpeg4 320x180 at 25 fps\), looped")
        ws = connect(f"ws://127.0.0.1:{daemon.http_port}/stream")
        try:
            assert read_header(ws) == (640, 480)
            started = time.monotonic()
            data = collect(ws, 4.0)
            elapsed = time.monotonic() - started
        finally:
            ws.close()
        assert "Traceback" not in daemon.output()
    frames = decoded_frames(data, tmp_path)
    assert {(f["width"], f["height"]) for f in frames} == {(640, 480)}
    # Played at its own speed, and past its end: the 1.5 s clip loops.
    assert len(frames) >= 25 * (elapsed - 1.2) * 0.8, (len(frames), elapsed)
    assert len(frames) <= 25 * elapsed * 1.1 + 2
    times = [float(f["pts_time"]) for f in frames]
    assert times[-1] - times[0] > 2.0
    # 16:9 fitted into 4:3: black bars above and below, the picture between.
    y, _, _ = decode_last_picture(data, 640, 480, tmp_path)
    y = np.frombuffer(y, np.uint8).reshape(480, 640)
    assert y[:50].mean() < 24 and y[-50:].mean() < 24
    assert y[100:380].mean() > 60


def test_rotation_turns_the_file_picture(tmp_path):
    clip = quadrant_clip(tmp_path / "quadrants.mp4")
    with Daemon("--resolution", "320x240", "--framerate", "25", "--rotation", "180",
                camera=f"file:{clip}") as daemon:
        ws = connect(f"ws://127.0.0.1:{daemon.http_port}/stream")
        try:
            read_header(ws)
            data = collect(ws, 2.0)
        finally:
            ws.close()
    y, _, _ = decode_last_picture(data, 320, 240, tmp_path)
    y = np.frombuffer(y, np.uint8).reshape(240, 320)
    assert y[150:230, 170:310].mean() > 200   # the white quadrant is bottom right now
    assert y[10:90, 10:150].mean() < 80       # and top left is dark
