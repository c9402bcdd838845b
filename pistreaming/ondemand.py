"""MPEG-1 on demand: with C{--codec h264}, the MPEG-1 stream for viewers
that cannot play H.264, made only while one of them watches.

Who gets it: the page where the browser has neither WebCodecs nor Media
Source Extensions (it asks for C{/stream?codec=mpeg1} on the HTTP port),
and clients of the original demo on C{--ws-port} (any path).  What they get
is exactly the stream of C{--codec mpeg1}: C{jsmp} + width + height, then
MPEG-TS cut where pictures begin, with the same limits as every viewer
(Host, Origin, password, pending connections, slow and stuck viewers, and
C{--max-viewers} counted over both streams together).

How it is made: an ffmpeg child encodes MPEG-1 with the output arguments
of C{--codec mpeg1} (L{pistreaming.encoder.output_args}), from one of two
inputs.  Where the camera gives a second, smaller stream of raw frames
(picamera2's C{lores}: L{pistreaming.camera.picamera2_source.lores_size}),
from those, at that size (the C{jsmp} header says it; the page's JSMpeg
scales the picture to its canvas), copied out of the camera only while
ffmpeg runs (L{lores_command}):

    camera's lores stream -> (raw YUV420) -> ffmpeg -> (MPEG-TS) -> MPEG-1 fan-out

Otherwise by decoding the daemon's own H.264, at its size
(L{decode_command}):

    H.264 stage -> (access units) -> ffmpeg -> (MPEG-TS) -> MPEG-1 fan-out

A camera with a lores stream says what it is (or that it has none after
all) each time it starts (L{OnDemand.lores_stream}); until the first time,
a viewer's ffmpeg waits.  The raw frames go as C{--codec mpeg1}'s do: one
whole frame in the pipe at most, the others dropped and counted.

It runs only while at least one MPEG-1 viewer is connected: started when
the first arrives, stopped L{STOP_AFTER} seconds after the last leaves (a
viewer who comes back meanwhile keeps it).  A freshly started ffmpeg is
first given what a decoder needs (the H.264 fan-out's start cache: the
latest keyframe and every access unit since), so that its first picture
comes at once rather than at the next keyframe; then each access unit as
it comes.

ffmpeg outputs each picture as soon as its access unit is in (measured:
1-5 ms at 640x480 and 1280x720 on the machine of docs/benchmarks.rst;
without these flags, 100-300 ms).  That takes: no probing beyond the first
bytes (C{-probesize 32 -analyzeduration 0}); the decoder's frame threads
off (C{-flags low_delay}: each thread would hold a picture back); and an
access unit delimiter written right after each access unit, because the
raw H.264 demuxer knows an access unit has ended only when the next one
begins.  (C{-fflags nobuffer} is not used: with it ffmpeg discards what it
read while probing, the keyframe among it.)

Access units go to ffmpeg without blocking the reactor: each is written to
its stdin and Twisted buffers what the pipe does not take.  When ffmpeg
does not keep up (an access unit written L{MAX_BEHIND} seconds ago has not
come out as a picture yet), access units are dropped up to the next
keyframe: a decoder is never given a picture whose reference it did not
get.  (The start cache is written whole even though it fills the pipe: that
is what a decoder needs first.)  ffmpeg that fails is restarted with the
L{pistreaming.encoder.Encoder}'s back-off, and is given the start cache
again.
"""

import collections
import struct

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from pistreaming.broadcast import StreamFactory
from pistreaming.camera.picture import rate_text
from pistreaming.encoder import Encoder, output_args
from pistreaming.frames import stream_header
from pistreaming.h264 import AUD, HEADER, START_CODE
from pistreaming.stats import Window

#: Seconds the encoder runs on after the last MPEG-1 viewer left.
STOP_AFTER = 5.0

#: ffmpeg is behind when an access unit written this many seconds ago has
#: not come out as a picture yet.
MAX_BEHIND = 1.0

#: An access unit delimiter (primary_pic_type 7: any slice type), written
#: after each access unit so that ffmpeg knows at once that it is whole.
DELIMITER = b"\x00\x00\x00\x01\x09\xf0"

