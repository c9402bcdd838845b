"""The recorder (pistreaming.recorder), in-process: segment names, the
keep and floor policy, segments cut at keyframes after their length, what
its ffmpeg is given (pistreaming.tsmux: the H.264 access units with their
capture times), a slow or failing ffmpeg, and stopping.

No ffmpeg runs here but one (tsmux's output read by ffprobe): the
recorder's children are a SpawningReactor's records, its disk a FakeDisk,
its thread a SyncPool, and time passes when the test says.  The real
thing, on a real disk, is tests/test_recording_daemon.py."""

import errno
import json
import signal
import subprocess

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from pistreaming.h264 import access_units, frame_message, is_idr, parse_message
from pistreaming.mpegts import PESAssembler, Chunk
from pistreaming.recorder import (
    FAILING, FLOOR_MAX, RECORDING, STARTING, STOPPED, Recorder, Scan, floor_bytes, keep_bytes,
    record_command, segment_name, segment_order, segment_start, to_delete)
from pistreaming.tsmux import FIRST_PTS, H264Muxer
from tests.fakes.inmemory import SpawningReactor, SyncPool

#: 2026-12-05T10:20:30Z, and a little.
START = 1796466030.25
SPS = b"\x00\x00\x00\x01\x67\x64\x00\x1e\xac\xd9\x40\xa0"
PPS = b"\x00\x00\x00\x01\x68\xeb\xe3\xcb"
MB = 10 ** 6


def h264_chunk(keyframe, captured_at, sps=SPS, size=500):
    au = (b"\x00\x00\x00\x01\x09\xf0" + (sps + PPS if keyframe else b"")
          + b"\x00\x00\x00\x01" + (b"\x65\x88" if keyframe else b"\x41\x9a") + b"\x42" * size)
    return Chunk(frame_message(au, keyframe, captured_at), picture=True, keyframe=keyframe,
                 pts=captured_at)


def mpeg1_chunk(keyframe, pts, size=500):
    return Chunk(b"\x47" + b"\x00" * 187 * 1 + b"\x47" + bytes(size % 187),
                 picture=True, keyframe=keyframe, pts=pts)


class FakeDisk:
    """The recordings' directory: files (name -> size, mtime) and free space."""

    def __init__(self, free=100 * MB, total=1000 * MB, files=None):
        self.free = free
        self.total = total
        self.files = dict(files or {})
        self.deleted = []
        self.error = None
        #: Called at each scan: the files the recorder's ffmpegs write.
        self.written = dict

    def scan(self, directory):
        if self.error is not None:
            raise self.error
        for name, size in self.written().items():
            if name not in self.deleted:
                self.files[name] = (size, self.files.get(name, (0, 0))[1])
        return Scan(sorted(((n, s, m) for n, (s, m) in self.files.items()),
                           key=lambda r: segment_order(r[0])), self.free, self.total)

    def space(self, directory):
        if self.error is not None:
            raise self.error
        return self.free, self.total

    def delete(self, directory, names):
        for name in names:
            self.files.pop(name, None)
        self.deleted.extend(names)
        return list(names), []


