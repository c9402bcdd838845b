"""Access units out of ffmpeg's MPEG-TS (real ffmpeg output, H.264): each
video PES payload whole, as ffprobe sees the packets, handed on the moment
its last TS packet is in, never later (except where ffmpeg leaves a PES
packet's length open: then when the next one begins)."""

import json
import os
import random
import subprocess
import time

import pytest

from pistreaming.camera.picture import Picture
from pistreaming.camera.testpattern import TestPattern
from pistreaming.encoder import ffmpeg_command
from pistreaming.frames import FrameGeometry
from pistreaming.mpegts import PACKET, PESAssembler, TSPacketizer
from pistreaming.options import find_ffmpeg

FFMPEG = find_ffmpeg("ffmpeg")
FFPROBE = os.path.join(os.path.dirname(FFMPEG), "ffprobe")
RATE = 25
FRAMES = 60
#: The access unit delimiter ffmpeg's MPEG-TS muxer puts in front of each
#: access unit that lacks one (x264 writes none).
AUD = b"\x00\x00\x00\x01\x09\xf0"


def probe_packets(ts, tmp_path):
    """ffprobe's packets of the video in C{ts}: [(size, pts in 90 kHz)]."""
    path = tmp_path / "stream.ts"
    path.write_bytes(ts)
    result = subprocess.run(
        [FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_packets",
         "-show_entries", "packet=size,pts", "-of", "json", str(path)],
        capture_output=True, timeout=60, check=True)
    return [(int(p["size"]), int(p["pts"])) for p in json.loads(result.stdout)["packets"]]


def elementary_stream(ts, tmp_path):
    """The video's elementary stream as ffmpeg's own demuxer takes it out."""
    path = tmp_path / "copy.ts"
    path.write_bytes(ts)
    return subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy",
         "-f", "h264", "pipe:1"], capture_output=True, timeout=60, check=True).stdout


def assemble(ts, seed):
    """C{ts} fed in pieces of random sizes, as a pipe would deliver it."""
    rng = random.Random(seed)
    packetizer, assembler = TSPacketizer(), PESAssembler()
    units, pos = [], 0
    while pos < len(ts):
        step = rng.randrange(1, 9000)
        packets = packetizer.feed(ts[pos:pos + step])
        pos += step
        units.extend(assembler.feed(packets))
    return units, assembler


@pytest.fixture(scope="module")
def small():
    """2.4 s of the test pattern, 320x240, through the daemon's own H.264 command."""
    geometry = FrameGeometry(320, 240)
    pattern = TestPattern(Picture(320, 240, RATE))
    raw = b"".join(pattern.render(i, time.time()) for i in range(FRAMES))
    command = ffmpeg_command(FFMPEG, geometry, RATE, 400_000, codec="h264",
                             keyframe_interval=1.0)
    return subprocess.run(command, input=raw, capture_output=True, timeout=60,
                          check=True).stdout


@pytest.fixture(scope="module")
def big():
    """Three frames of 1920x1080 noise at 20 Mbit/s with no VBV to hold x264
    back: each picture is far over 64 KiB, so ffmpeg leaves every PES
    packet's length open."""
    geometry = FrameGeometry(1920, 1080)
    noise = os.urandom(geometry.frame_size * 3)
    command = [
        FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "yuv420p", "-video_size", "1920x1088",
        "-framerate", "30", "-i", "pipe:0", "-vf", geometry.crop_filter,
        "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
        "-profile:v", "baseline", "-b:v", "20M", "-g", "2",
        "-f", "mpegts", "-muxdelay", "0", "-muxpreload", "0", "-flush_packets", "1",
        "-omit_video_pes_length", "0", "pipe:1"]
    return subprocess.run(command, input=noise, capture_output=True, timeout=60,
                          check=True).stdout


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_each_access_unit_comes_out_whole_as_ffprobe_sees_it(small, seed, tmp_path):
    units, assembler = assemble(small, seed)
    packets = probe_packets(small, tmp_path)
    assert len(units) == len(packets) == FRAMES
    assert [len(data) for data, _ in units] == [size for size, _ in packets]
    # the pictures' times, in seconds, from the first to the last
    assert [round(pts * 90_000) for _, pts in units] == [pts for _, pts in packets]
    # the bytes are the elementary stream, whole and in order
    assert b"".join(data for data, _ in units) == elementary_stream(small, tmp_path)
    # every one begins with the muxer's AUD; nothing is left over or dropped
    assert all(data.startswith(AUD) for data, _ in units)
    assert assembler.flush() == [] and assembler.pending() == 0
    assert (assembler.dropped, assembler.open_length) == (0, 0)


