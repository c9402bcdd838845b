"""Recording (C{--record DIR}): the stream as it is encoded, written to disk
without re-encoding, in segments.

    fan-out's chunks (a tap) -> Recorder -> ffmpeg -c copy -> DIR/20261205T102030Z.mp4

The recorder is one of the daemon's taps (L{pistreaming.service.Pistream.taps}):
it is given every chunk the viewers are given, in the reactor thread, and
hands each to an ffmpeg child of its own, which copies the pictures into a
file (C{-c copy}: never a re-encode).  One ffmpeg writes one segment; at
the first keyframe at or after C{--record-segment} (a quarter of a
keyframe interval early counts, so that a keyframe that comes a few
milliseconds early does not make a segment a whole interval longer) its
input is closed, it finishes the file and exits, and a new ffmpeg starts
the next segment with that keyframe: no picture is lost between segments,
and every segment begins where a decoder can start.

The container survives a power cut mid-segment: with C{--codec h264}
fragmented MP4 (a fragment at each keyframe and at least every half
second, each written out at once; a file cut anywhere plays up to its last
whole fragment, and browsers play it in a C{<video>}), with C{--codec
mpeg1} MPEG-TS of the MPEG-1 (packets of 188 bytes, each written out at
once; no browser plays MPEG-1 in a C{<video>}: VLC, mpv and ffplay do).  In
h264 mode ffmpeg reads the access units in Annex B, as the stream has them,
in MPEG-TS that gives each its capture time (L{pistreaming.tsmux}: the
video then lasts as long as it took, whatever the camera's frame rate
did); in mpeg1 mode the stream's own MPEG-TS, whose timestamps it keeps.

Segments are named by their start (the arrival of their first keyframe) in
UTC, in ISO 8601's basic format, which sorts by time and is a valid file
name on any file system (no colons, for FAT-formatted USB sticks):
C{20261205T102030Z.mp4}; a second segment that would begin in the same
second gets C{-2}, and so on.  A segment also ends where the stream
changes: new H.264 parameter sets (a camera restarted at another size), or
MPEG-1 timestamps that start again (the encoder restarted).

Disk housekeeping runs on a thread of the recorder's own (listing the
directory, C{statvfs}, deleting), never in the reactor thread: the free
space every C{check_interval} seconds (a second), the directory every
C{scan_interval} seconds (5) and after each segment:

- C{--record-keep}: when the segments together take more, the oldest are
  deleted (never the one being written).  A share (the default, 80%) is of
  what was free on the disk when the daemon started plus what earlier
  recordings already took then.
- A floor of free space (L{floor_bytes}: 5% of the file system, 256 MiB at
  most): below it recording stops, with one log line and a state that
  /stats.json, /metrics and the page's overlay show, and it starts again
  (at the next keyframe) once 1.5 times the floor is free.  Space taken by
  others is not made by deleting recordings.

A failing or full disk never stops the live stream: ffmpeg is fed without
blocking (what its pipe does not take is dropped, counted, up to the next
keyframe), an ffmpeg that fails (a write error, a full disk) or that has
taken nothing for L{Recorder.stall_timeout} seconds (a disk that hangs) is
killed if need be, logged with its last error line, and recording starts
again after a pause that doubles from 1 s up to a minute while it keeps
failing.  The stream's viewers never wait for any of it.
"""

import calendar
import collections
import errno
import os
import re
import signal
import threading
import time

from twisted.application.internet import TimerService
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from pistreaming.backoff import Backoff
from pistreaming.h264 import HEADER, PPS, SPS, VCL_TYPES, nal_spans
from pistreaming.tsmux import H264Muxer

log = Logger(namespace="pistreaming.recorder")

#: The container of each codec's segments: its file name extension.
EXTENSIONS = {"h264": "mp4", "mpeg1": "ts"}
#: Content types of the containers (for /recordings/).
CONTENT_TYPES = {"mp4": "video/mp4", "ts": "video/mp2t"}
#: A segment's name: its start in UTC (ISO 8601 basic format), a number
#: from 2 on where two begin in the same second, its container.
SEGMENT_NAME = re.compile(r"(\d{8}T\d{6}Z)(?:-([2-9]|[1-9]\d{1,3}))?\.(mp4|ts)")