class Rig:
    """A recorder on a clock, fed pictures as a camera would make them."""

    def __init__(self, codec="h264", segment=2.0, keep=("bytes", 500 * MB), disk=None,
                 framerate=24):
        self.reactor = SpawningReactor()
        self.reactor.advance(START)
        self.disk = disk if disk is not None else FakeDisk()
        self.states = []
        self.framerate = framerate
        self.codec = codec
        self.recorder = Recorder(
            "/recordings", codec, lambda path: record_command("/bin/true", codec, path),
            self.reactor, segment_length=segment, keep=keep, framerate=framerate,
            on_state=lambda state, why: self.states.append((state, why)), pool=SyncPool(),
            disk=self.disk)
        self.captured = START
        self.pts = 0.0
        self.count = 0
        # An ffmpeg's file is what it was given (once it has had something).
        self.disk.written = lambda: {
            name: sum(map(len, transport.written))
            for name, _, transport in self.ffmpegs() if transport.written}

    def start(self):
        self.recorder.startService()
        return self

    def pictures(self, seconds, keyframe_every=1.0, first_keyframe=True, sps=SPS, pace=None):
        """The camera's pictures for C{seconds}, a keyframe every
        C{keyframe_every} seconds of pictures counted from the first
        (that one too, if C{first_keyframe}), one each C{pace} seconds
        (by default 1/framerate)."""
        every = round(keyframe_every * self.framerate)
        for _ in range(round(seconds * self.framerate)):
            keyframe = self.count % every == 0 and (first_keyframe or self.count > 0)
            if self.codec == "h264":
                self.recorder.feed(h264_chunk(keyframe, self.captured, sps))
            else:
                self.recorder.feed(mpeg1_chunk(keyframe, self.pts))
            self.count += 1
            self.captured += 1 / self.framerate
            self.pts += 1 / self.framerate
            self.reactor.advance(pace or 1 / self.framerate)

    def ffmpegs(self):
        """[(segment's file name, the protocol, its transport)] in order."""
        return [(args[-1].rsplit("/", 1)[-1], proto, transport)
                for proto, _, args, transport in self.reactor.spawned]

    def end(self, n, code=0, stderr=b""):
        """The nth ffmpeg exits with C{code}."""
        _, proto, transport = self.ffmpegs()[n]
        if stderr:
            proto.errReceived(stderr)
        transport.end(Failure(ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code)))


def written_units(transport):
    """The access units an ffmpeg was given, with their times (s, from the
    segment's first), read back out of the MPEG-TS."""
    ts = b"".join(transport.written)
    return [(au, round(pts - FIRST_PTS / 90000, 4)) for au, pts in PESAssembler().feed(ts)]


@pytest.fixture
def said():
    """What the recorder logs: [(level, text)]."""
    lines = []

    def observer(event):
        if event.get("log_namespace") == "pistreaming.recorder":
            from twisted.logger import formatEvent
            lines.append((event["log_level"].name, formatEvent(event)))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


# -- names and policy ------------------------------------------------------------

def test_segments_are_named_by_their_utc_start_and_never_overwrite_one_another():
    assert segment_name(START, "h264") == "20261205T102030Z.mp4"
    assert segment_name(START, "mpeg1") == "20261205T102030Z.ts"
    taken = {"20261205T102030Z.mp4", "20261205T102030Z-2.mp4"}
    assert segment_name(START + 0.5, "h264", taken) == "20261205T102030Z-3.mp4"
    assert segment_start("20261205T102030Z-3.mp4") == 1796466030.0
    # by time, then by number (a plain "-2" would sort before the first)
    names = ["20261205T102031Z.ts", "20261205T102030Z-2.ts", "20261205T102030Z.ts",
             "20261205T102030Z-10.ts"]
    assert sorted(names, key=segment_order) == [
        "20261205T102030Z.ts", "20261205T102030Z-2.ts", "20261205T102030Z-10.ts",
        "20261205T102031Z.ts"]


@pytest.mark.parametrize("name", [
    "../20261205T102030Z.mp4", "20261205T102030Z.mp4\n", "20261205T102030Z.mp4/x",
    "20261205T102030Z.MP4", "20261205T102030Z.mkv", "20261205T102030Z-1.mp4",
    "20261305T102030Z.mp4", "stats.json", "", ".", "..", "20261205T102030Z-02.ts"])
def test_only_segment_names_are_segments(name):
    assert segment_start(name) is None


def test_the_oldest_go_first_and_never_the_one_being_written():
    recordings = [("20261205T102034Z.ts", 3), ("20261205T102030Z.ts", 4),
                  ("20261205T102032Z.ts", 5), ("20261205T102036Z.ts", 6)]
    assert to_delete(recordings, 18) == []
    assert to_delete(recordings, 17) == ["20261205T102030Z.ts"]
    assert to_delete(recordings, 10) == ["20261205T102030Z.ts", "20261205T102032Z.ts"]
    # the one being written stays, even when it alone is over the limit
    assert to_delete(recordings, 1, current="20261205T102036Z.ts") == [
        "20261205T102030Z.ts", "20261205T102032Z.ts", "20261205T102034Z.ts"]


