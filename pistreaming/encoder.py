"""The encoder: an ffmpeg child process, raw YUV420 in (or a device or a
file that ffmpeg reads itself), MPEG-1 or H.264 in MPEG-TS out.

Its output is read as it arrives.  MPEG-1 is cut into chunks of MPEG-TS
that begin where pictures begin (pistreaming.mpegts) and handed to the sink
as such.  H.264 is taken out of MPEG-TS: each access unit (one picture, in
Annex B) is handed to the sink the moment its PES packet is complete, with
the time its frame was captured.  Each picture that comes out is matched,
by its timestamp, with the frame that went in, so that the time a frame
spent waiting for ffmpeg and inside ffmpeg is measured.
"""

import collections
import fcntl
import errno
import os
import struct
import termios
import signal
from fractions import Fraction

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from pistreaming.backoff import Backoff
from pistreaming.camera.picture import rate_text
from pistreaming.mpegts import PESAssembler, PictureSplitter, TSPacketizer

#: The codecs the encoder makes (or passes on): C{--codec}.
CODECS = ("mpeg1", "h264")
#: How H.264 is made: x264 in ffmpeg, the V4L2 memory-to-memory hardware
#: encoder (a Raspberry Pi's, through ffmpeg), or not at all (a webcam's own
#: H.264, copied).
H264_ENCODERS = ("libx264", "h264_v4l2m2m", "copy")
#: The most bits x264's rate control may hold in its buffer (VBV): so no
#: picture outgrows 64 KB, and each fits a PES packet whose header states its
#: length (pistreaming.mpegts.PESAssembler: a picture of open length is known
#: to be complete only when the next begins, a frame interval later).
H264_MAX_VBV = 500_000
#: x264's presets the daemon may use (--x264-preset), fastest first: each
#: later one spends more CPU for fewer bits at the same quality (see
#: docs/benchmarks.rst, bench/quality).
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")



def raw_input(geometry, framerate):
    """ffmpeg's input for padded raw YUV420 frames on stdin, and the filter that
    crops the padding away: (input arguments, filters)."""
    return [
        # input: raw padded frames on stdin, read as they come.  (No
        # "-fflags nobuffer -probesize 32": with them, ffmpeg 5.1 holds one
        # more frame back.)
        "-f", "rawvideo", "-pix_fmt", "yuv420p",
        "-video_size", f"{geometry.padded_width}x{geometry.padded_height}",
        "-framerate", rate_text(framerate),
        "-i", "pipe:0",
    ], [
        # crop away the camera's padding
        geometry.crop_filter,
    ]


def keyframe_distance(framerate, keyframe_interval):
    """Frames from one H.264 keyframe (IDR) to the next."""
    return max(1, round(Fraction(framerate) * Fraction(keyframe_interval).limit_denominator(1000)))


def h264_args(framerate, bitrate, keyframe_interval, encoder="libx264",
              x264_preset="superfast"):
    """ffmpeg's video codec arguments for H.264 that every browser decodes
    at once: no B-frames (so no picture waits for a later one), a keyframe
    (IDR, with SPS and PPS before it) every C{keyframe_interval} seconds and
    no others.  x264 makes the High profile (without B-frames: CABAC and 8x8
    transforms, fewer bits than baseline for the same picture, and decoded
    by every browser), at C{x264_preset}."""
    if encoder not in H264_ENCODERS:
        raise ValueError(f"not an H.264 encoder: {encoder!r}")
    if encoder == "copy":
        # A webcam's own H.264, as it comes: its keyframes, its bit rate.
        return ["-c:v", "copy"]
    gop = keyframe_distance(framerate, keyframe_interval)
    if encoder == "h264_v4l2m2m":
        # The hardware encoder: ffmpeg sets its bit rate, GOP size and
        # profile (578: ffmpeg's number for constrained baseline; the
        # encoder has no name for it) through V4L2 controls.
        return ["-c:v", "h264_v4l2m2m", "-pix_fmt", "yuv420p",
                "-b:v", str(bitrate), "-g", str(gop), "-bf", "0", "-profile:v", "578"]
    if x264_preset not in X264_PRESETS:
        raise ValueError(f"not an x264 preset the daemon uses: {x264_preset!r}")
    return [
        # x264 with zerolatency: no lookahead, no B-frames, each picture out
        # before the next frame goes in (several slices of one picture, coded
        # on several threads).
        "-c:v", "libx264", "-preset", x264_preset, "-tune", "zerolatency",
        "-profile:v", "high", "-pix_fmt", "yuv420p",
        # the bit rate asked for, with a buffer of at most a second (and
        # H264_MAX_VBV), so a keyframe does not balloon
        "-b:v", str(bitrate), "-maxrate", str(bitrate),
        "-bufsize", str(min(bitrate, H264_MAX_VBV)),
        # keyframes every GOP frames exactly: none at scene cuts
        "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0",
        # SPS and PPS before every keyframe, where a decoder can start
        "-x264-params", "repeat-headers=1",
    ]