#: The floor of free space: this share of the file system, at most FLOOR_MAX.
FLOOR_SHARE = 0.05
FLOOR_MAX = 256 * 1024 * 1024
#: Recording starts again when this many times the floor is free.
RESUME_FACTOR = 1.5

#: The states (L{Recorder.state}).
STARTING = "starting"    # waiting for a keyframe to begin a segment at
RECORDING = "recording"  # a segment is being written
STOPPED = "stopped"      # below the floor of free space, or the directory unreadable
FAILING = "failing"      # ffmpeg failed; it is started again after a pause


def segment_name(start, codec, taken=()):
    """The name of a segment that begins at C{start} (seconds since the
    epoch): its UTC time, and a number if C{taken} has that name already."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start))
    extension = EXTENSIONS[codec]
    name = f"{stamp}.{extension}"
    number = 1
    while name in taken:
        number += 1
        name = f"{stamp}-{number}.{extension}"
    return name


def segment_start(name):
    """When the segment C{name} began (seconds since the epoch, UTC), or
    None if C{name} is not a segment's name."""
    match = SEGMENT_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return float(calendar.timegm(time.strptime(match.group(1), "%Y%m%dT%H%M%SZ")))
    except ValueError:  # 20261399T996699Z: the shape of a name, not a time
        return None


def segment_order(name):
    """A key that sorts segment names by their start, then by number."""
    match = SEGMENT_NAME.fullmatch(name)
    return (match.group(1), int(match.group(2) or 1), match.group(3)) if match else (name, 0, "")


def record_command(ffmpeg, codec, path):
    """The ffmpeg argument list (argv[0] included) that copies the stream on
    its stdin (MPEG-TS: of the MPEG-1 as the encoder made it, or of the
    H.264 access units as L{pistreaming.tsmux} wraps them) into the segment
    file C{path}, never overwriting a file."""
    head = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error"]
    if codec == "h264":
        return head + [
            # the access units in MPEG-TS with their capture times (tsmux),
            # read as they come: probing would hold seconds of pictures back
            # (lost in a power cut)
            "-probesize", "32", "-analyzeduration", "0",
            "-f", "mpegts", "-i", "pipe:0", "-map", "0:v", "-c", "copy",
            # fragmented MP4: the header first, then a fragment at each
            # keyframe and at least every half second, each written out at
            # once, so that a file cut short plays up to its last fragment
            "-f", "mp4", "-movflags", "+frag_keyframe+empty_moov+default_base_moof",
            "-frag_duration", "500000", "-flush_packets", "1", "-n", path,
        ]
    if codec == "mpeg1":
        return head + [
            "-probesize", "32", "-analyzeduration", "0",
            "-f", "mpegts", "-i", "pipe:0", "-map", "0:v", "-c", "copy",
            # each packet written out at once, none held back to interleave
            "-f", "mpegts", "-muxdelay", "0", "-muxpreload", "0", "-flush_packets", "1",
            "-n", path,
        ]
    raise ValueError(f"not a codec the recorder knows: {codec!r}")


def floor_bytes(total):
    """The free space below which recording stops, on a file system of
    C{total} bytes."""
    return int(min(total * FLOOR_SHARE, FLOOR_MAX))


def keep_bytes(keep, free, recorded):
    """The bytes the recordings may take: C{keep} is ("bytes", n) or
    ("percent", p) of what is free (C{free}) plus what recordings take
    already (C{recorded})."""
    kind, value = keep
    if kind == "bytes":
        return int(value)
    return int((free + recorded) * value / 100)


def to_delete(recordings, keep, current=None):
    """The names of the oldest recordings to delete so that the rest take
    at most C{keep} bytes; C{recordings} is [(name, size)], the one named
    C{current} (being written) is never deleted."""
    total = sum(size for _, size in recordings)
    victims = []
    for name, size in sorted(recordings, key=lambda r: segment_order(r[0])):
        if total <= keep:
            break
        if name == current:
            continue
        victims.append(name)
        total -= size
    return victims


