"""The encoder: its restarts and stops on a Clock with a recording
spawnProcess, and real ffmpeg under its ProcessProtocol for what only ffmpeg
can show (packet cutting, each picture out at once, dropping while it is
stuck, stops that reap it)."""

import fcntl
import os
import random
import signal
import threading

from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from pistreaming import encoder
from pistreaming.encoder import Encoder, ffmpeg_command
from pistreaming.mpegts import TSPacketizer
from pistreaming.frames import FrameGeometry
from pistreaming.options import find_ffmpeg
from pistreaming.mpegts import Chunk
from tests.fakes.inmemory import SpawningReactor
from tests.helpers import Arrivals, Events, with_timeout

FFMPEG = find_ffmpeg("ffmpeg")


class CommandTests(unittest.TestCase):
    def test_padded_input_is_cropped_to_the_picture(self):
        command = ffmpeg_command("/usr/bin/ffmpeg", FrameGeometry(800, 600), 24, 800_000)
        assert command[0] == "/usr/bin/ffmpeg"
        joined = " ".join(command)
        assert "-f rawvideo -pix_fmt yuv420p -video_size 800x608 -framerate 24/1" in joined
        assert "-i pipe:0 -vf crop=800:600:0:0" in joined
        assert "-c:v mpeg1video -b:v 800000 -bf 0 -g 24" in joined
        assert command[-11:] == ["-f", "mpegts", "-muxdelay", "0", "-muxpreload", "0",
                                 "-flush_packets", "1", "-omit_video_pes_length", "0",
                                 "pipe:1"]
        # no B-frames, and MPEG-1's low_delay (which ffmpeg gates behind
        # -strict unofficial): no picture waits for the next frame
        assert "-bf 0" in joined and "-flags low_delay -strict unofficial" in joined

    def test_the_raw_path_command_in_full(self):
        # Sources that ffmpeg reads itself change the input half only; the
        # raw path's command stays exactly this.
        assert ffmpeg_command("/usr/bin/ffmpeg", FrameGeometry(1296, 730), 15, 1_000_000) == [
            "/usr/bin/ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "yuv420p", "-video_size", "1312x736",
            "-framerate", "15/1", "-i", "pipe:0",
            "-vf", "crop=1296:730:0:0",
            "-c:v", "mpeg1video", "-b:v", "1000000", "-bf", "0", "-g", "15",
            "-flags", "low_delay", "-strict", "unofficial",
            "-f", "mpegts", "-muxdelay", "0", "-muxpreload", "0", "-flush_packets", "1",
            "-omit_video_pes_length", "0",
            "pipe:1",
        ]

    def test_low_rates_need_ffmpegs_unofficial_mpeg1_rates(self):
        command = ffmpeg_command("ffmpeg", FrameGeometry(640, 480), 15, 800_000)
        assert command[command.index("-strict") + 1] == "unofficial"


class PacketizerTests(unittest.TestCase):
    def test_output_is_cut_on_188_byte_packet_boundaries(self):
        rng = random.Random(7)
        stream = bytes(rng.randrange(256) for _ in range(188 * 50 + 77))
        packetizer = TSPacketizer()
        out = []
        pos = 0
        while pos < len(stream):
            step = rng.randrange(1, 700)
            chunk = packetizer.feed(stream[pos:pos + step])
            pos += step
            assert len(chunk) % 188 == 0
            out.append(chunk)
        assert b"".join(out) == stream[:188 * 50]


