"""The encoder: real ffmpeg under a ProcessProtocol."""

import fcntl
import os
import random
import signal
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pistreaming import encoder
from pistreaming.camera.testpattern import TestPattern
from pistreaming.encoder import Encoder, ffmpeg_command
from pistreaming.mpegts import TSPacketizer
from pistreaming.frames import FrameGeometry
from pistreaming.options import find_ffmpeg
from tests.helpers import wait_until, with_timeout

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


def frames(geometry, count, start=0):
    pattern = TestPattern(geometry.width, geometry.height, 24)
    return [pattern.render(start + i, time.time()) for i in range(count)]


def stopped(pid):
    """Whether every thread of C{pid} has stopped (a signal takes effect when
    the thread next runs: a read it was in finishes first)."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return all(state in ("T", "t") for state in states)


def process_exists(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class EncoderTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.geometry = FrameGeometry(320, 240)
        self.chunks = []
        self.encoder = Encoder(
            ffmpeg_command(FFMPEG, self.geometry, 24, 400_000),
            lambda chunk: self.chunks.append(chunk.data), reactor, framerate=24,
            frame_size=self.geometry.frame_size)
        self.encoder.first_restart_delay = 0.1
        self.encoder.startService()
        self.addCleanup(self.stop_encoder)
        self.frames = frames(self.geometry, 24)
        return wait_until(lambda: self.encoder.process is not None, 10, what="ffmpeg start")

    def stop_encoder(self):
        if self.encoder.running:
            return with_timeout(self.encoder.stopService(), 5, "encoder stop")

    def feed_until_output(self, timeout=10):
        """Feed a frame every 1/24 s until ffmpeg has produced some output."""
        before = len(self.chunks)
        frames = iter(self.frames * 100)

        def more():
            self.encoder.feed(next(frames))
            return len(self.chunks) > before

        return wait_until(more, timeout, interval=1 / 24, what="encoded output")

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
        yield wait_until(lambda: self.encoder.pictures_out == self.encoder.frames_in, 5,
                         what="every frame fed so far to come out")
        for number in range(5):
            before = self.encoder.pictures_out
            self.encoder.feed(self.frames[number])
            # Nothing else is fed: ffmpeg must not hold the picture back
            # until the next frame arrives (MPEG-1's low_delay).
            yield wait_until(lambda: self.encoder.pictures_out == before + 1, 5,
                             what=f"picture {number} out on its own")

    @defer.inlineCallbacks
    def test_killed_ffmpeg_is_restarted_and_output_resumes(self):
        yield self.feed_until_output()
        first = self.encoder.process.transport.pid
        os.kill(first, signal.SIGKILL)
        yield wait_until(lambda: self.encoder.process is not None
                         and self.encoder.process.transport.pid != first,
                         5, what="a new ffmpeg")
        assert self.encoder.restarts == 1
        assert not process_exists(first)
        del self.chunks[:]
        yield self.feed_until_output()
        assert b"\x00\x00\x01\xb3" in b"".join(self.chunks)

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
        yield wait_until(lambda: not process.paused and encoder.unread(pipe) == 0, 5,
                         what="ffmpeg to have read every frame")
        pid = process.transport.pid
        os.kill(pid, signal.SIGSTOP)
        yield wait_until(lambda: stopped(pid), 5, what="ffmpeg to stop")
        try:
            taken = self.encoder.frames_in
            self.encoder.feed(self.frames[0])
            assert self.encoder.frames_in - taken == 1
            yield wait_until(lambda: not self.encoder.process.paused, 5,
                             what="the frame in the pipe")
            for frame in self.frames:
                self.encoder.feed(frame)
            assert self.encoder.frames_in - taken == 1
        finally:
            os.kill(pid, signal.SIGCONT)
        yield self.feed_until_output()

    @defer.inlineCallbacks
    def test_stop_reaps_ffmpeg_quickly(self):
        yield self.feed_until_output()
        pid = self.encoder.process.transport.pid
        started = reactor.seconds()
        yield with_timeout(self.encoder.stopService(), 3, "encoder stop")
        assert reactor.seconds() - started < 2
        assert not process_exists(pid)
        assert self.encoder.restarts == 0

    @defer.inlineCallbacks
    def test_stop_of_a_stuck_ffmpeg_ends_in_sigkill(self):
        yield self.feed_until_output()
        pid = self.encoder.process.transport.pid
        os.kill(pid, signal.SIGSTOP)  # ignores stdin EOF and SIGTERM until killed
        started = reactor.seconds()
        yield with_timeout(self.encoder.stopService(), 4, "encoder stop")
        assert reactor.seconds() - started < 2
        assert not process_exists(pid)


class SelfReadingEncoderTests(unittest.TestCase):
    """An ffmpeg that reads its input itself (a device, a file) streams with no
    frames fed, and stops at once: SIGTERM without waiting for end-of-input."""

    timeout = 30

    @defer.inlineCallbacks
    def test_output_without_feeding_and_a_prompt_stop(self):
        geometry = FrameGeometry(320, 240)
        chunks = []
        source = (["-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"], ["null"])
        encoder = Encoder(ffmpeg_command(FFMPEG, geometry, 25, 400_000, source),
                          lambda chunk: chunks.append(chunk.data), reactor,
                          framerate=25, reads_stdin=False)
        encoder.startService()
        self.addCleanup(lambda: encoder.running and encoder.stopService())
        yield wait_until(lambda: b"\x00\x00\x01\xb3" in b"".join(chunks), 10,
                         what="encoded output")
        pid = encoder.process.transport.pid
        started = reactor.seconds()
        yield with_timeout(encoder.stopService(), 3, "encoder stop")
        assert reactor.seconds() - started < encoder.term_after
        assert not process_exists(pid)
        assert encoder.frames_in == 0 and encoder.restarts == 0


class FailingEncoderTests(unittest.TestCase):
    """An ffmpeg that fails at once: its error output is logged, and restarts back off."""

    timeout = 30

    @defer.inlineCallbacks
    def test_error_output_is_logged_and_restarts_back_off(self):
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        encoder = Encoder(
            ["/bin/sh", "-c", "echo 'Unknown encoder mpeg1video_x' >&2; exit 3"],
            lambda chunk: None, reactor)
        encoder.first_restart_delay = 0.05
        encoder.startService()
        self.addCleanup(lambda: encoder.running and encoder.stopService())
        yield wait_until(lambda: encoder.restarts >= 4, 10, what="four restarts")
        yield with_timeout(encoder.stopService(), 3, "encoder stop")
        failures = [e for e in events if e.get("log_namespace", "").endswith("Encoder")
                    and "how" in e]
        assert len(failures) >= 4
        assert failures[0]["how"] == "exited with code 3"
        assert failures[0]["stderr"] == ": Unknown encoder mpeg1video_x"
        delays = [e["delay"] for e in failures[:4]]
        assert delays == [0.05, 0.1, 0.2, 0.4]


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