def test_a_share_is_of_the_free_space_and_what_recordings_took_at_start():
    assert keep_bytes(("percent", 80.0), free=900 * MB, recorded=100 * MB) == 800 * MB
    assert keep_bytes(("bytes", 5 * MB), free=900 * MB, recorded=100 * MB) == 5 * MB


def test_the_floor_is_a_twentieth_of_the_disk_and_256_mib_at_most():
    assert floor_bytes(16 * MB) == 800_000
    assert floor_bytes(32 * 10 ** 9) == FLOOR_MAX == 256 * 1024 * 1024


@pytest.mark.parametrize("codec,container,extension", [("h264", "mp4", ".mp4"),
                                                      ("mpeg1", "mpegts", ".ts")])
def test_ffmpeg_copies_the_stream_into_a_segment_that_survives_a_cut(codec, container,
                                                                     extension):
    command = record_command("ffmpeg", codec, "/r/x" + extension)
    # The stream as it is (no encoder named), read as it comes (no seconds
    # held back probing), into a file never overwritten.
    assert command[command.index("-c") + 1] == "copy" and "-c:v" not in command
    assert command[command.index("-probesize") + 1] == "32"
    assert command[command.index("-i") - 2:command.index("-i")] == ["-f", "mpegts"]
    assert command[-2:] == ["-n", "/r/x" + extension]
    assert command[command.index("-flush_packets") + 1] == "1"
    out = command[command.index("-map"):]
    assert out[out.index("-f") + 1] == container
    if codec == "h264":  # fragments written out as they are made
        assert "empty_moov" in command[command.index("-movflags") + 1]


# -- tsmux -------------------------------------------------------------------------

def test_access_units_keep_their_capture_times_and_ffmpeg_reads_them(tmp_path):
    """The camera's capture times, gaps and all, are the pictures' times:
    the recording lasts as long as the camera took."""
    stream = subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=24",
         "-frames:v", "12", "-c:v", "libx264", "-g", "6", "-bf", "0",
         "-x264-params", "repeat-headers=1", "-f", "h264", "-"],
        check=True, capture_output=True).stdout
    units = access_units(stream)
    gaps = [1 / 24, 1 / 24, 3 / 24, 1 / 24, 2 / 24] * 3
    muxer, ts, at = H264Muxer(24), [], START
    for au, gap in zip(units, gaps):
        ts.append(muxer.write(au, is_idr(au), at))
        at += gap
    data = b"".join(ts)
    assert all(data[i] == 0x47 for i in range(0, len(data), 188)) and len(data) % 188 == 0
    back = list(PESAssembler().feed(data))
    assert [au for au, _ in back] == units
    times = [pts - FIRST_PTS / 90000 for _, pts in back]
    expected = [0.0]
    for gap in gaps[:len(units) - 1]:
        expected.append(expected[-1] + gap)
    assert times == pytest.approx(expected, abs=1 / 90000)
    path = tmp_path / "x.ts"
    path.write_bytes(data)
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries",
         "stream=codec_name,width,height,nb_read_frames", "-of", "json", str(path)],
        check=True, capture_output=True).stdout)["streams"][0]
    assert (probe["codec_name"], probe["width"], probe["height"],
            int(probe["nb_read_frames"])) == ("h264", 160, 120, 12)


def test_a_missing_or_backward_or_far_capture_time_is_one_frame_on():
    muxer = H264Muxer(25)
    assert [muxer.time_of(t) for t in (100.0, 100.04, None, 100.0, 5000.0, 100.3)] == \
        pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16, 0.3])


# -- segments ------------------------------------------------------------------