def video_pid_packets(ts):
    """For each TS packet of C{ts}: (its PID, whether it begins a PES/section)."""
    return [(((ts[i + 1] & 0x1F) << 8) | ts[i + 2], bool(ts[i + 1] & 0x40))
            for i in range(0, len(ts), PACKET)]


def test_an_access_unit_is_handed_on_with_its_last_packet(small):
    # Fed one TS packet at a time: each access unit comes out at the packet
    # that is the last of its PES packet (the next packet of the video's PID
    # begins a new one), not one packet later.
    packets = video_pid_packets(small)
    assembler = PESAssembler()
    out_at = []
    for index in range(len(packets)):
        if assembler.feed(small[index * PACKET:(index + 1) * PACKET]):
            out_at.append(index)
    video = assembler.video_pid
    video_indexes = [i for i, (pid, _) in enumerate(packets) if pid == video]
    last_of_each = [i for i, following in zip(video_indexes, video_indexes[1:] + [None])
                    if following is None or packets[following][1]]
    assert out_at == last_of_each
    assert len(out_at) == FRAMES


def test_big_pictures_of_open_length_come_out_when_the_next_begins(big, tmp_path):
    packets = probe_packets(big, tmp_path)
    assert len(packets) == 3 and all(size > 65535 for size, _ in packets)
    units, assembler = assemble(big, 4)
    # the first two, when the next PES packet began; the last one only at the end
    assert [len(data) for data, _ in units] == [size for size, _ in packets[:2]]
    last = assembler.flush()
    assert [len(data) for data, _ in last] == [packets[2][0]]
    units += last
    assert [round(pts * 90_000) for _, pts in units] == [pts for _, pts in packets]
    assert b"".join(data for data, _ in units) == elementary_stream(big, tmp_path)
    assert (assembler.open_length, assembler.dropped) == (3, 0)


def test_open_length_waits_for_the_next_pes_packet_and_no_longer(big):
    # Fed a packet at a time, the first picture comes out with the first
    # packet of the second, which is what tells it is complete.
    packets = video_pid_packets(big)
    assembler = PESAssembler()
    starts = []
    for index in range(len(packets)):
        if assembler.feed(big[index * PACKET:(index + 1) * PACKET]):
            starts.append(index)
    video = assembler.video_pid
    pes_starts = [i for i, (pid, start) in enumerate(packets) if pid == video and start]
    assert starts == pes_starts[1:]


def test_times_keep_counting_across_the_33_bit_wrap(tmp_path):
    # PTS are 33 bits of 90 kHz: they wrap after about 26.5 hours.  The
    # stream made to cross that point still gives rising times.
    result = subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi",
         "-i", f"testsrc2=size=160x120:rate={RATE}", "-t", "2",
         "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
         "-profile:v", "baseline", "-pix_fmt", "yuv420p",
         "-f", "mpegts", "-muxdelay", "0", "-muxpreload", "0",
         "-omit_video_pes_length", "0", "-output_ts_offset", "95443", "pipe:1"],
        capture_output=True, timeout=60, check=True)
    units, assembler = assemble(result.stdout, 5)
    units += assembler.flush()
    times = [pts for _, pts in units]
    assert len(times) == 2 * RATE
    assert times[0] < (1 << 33) / 90_000 < times[-1]
    steps = {round((b - a) * RATE, 6) for a, b in zip(times, times[1:])}
    assert steps == {1.0}


def test_what_is_not_a_whole_video_pes_packet_is_not_handed_on(small):
    assembler = PESAssembler()
    ts = small
    first, second = assemble(ts, 6)[0][:2]
    video = None
    for i in range(0, len(ts), PACKET):
        pid = ((ts[i + 1] & 0x1F) << 8) | ts[i + 2]
        if ts[i + 1] & 0x40 and ts[i + 4:i + 7] == b"\x00\x00\x01":
            video = pid
            break
    video_packets = [ts[i:i + PACKET] for i in range(0, len(ts), PACKET)
                     if ((ts[i + 1] & 0x1F) << 8) | ts[i + 2] == video]
    starts = [n for n, p in enumerate(video_packets) if p[1] & 0x40]
    # the second half of the first picture only: no start seen, nothing out
    tail = b"".join(video_packets[1:starts[1]])
    assert assembler.feed(tail) == [] and assembler.pending() == 0
    # the first picture cut short by the second: dropped, the second whole
    cut = video_packets[:starts[1] - 1] + video_packets[starts[1]:starts[2]]
    assert assembler.feed(b"".join(cut)) == [second]
    assert assembler.dropped == 1
    # a packet that has lost its sync byte is skipped
    broken = b"\x00" + video_packets[0][1:]
    assert assembler.feed(broken) == [] and assembler.pending() == 0
    assert assembler.feed(b"".join(video_packets[:starts[1]])) == [first]
