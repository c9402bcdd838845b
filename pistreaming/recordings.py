"""/recordings/: the recorder's segments on the web (with C{--record}).

    /recordings/                  a plain HTML page: each segment's start
                                  (UTC), length and size, newest first, with
                                  a link to download it; with --codec h264
                                  also to play it in the page (?play=NAME
                                  shows a <video>: fragmented MP4 of H.264
                                  plays in every current browser); MPEG-1 in
                                  MPEG-TS plays in no browser (VLC, mpv,
                                  ffplay play it)
    /recordings/?format=json      the same as JSON (oldest first)
    /recordings/NAME              the segment itself, with Range support (a
                                  browser seeks in it; 206 Partial Content)

A NAME is served only if it is a segment's name (pistreaming.recorder's
SEGMENT_NAME: a UTC time and .mp4 or .ts, nothing else) and a regular file
in the recordings' directory that the recorder lists: any other name, a
path of more than one part, an escaped slash or dot-dot gets 404.  It
stands behind the same Host check and password as every other page
(pistreaming.web).  The listing is made from what the recorder's last
housekeeping pass found (the disk is never read in the reactor thread to
make it); serving a file is Twisted's static.File (one stat, then reads
of 64 KiB as the client takes them).
"""

import html
import json
import os
import stat
import time
import warnings

with warnings.catch_warnings():
    # Twisted 22.10 and later warn, as static is imported, about the
    # deprecated pages its own File keeps as class attributes (this module
    # replaces the one it uses).
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web import static

from pistreaming.recorder import CONTENT_TYPES, SEGMENT_NAME, human
from pistreaming.web import NOT_FOUND, GetOnly, refuse

#: Which containers a browser plays in a <video>.
PLAYS_IN_BROWSERS = {"mp4": True, "ts": False}


def utc_text(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def length_text(seconds):
    """12:34 or 1:02:03."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class RecordingFile(static.File):
    """One segment: GET and HEAD (with Range), a plain 404 if it is gone."""

    childNotFound = NOT_FOUND
    isLeaf = True

    def __init__(self, path):
        extension = path.rsplit(".", 1)[-1]
        super().__init__(path, defaultType=CONTENT_TYPES[extension])
        self.contentTypes = {"." + ext: kind for ext, kind in CONTENT_TYPES.items()}

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            return refuse(request, 405, b"405 method not allowed\n", allow=b"GET, HEAD")
        # A segment being written grows: always ask again.
        request.setHeader(b"cache-control", b"no-cache")
        return super().render(request)

    def getChild(self, path, request):
        return NOT_FOUND


class Listing(GetOnly):
    """/recordings/ itself: the HTML page or, with ?format=json, the JSON."""

    isLeaf = True

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def render_GET(self, request):
        args = request.args
        formats = args.get(b"format", [b"html"])
        if len(formats) != 1 or formats[0] not in (b"html", b"json"):
            return refuse(request, 400, b"400 format is html or json\n")
        now = self.recorder.reactor.seconds()
        listing = self.recorder.listing(now)
        names = {r["name"] for r in listing}
        play = args.get(b"play")
        if play is not None:
            name = play[0].decode("ascii", "replace") if len(play) == 1 else ""
            if name not in names or not PLAYS_IN_BROWSERS[name.rsplit(".", 1)[-1]]:
                return refuse(request, 404, b"404 no such recording to play here\n")
            play = name
        if formats[0] == b"json":
            body = (json.dumps(self.document(listing), indent=1) + "\n").encode("utf-8")
            kind = b"application/json"
        else:
            body = self.page(listing, play).encode("utf-8")
            kind = b"text/html; charset=utf-8"
        request.setHeader(b"content-type", kind)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    render_HEAD = render_GET

    def document(self, listing):
        recorder = self.recorder
        extension = recorder.extension
        return {
            "state": recorder.state,
            "why": recorder.why,
            "container": recorder.container,
            "content_type": CONTENT_TYPES[extension],
            "plays_in_browsers": PLAYS_IN_BROWSERS[extension],
            "segment_seconds": recorder.segment_length,
            "keep_bytes": recorder.keep,
            "free_bytes": recorder.free,
            "recordings": [{
                "name": r["name"],
                "url": r["name"],
                "start": utc_text(r["start"]),
                "start_unix": r["start"],
                "length": r["length"],
                "size": r["size"],
                "recording": r["recording"],
            } for r in listing],
        }

    def page(self, listing, play):
        recorder = self.recorder
        playable = PLAYS_IN_BROWSERS[recorder.extension]
        e = html.escape
        if recorder.state == "recording":
            state = "Recording now."
        else:
            state = f"Not recording: {e(recorder.state)}" + (
                f" ({e(recorder.why)})." if recorder.why else ".")
        total = sum(r["size"] for r in listing)
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<title>Recordings</title><link rel="icon" href="data:,"></head><body>',
            "<h1>Recordings</h1>",
            f"<p>{state} {len(listing)} segments, {e(human(total))}"
            + (f", at most {e(human(recorder.keep))} kept" if recorder.keep else "")
            + f". <a href=\"?format=json\">JSON</a></p>",
        ]
        if playable:
            parts.append("<p>H.264 in fragmented MP4: play a segment here, or download it.</p>")
        else:
            parts.append("<p>MPEG-1 in MPEG-TS, which browsers do not play: download a segment "
                         "and open it in VLC, mpv or ffplay.</p>")
        if play is not None:
            parts.append(f"<p><video controls autoplay muted playsinline "
                         f"src=\"{e(play)}\"></video><br>{e(play)}</p>")
        parts.append("<table><thead><tr><th>Start (UTC)</th><th>Length</th><th>Size</th>"
                     "<th></th></tr></thead><tbody>")
        for r in reversed(listing):
            name = e(r["name"])
            links = [f'<a href="{name}" download>download</a>']
            if playable:
                links.insert(0, f'<a href="?play={name}">play</a>')
            parts.append(
                f"<tr><td>{e(utc_text(r['start']))}{' (recording)' if r['recording'] else ''}"
                f"</td><td>{length_text(r['length'])}</td><td>{e(human(r['size']))}</td>"
                f"<td>{' '.join(links)}</td></tr>")
        parts.append("</tbody></table></body></html>\n")
        return "\n".join(parts)


class Recordings(GetOnly):
    """/recordings and everything under it."""

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder
        self.listing = Listing(recorder)

    def render_GET(self, request):
        # /recordings without its slash: the page's links are relative to it.
        request.setResponseCode(301)
        request.setHeader(b"location", b"recordings/")
        return refuse(request, 301, b"301 see recordings/\n")

    render_HEAD = render_GET

    def getChild(self, name, request):
        if request.postpath:  # more than one part: never a recording
            return NOT_FOUND
        if name == b"":
            return self.listing
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            return NOT_FOUND
        if SEGMENT_NAME.fullmatch(text) is None or text not in self.recorder.recordings:
            return NOT_FOUND
        path = os.path.join(self.recorder.directory, text)
        try:
            info = os.lstat(path)
        except OSError:
            return NOT_FOUND
        if not stat.S_ISREG(info.st_mode):
            return NOT_FOUND
        return RecordingFile(path)