def test_segments_roll_over_at_the_first_keyframe_after_their_length():
    rig = Rig(segment=2.0).start()
    rig.pictures(5.0, keyframe_every=1.0)
    ffmpegs = rig.ffmpegs()
    assert [name for name, _, _ in ffmpegs] == [
        "20261205T102030Z.mp4", "20261205T102032Z.mp4", "20261205T102034Z.mp4"]
    for name, proto, transport in ffmpegs[:2]:
        units = written_units(transport)
        # whole: 2 s of pictures from a keyframe, and the ffmpeg told it ends
        assert len(units) == 48 and transport.stdin_closed
        assert is_idr(units[0][0]) and units[-1][1] == pytest.approx(47 / 24, abs=1e-3)
    assert not ffmpegs[2][2].stdin_closed
    assert rig.recorder.state == RECORDING and rig.states == [(RECORDING, None)]
    rig.end(0)
    rig.end(1)
    listing = rig.recorder.listing(rig.reactor.seconds())
    assert [(r["name"], r["length"], r["recording"]) for r in listing] == [
        ("20261205T102030Z.mp4", 2.0, False), ("20261205T102032Z.mp4", 2.0, False),
        ("20261205T102034Z.mp4", 1.0, True)]


def test_a_keyframe_a_little_early_still_ends_the_segment():
    rig = Rig(segment=4.0).start()
    # keyframes every 2 s of pictures, which come a little faster than that
    rig.pictures(4.0, keyframe_every=2.0, pace=0.999 / 24)
    assert len(rig.ffmpegs()) == 1  # the keyframe at 1.998 s is not the end
    rig.pictures(0.5, keyframe_every=2.0, pace=0.999 / 24)
    assert len(rig.ffmpegs()) == 2  # the one at 3.996 s is: not a 6 s segment


def test_a_segment_ends_at_the_first_keyframe_at_or_after_its_length():
    rig = Rig(segment=3.0).start()
    rig.pictures(7.0, keyframe_every=2.0)  # keyframes at 0, 2, 4, 6 s
    names = [name for name, _, _ in rig.ffmpegs()]
    assert names == ["20261205T102030Z.mp4", "20261205T102034Z.mp4"]  # not 2 s, not 6 s


def test_recording_starts_at_a_keyframe():
    rig = Rig().start()
    rig.pictures(0.5, keyframe_every=1.0, first_keyframe=False)
    assert rig.ffmpegs() == [] and rig.recorder.state == STARTING
    rig.pictures(0.6)
    (name, _, transport), = rig.ffmpegs()
    assert is_idr(written_units(transport)[0][0])


def test_new_parameter_sets_begin_a_new_segment(said):
    rig = Rig(segment=600.0).start()
    rig.pictures(2.0)
    rig.pictures(2.0, sps=SPS[:-1] + b"\x41")  # the camera restarted at another size
    assert len(rig.ffmpegs()) == 2 and rig.ffmpegs()[0][2].stdin_closed
    assert ("info", "recording: 20261205T102030Z.mp4 ends (the stream's parameters "
            "changed)") in said


def test_mpeg1_a_restarted_encoder_begins_a_new_segment():
    rig = Rig(codec="mpeg1", segment=600.0).start()
    rig.pictures(2.0)
    rig.pts = 0.0  # the encoder's timestamps start again
    rig.pictures(1.0)
    names = [name for name, _, _ in rig.ffmpegs()]
    assert names == ["20261205T102030Z.ts", "20261205T102032Z.ts"]
    # MPEG-1's own MPEG-TS goes to ffmpeg as it is
    assert rig.ffmpegs()[1][2].written[0] == mpeg1_chunk(True, 0.0).data


def test_an_ffmpeg_that_does_not_keep_up_loses_pictures_up_to_a_keyframe(said):
    rig = Rig(segment=600.0).start()
    rig.pictures(0.5)
    _, proto, transport = rig.ffmpegs()[0]
    before = len(written_units(transport))
    proto.pauseProducing()  # its pipe and Twisted's buffer are full
    rig.pictures(0.25)
    proto.resumeProducing()
    rig.pictures(0.25)  # no keyframe yet: still dropped
    assert len(written_units(transport)) == before
    rig.pictures(0.5)  # from the keyframe at 1 s on
    units = written_units(transport)
    assert len(units) == before + 12 and is_idr(units[before][0])
    assert rig.recorder.chunks_dropped == 12
    assert [level for level, text in said if "does not keep up" in text] == ["warn"]