#: Access units in ffmpeg whose writing time is remembered, at most.
IN_FLIGHT_LIMIT = 4096

log = Logger(namespace="pistreaming.ondemand")


def decode_command(ffmpeg, framerate, bitrate):
    """The ffmpeg argument list (argv[0] included): H.264 access units on
    stdin, each decoded the moment it is whole, MPEG-1 in MPEG-TS out, as
    C{--codec mpeg1} makes it (same size: nothing is scaled)."""
    return [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error",
        # Read the stream as it comes: no probing past the first bytes (the
        # keyframe's SPS says all), and no frame threads in the decoder.
        "-probesize", "32", "-analyzeduration", "0", "-flags", "low_delay",
        "-f", "h264", "-framerate", rate_text(framerate), "-i", "pipe:0",
        *output_args(framerate, bitrate, codec="mpeg1"),
    ]


def lores_command(ffmpeg, framerate, bitrate, size, stride):
    """The ffmpeg argument list (argv[0] included): raw YUV420 frames of a
    camera's second, smaller stream on stdin, as libcamera lays them out
    (C{size} = (width, height); rows of C{stride} bytes in the Y plane and
    half that in U and V, no padding rows: the layout of yuv420p
    C{stride} pixels wide, whose surplus is cropped), MPEG-1 in MPEG-TS out
    at that size, as C{--codec mpeg1} makes it."""
    width, height = size
    command = [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error",
        # read as the raw frames of --codec mpeg1 are (pistreaming.encoder.raw_input)
        "-f", "rawvideo", "-pix_fmt", "yuv420p", "-video_size", f"{stride}x{height}",
        "-framerate", rate_text(framerate), "-i", "pipe:0",
    ]
    if stride != width:
        command += ["-vf", f"crop={width}:{height}:0:0"]
    return command + output_args(framerate, bitrate, codec="mpeg1")


def decoder_input(message):
    """What ffmpeg is given of one message of the H.264 stream (its flags
    and capture time, then the access unit): the access unit without its
    own delimiter, if it has one, and with one after it (L{DELIMITER})."""
    au = message[HEADER.size:]
    if au.startswith(b"\x00\x00\x00\x01"):
        head = 4
    elif au.startswith(START_CODE):
        head = 3
    else:
        head = None
    if head is not None and len(au) > head and au[head] & 0x1F == AUD:
        following = au.find(START_CODE, head + 1)
        if following > 0:
            au = au[following - 1 if au[following - 1] == 0 else following:]
    return au + DELIMITER


