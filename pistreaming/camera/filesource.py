"""A video file streamed in a loop, read by ffmpeg itself (for demos and tests).

ffmpeg reads the file at its own speed (``-re``) and starts again at the end
(``-stream_loop -1``).  The picture is scaled to fit the configured size with
its aspect kept (black bars fill the rest) and re-timed to the configured
frame rate (frames repeated or dropped as needed), so the stream is what the
options say whatever the file holds.  The file is checked with ffprobe at
start: a missing, unreadable or non-video file stops the daemon with one line.
"""

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction



class FileError(Exception):
    """The file cannot be streamed; the message says why, in one line."""


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    width: int
    height: int
    #: The file's own frame rate, or None if ffprobe does not know it.
    rate: "Fraction | None"


def find_ffprobe(ffmpeg):
    """ffprobe beside the C{ffmpeg} executable, else on PATH."""
    beside = os.path.join(os.path.dirname(ffmpeg), "ffprobe")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("ffprobe")
    if found is None:
        raise FileError("ffprobe (part of ffmpeg) was not found; install ffmpeg")
    return found


def _rate(text):
    try:
        rate = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return rate if rate > 0 else None


def probe_file(ffprobe, path, timeout=30):
    """The first video stream of C{path}, as ffprobe sees it.

    @raise FileError: if the file is missing, unreadable or holds no video.
    """
    if not os.path.exists(path):
        raise FileError("no such file")
    if os.path.isdir(path):
        raise FileError("a directory, not a video file")
    if not os.access(path, os.R_OK):
        raise FileError("permission denied")
    try:
        result = subprocess.run(
            [ffprobe, "-v", "error", "-select_streams", "V:0",
             "-show_entries", "stream=codec_name,width,height,avg_frame_rate,r_frame_rate",
             "-of", "json", path],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise FileError(f"ffprobe did not finish reading it in {timeout}s") from None
    if result.returncode != 0:
        why = result.stderr.decode("utf-8", "replace").strip().splitlines()
        why = why[-1] if why else f"ffprobe exited with code {result.returncode}"
        # ffprobe names the file first ("PATH: Invalid data ..."); say it once.
        if why.startswith(path + ": "):
            why = why[len(path) + 2:]
        raise FileError(f"not a video file ffmpeg can read ({why})")
    streams = json.loads(result.stdout or b"{}").get("streams") or []
    if not streams or not streams[0].get("width"):
        raise FileError("no video stream in it")
    stream = streams[0]
    rate = _rate(stream.get("avg_frame_rate", "")) or _rate(stream.get("r_frame_rate", ""))
    return VideoInfo(stream.get("codec_name", "?"), int(stream["width"]),
                     int(stream["height"]), rate)


class FileSource:
    """A video file, looped, that ffmpeg reads itself."""

    name = "file"
    #: With --codec h264, ffmpeg encodes the file's frames with x264 (in its
    #: own process: the daemon never encodes).
    h264_encoder = "libx264"

    def __init__(self, path, info, picture):
        """
        @param info: the file's L{VideoInfo}.
        @param picture: the L{pistreaming.camera.picture.Picture} to stream.
        """
        self.path = path
        self.info = info
        self.picture = picture
        self.geometry = picture.geometry

    def describe(self):
        i, p = self.info, self.picture
        own = f" at {float(i.rate):g} fps" if i.rate else ""
        text = (f"video file {self.path} ({i.codec} {i.width}x{i.height}{own}), looped, "
                f"streamed as {p.size} at {float(p.framerate):g} fps")
        if i.rate and i.rate != p.framerate:
            text += " (frames repeated or dropped to fit; --framerate sets the rate)"
        return text

    def ffmpeg_input(self, codec=None):
        """(ffmpeg input arguments, filters) that play the file in a loop.

        The same whatever the codec (C{codec}, "mpeg1" or "h264", is taken
        for the sake of sources whose input depends on it): the file's
        frames are decoded, fitted and re-timed, then encoded
        (L{h264_encoder} for H.264)."""
        p = self.picture
        w, h = p.width, p.height
        args = ["-re", "-stream_loop", "-1", "-i", self.path, "-map", "0:V:0"]
        # Fit inside WxH with the aspect kept (even sides, for YUV 4:2:0),
        # then centre on black.
        scale = (f"2*trunc(min({w}/iw\\,{h}/ih)*iw/2)", f"2*trunc(min({w}/iw\\,{h}/ih)*ih/2)")
        filters = [
            f"scale=w={scale[0]}:h={scale[1]}",
            "setsar=1",
            f"pad={w}:{h}:(ow-iw)/2:(oh-ih)/2",
            *p.flip_filters,
            f"fps={p.rate_text}",
        ]
        return args, filters


def open_source(path, ffmpeg, picture):
    """A L{FileSource} for C{path} giving C{picture} (a
    L{pistreaming.camera.picture.Picture}), or L{FileError}."""
    info = probe_file(find_ffprobe(ffmpeg), path)
    return FileSource(path, info, picture)