# -- the disk ------------------------------------------------------------------

def test_the_oldest_segments_go_when_the_recordings_pass_keep(said):
    disk = FakeDisk(files={"20261204T000000Z.mp4": (3 * MB, 0), "20261204T001000Z.mp4":
                           (3 * MB, 0), "20261204T002000Z.mp4": (3 * MB, 0)})
    rig = Rig(keep=("bytes", 7 * MB), disk=disk).start()
    assert disk.deleted == ["20261204T000000Z.mp4"]
    assert rig.recorder.segments_deleted == 1
    assert ("info", "recording: deleted 1 oldest segment(s), 20261204T000000Z.mp4: the "
            "recordings took 9.0 MB, more than --record-keep 7.0 MB") in said
    rig.pictures(1.0)
    name = rig.ffmpegs()[0][0]
    disk.written = lambda: {name: 2 * MB}  # it grows
    rig.reactor.advance(3)  # not listed again yet (free space only, each second)
    assert disk.deleted == ["20261204T000000Z.mp4"]
    rig.reactor.advance(2)  # listed every 5 s
    assert disk.deleted == ["20261204T000000Z.mp4", "20261204T001000Z.mp4"]
    disk.written = lambda: {name: 9 * MB}
    rig.reactor.advance(5)  # the segment being written is never deleted
    assert name in disk.files and "20261204T002000Z.mp4" not in disk.files


def test_a_share_of_the_free_space_is_taken_at_the_first_pass(said):
    disk = FakeDisk(free=400 * MB, files={"20261204T000000Z.ts": (100 * MB, 0)})
    rig = Rig(codec="mpeg1", keep=("percent", 80.0), disk=disk, segment=30.0).start()
    assert rig.recorder.keep == 400 * MB
    assert ("info", "recording to /recordings: segments of 30s, MPEG-TS; keeping at most "
            "400.0 MB (80% of the 400.0 MB free, with the 100.0 MB recorded before)") in said


def test_below_the_floor_recording_stops_and_starts_again_when_there_is_room(said):
    disk = FakeDisk(free=100 * MB, total=1000 * MB)  # the floor: 50 MB
    rig = Rig(disk=disk).start()
    rig.pictures(1.5)
    disk.free = 40 * MB  # someone else fills the disk
    rig.reactor.advance(2)
    (_, _, transport), = rig.ffmpegs()
    assert transport.stdin_closed  # the segment is finished, not cut off
    why = "only 40.0 MB free on the disk of /recordings, below the floor of 50.0 MB"
    assert rig.recorder.state == STOPPED and rig.states[-1] == (STOPPED, why)
    rig.pictures(3.0)
    assert len(rig.ffmpegs()) == 1
    disk.free = 70 * MB  # not yet 1.5 times the floor
    rig.reactor.advance(2)
    rig.pictures(1.0)
    assert len(rig.ffmpegs()) == 1 and rig.recorder.state == STOPPED
    disk.free = 80 * MB
    rig.reactor.advance(2)
    assert rig.recorder.state == STARTING
    rig.pictures(1.0)
    assert len(rig.ffmpegs()) == 2 and rig.recorder.state == RECORDING
    assert [text for level, text in said if level == "warn"] == [
        f"recording stopped: {why}; it resumes when 75.0 MB are free"]
    assert ("info", "recording resumes: 80.0 MB free on the disk of /recordings") in said
    assert [state for state, _ in rig.states] == [RECORDING, STOPPED, STARTING, RECORDING]