def frames(geometry, count):
    """C{count} raw YUV420 frames of C{geometry}: diagonal stripes that move
    from frame to frame (any picture does for the encoder)."""
    width, height = geometry.padded_width, geometry.padded_height
    chroma = bytes([128]) * (geometry.frame_size - width * height)
    pictures = []
    for i in range(count):
        rows = b"".join(bytes((x + y + 8 * i) & 0xFF for x in range(width))
                        for y in range(0, 256))
        luma = (rows * (height // 256 + 1))[:width * height]
        pictures.append(luma + chroma)
    return pictures


def stopped(pid, timeout):
    """A Deferred that fires once every thread of our child C{pid} has
    stopped (SIGSTOP takes effect when each thread next runs: a read it was
    in finishes first), as the kernel tells its parent (waitid, on a thread
    of its own); it fails after C{timeout} seconds."""
    d = defer.Deferred()

    def wait():
        try:
            os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)
        except OSError as e:
            reactor.callFromThread(d.errback, e)
        else:
            reactor.callFromThread(d.callback, None)

    threading.Thread(target=wait, name="waitid", daemon=True).start()
    return with_timeout(d, timeout, f"ffmpeg (pid {pid}) to stop")


def on_resume(proto, events):
    """Tells C{events} each time the transport resumes C{proto}, the
    producer of ffmpeg's stdin (it has handed the last frame to the pipe)."""
    real = proto.resumeProducing

    def resumeProducing():
        real()
        events.notify()

    proto.resumeProducing = resumeProducing


def process_exists(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class EncoderTests(unittest.TestCase):
    """Real ffmpeg.  Each wait resumes when what it waits for happens (ffmpeg's
    output, stdin's producer resumed, ffmpeg stopped), bounded; the stop
    schedule itself is tested on a Clock below."""

    timeout = 60

    def setUp(self):
        self.geometry = FrameGeometry(320, 240)
        self.chunks = Arrivals()
        self.encoder = Encoder(
            ffmpeg_command(FFMPEG, self.geometry, 24, 400_000),
            lambda chunk: self.chunks.append(chunk.data), reactor, framerate=24,
            frame_size=self.geometry.frame_size)
        # The stop's schedule is tested on a Clock (StopScheduleTests); these
        # tests do not wait the daemon's delays.
        self.encoder.term_after, self.encoder.kill_after = 0.01, 0.05
        self.encoder.startService()
        self.addCleanup(self.stop_encoder)
        self.frames = frames(self.geometry, 24)
        # spawnProcess starts the child before it returns
        assert self.encoder.process is not None

    def stop_encoder(self):
        if self.encoder.running:
            return with_timeout(self.encoder.stopService(), 5, "encoder stop")

    def feed_until_output(self, timeout=10):
        """Offer a frame (ffmpeg takes it if it has read the last), and wait
        for ffmpeg's next output: each picture comes out on its own."""
        before = len(self.chunks)
        self.encoder.feed(self.frames[0])
        return self.chunks.until(lambda: len(self.chunks) > before, timeout, "encoded output")

    def all_out(self, timeout=5):
        """Wait until every frame fed so far has come out as a picture: ffmpeg
        has read them all, so the transport has handed them all to the pipe
        (and resumed its producer) before."""
        return self.chunks.until(lambda: self.encoder.pictures_out == self.encoder.frames_in,
                                 timeout, "every frame fed so far to come out")

    @defer.inlineCallbacks
    def test_frames_come_out_as_mpeg_ts(self):
        yield self.feed_until_output()
        data = b"".join(self.chunks)
        assert all(len(c) % 188 == 0 for c in self.chunks)
        assert all(data[i] == 0x47 for i in range(0, len(data), 188))
        # An MPEG-1 sequence header (00 00 01 B3) starts the video.
        assert b"\x00\x00\x01\xb3" in data
        assert self.encoder.frames_in > 0
        assert self.encoder.bytes_out == len(data)

    @defer.inlineCallbacks
    def test_each_picture_comes_out_without_waiting_for_the_next_frame(self):
        yield self.feed_until_output()
        yield self.all_out()
        for number in range(5):
            before = self.encoder.pictures_out
            assert not self.encoder.process.paused  # ready for a frame
            taken = self.encoder.frames_in
            self.encoder.feed(self.frames[number])
            assert self.encoder.frames_in == taken + 1
            # Nothing else is fed: ffmpeg must not hold the picture back
            # until the next frame arrives (MPEG-1's low_delay).
            yield self.chunks.until(lambda: self.encoder.pictures_out == before + 1, 5,
                                    f"picture {number} out on its own")

    @defer.inlineCallbacks
    def test_frames_are_dropped_not_queued_while_ffmpeg_is_stuck(self):
        yield self.feed_until_output()
        pid = self.encoder.process.transport.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            dropped = self.encoder.frames_dropped
            taken = self.encoder.frames_in
            for frame in self.frames * 5:  # 120 frames, ~14 MB
                self.encoder.feed(frame)
            # Every frame taken is written to the pipe at once, so frames_in
            # bounds what waits in memory: at most the frame being written.
            assert self.encoder.frames_in - taken <= 2
            assert self.encoder.frames_dropped - dropped >= 118
        finally:
            os.kill(pid, signal.SIGCONT)
        yield self.feed_until_output()

    def test_the_pipe_to_ffmpeg_holds_a_whole_frame(self):
        pipe = self.encoder.process.transport.pipes[0].fileno()
        assert fcntl.fcntl(pipe, F_GETPIPE_SZ) >= self.geometry.frame_size

    @defer.inlineCallbacks
    def test_a_frame_ffmpeg_has_not_read_keeps_the_next_ones_out(self):
        # The pipe holds a whole frame, so the transport has written the last
        # one long before ffmpeg has read it: frames wait for ffmpeg to read
        # it, not for the pipe, or they would queue up in the pipe.
        yield self.feed_until_output()
        process = self.encoder.process
        pipe = process.transport.pipes[0].fileno()
        yield self.all_out()
        assert not process.paused and encoder.unread(pipe) == 0  # ffmpeg read every frame
        resumed = Events()
        on_resume(process, resumed)
        pid = process.transport.pid
        os.kill(pid, signal.SIGSTOP)
        yield stopped(pid, 5)
        try:
            taken = self.encoder.frames_in
            self.encoder.feed(self.frames[0])
            assert self.encoder.frames_in - taken == 1
            yield resumed.until(lambda: not process.paused, 5, "the frame in the pipe")
            for frame in self.frames:
                self.encoder.feed(frame)
            assert self.encoder.frames_in - taken == 1
        finally:
            os.kill(pid, signal.SIGCONT)
        yield self.feed_until_output()

    @defer.inlineCallbacks
    def test_stop_reaps_ffmpeg(self):
        yield self.feed_until_output()
        pid = self.encoder.process.transport.pid
        yield with_timeout(self.encoder.stopService(), 5, "encoder stop")
        assert not process_exists(pid)
        assert self.encoder.restarts == 0

    @defer.inlineCallbacks
    def test_closing_its_input_ends_ffmpeg_without_a_signal(self):
        yield self.feed_until_output()
        pid = self.encoder.process.transport.pid
        signals = []
        self.patch(self.encoder, "_signal", lambda proto, signum: signals.append(signum))
        # no signal comes for a minute: only the end of its input can end it
        self.encoder.term_after, self.encoder.kill_after = 60, 61
        # a frame on its way to ffmpeg when the daemon stops, as is usual
        yield self.all_out()
        assert not self.encoder.process.paused  # ready for a frame
        taken = self.encoder.frames_in
        self.encoder.feed(self.frames[0])
        assert self.encoder.frames_in == taken + 1
        done = self.encoder.stopService()
        try:
            yield with_timeout(done, 10, "ffmpeg to end at the end of its input")
        finally:
            if pid is not None and process_exists(pid):
                os.kill(pid, signal.SIGKILL)
                yield with_timeout(done, 5, "encoder stop")
        assert signals == []
        assert not process_exists(pid)


    @defer.inlineCallbacks
    def test_stop_of_a_stuck_ffmpeg_ends_in_sigkill(self):
        yield self.feed_until_output()
        pid = self.encoder.process.transport.pid
        os.kill(pid, signal.SIGSTOP)  # ignores stdin EOF and SIGTERM until killed
        yield with_timeout(self.encoder.stopService(), 5, "encoder stop")
        assert not process_exists(pid)


class SelfReadingEncoderTests(unittest.TestCase):
    """An ffmpeg that reads its input itself (a device, a file) streams with no
    frames fed, and stops at once: SIGTERM without waiting for end-of-input."""

    timeout = 30

    @defer.inlineCallbacks
    def test_output_without_feeding_and_a_prompt_stop(self):
        geometry = FrameGeometry(320, 240)
        chunks = Arrivals()
        source = (["-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"], ["null"])
        encoder = Encoder(ffmpeg_command(FFMPEG, geometry, 25, 400_000, source),
                          lambda chunk: chunks.append(chunk.data), reactor,
                          framerate=25, reads_stdin=False)
        encoder.startService()
        self.addCleanup(lambda: encoder.running and encoder.stopService())
        yield chunks.until(lambda: b"\x00\x00\x01\xb3" in b"".join(chunks), 10,
                           "encoded output")
        pid = encoder.process.transport.pid
        # SIGKILL would come only after kill_after: SIGTERM (sent at once)
        # must be what ends it.
        signals = []
        real = encoder._signal
        self.patch(encoder, "_signal", lambda proto, signum: (signals.append(signum),
                                                              real(proto, signum)))
        yield with_timeout(encoder.stopService(), 5, "encoder stop")
        assert signals == [signal.SIGTERM]
        assert not process_exists(pid)
        assert encoder.frames_in == 0 and encoder.restarts == 0


#: A moment, exact in binary (so that times add up to the delays exactly).
TICK = 1 / 1024


def picture_packet(keyframe=True):
    """One TS packet holding a whole (tiny) picture's PES packet, as ffmpeg
    writes them (with its length), so that it comes out as a chunk at once."""
    es = (b"\x00\x00\x01\xb3" if keyframe else b"\x00\x00\x01\x00").ljust(184 - 14, b"\xff")
    pes = b"\x00\x00\x01\xe0" + (184 - 6).to_bytes(2, "big") + b"\x80\x80\x05" \
        + b"\x21\x00\x01\x00\x01" + es
    return b"\x47\x41\x00\x10" + pes


def logged(events):
    def observer(event):
        if event.get("log_namespace", "").startswith("pistreaming"):
            events.append(event)
    return observer


class ClockCase(unittest.TestCase):
    """An Encoder on a MemoryReactorClock whose spawnProcess only records."""

    def setUp(self):
        self.reactor = SpawningReactor()
        self.chunks = []
        self.states = []
        self.events = []
        observer = logged(self.events)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def make(self, command=("/usr/bin/ffmpeg", "-i", "-"), **kwargs):
        self.encoder = Encoder(list(command), self.chunks.append, self.reactor,
                               on_state=lambda state, why: self.states.append((state, why)),
                               **kwargs)
        return self.encoder

    def process(self, n=-1):
        proto, _, _, transport = self.reactor.spawned[n]
        return proto, transport

    def crash(self, stderr=b"", **how):
        proto, transport = self.process()
        proto.errReceived(stderr)
        transport.end(Failure(ProcessTerminated(**how)))

    def failures(self):
        return [e for e in self.events if "how" in e]

    def next_restart(self):
        """Seconds until the pending restart."""
        (call,) = self.reactor.getDelayedCalls()
        return call.getTime() - self.reactor.seconds()


class RestartTests(ClockCase):
    def test_error_output_is_logged_and_restarts_back_off(self):
        encoder = self.make(["/bin/sh", "-c", "exit 3"])
        encoder.startService()
        delays = []
        for attempt in range(8):
            self.crash(b"[mpeg1video @ 0x1] bad things\nUnknown encoder mpeg1video_x\n",
                       exitCode=3)
            delays.append(self.next_restart())
            self.reactor.advance(delays[-1] - TICK)
            assert len(self.reactor.spawned) == attempt + 1
            self.reactor.advance(TICK)
            assert len(self.reactor.spawned) == attempt + 2
        assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
        assert encoder.restarts == 8
        first = self.failures()[0]
        assert first["how"] == "exited with code 3"
        assert first["stderr"] == ": [mpeg1video @ 0x1] bad things\nUnknown encoder mpeg1video_x"
        assert first["delay"] == 0.25
        # viewers are told the last line
        assert self.states[0] == ("unavailable",
                                  "ffmpeg exited with code 3: Unknown encoder mpeg1video_x")

    def test_a_killed_ffmpeg_is_restarted_and_output_resumes(self):
        encoder = self.make()
        encoder.startService()
        first, _ = self.process()
        assert encoder.process is first
        first.outReceived(picture_packet())
        assert len(self.chunks) == 1 and self.states == [("ok", None)]
        self.reactor.advance(3.0)
        self.crash(signal=signal.SIGKILL)
        assert encoder.process is None
        assert self.failures()[-1]["how"] == f"was killed by signal {int(signal.SIGKILL)}"
        assert self.states[1:] == [
            ("unavailable", f"ffmpeg was killed by signal {int(signal.SIGKILL)}")]
        # frames offered meanwhile are dropped
        encoder.feed(b"frame")
        assert (encoder.frames_in, encoder.frames_dropped) == (0, 1)
        self.reactor.advance(0.25)
        second, transport = self.process()
        assert second is not first and encoder.process is second
        assert encoder.restarts == 1
        encoder.feed(b"frame")
        assert transport.written == [b"frame"] and encoder.frames_in == 1
        # what the new ffmpeg writes reaches the sink
        second.outReceived(picture_packet())
        assert len(self.chunks) == 2 and self.states[-1] == ("ok", None)

    def test_a_run_that_lasted_starts_the_back_off_over(self):
        encoder = self.make()
        encoder.startService()
        for _ in range(4):
            self.crash(exitCode=1)
            self.reactor.advance(self.next_restart())
        assert encoder.restarts == 4
        self.crash(exitCode=1)
        assert self.next_restart() == 4.0
        self.reactor.advance(4.0)
        self.reactor.advance(10.0 - TICK)  # not quite a healthy run (healthy_run)
        self.crash(exitCode=1)
        assert self.next_restart() == 8.0
        self.reactor.advance(8.0)
        self.reactor.advance(10.0)
        self.crash(exitCode=1)
        assert self.next_restart() == 0.25


class StopScheduleTests(ClockCase):
    def test_stdin_is_closed_at_once_then_sigterm_then_sigkill(self):
        encoder = self.make()
        encoder.startService()
        proto, transport = self.process()
        stopped = []
        encoder.stopService().addCallback(stopped.append)
        assert transport.stdin_closed and transport.signals == []
        assert not proto.writable  # no frame goes to a stopping ffmpeg
        # SIGTERM after 0.8 s (term_after), SIGKILL after 1.4 s (kill_after)
        self.reactor.advance(0.8 - TICK)
        assert transport.signals == []
        self.reactor.advance(TICK)
        assert transport.signals == [signal.SIGTERM]
        self.reactor.advance(0.6 - TICK)
        assert transport.signals == [signal.SIGTERM]
        self.reactor.advance(TICK)
        assert transport.signals == [signal.SIGTERM, signal.SIGKILL]
        assert stopped == []  # until it has ended
        transport.end(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        assert stopped == [None]
        assert encoder.restarts == 0 and len(self.reactor.spawned) == 1
        assert not self.reactor.getDelayedCalls()

    def test_an_ffmpeg_that_ends_at_the_end_of_its_input_gets_no_signal(self):
        encoder = self.make()
        encoder.startService()
        _, transport = self.process()
        stopped = []
        encoder.stopService().addCallback(stopped.append)
        self.reactor.advance(0.1)
        transport.end(Failure(ProcessDone(0)))
        assert stopped == [None]
        self.reactor.advance(10)
        assert transport.signals == [] and len(self.reactor.spawned) == 1
        assert not self.reactor.getDelayedCalls()

    def test_an_ffmpeg_reading_its_own_input_gets_sigterm_at_once(self):
        encoder = self.make(reads_stdin=False)
        encoder.startService()
        _, transport = self.process()
        stopped = []
        encoder.stopService().addCallback(stopped.append)
        self.reactor.advance(0)
        assert transport.signals == [signal.SIGTERM]
        transport.end(Failure(ProcessTerminated(signal=signal.SIGTERM)))
        assert stopped == [None]
        assert not self.reactor.getDelayedCalls()


F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def test_a_pipe_grows_to_a_frame_or_as_far_as_the_system_lets_it(monkeypatch, tmp_path):
    read, write = os.pipe()
    try:
        assert encoder.grow_pipe(write, 300_000) >= 300_000
        # Past /proc/sys/fs/pipe-max-size an unprivileged process is refused:
        # it gets the most it may have.
        limit = tmp_path / "pipe-max-size"
        limit.write_text("131072\n")
        monkeypatch.setattr(encoder, "PIPE_MAX_SIZE", str(limit))
        real = fcntl.fcntl

        def unprivileged(fd, command, size):
            if size > 131072:
                raise PermissionError(1, "Operation not permitted")
            return real(fd, command, size)

        monkeypatch.setattr(encoder.fcntl, "fcntl", unprivileged)
        assert encoder.grow_pipe(write, 2_000_000) == 131072
    finally:
        os.close(read)
        os.close(write)