def human(size):
    """Bytes as a person reads them: 812 kB, 3.4 MB, 12.0 GB."""
    for unit, scale in (("TB", 10 ** 12), ("GB", 10 ** 9), ("MB", 10 ** 6), ("kB", 10 ** 3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if unit != "kB" else f"{size // scale} kB"
    return f"{size} B"


def duration_text(seconds):
    """30s, 10m, 1h30m: a time as the options write it."""
    seconds = round(seconds)
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m" + (
            f"{seconds % 60}s" if seconds % 60 else "")
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds // 60}m{seconds % 60}s" if seconds > 60 else f"{seconds}s"


def parameter_sets(message):
    """The SPS and PPS in front of the picture in an H.264 stream message
    (bytes; empty where there are none)."""
    found = []
    au = memoryview(message)[HEADER.size:]
    data = bytes(au)
    for _, start, end in nal_spans(data):
        if end <= start:
            continue
        kind = data[start] & 0x1F
        if kind in VCL_TYPES:
            break
        if kind in (SPS, PPS):
            found.append(data[start:end])
    return b"".join(found)


# -- on the recorder's thread ---------------------------------------------------

Scan = collections.namedtuple("Scan", ["recordings", "free", "total"])
Scan.__doc__ = """What is in the recordings' directory: C{recordings}, a
list of (name, size, modification time) of the segments; C{free} (bytes an
unprivileged process may still write) and C{total} (the file system's size)."""


def scan(directory):
    """List the segments in C{directory} and how full its disk is (blocking:
    on the recorder's thread)."""
    recordings = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if SEGMENT_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                recordings.append((entry.name, info.st_size, info.st_mtime))
    return Scan(sorted(recordings, key=lambda r: segment_order(r[0])), *space(directory))


def space(directory):
    """(bytes free to an unprivileged process, bytes in all) on the file
    system of C{directory} (blocking: on the recorder's thread)."""
    disk = os.statvfs(directory)
    return disk.f_bavail * disk.f_frsize, disk.f_blocks * disk.f_frsize


def delete(directory, names):
    """Delete the segments C{names} (blocking: on the recorder's thread);
    returns (names gone, [(name, why) that could not be deleted])."""
    gone, failed = [], []
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            gone.append(name)
        except OSError as e:
            failed.append((name, (e.strerror or str(e)).lower()))
        else:
            gone.append(name)
    return gone, failed


class Disk:
    """The recordings' directory as the recorder's thread sees it (tests
    give the recorder another)."""

    scan = staticmethod(scan)
    space = staticmethod(space)
    delete = staticmethod(delete)


def _daemon_thread(*args, **kwargs):
    # A thread stuck on a dead disk must not keep the daemon from exiting.
    thread = threading.Thread(*args, **kwargs)
    thread.daemon = True
    return thread


# -- the segments' ffmpeg -------------------------------------------------------

class Segment:
    """One segment: its file, its ffmpeg, what went into it."""

    def __init__(self, name, path, started_at):
        self.name = name
        self.path = path
        #: Arrival (reactor time) of its first keyframe, and of its last chunk.
        self.started_at = started_at
        self.last_at = started_at
        self.bytes = 0
        self.process = None
        #: Whether its input was closed (it ends, or was given up).
        self.closing = False
        #: Whether chunks are dropped up to the next keyframe (ffmpeg did
        #: not take one).
        self.skipping = False
        #: H.264: the parameter sets it began with, and what puts the
        #: access units in MPEG-TS; MPEG-1: the last picture's timestamp.
        self.parameter_sets = None
        self.muxer = None
        self.last_pts = None
        #: Whether it was given up (its ffmpeg killed) after a failure.
        self.given_up = False
        self.timers = []


@implementer(IPushProducer)
class SegmentProcess(protocol.ProcessProtocol):
    """One segment's ffmpeg run; the producer for its stdin, paused by the
    transport while the pipe and Twisted's buffer are full."""

    stderr_limit = 4096

    def __init__(self, recorder, segment):
        self.recorder = recorder
        self.segment = segment
        self.writable = False
        self.paused = False
        self.paused_since = None
        self.stderr = b""
        self.started_at = None

    def connectionMade(self):
        self.started_at = self.recorder.reactor.seconds()
        self.writable = True
        self.transport.registerProducer(self, True)

    def pauseProducing(self):
        if not self.paused:
            self.paused = True
            self.paused_since = self.recorder.reactor.seconds()

    def resumeProducing(self):
        self.paused = False
        self.paused_since = None

    def stopProducing(self):
        self.writable = False

    def errReceived(self, data):
        self.stderr = (self.stderr + data)[-self.stderr_limit:]

    def last_error(self):
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip()[:200] if lines else ""

    def processEnded(self, reason):
        self.writable = False
        self.recorder._segment_ended(self, reason)


# -- the recorder ---------------------------------------------------------------

class Recorder(TimerService):
    """The recording tap: see the module's docstring.  Also a service of the
    daemon: its timer runs the disk housekeeping."""

    name = "recorder"

    first_retry_delay = 1.0
    max_retry_delay = 60.0
    #: A segment's ffmpeg that ran this long resets the pause after failures.
    healthy_run = 30.0
    #: Seconds ffmpeg may take nothing before it is given up (a hung disk).
    stall_timeout = 10.0
    #: A finished segment's ffmpeg (input closed) gets SIGTERM, then
    #: SIGKILL, if it has not exited after these many seconds.
    close_term_after = 5.0
    close_kill_after = 10.0
    #: When the daemon stops: SIGTERM, SIGKILL, and no more waiting.
    stop_term_after = 0.8
    stop_kill_after = 1.2
    stop_give_up = 1.6

    def __init__(self, directory, codec, command, reactor, segment_length=600.0,
                 keep=("percent", 80.0), framerate=24, on_state=None, check_interval=1.0,
                 scan_interval=5.0, pool=None, env=None, disk=None):
        """
        @param directory: where the segments go (it exists).
        @param codec: the stream's, C{"h264"} or C{"mpeg1"}: what the chunks are.
        @param command: called with a segment's path, gives the ffmpeg
            argument list that writes it (L{record_command}).
        @param segment_length: seconds of video per segment.
        @param keep: C{--record-keep}: ("bytes", n) or ("percent", p).
        @param framerate: the stream's pictures per second.
        @param on_state: called with (state, why) when the state changes.
        @param check_interval: seconds between looks at the free space.
        @param scan_interval: seconds between listings of the directory
            (it is listed after each segment, too).
        @param pool: a thread pool for the disk work (started and stopped by
            its owner); by default the recorder's own.
        @param disk: what lists and deletes segments (L{Disk}), on C{pool}.
        """
        super().__init__(check_interval, self._tick)
        if codec not in EXTENSIONS:
            raise ValueError(f"not a codec the recorder knows: {codec!r}")
        self.clock = reactor
        self.reactor = reactor
        self.directory = directory
        self.codec = codec
        self.extension = EXTENSIONS[codec]
        self.command = command
        self.segment_length = segment_length
        self.keep_setting = keep
        self.framerate = float(framerate)
        self.scan_interval = scan_interval
        self._last_scan = None
        self.on_state = on_state
        self.env = dict(os.environ) if env is None else env
        self.disk = Disk() if disk is None else disk
        self._own_pool = pool is None
        self.pool = pool
        #: The bytes the recordings may take (known after the first scan
        #: when a share of the free space).
        self.keep = keep[1] if keep[0] == "bytes" else None
        self.floor = None
        self.free = None
        self.total = None
        self.state = STARTING
        self.why = "waiting for a keyframe"
        #: The segment being written, or None.
        self.segment = None
        #: The segments on disk at the last scan: name -> (size, mtime).
        self.recordings = {}
        #: Lengths of the segments this daemon finished, by name.
        self.lengths = {}
        self._hold = None        # why recording stopped (space, directory), or None
        self._failure = None     # why ffmpeg failed, while a retry is pending
        self._retry = None
        self._backoff = Backoff(self.first_retry_delay, self.max_retry_delay)
        self._scanning = False
        self._rescan = False
        self._last_keyframe_at = None
        self._keyframe_interval = None
        self._closing = set()
        self._stopped = None
        # counters
        self.segments_started = 0
        self.segments_deleted = 0
        self.failures = 0
        self.bytes_written = 0
        self.chunks_dropped = 0
        self.scans = 0

    # -- the tap
    def feed(self, chunk):
        """One chunk of the stream (as the viewers get it); never blocks."""
        if not self.running:
            return
        now = self.reactor.seconds()
        segment = self.segment
        if chunk.keyframe:
            self._keyframe(now)
            if segment is not None:
                why = self._cut(segment, chunk, now)
                if why is not None:
                    self._close(segment, why, refresh=False)
                    segment = None
            if segment is None and self._hold is None and self._retry is None:
                segment = self._open(chunk, now)
            self._refresh_state()
        elif segment is not None and self._restarted(segment, chunk):
            # A new encoder run, whose timestamps start again: the next
            # keyframe (its first picture) begins a new segment.
            self._close(segment, "the encoder started again")
            return
        if segment is None or segment.process is None:
            return
        if segment.skipping and not chunk.keyframe:
            self.chunks_dropped += 1
            return
        proto = segment.process
        if not proto.writable or proto.paused:
            if not segment.skipping:
                log.warn("recording: ffmpeg does not keep up with the stream (is the disk "
                         "slow?); dropping pictures up to the next keyframe")
            segment.skipping = True
            self.chunks_dropped += 1
            return
        segment.skipping = False
        if self.codec == "h264":
            _, micros = HEADER.unpack_from(chunk.data)
            data = segment.muxer.write(chunk.data[HEADER.size:], chunk.keyframe,
                                       micros / 1e6 if micros else None)
        else:
            data = chunk.data
        proto.transport.write(data)
        segment.bytes += len(data)
        segment.last_at = now
        if chunk.pts is not None:
            segment.last_pts = chunk.pts
        self.bytes_written += len(data)

    def _keyframe(self, now):
        if self._last_keyframe_at is not None:
            self._keyframe_interval = now - self._last_keyframe_at
        self._last_keyframe_at = now

    def _restarted(self, segment, chunk):
        return (self.codec == "mpeg1" and chunk.pts is not None and segment.last_pts is not None
                and not segment.last_pts - 0.5 <= chunk.pts <= segment.last_pts + 10)

    def _cut(self, segment, chunk, now):
        """Why the segment ends at this keyframe, or None if it goes on."""
        if self.codec == "h264":
            if parameter_sets(chunk.data) != segment.parameter_sets:
                return "the stream's parameters changed"
        elif self._restarted(segment, chunk):
            return "the encoder started again"
        if segment.process is not None and segment.process.paused:
            # ffmpeg takes nothing (a slow or hung disk): no new ffmpeg on
            # that disk; this one goes on, or is given up (_tick).
            return None
        # The first keyframe at or after the length; a quarter of a keyframe
        # interval early counts as on time (keyframes come a few
        # milliseconds early or late).
        early = min((self._keyframe_interval or 0) / 4, self.segment_length / 4)
        if now - segment.started_at >= self.segment_length - early:
            return "length"
        return None

    # -- segments
    def _open(self, chunk, now):
        taken = set(self.recordings) | {s.name for s in self._closing}
        name = segment_name(now, self.codec, taken)
        path = os.path.join(self.directory, name)
        segment = Segment(name, path, now)
        if self.codec == "h264":
            segment.parameter_sets = parameter_sets(chunk.data)
            segment.muxer = H264Muxer(self.framerate)
        proto = SegmentProcess(self, segment)
        command = self.command(path)
        try:
            if os.path.isabs(command[0]) and not os.access(command[0], os.X_OK):
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            self.reactor.spawnProcess(proto, command[0], command, env=self.env)
        except Exception as e:
            why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
            self._failed(f"cannot start {command[0]}: {(why or type(e).__name__).lower()}")
            return None
        segment.process = proto
        self.segment = segment
        self.segments_started += 1
        self.recordings.setdefault(name, (0, now))
        log.info("recording: {name} (ffmpeg pid {pid})", name=name,
                 pid=getattr(proto.transport, "pid", None))
        return segment

    def _close(self, segment, why, refresh=True):
        """End C{segment}: ffmpeg's input is closed, it finishes the file.
        (C{refresh}: whether the state may change now; not when the next
        segment begins at once.)"""
        if segment is self.segment:
            self.segment = None
        if segment.closing:
            return
        segment.closing = True
        if why != "length":
            log.info("recording: {name} ends ({why})", name=segment.name, why=why)
        self.lengths[segment.name] = self._length(segment)
        proto = segment.process
        if proto is not None and proto.transport is not None and proto.transport.pid:
            self._closing.add(segment)
            self._end_input(proto)
            segment.timers = [
                self.reactor.callLater(self.close_term_after, self._signal, proto,
                                       signal.SIGTERM),
                self.reactor.callLater(self.close_kill_after, self._signal, proto,
                                       signal.SIGKILL),
            ]
        if refresh:
            self._refresh_state()
        self._check()

    def _length(self, segment):
        # From its first picture's arrival to its last's, and that one's time.
        return max(0.0, segment.last_at - segment.started_at + 1 / self.framerate)

    @staticmethod
    def _end_input(proto):
        proto.writable = False
        try:
            # The producer first: while one is registered, Twisted keeps the
            # pipe open for it (pistreaming.encoder says more).
            proto.transport.unregisterProducer()
            proto.transport.closeStdin()
        except Exception:
            pass

    @staticmethod
    def _signal(proto, signum):
        try:
            proto.transport.signalProcess(signum)
        except (error.ProcessExitedAlready, OSError):
            pass

    def _segment_ended(self, proto, reason):
        segment = proto.segment
        for timer in segment.timers:
            if timer.active():
                timer.cancel()
        segment.timers = []
        self._closing.discard(segment)
        ran = self.reactor.seconds() - (proto.started_at or self.reactor.seconds())
        clean = reason.check(error.ProcessDone) is not None
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"was killed by signal {sig}" if sig else f"exited with code {code}"
        last = proto.last_error()
        if segment.closing:
            # Its input was closed: it finished the file (or, given up, was killed).
            if clean and ran >= self.healthy_run:
                self._backoff.reset()
            elif not clean and self.running and not segment.given_up:
                log.error("recording: ffmpeg {how} finishing {name}{last}", how=how,
                          name=segment.name, last=f": {last}" if last else "")
            if self._stopped is not None and not self._closing and not self._stopped.called:
                self._stopped.callback(None)
            self._check()
            return
        # ffmpeg ended by itself: a write error, a full disk.
        if segment is self.segment:
            self.segment = None
        self.lengths[segment.name] = self._length(segment)
        if ran >= self.healthy_run:
            self._backoff.reset()
        self._failed(f"ffmpeg {how} writing {segment.name}" + (f": {last}" if last else ""))

    def _failed(self, why):
        self.failures += 1
        delay = self._backoff.next()
        log.error("recording: {why}; trying again in {delay:g}s", why=why, delay=delay)
        self._failure = why
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = self.reactor.callLater(delay, self._retry_now)
        self._refresh_state()
        self._check()

    def _retry_now(self):
        self._retry = None
        self._failure = None
        self._refresh_state()

    # -- the state
    def _refresh_state(self):
        if self._hold is not None:
            state, why = STOPPED, self._hold
        elif self._retry is not None:
            state, why = FAILING, self._failure
        elif self.segment is not None:
            state, why = RECORDING, None
        else:
            state, why = STARTING, "waiting for a keyframe"
        if (state, why) == (self.state, self.why):
            return
        self.state, self.why = state, why
        if self.on_state is not None:
            self.on_state(state, why)

    # -- the disk
    def _tick(self):
        last = self._last_scan
        self._check(full=last is None
                    or self.reactor.seconds() - last >= self.scan_interval - 1e-6)
        proto = self.segment.process if self.segment is not None else None
        if (proto is not None and proto.paused_since is not None
                and self.reactor.seconds() - proto.paused_since > self.stall_timeout):
            segment = self.segment
            self.segment = None
            segment.closing = segment.given_up = True
            self.lengths[segment.name] = self._length(segment)
            self._end_input(proto)
            self._signal(proto, signal.SIGKILL)
            self._failed(f"ffmpeg has taken nothing for {self.stall_timeout:g}s writing "
                         f"{segment.name} (does the disk hang?)")

    def _check(self, full=True):
        """A housekeeping pass on the recorder's thread (one at a time): the
        free space, and if C{full} the directory's segments."""
        if not self.running:
            return
        if self._scanning:
            self._rescan = self._rescan or full
            return
        self._scanning = True
        self._rescan = False
        if full:
            self._last_scan = self.reactor.seconds()
            d = deferToThreadPool(self.reactor, self.pool, self.disk.scan, self.directory)
            d.addCallbacks(self._scanned, self._scan_failed)
        else:
            d = deferToThreadPool(self.reactor, self.pool, self.disk.space, self.directory)
            d.addCallbacks(lambda found: self._space(*found), self._scan_failed)
        d.addErrback(lambda f: log.failure("recording: housekeeping failed", f))
        d.addBoth(self._pass_done)

    def _pass_done(self, _):
        self._scanning = False
        if self._rescan:
            self._check()

    def _scan_failed(self, failure):
        e = failure.value
        why = (e.strerror or str(e)).lower() if isinstance(e, OSError) else str(e)
        self._stop_recording(f"cannot read {self.directory}: {why}")

    def _space(self, free, total):
        """The floor of free space: recording stops below it, and starts
        again at L{RESUME_FACTOR} times it."""
        self.free, self.total = free, total
        self.floor = floor_bytes(total)
        if self._hold is not None and self._hold.startswith("cannot read"):
            return  # a scan says when it can be read again
        if free < self.floor:
            if self._hold is None:
                self._stop_recording(
                    f"only {human(free)} free on the disk of {self.directory}, below "
                    f"the floor of {human(self.floor)}", space=True)
        elif self._hold is not None and free >= self.floor * RESUME_FACTOR:
            log.info("recording resumes: {free} free on the disk of {directory}",
                     free=human(free), directory=self.directory)
            self._hold = None
            self._refresh_state()

    def _scanned(self, found):
        self.scans += 1
        self.recordings = {name: (size, mtime) for name, size, mtime in found.recordings}
        # (A segment's file appears once its ffmpeg has read the first
        # pictures: one just begun or just ended may not be there yet.)
        busy = {segment.name for segment in self._closing}
        if self.segment is not None:
            busy.add(self.segment.name)
        self.lengths = {name: length for name, length in self.lengths.items()
                        if name in self.recordings or name in busy}
        if self.segment is not None:
            self.recordings.setdefault(self.segment.name, (self.segment.bytes,
                                                           self.reactor.seconds()))
        recorded = sum(size for size, _ in self.recordings.values())
        if self.keep is None:
            self.keep = keep_bytes(self.keep_setting, found.free, recorded)
            log.info("recording to {directory}: segments of {segment}, {container}; "
                     "keeping at most {keep} ({share:g}% of the {free} free, with the "
                     "{recorded} recorded before)", directory=self.directory,
                     segment=duration_text(self.segment_length), container=self.container,
                     keep=human(self.keep), share=self.keep_setting[1], free=human(found.free),
                     recorded=human(recorded))
        elif self.scans == 1:
            log.info("recording to {directory}: segments of {segment}, {container}; "
                     "keeping at most {keep}", directory=self.directory,
                     segment=duration_text(self.segment_length), container=self.container,
                     keep=human(self.keep))
        if self._hold is not None and self._hold.startswith("cannot read"):
            log.info("recording: {directory} can be read again", directory=self.directory)
            self._hold = None
            self._refresh_state()
        self._space(found.free, found.total)
        current = self.segment.name if self.segment is not None else None
        victims = to_delete([(name, size) for name, (size, _) in self.recordings.items()],
                            self.keep, current)
        if victims:
            return deferToThreadPool(self.reactor, self.pool, self.disk.delete, self.directory,
                                     victims).addCallback(self._deleted, recorded)
        return None

    def _deleted(self, result, recorded):
        gone, failed = result
        for name in gone:
            self.recordings.pop(name, None)
            self.lengths.pop(name, None)
        self.segments_deleted += len(gone)
        if gone:
            log.info("recording: deleted {count} oldest segment(s), {first}{last}: the "
                     "recordings took {recorded}, more than --record-keep {keep}",
                     count=len(gone), first=gone[0],
                     last=f" .. {gone[-1]}" if len(gone) > 1 else "",
                     recorded=human(recorded), keep=human(self.keep))
        for name, why in failed:
            log.error("recording: cannot delete {name}: {why}", name=name, why=why)

    def _stop_recording(self, why, space=False):
        if self._hold == why:
            return
        first = self._hold is None
        self._hold = why
        if first:
            resume = (f"; it resumes when {human(int(self.floor * RESUME_FACTOR))} are free"
                      if space else "; it resumes when it can be read again")
            log.warn("recording stopped: {why}{resume}", why=why, resume=resume)
        if self.segment is not None:
            self._close(self.segment, "recording stopped")
        self._refresh_state()

    @property
    def container(self):
        """What the segments are, in words."""
        return "fragmented MP4" if self.extension == "mp4" else "MPEG-TS"

    # -- the service
    def startService(self):
        if self.pool is None:
            self.pool = ThreadPool(minthreads=0, maxthreads=1, name="recorder")
            self.pool.threadFactory = _daemon_thread
            self.pool.start()
        self._refresh_state()
        super().startService()  # and the first housekeeping pass, at once

    def stopService(self):
        stopped = super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self.segment is not None:
            self._close(self.segment, "the daemon stops")
        pool, self._own_pool = (self.pool if self._own_pool else None), False
        if pool is not None:
            self.pool = None
            if not self._scanning:
                pool.stop()
            # else: its thread is a daemon thread, stuck on the disk perhaps
        closing = list(self._closing)
        if not closing:
            return stopped
        self._stopped = done = defer.Deferred()
        for segment in closing:
            for timer in segment.timers:
                if timer.active():
                    timer.cancel()
            proto = segment.process
            segment.timers = [
                self.reactor.callLater(self.stop_term_after, self._signal, proto,
                                       signal.SIGTERM),
                self.reactor.callLater(self.stop_kill_after, self._signal, proto,
                                       signal.SIGKILL),
            ]

        def give_up():
            if not done.called:
                log.warn("recording: ffmpeg did not end within {seconds:g}s; not waiting",
                         seconds=self.stop_give_up)
                done.callback(None)

        late = self.reactor.callLater(self.stop_give_up, give_up)
        done.addBoth(lambda result: late.cancel() if late.active() else None)
        return defer.gatherResults([stopped, done])

    # -- figures
    def listing(self, now):
        """The segments, oldest first: dicts of name, start (seconds since
        the epoch), length (seconds), size (bytes), and whether it is being
        written."""
        current = self.segment
        found = []
        for name, (size, mtime) in self.recordings.items():
            start = segment_start(name)
            if start is None:
                continue
            writing = current is not None and name == current.name
            if writing:
                length = now - current.started_at
                size = max(size, current.bytes)
            elif name in self.lengths:
                length = self.lengths[name]
            else:  # an earlier run's: until it was last written to
                length = max(0.0, mtime - start)
            found.append({"name": name, "start": start, "length": round(length, 1),
                          "size": size, "recording": writing})
        found.sort(key=lambda r: segment_order(r["name"]))
        return found

    def figures(self, now):
        """For /stats.json (and /metrics)."""
        listing = self.listing(now)
        return {
            "state": self.state,
            "why": self.why,
            "directory": self.directory,
            "container": self.container,
            "segment_seconds": self.segment_length,
            "current": self.segment.name if self.segment is not None else None,
            "segments": len(listing),
            "bytes": sum(r["size"] for r in listing),
            "keep_bytes": self.keep,
            "free_bytes": self.free,
            "floor_bytes": self.floor,
            "segments_started": self.segments_started,
            "segments_deleted": self.segments_deleted,
            "failures": self.failures,
            "bytes_written": self.bytes_written,
            "chunks_dropped": self.chunks_dropped,
        }