def test_an_unreadable_directory_stops_recording_until_it_can_be_read():
    disk = FakeDisk()
    rig = Rig(disk=disk).start()
    rig.pictures(1.0)
    disk.error = OSError(errno.EIO, "Input/output error")
    rig.reactor.advance(2)
    assert rig.states[-1] == (STOPPED, "cannot read /recordings: input/output error")
    disk.error = None
    rig.reactor.advance(5)  # the next listing says so
    rig.pictures(1.0)
    assert rig.recorder.state == RECORDING and len(rig.ffmpegs()) == 2


def test_a_failing_ffmpeg_is_logged_and_started_again_after_a_growing_pause(said):
    rig = Rig().start()
    rig.pictures(1.0)
    rig.end(0, code=1, stderr=b"[mp4 @ 0x1] x.mp4: No space left on device\n"
                              b"Error writing trailer: No space left on device\n")
    why = ("ffmpeg exited with code 1 writing 20261205T102030Z.mp4: Error writing trailer: "
           "No space left on device")
    assert rig.states[-1] == (FAILING, why)
    assert said[-1] == ("error", f"recording: {why}; trying again in 1s")
    rig.pictures(0.95)  # the keyframe at 1 s comes during the pause
    assert len(rig.ffmpegs()) == 1
    rig.pictures(1.05)
    assert len(rig.ffmpegs()) == 2  # at the keyframe after the pause
    rig.end(1, code=1)
    assert said[-1] == ("error", "recording: ffmpeg exited with code 1 writing "
                                 "20261205T102032Z.mp4; trying again in 2s")
    assert rig.recorder.failures == 2


def test_an_ffmpeg_that_takes_nothing_for_long_is_killed(said):
    rig = Rig().start()
    rig.pictures(1.0)
    _, proto, transport = rig.ffmpegs()[0]
    proto.pauseProducing()  # the disk hangs
    rig.pictures(9.0)
    # no new ffmpeg on that disk at the segment's end; this one waits
    assert transport.signals == [] and len(rig.ffmpegs()) == 1
    rig.pictures(2.0)
    assert transport.signals == [signal.SIGKILL]
    assert (FAILING, "ffmpeg has taken nothing for 10s writing 20261205T102030Z.mp4 "
                     "(does the disk hang?)") in rig.states
    transport.end(Failure(ProcessTerminated(signal=signal.SIGKILL)))
    assert [level for level, _ in said].count("error") == 1  # no second line for the kill


def test_stopping_finishes_the_segment_within_a_bounded_time():
    rig = Rig().start()
    rig.pictures(1.0)
    _, _, transport = rig.ffmpegs()[0]
    done = []
    rig.recorder.stopService().addCallback(done.append)
    assert transport.stdin_closed and not done
    rig.reactor.advance(0.8)
    assert transport.signals == [signal.SIGTERM]
    rig.reactor.advance(0.4)
    assert transport.signals == [signal.SIGTERM, signal.SIGKILL] and not done
    rig.reactor.advance(0.4)  # stuck in the kernel on a dead disk: not waited for
    assert len(done) == 1


def test_a_segment_that_ends_when_asked_is_no_failure():
    rig = Rig().start()
    rig.pictures(1.0)
    done = []
    rig.recorder.stopService().addCallback(done.append)
    rig.end(0)
    assert len(done) == 1 and rig.recorder.failures == 0


def test_the_listing_gives_earlier_runs_their_length_from_the_file():
    disk = FakeDisk(files={"20261204T000000Z.ts": (3 * MB, 1796342400.0 + 598.5)})
    rig = Rig(codec="mpeg1", disk=disk).start()
    (earlier,) = rig.recorder.listing(rig.reactor.seconds())
    assert earlier == {"name": "20261204T000000Z.ts", "start": 1796342400.0,
                       "length": 598.5, "size": 3 * MB, "recording": False}


def test_h264_messages_go_in_without_their_header():
    rig = Rig().start()
    rig.pictures(0.25)
    units = written_units(rig.ffmpegs()[0][2])
    sent = parse_message(h264_chunk(True, START).data).access_unit
    assert units[0][0] == sent
