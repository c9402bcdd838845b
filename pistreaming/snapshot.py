"""The latest picture as a JPEG: C{/snapshot.jpg}, for the programs people
already run (Home Assistant's generic camera, OctoPrint's snapshot URL, a
cron job making a time-lapse).

The picture is decoded on demand from the fan-out's start cache (the
latest keyframe and every picture since, exactly what a newcomer's decoder
is given) by an ffmpeg child that decodes them all and encodes only the
last one as a JPEG (C{select} by its number; C{scale} for C{?width=}):
any codec, any source, and no CPU at all while nobody asks.  (A decoder
kept running would decode every picture all the time, and still could not
be asked for a JPEG of the picture in hand without a second encoder
running all the time too; measured in docs/benchmarks.rst, a decode from
the start cache answers in about a tenth of a second.)

However many ask, there is at most one decode per new picture: a request
that comes while a decode runs waits for that decode, and the JPEG is
kept, per width, and given to every request until a newer picture has
arrived and it is more than L{FRESH_FOR} seconds old (so a hundred
requests a second cost at most one decode a second), or, where a decode
took longer than a quarter of that, four times the decode's time
(L{DECODE_SHARE}: decoding never takes more than a quarter of a core, even
with a long keyframe interval and so a long start cache to decode).
Decodes run one at a time (a request for another width waits for its
turn), and a few widths at most are kept and waited for.  L{Snapshot.decodes} counts them, for
/stats.json.

Before the first picture (or when the start cache is empty, after a
camera restart, and no JPEG was made yet) the answer is 503 with
C{Retry-After}.
"""

import collections
import os
import re
import signal

from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.web import server

from pistreaming.h264 import HEADER
from pistreaming.stats import Window
from pistreaming.web import GetOnly, refuse

log = Logger(namespace="pistreaming.snapshot")

#: Seconds a JPEG is given out as the latest picture although newer ones came.
FRESH_FOR = 1.0
#: ...or longer, where decoding takes long (a long keyframe interval: the
#: start cache holds many pictures): at most this share of a core goes to
#: decoding however many ask.
DECODE_SHARE = 0.25
#: The narrowest ?width= (the widest is the picture's own).
MIN_WIDTH = 16
#: Seconds a decode may take before its ffmpeg is killed.
DECODE_TIMEOUT = 5.0
#: JPEGs kept (one per width asked for), and widths waited for, at most.
CACHED_WIDTHS = 8
WAITING_WIDTHS = 8
#: Bytes of JPEG read from ffmpeg, at most.
JPEG_LIMIT = 16 * 1024 * 1024
#: What a 503 tells the client to wait, in seconds.
RETRY_AFTER = 1


class NoPicture(Exception):
    """No JPEG can be given now; the message says why."""


def snapshot_command(ffmpeg, codec, last, width=None):
    """The ffmpeg argument list (argv[0] included) that decodes the pictures
    on its stdin (H.264 access units in Annex B, or MPEG-TS of MPEG-1) and
    writes picture number C{last} (counted from 0) as a JPEG to stdout,
    C{width} pixels wide (the height in proportion) if given."""
    if codec == "h264":
        source = ["-f", "h264"]
    elif codec == "mpeg1":
        source = ["-f", "mpegts"]
    else:
        raise ValueError(f"not a codec the snapshot decodes: {codec!r}")
    filters = [f"select=eq(n\\,{int(last)})"]
    if width is not None:
        filters.append(f"scale={int(width)}:-2")
    return [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", *source, "-i", "pipe:0",
            "-an", "-vf", ",".join(filters), "-frames:v", "1",
            "-f", "image2pipe", "-c:v", "mjpeg", "-q:v", "3", "pipe:1"]


Picture = collections.namedtuple("Picture", ["jpeg", "number", "made_at", "fresh_for"])
Picture.__doc__ = """A JPEG, the number of the stream's picture it shows
(L{Snapshot.pictures} when its decode began), when it was made, and for
how long it is given out although newer pictures came."""