def output_args(framerate, bitrate, codec="mpeg1", keyframe_interval=2.0,
                h264_encoder="libx264", x264_preset="superfast"):
    """Everything after the filters: the encoder and the muxer (the one place
    for the output flags, whatever the input)."""
    if codec not in CODECS:
        raise ValueError(f"not a codec the encoder makes: {codec!r}")
    framerate = Fraction(framerate)
    if codec == "h264":
        command = h264_args(framerate, bitrate, keyframe_interval, h264_encoder, x264_preset)
        return command + _mpegts_args()
    # One intra picture a second: a new viewer's first picture is never far.
    gop = max(1, round(framerate))
    command = [
        # MPEG-1 video without B-frames, and with low_delay, without which
        # ffmpeg's MPEG-1 encoder holds each picture back until the next
        # frame arrives (a frame interval of delay).  ffmpeg allows
        # low_delay for MPEG-1, and frame rates 5, 10, 12 and 15, only with
        # "-strict unofficial"; the pictures are plain MPEG-1 all the same.
        "-c:v", "mpeg1video", "-b:v", str(bitrate), "-bf", "0", "-g", str(gop),
        "-flags", "low_delay", "-strict", "unofficial",
    ]
    return command + _mpegts_args()


def _mpegts_args():
    return [
        # MPEG-TS out, each packet flushed at once, with the length of each
        # picture's PES packet written in its header, so that a demuxer knows
        # the picture is complete without waiting for the next one
        "-f", "mpegts", "-muxdelay", "0", "-muxpreload", "0", "-flush_packets", "1",
        "-omit_video_pes_length", "0",
        "pipe:1",
    ]


def ffmpeg_command(ffmpeg, geometry, framerate, bitrate, video_input=None, filters=(),
                   codec="mpeg1", keyframe_interval=2.0, h264_encoder=None,
                   x264_preset="superfast"):
    """The ffmpeg argument list (argv[0] included) for the stream.

    @param video_input: (input arguments, filters) for a source that ffmpeg
        reads itself (a device, a file); by default raw frames on stdin
        (L{raw_input}).  It may say how H.264 is made of it, in an
        attribute C{h264_encoder} (a webcam's own H.264: C{"copy"}).
    @param filters: more video filters, applied last (e.g. an annotation).
    @param codec: C{"mpeg1"} or C{"h264"}.
    @param keyframe_interval: seconds from one H.264 keyframe to the next.
    @param x264_preset: x264's preset, where x264 makes the H.264.
    @param h264_encoder: one of L{H264_ENCODERS}, if not the input's own
        (by default libx264); C{"copy"} only for a source that gives H.264
        itself, and then without filters.
    """
    if h264_encoder is None:
        h264_encoder = getattr(video_input, "h264_encoder", None) or "libx264"
    if video_input is None:
        video_input = raw_input(geometry, framerate)
    input_args, input_filters = video_input
    chain = [*input_filters, *filters]
    command = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", *input_args]
    if codec == "h264" and h264_encoder == "copy":
        if chain:
            raise ValueError(f"H.264 copied as it comes cannot be filtered ({','.join(chain)})")
    elif chain:
        command += ["-vf", ",".join(chain)]
    return command + output_args(framerate, bitrate, codec, keyframe_interval, h264_encoder,
                                 x264_preset)


#: fcntl's F_SETPIPE_SZ (Linux; Python's fcntl names it from 3.10 on).
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"