class OnDemandEncoder(Encoder):
    """An L{Encoder} that makes MPEG-1 for viewers that cannot play H.264:
    of the H.264 stream, fed the H.264 fan-out's chunks (L{feed_h264}), or,
    after L{set_input} with a camera's second, smaller stream, of its raw
    frames (L{feed_lores}); it hands MPEG-1 chunks to C{sink}.  It is
    started and stopped by L{OnDemand}, as often as viewers come and go."""

    what = "MPEG-1 on demand"

    def __init__(self, command, sink, reactor, start_cache, framerate=30,
                 request_keyframe=None, on_state=None, max_behind=MAX_BEHIND,
                 lores_command=None):
        """
        @param command: L{decode_command}'s.
        @param lores_command: called with (size, stride) of a camera's
            second, smaller stream, gives the command that encodes its raw
            frames (L{lores_command}, the other arguments given).
        @param sink: called with each L{pistreaming.mpegts.Chunk} of MPEG-1.
        @param start_cache: called with no arguments, gives the H.264
            chunks a decoder needs first (the latest keyframe's and every one
            since), fed to each new ffmpeg before anything else.
        @param request_keyframe: called (no arguments) when ffmpeg waits for
            a keyframe (it fell behind, or started with none to begin at).
        @param max_behind: see L{MAX_BEHIND}.
        """
        super().__init__(command, sink, reactor, framerate=framerate, timings=self._timed,
                         reads_stdin=True, frame_size=None, on_state=on_state, codec="mpeg1")
        self.decode_command = list(command)
        self.lores_command = lores_command
        #: The camera's second, smaller stream, ((width, height), stride),
        #: when that is the input; None: the H.264 is.
        self.lores = None
        #: H.264 access units written to ffmpeg, and dropped (while waiting
        #: for a keyframe, or while it was behind).  (Raw frames count in
        #: C{frames_in} and C{frames_dropped}.)
        self.access_units_in = 0
        self.access_units_dropped = 0
        self.start_cache = start_cache
        self.request_keyframe = request_keyframe
        self.max_behind = max_behind
        #: Whether access units are dropped until the next keyframe.
        self.skipping = True
        #: Why ffmpeg is started next (for the log line), set by L{OnDemand}.
        self.start_reason = None
        #: Seconds from an access unit written to ffmpeg to its MPEG-1
        #: picture out (decoding and encoding), over the last minute.
        self.latency = Window()
        #: Times ffmpeg fell behind (access units dropped to a keyframe).
        self.fell_behind = 0

    def set_input(self, lores=None):
        """What the next ffmpeg started is given: the raw frames of the
        camera's second, smaller stream, C{lores} = ((width, height),
        stride), or with None the H.264 (a running one is not changed)."""
        self.lores = lores
        if lores is None:
            self.command, self.frame_size = list(self.decode_command), None
            return
        (width, height), stride = lores
        self.command = list(self.lores_command((width, height), stride))
        # The pipe is made to hold one whole frame (grow_pipe).
        self.frame_size = stride * height + 2 * (stride // 2) * (height // 2)

    def feed_lores(self, frame, captured_at=None):
        """One raw frame of the camera's second, smaller stream: written to
        ffmpeg if it has taken the last one, else dropped (and counted).
        Ignored unless that stream is the input and ffmpeg runs."""
        if self.lores is None or not self.running:
            return
        self.feed(frame, captured_at)

    def feed_h264(self, chunk):
        """One chunk of the H.264 fan-out (L{pistreaming.h264.H264Stream}'s:
        its data is the stream's message): written to ffmpeg, or dropped
        while waiting for a keyframe.  Ignored while no ffmpeg runs, and
        while the input is a camera's raw frames."""
        proto = self.process
        if proto is None or not proto.writable or self.lores is not None:
            return
        self._write(proto, chunk, self.reactor.seconds())

    def _write(self, proto, chunk, now, starting=False):
        if self.skipping and not chunk.keyframe:
            self.access_units_dropped += 1
            return
        in_flight = proto.in_flight
        if not starting and in_flight and now - in_flight[0][2] > self.max_behind:
            self.access_units_dropped += 1
            if not self.skipping:
                self.skipping = True
                self.fell_behind += 1
                log.warn("MPEG-1 on demand: ffmpeg is {behind:.1f}s behind; dropping H.264 "
                         "pictures until the next keyframe", behind=now - in_flight[0][2])
                if self.request_keyframe is not None:
                    self.request_keyframe()
            return
        self.skipping = False
        data = decoder_input(chunk.data)
        proto.transport.write(data)
        in_flight.append((proto.frames_written, chunk.pts, now))
        proto.frames_written += 1
        if len(in_flight) > IN_FLIGHT_LIMIT:
            in_flight.popleft()
        self.access_units_in += 1
        self.bytes_in += len(data)

    def _timed(self, captured_at, written_at, out_at):
        self.latency.add(out_at, out_at - written_at)

    def _process_started(self, proto):
        self.process = proto
        why = self.start_reason or "restarted after a failure"
        self.start_reason = None
        log.info("MPEG-1 on demand: ffmpeg pid {pid} started ({why}): {command}",
                 pid=proto.transport.pid, why=why, command=" ".join(self.command))
        if self.lores is not None:
            return  # raw frames: each is whole, the next one will do
        # What a decoder needs first, whole, however full the pipe gets.
        proto.in_flight = collections.deque()
        self.skipping = True
        now = self.reactor.seconds()
        for chunk in self.start_cache():
            self._write(proto, chunk, now, starting=True)
        if self.skipping and self.request_keyframe is not None:
            self.request_keyframe()  # nothing to start at: ask for a keyframe


class OnDemandFactory(StreamFactory):
    """The MPEG-1 stream's factory: tells its L{OnDemand} when a viewer
    is added and when one leaves."""

    #: The L{OnDemand} told; set by it.
    on_demand = None

    def add_viewer(self, protocol):
        super().add_viewer(protocol)
        if protocol in self.fanout.viewers and self.on_demand is not None:
            self.on_demand.viewer_added(protocol)

    def remove_viewer(self, protocol):
        watching = protocol in self.fanout.viewers
        super().remove_viewer(protocol)
        if watching and self.on_demand is not None:
            self.on_demand.viewer_left(protocol)


class OnDemand(service.Service):
    """Runs the L{OnDemandEncoder} while the MPEG-1 stream has viewers, on
    the input there is: the H.264, or a camera's second, smaller stream
    (L{expect_lores}, L{lores_stream})."""

    name = "mpeg1-on-demand"

    def __init__(self, encoder, factory, reactor, stop_after=STOP_AFTER):
        """
        @param encoder: the L{OnDemandEncoder}, whose sink is C{factory}'s
            fan-out.
        @param factory: the MPEG-1 stream's L{OnDemandFactory}.
        """
        self.encoder = encoder
        self.factory = factory
        self.fanout = factory.fanout
        self.reactor = reactor
        self.stop_after = stop_after
        factory.on_demand = self
        #: Times the encoder was started for viewers.
        self.starts = 0
        #: What ffmpeg encodes: "h264" (decoded), "lores" (a camera's raw
        #: frames), or None while a camera that may give those has not yet
        #: said whether it does (a viewer's ffmpeg then waits).
        self.input = "h264"
        #: The H.264 pictures' size, when known.
        self.h264_size = None
        #: Called with True when the camera's raw frames are wanted, False
        #: when they are not any more (L{expect_lores}).
        self.want_frames = None
        self._stop_call = None
        self._stopping = None  # a Deferred while ffmpeg is being stopped
        self._next_why = None

    @property
    def encoding(self):
        """Whether the encoder runs (or is starting, or restarting)."""
        return bool(self.encoder.running)

    # viewers
    def viewer_added(self, protocol):
        if not self.running:
            return
        if self._stop_call is not None:
            self._stop_call.cancel()
            self._stop_call = None
        if not self.encoder.running:
            where = ("the page, without an H.264 decoder" if protocol.via_http_port
                     else "an MPEG-1 client on the stream's own port")
            self._start(f"viewer {protocol.peer} needs MPEG-1: {where}")

    def viewer_left(self, protocol):
        if not self.running or self.fanout.viewers:
            return
        if self.encoder.running and self._stop_call is None:
            self._stop_call = self.reactor.callLater(self.stop_after, self._idle)

    def _idle(self):
        self._stop_call = None
        if not self.fanout.viewers:
            self._stop(f"no MPEG-1 viewer for {self.stop_after:g}s")

    # the input
    def expect_lores(self, size, want_frames):
        """The camera may give a second, smaller stream of C{size} (width,
        height): the MPEG-1 stream's header says that size at once, and no
        ffmpeg starts until the camera says what it gives
        (L{lores_stream}).  C{want_frames} is called with True when its
        frames are wanted (ffmpeg starts), with False when they are not any
        more (ffmpeg stops)."""
        self.input = None
        self.want_frames = want_frames
        self._set_header(*size)

    def lores_stream(self, size, stride):
        """What the camera gives (each time it starts): a second, smaller
        stream of C{size} (width, height), C{stride} bytes a row of its Y
        plane; or, with None, none after all (then the H.264 is decoded).
        A running ffmpeg whose input changes is started again."""
        lores = ((tuple(size), stride) if size is not None else None)
        kind = "lores" if lores is not None else "h264"
        if kind == self.input and lores == self.encoder.lores:
            return
        self.input = kind
        self.encoder.set_input(lores)
        if lores is not None:
            why = "the camera's second, smaller stream, {}x{}".format(*size)
            self._set_header(*size)
        else:
            why = "the H.264, decoded"
            if self.h264_size is not None:
                self._set_header(*self.h264_size)
        log.info("MPEG-1 on demand: made of {what}", what=why)
        self._input_changed(f"made of {why} now")

    def lores_frame(self, frame, captured_at):
        """One raw frame of the camera's second, smaller stream."""
        self.encoder.feed_lores(frame, captured_at)

    def _input_changed(self, why):
        """The input or the size changed: a running ffmpeg is started again
        (it cannot change either), and a viewer waiting for the input gets
        one."""
        if self.encoder.running and self._stopping is None:
            self._next_why = why
            self._stop(why)
        elif self.running and self.fanout.viewers and not self.encoder.running:
            self._start(self._next_why or "an MPEG-1 viewer is watching")

    @property
    def size(self):
        """The MPEG-1 pictures' size, as the stream's header says it."""
        header = self.fanout.header
        if header is None or len(header) != 8:
            return None
        return struct.unpack(">HH", header[4:])

    def _set_header(self, width, height):
        header = stream_header(width, height)
        if header != self.fanout.header:
            self.fanout.set_header(header)

    # the encoder
    def _start(self, why):
        if self._stopping is not None or self.input is None:
            # started again once the last one is gone, or once the camera
            # has said what it gives
            self._next_why = why
            return
        self._next_why = None
        self.starts += 1
        if self.input == "lores" and self.want_frames is not None:
            self.want_frames(True)
        self.encoder.start_reason = why
        self.encoder.startService()

    def _stop(self, why):
        encoder = self.encoder
        if self.want_frames is not None:
            self.want_frames(False)
        if not encoder.running:
            return defer.succeed(None)
        process = encoder.process
        log.info("MPEG-1 on demand: stopping ffmpeg{pid} ({why})",
                 pid=f" pid {process.transport.pid}" if process is not None else "", why=why)
        stopping = self._stopping = encoder.stopService()
        stopping.addCallback(self._stopped)
        return stopping

    def _stopped(self, _):
        self._stopping = None
        log.info("MPEG-1 on demand: ffmpeg has stopped")
        # Its pictures are of no use to the next run's viewers.
        self.fanout.start_cache.reset()
        why, self._next_why = self._next_why, None
        if self.running and self.fanout.viewers:
            self._start(why or "an MPEG-1 viewer is watching")

    def set_size(self, width, height):
        """The H.264 pictures are C{width}x{height} (again, or now).  When
        they are what ffmpeg decodes, the MPEG-1 stream's header says so,
        and a running ffmpeg, whose MPEG-1 encoder cannot change its size,
        is started again."""
        self.h264_size = (width, height)
        if self.input != "h264" or stream_header(width, height) == self.fanout.header:
            return
        self._set_header(width, height)
        self._input_changed(f"the pictures are {width}x{height} now")

    # the service
    def stopService(self):
        super().stopService()
        if self._stop_call is not None:
            self._stop_call.cancel()
            self._stop_call = None
        if self._stopping is not None:
            done = defer.Deferred()
            self._stopping.addBoth(lambda result: done.callback(None))
            return done
        return self._stop("the daemon stops")

    # figures
    def figures(self, now):
        """For /stats.json (and /metrics): whether it runs, its viewers,
        starts, restarts, pictures."""
        encoder = self.encoder
        process = encoder.process
        size = self.size
        return {
            "running": self.encoding,
            "state": encoder.state if self.encoding else "stopped",
            "why": encoder.why if self.encoding else None,
            "pid": process.transport.pid if process is not None else None,
            "viewers": len(self.fanout.viewers),
            "viewers_total": self.fanout.viewers_total,
            "turned_away": self.factory.turned_away,
            "starts": self.starts,
            "restarts": encoder.restarts,
            "input": self.input,
            "width": size[0] if size else None,
            "height": size[1] if size else None,
            "access_units_in": encoder.access_units_in,
            "access_units_dropped": encoder.access_units_dropped,
            "frames_in": encoder.frames_in,
            "frames_dropped": encoder.frames_dropped,
            "fell_behind": encoder.fell_behind,
            "pictures_out": encoder.pictures_out,
            "bytes_out": encoder.bytes_out,
            "bytes_sent": self.fanout.bytes_sent,
            "skips": self.fanout.skips,
            "latency_ms": encoder.latency.summary(now, 1000),
        }