class DecodeProcess(protocol.ProcessProtocol):
    """One decode: the pictures in on stdin, the JPEG out on stdout."""

    def __init__(self, snapshot, width, number, data):
        self.snapshot = snapshot
        self.width = width
        self.number = number
        self.data = data
        self.out = []
        self.size = 0
        self.stderr = b""
        self.timer = None
        self.started_at = None

    def connectionMade(self):
        self.started_at = self.snapshot.reactor.seconds()
        # All at once; Twisted writes what the pipe does not take as ffmpeg
        # reads, then closes it.
        self.transport.write(self.data)
        self.data = None
        self.transport.closeStdin()

    def outReceived(self, data):
        if self.size + len(data) > JPEG_LIMIT:
            self.kill()
            return
        self.out.append(data)
        self.size += len(data)

    def errReceived(self, data):
        self.stderr = (self.stderr + data)[-4096:]

    def kill(self):
        try:
            self.transport.signalProcess(signal.SIGKILL)
        except (error.ProcessExitedAlready, OSError):
            pass

    def processEnded(self, reason):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        jpeg = b"".join(self.out)
        if reason.check(error.ProcessDone) and jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9":
            self.snapshot._decoded(self, jpeg)
            return
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        code = getattr(reason.value, "exitCode", None)
        why = lines[-1].strip()[:200] if lines else (
            "no picture came out" if reason.check(error.ProcessDone)
            else f"ffmpeg exited with code {code}" if code is not None else "ffmpeg was killed")
        self.snapshot._failed(self, why)


class Snapshot:
    """The JPEGs of the latest picture; a tap of the stream (it counts the
    pictures, so it knows when a JPEG is no longer of the latest one)."""

    def __init__(self, codec, start_cache, size, command, reactor, fresh_for=FRESH_FOR,
                 timeout=DECODE_TIMEOUT, env=None):
        """
        @param codec: the stream's (C{"h264"}, C{"mpeg1"}).
        @param start_cache: called with no arguments, gives the fan-out's
            start cache: chunks, a keyframe's first.
        @param size: called with no arguments, gives the picture's (width,
            height) now.
        @param command: called with (the number of the last picture, from 0;
            the width or None) gives the decoder's argument list
            (L{snapshot_command}).
        """
        self.codec = codec
        self.start_cache = start_cache
        self.size = size
        self.command = command
        self.reactor = reactor
        self.fresh_for = fresh_for
        self.timeout = timeout
        self.env = dict(os.environ) if env is None else env
        #: Pictures the stream has had.
        self.pictures = 0
        #: width (None: the picture's own) -> Picture, the least recently
        #: asked for first.
        self.cache = collections.OrderedDict()
        #: width -> [Deferred]: who waits for a decode of that width; the
        #: one decoding (L{decoding}) first.
        self.waiting = collections.OrderedDict()
        self.decoding = None  # the DecodeProcess running
        self._failing = False
        # figures
        self.requests = 0
        self.decodes = 0
        self.decode_failures = 0
        self.from_cache = 0
        self.unavailable = 0
        self.decode_times = Window()
        self.answer_times = Window()

    # the tap
    def feed(self, chunk):
        if chunk.picture:
            self.pictures += 1

    def get(self, width=None):
        """A Deferred that fires with the L{Picture} of the latest picture,
        C{width} pixels wide (None: its own width), or fails with
        L{NoPicture}."""
        self.requests += 1
        now = self.reactor.seconds()
        cached = self.cache.get(width)
        if cached is not None and (cached.number == self.pictures
                                   or now - cached.made_at < cached.fresh_for):
            self.cache.move_to_end(width)
            self.from_cache += 1
            return defer.succeed(cached)
        waiters = self.waiting.get(width)
        if waiters is not None:
            d = defer.Deferred()
            waiters.append(d)
            return d
        if not any(chunk.picture for chunk in self.start_cache()):
            if cached is not None:  # the newest there is (the stream starts again)
                self.from_cache += 1
                return defer.succeed(cached)
            self.unavailable += 1
            return defer.fail(NoPicture("no picture yet"))
        if len(self.waiting) >= WAITING_WIDTHS:
            self.unavailable += 1
            return defer.fail(NoPicture("too many picture sizes asked for at once"))
        d = defer.Deferred()
        self.waiting[width] = [d]
        if self.decoding is None:
            self._decode(width)
        return d

    def _decode(self, width):
        chunks = [chunk for chunk in self.start_cache()]
        pictures = sum(1 for chunk in chunks if chunk.picture)
        if not pictures:
            self._answer(width, NoPicture("no picture yet"))
            return
        if self.codec == "h264":
            data = b"".join(chunk.data[HEADER.size:] for chunk in chunks)
        else:
            data = b"".join(chunk.data for chunk in chunks)
        proto = DecodeProcess(self, width, self.pictures, data)
        command = self.command(pictures - 1, width)
        self.decodes += 1
        self.decoding = proto
        try:
            self.reactor.spawnProcess(proto, command[0], command, env=self.env)
        except Exception as e:
            why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
            self._failed(proto, f"cannot start {command[0]}: {why}")
            return
        proto.timer = self.reactor.callLater(self.timeout, proto.kill)

    def _decoded(self, proto, jpeg):
        now = self.reactor.seconds()
        took = now - proto.started_at
        self.decode_times.add(now, took)
        if self._failing:
            log.info("snapshot: decoding works again")
            self._failing = False
        picture = Picture(jpeg, proto.number, now, max(self.fresh_for, took / DECODE_SHARE))
        self.cache[proto.width] = picture
        self.cache.move_to_end(proto.width)
        while len(self.cache) > CACHED_WIDTHS:
            self.cache.popitem(last=False)
        self._finish(proto, picture)

    def _failed(self, proto, why):
        self.decode_failures += 1
        if not self._failing:  # one line until it works again
            log.warn("snapshot: the picture could not be decoded: {why}", why=why)
            self._failing = True
        self._finish(proto, NoPicture(f"the picture could not be decoded: {why}"))

    def _finish(self, proto, result):
        if self.decoding is proto:
            self.decoding = None
        self._answer(proto.width, result)
        if self.waiting and self.decoding is None:
            self._decode(next(iter(self.waiting)))

    def _answer(self, width, result):
        for d in self.waiting.pop(width, []):
            if isinstance(result, Exception):
                self.unavailable += 1
                d.errback(result)
            else:
                d.callback(result)

    def figures(self, now):
        """For /stats.json (and /metrics)."""
        return {
            "requests": self.requests,
            "decodes": self.decodes,
            "decode_failures": self.decode_failures,
            "answered_from_cache": self.from_cache,
            "unavailable": self.unavailable,
            "decode_ms": self.decode_times.summary(now, 1000),
            "answer_ms": self.answer_times.summary(now, 1000),
        }


