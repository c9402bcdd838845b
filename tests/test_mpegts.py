"""Cutting ffmpeg's MPEG-TS output where pictures start (real ffmpeg output)."""

import random
import subprocess
import time

import pytest

from pistreaming.camera.testpattern import TestPattern
from pistreaming.camera.picture import Picture
from pistreaming.encoder import ffmpeg_command
from pistreaming.frames import FrameGeometry
from pistreaming.mpegts import PACKET, PictureSplitter, TSPacketizer, video_pes_start

FRAMES = 50
RATE = 25


@pytest.fixture(scope="module")
def encoded():
    """2 s of the test pattern through the daemon's own ffmpeg command."""
    geometry = FrameGeometry(320, 240)
    pattern = TestPattern(Picture(320, 240, RATE))
    raw = b"".join(pattern.render(i, time.time()) for i in range(FRAMES))
    result = subprocess.run(ffmpeg_command("ffmpeg", geometry, RATE, 400_000),
                            input=raw, capture_output=True, timeout=60, check=True)
    return result.stdout


def split(data, seed):
    rng = random.Random(seed)
    packetizer, splitter = TSPacketizer(), PictureSplitter()
    chunks, pos = [], 0
    while pos < len(data):
        step = rng.randrange(1, 9000)
        packets = packetizer.feed(data[pos:pos + step])
        pos += step
        if packets:
            chunks.extend(splitter.feed(packets))
    return chunks, splitter


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_picture_starts_a_chunk_and_nothing_is_lost(encoded, seed):
    chunks, splitter = split(encoded, seed)
    assert b"".join(c.data for c in chunks) + splitter.held() == encoded
    pictures = [c for c in chunks if c.picture]
    assert len(pictures) == FRAMES
    # each picture (their lengths are known) is one chunk, whole
    assert all(c.picture for c in chunks)
    for chunk in chunks:
        assert len(chunk) % PACKET == 0
        starts = [i for i in range(0, len(chunk), PACKET)
                  if video_pes_start(chunk.data[i:i + PACKET]) is not None]
        if chunk.picture:
            # one picture starts here, after (at most) the tables that lead it
            assert len(starts) == 1
            first_video = starts[0]
            pids = {int.from_bytes(chunk.data[i + 1:i + 3], "big") & 0x1FFF
                    for i in range(0, first_video, PACKET)}
            assert splitter.video_pid not in pids
        else:
            assert starts == []
    pts = [c.pts for c in pictures]
    assert all(b - a == pytest.approx(1 / RATE, abs=1e-4) for a, b in zip(pts, pts[1:]))


def test_starting_points_are_the_intra_pictures_with_their_tables(encoded):
    chunks, _ = split(encoded, 4)
    keyframes = [i for i, c in enumerate([c for c in chunks if c.picture]) if c.keyframe]
    assert keyframes == list(range(0, FRAMES, RATE))  # -g = one a second
    for chunk in chunks:
        if chunk.keyframe:
            leading = [chunk.data[i:i + PACKET] for i in range(0, len(chunk), PACKET)]
            first_video = next(i for i, p in enumerate(leading) if video_pes_start(p))
            # the tables lead (a PAT among them), then the sequence header
            assert any(p[1:3] == b"\x40\x00" for p in leading[:first_video])
            assert b"\x00\x00\x01\xb3" in leading[first_video]


def test_a_starting_point_decodes_on_its_own(encoded, tmp_path):
    chunks, _ = split(encoded, 5)
    second = [i for i, c in enumerate(chunks) if c.keyframe][1]
    path = tmp_path / "tail.ts"
    path.write_bytes(b"".join(c.data for c in chunks[second:]))
    frames = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
        capture_output=True, timeout=60, check=True, text=True).stdout.split()
    assert int(frames[0]) == FRAMES - RATE


def test_pictures_of_unknown_length_are_handed_on_as_they_come(encoded):
    # PES length 0 ("unbounded", as ffmpeg writes pictures over 64 KiB): the
    # splitter cannot know where a picture ends, so it holds nothing back.
    packets = bytearray(encoded)
    for i in range(0, len(packets), PACKET):
        if video_pes_start(bytes(packets[i:i + PACKET])):
            offset = 4 + (1 + packets[i + 4] if packets[i + 3] & 0x20 else 0)
            packets[offset + i + 4:offset + i + 6] = b"\x00\x00"
    packets = bytes(packets)
    packetizer, splitter = TSPacketizer(), PictureSplitter()
    chunks = []
    for i in range(0, len(packets), PACKET):  # one packet at a time
        chunks.extend(splitter.feed(packetizer.feed(packets[i:i + PACKET])))
        held = splitter.held()
        # only table packets may wait (for the picture they lead)
        assert all(video_pes_start(held[j:j + PACKET]) is None
                   and int.from_bytes(held[j + 1:j + 3], "big") & 0x1FFF != splitter.video_pid
                   for j in range(0, len(held), PACKET))
    assert b"".join(c.data for c in chunks) + splitter.held() == packets
    assert sum(c.picture for c in chunks) == FRAMES
    assert any(not c.picture for c in chunks)  # continuations handed on alone