def grow_pipe(fd, size):
    """Let the pipe at C{fd} hold C{size} bytes, or as much as the system
    allows an unprivileged process (/proc/sys/fs/pipe-max-size, 1 MiB by
    default): a raw frame then goes to ffmpeg in one write, instead of 64 KiB
    at a time with a wait for ffmpeg to read each.  Returns the pipe's size,
    or None where it cannot be changed."""
    try:
        return fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:
        pass
    try:
        with open(PIPE_MAX_SIZE) as f:
            most = int(f.read())
        return fcntl.fcntl(fd, F_SETPIPE_SZ, min(size, most))
    except (OSError, ValueError):
        return None


def unread(fd):
    """Bytes written to the pipe at C{fd} that its reader has not read yet."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


@implementer(IPushProducer)
class FFmpegProtocol(protocol.ProcessProtocol):
    """One ffmpeg run.  Also the producer for its stdin: the transport pauses
    us when ffmpeg has not taken the last frame yet, and frames offered while
    paused are dropped by the caller."""

    stderr_limit = 8192

    def __init__(self, encoder):
        self.encoder = encoder
        self.packetizer = TSPacketizer()
        # MPEG-1: MPEG-TS cut where pictures begin; H.264: access units.
        self.splitter = self.assembler = None
        if encoder.codec == "h264":
            self.assembler = PESAssembler()
        else:
            self.splitter = PictureSplitter()
        #: (frame number in this run, captured at, written at) of frames in ffmpeg
        self.in_flight = collections.deque()
        self.frames_written = 0
        self.first_pts = None
        self.paused = False
        self.writable = False
        self.stderr = b""
        self.started_at = None
        self.stdin = None  # the pipe's file descriptor

    # process events
    def connectionMade(self):
        self.started_at = self.encoder.reactor.seconds()
        pipe = getattr(self.transport, "pipes", {}).get(0)
        if pipe is not None:
            self.stdin = pipe.fileno()
            if self.encoder.frame_size:
                grow_pipe(self.stdin, self.encoder.frame_size)
        self.writable = True
        self.transport.registerProducer(self, True)
        self.encoder._process_started(self)

    def outReceived(self, data):
        packets = self.packetizer.feed(data)
        if packets:
            if self.assembler is not None:
                for access_unit, pts in self.assembler.feed(packets):
                    self.encoder._access_unit(self, access_unit, pts)
                return
            for chunk in self.splitter.feed(packets):
                self.encoder._encoded(self, chunk)

    def errReceived(self, data):
        self.stderr = (self.stderr + data)[-self.stderr_limit:]

    def processEnded(self, reason):
        self.writable = False
        if self.assembler is not None:
            # A last picture of open length ends with the stream, if ffmpeg
            # ended it (exit 0); a crash may have cut it short.
            if reason.check(error.ProcessDone):
                for access_unit, pts in self.assembler.flush():
                    self.encoder._access_unit(self, access_unit, pts)
            else:
                self.assembler.discard()
            self.encoder.pes_dropped += self.assembler.dropped
            self.encoder.pes_open_length += self.assembler.open_length
        self.encoder._process_ended(self, reason)

    # IPushProducer, for stdin
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.writable = False

    def write_frame(self, frame, captured_at, now):
        """Write a frame to ffmpeg if it can take one now; return whether it did.
        It cannot while the last one is still on its way: in the transport's
        buffer (which then pauses us), or in the pipe, not yet all read by
        ffmpeg (with a pipe that holds a whole frame, that is where it waits)."""
        if not self.writable or self.paused:
            return False
        if self.stdin is not None:
            try:
                if unread(self.stdin):
                    return False
            except OSError:
                self.stdin = None
        self.transport.write(frame)
        self.in_flight.append((self.frames_written, captured_at, now))
        self.frames_written += 1
        if len(self.in_flight) > 256:  # ffmpeg dropped some; forget the oldest
            self.in_flight.popleft()
        return True

    def frame_for(self, pts, framerate):
        """(captured at, written at) of the frame that became the picture at
        C{pts}, or None if it is not known."""
        if pts is None:
            return None
        if self.first_pts is None:
            self.first_pts = pts
        number = round((pts - self.first_pts) * framerate)
        while self.in_flight and self.in_flight[0][0] < number:
            self.in_flight.popleft()
        if self.in_flight and self.in_flight[0][0] == number:
            _, captured_at, written_at = self.in_flight.popleft()
            return captured_at, written_at
        return None

    def stderr_text(self):
        return self.stderr.decode("utf-8", "replace").strip()


class Encoder(service.Service):
    """Keeps one ffmpeg running; feeds it frames, hands its output to C{sink}."""

    name = "encoder"
    #: What the log calls it.
    what = "encoder"
    log = Logger()

    first_restart_delay = 0.25
    max_restart_delay = 8.0
    #: A run at least this long counts as healthy and resets the backoff.
    healthy_run = 10.0
    #: On stop: stdin is closed at once, then SIGTERM, then SIGKILL.  An
    #: ffmpeg that reads a device or a file itself gets SIGTERM at once.
    term_after = 0.8
    kill_after = 1.4

    def __init__(self, command, sink, reactor, framerate=24, env=None, timings=None,
                 reads_stdin=True, frame_size=None, on_state=None, codec="mpeg1"):
        """
        @param sink: with C{codec="mpeg1"}, called with each
            L{pistreaming.mpegts.Chunk} of output; with C{codec="h264"},
            called with C{(access_unit, capture_time)} for each picture: its
            bytes in Annex B (as ffmpeg's MPEG-TS muxer gives them: an access
            unit delimiter first, SPS and PPS before each IDR), and when its
            frame was captured, in seconds since the epoch (for frames fed
            to L{feed}: the time they were fed with; None if ffmpeg's output
            cannot be matched to one), or, for a source that ffmpeg reads
            itself, when the access unit came out of ffmpeg.
        @param framerate: the input's frame rate (to match pictures to frames).
        @param timings: called with (captured at, written at, out at) for each
            picture whose frame is known.
        @param reads_stdin: whether ffmpeg encodes the frames given to L{feed}
            (False when it reads a device or a file itself).
        @param frame_size: bytes in a raw frame: ffmpeg's stdin pipe is made
            to hold one (L{grow_pipe}).
        @param on_state: called with (state, why) when pictures come out
            (again) (C{"ok"}, None) and when ffmpeg stops or cannot be
            started (C{"unavailable"}, the reason), so viewers can be told.
        @param codec: what C{command} makes, C{"mpeg1"} or C{"h264"}
            (L{ffmpeg_command}'s C{codec}); it says what the sink is given.
        """
        if codec not in CODECS:
            raise ValueError(f"not a codec the encoder makes: {codec!r}")
        self.codec = codec
        self.command = list(command)
        self.sink = sink
        self.reactor = reactor
        self.framerate = Fraction(framerate)
        self.timings = timings
        self.env = dict(os.environ) if env is None else env
        self.reads_stdin = reads_stdin
        self.frame_size = frame_size if reads_stdin else None
        self.process = None
        self.on_state = on_state
        #: "starting", "ok" (pictures come out) or "unavailable" (it stopped or
        #: could not be started; a restart is pending), and why.
        self.state = "starting"
        self.why = None
        self.restarts = 0
        self.frames_in = 0
        self.frames_dropped = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.pictures_out = 0
        #: H.264: PES packets that did not make sense or were cut short (so
        #: their pictures were never handed on), and pictures whose PES
        #: length was open (handed on when the next began).  Summed over
        #: ffmpeg runs that have ended.
        self.pes_dropped = 0
        self.pes_open_length = 0
        self._backoff = Backoff(self.first_restart_delay, self.max_restart_delay)
        self._restart_call = None
        self._stopping = False
        self._stopped = None
        self._stop_timers = []

    # feeding
    def feed(self, frame, captured_at=None):
        """Offer one raw frame; it is dropped (and counted) if ffmpeg is busy."""
        now = self.reactor.seconds()
        if captured_at is None:
            captured_at = now
        if self.process is not None and self.process.write_frame(frame, captured_at, now):
            self.frames_in += 1
            self.bytes_in += len(frame)
        else:
            self.frames_dropped += 1

    def _encoded(self, proto, chunk):
        if self.state != "ok":  # pictures again: the encoder works
            self._set_state("ok")
        self.bytes_out += len(chunk)
        if chunk.picture:
            self.pictures_out += 1
            if self.timings is not None:
                frame = proto.frame_for(chunk.pts, self.framerate)
                if frame is not None:
                    self.timings(frame[0], frame[1], self.reactor.seconds())
        self.sink(chunk)

    def _access_unit(self, proto, access_unit, pts):
        if self.state != "ok":  # pictures again: the encoder works
            self._set_state("ok")
        self.bytes_out += len(access_unit)
        self.pictures_out += 1
        now = self.reactor.seconds()
        if not self.reads_stdin:
            captured_at = now  # ffmpeg read the frame itself: this is what is known
        else:
            captured_at = None
            frame = proto.frame_for(pts, self.framerate)
            if frame is not None:
                captured_at = frame[0]
                if self.timings is not None:
                    self.timings(frame[0], frame[1], now)
        self.sink(access_unit, captured_at)

    # lifecycle
    def startService(self):
        super().startService()
        self._stopping = False
        self._backoff = Backoff(self.first_restart_delay, self.max_restart_delay)
        self._spawn()

    def _spawn(self):
        self._restart_call = None
        proto = FFmpegProtocol(self)
        try:
            # Where Twisted forks (22.4), a missing executable would show only
            # as a child exiting 1; asked first, it is said as what it is.
            if os.path.isabs(self.command[0]) and not os.access(self.command[0], os.X_OK):
                raise OSError(errno.ENOENT if not os.path.exists(self.command[0])
                              else errno.EACCES, "")
            self.reactor.spawnProcess(proto, self.command[0], self.command, env=self.env)
        except Exception as e:
            # The executable gone or replaced (an upgrade), EMFILE, ENOMEM:
            # said, and tried again with the same back-off as a crash.
            why = (e.strerror or (os.strerror(e.errno) if e.errno else "") or str(e)) \
                if isinstance(e, OSError) else str(e)
            why = f"cannot start {self.command[0]}: {why.lower() if why else type(e).__name__}"
            self.log.error("{what}: {why}; trying again in {delay}s", what=self.what, why=why,
                           delay=self._backoff.delay)
            self._set_state("unavailable", why)
            self._schedule_restart()

    def _set_state(self, state, why=None):
        if (state, why) == (self.state, self.why):
            return
        self.state, self.why = state, why
        if self.on_state is not None:
            self.on_state(state, why)

    def _schedule_restart(self):
        self.restarts += 1
        self._restart_call = self.reactor.callLater(self._backoff.next(), self._spawn)

    def _process_started(self, proto):
        self.process = proto
        self.log.info("{what} process: ffmpeg pid {pid}: {command}", what=self.what,
                      pid=proto.transport.pid, command=" ".join(self.command))

    def _process_ended(self, proto, reason):
        if self.process is proto:
            self.process = None
        if self._stopping:
            for timer in self._stop_timers:
                if timer.active():
                    timer.cancel()
            self._stop_timers = []
            if self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        ran = self.reactor.seconds() - (proto.started_at or self.reactor.seconds())
        if ran >= self.healthy_run:
            self._backoff.reset()
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"was killed by signal {sig}" if sig else f"exited with code {code}"
        stderr = proto.stderr_text()
        self.log.error(
            "{what}: ffmpeg {how} after {ran:.1f}s; restarting in {delay}s{stderr}",
            what=self.what,
            how=how, ran=ran, delay=self._backoff.delay,
            stderr=(": " + stderr) if stderr else "",
        )
        last = stderr.strip().splitlines()[-1][:200] if stderr and stderr.strip() else ""
        self._set_state("unavailable", f"ffmpeg {how}" + (f": {last}" if last else ""))
        self._schedule_restart()

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        proto = self.process
        if proto is None:
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        proto.writable = False
        try:
            # The frame producer first: with a paused producer still
            # registered, Twisted's FileDescriptor resumes it when the pipe
            # drains instead of closing, and ffmpeg would never see the end
            # of its input (the stop would wait for SIGKILL).
            proto.transport.unregisterProducer()
            proto.transport.closeStdin()
        except Exception:
            pass
        term_after = self.term_after if self.reads_stdin else 0
        self._stop_timers = [
            self.reactor.callLater(term_after, self._signal, proto, signal.SIGTERM),
            self.reactor.callLater(self.kill_after, self._signal, proto, signal.SIGKILL),
        ]
        return self._stopped

    def _signal(self, proto, signum):
        try:
            proto.transport.signalProcess(signum)
        except error.ProcessExitedAlready:
            pass