_WIDTH = re.compile(rb"^[0-9]{1,5}$")


class SnapshotResource(GetOnly):
    """/snapshot.jpg: the latest picture; C{?width=N} scales it down."""

    isLeaf = True

    def __init__(self, snapshot):
        super().__init__()
        self.snapshot = snapshot

    def width(self, request):
        """The width asked for (None: the picture's own), or the text of a 400."""
        values = request.args.get(b"width")
        if values is None:
            return None, None
        widest = self.snapshot.size()[0]
        if len(values) != 1 or not _WIDTH.match(values[0]):
            return None, f"400 width must be a whole number of pixels, {MIN_WIDTH}..{widest}\n"
        width = int(values[0])
        if not MIN_WIDTH <= width <= widest:
            return None, f"400 width {width} is outside {MIN_WIDTH}..{widest} (the picture's)\n"
        return (None if width == widest else width), None

    def render_GET(self, request):
        width, bad = self.width(request)
        if bad is not None:
            return refuse(request, 400, bad.encode())
        snapshot = self.snapshot
        asked_at = snapshot.reactor.seconds()
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def send(picture):
            if gone:
                return
            now = snapshot.reactor.seconds()
            snapshot.answer_times.add(now, now - asked_at)
            request.setHeader(b"content-type", b"image/jpeg")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"content-length", b"%d" % len(picture.jpeg))
            if request.method != b"HEAD":
                request.write(picture.jpeg)
            request.finish()

        def unavailable(failure):
            failure.trap(NoPicture)
            if gone:
                return
            request.setHeader(b"retry-after", b"%d" % RETRY_AFTER)
            request.setHeader(b"cache-control", b"no-store")
            body = refuse(request, 503, f"503 {failure.getErrorMessage()}\n".encode())
            if body:
                request.write(body)
            request.finish()

        snapshot.get(width).addCallbacks(send, unavailable).addErrback(
            lambda failure: log.failure("snapshot: answering failed", failure))
        return server.NOT_DONE_YET

    render_HEAD = render_GET
