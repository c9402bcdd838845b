"""The text annotation (``--annotate``), drawn by ffmpeg's drawtext filter.

The same filter serves every camera, so the text looks the same whichever
camera is used.  strftime codes in the text (``%H:%M:%S``, ``%Y-%m-%d``) are
expanded by ffmpeg for each frame, so a clock keeps time.

The text passes three parsers on its way to drawtext (the filter graph, the
filter's options, drawtext's own ``%{...}`` expansion); each takes a
backslash before any character as that character, so the text is escaped once
for each of them and arrives exactly as typed.
"""

import os
import shutil
import subprocess

#: Fixed-width digits, so a clock does not jitter.  Debian's fonts-dejavu-core
#: first, then where other distributions keep the same font.
FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/TTF/DejaVuSansMono.ttf",
    "/usr/share/fonts/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/dejavu-sans-mono-fonts/DejaVuSansMono.ttf",
)

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./")


class AnnotationUnavailable(Exception):
    """The annotation cannot be drawn here; the message says why and what to do."""


def escape(text):
    """C{text} escaped for one of ffmpeg's parsers (av_get_token): a backslash
    before every character that is not plainly safe."""
    return "".join(c if c in _SAFE or (c.isalnum() and ord(c) > 127) else "\\" + c
                   for c in text)


def find_font(candidates=FONTS, fc_match=None):
    """A TrueType font file for the text, or AnnotationUnavailable."""
    for path in candidates:
        if os.path.isfile(path):
            return path
    fc_match = fc_match or shutil.which("fc-match")
    if fc_match:
        try:
            result = subprocess.run([fc_match, "--format=%{file}", "monospace"],
                                    capture_output=True, timeout=10)
            path = result.stdout.decode("utf-8", "replace").strip()
            if result.returncode == 0 and os.path.isfile(path):
                return path
        except (OSError, subprocess.TimeoutExpired):
            pass
    raise AnnotationUnavailable(
        "no font to draw the text with; install one (apt install fonts-dejavu-core)")


def check_drawtext(ffmpeg):
    """Raise AnnotationUnavailable unless C{ffmpeg} has the drawtext filter."""
    try:
        result = subprocess.run([ffmpeg, "-hide_banner", "-h", "filter=drawtext"],
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AnnotationUnavailable(f"cannot ask {ffmpeg} for its filters ({e})") from None
    if b"Filter drawtext" not in result.stdout:
        raise AnnotationUnavailable(
            f"{ffmpeg} has no drawtext filter (it was built without libfreetype); "
            "Debian's ffmpeg has it")


def font_size(height):
    """Text height in pixels for a picture C{height} pixels high."""
    return max(12, height // 18)


def drawtext_filter(text, font, height):
    """The drawtext filter that draws C{text} (strftime codes expanded each
    frame) in white on a dark band, centred at the top of the picture."""
    size = font_size(height)
    expanded = "%{localtime:" + escape(text) + "}"
    options = ":".join([
        f"fontfile={escape(font)}",
        f"text={escape(expanded)}",
        f"fontsize={size}",
        "fontcolor=white",
        "box=1",
        "boxcolor=black@0.6",
        f"boxborderw={max(2, size // 4)}",
        "x=(w-text_w)/2",
        f"y={size // 2}",
    ])
    return "drawtext=" + escape(options)
