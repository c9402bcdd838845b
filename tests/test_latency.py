"""What latency measurements and instant start rest on.

- The test pattern's capture stamp survives the real encoder: every decoded
  picture says exactly when its frame was captured and which frame it was.
- A newcomer's first bytes after the header decode to a picture at once,
  without waiting for the stream: even with the encoder frozen, so that
  nothing new is coming, a new viewer gets a decodable start, and its first
  message alone (the intra picture) decodes to a picture.
"""

import os
import signal
import subprocess
import time

import pytest
import websocket

from pistreaming import stamp
from pistreaming.camera.testpattern import TestPattern
from pistreaming.camera.picture import Picture
from pistreaming.encoder import ffmpeg_command
from pistreaming.frames import FrameGeometry
from pistreaming.mpegts import PACKET, video_pes_start
from tests.daemon import Daemon
from tests.test_stream import (
    ffmpeg_children, read_header, stream_goes_quiet, stream_has_a_start)

T0 = 1_790_000_000.0  # a time stamp in 2026, far from 2**32 ms boundaries


def decode_luma(ts_bytes, width, height):
    out = subprocess.run(["ffmpeg", "-v", "error", "-f", "mpegts", "-i", "pipe:0",
                          "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
                         input=ts_bytes, capture_output=True, timeout=120, check=True).stdout
    size = width * height
    return [out[i:i + size] for i in range(0, len(out) - size + 1, size)]


@pytest.mark.parametrize("width,height,bitrate", [
    (640, 480, 800_000), (1280, 720, 800_000), (1296, 730, 2_000_000)])
def test_the_stamp_round_trips_through_the_real_encoder(width, height, bitrate):
    rate = 30
    pattern = TestPattern(Picture(width, height, rate))
    count = 45
    times = [T0 + i / rate + (i % 7) * 0.0013 for i in range(count)]
    raw = b"".join(pattern.render(i, times[i]) for i in range(count))
    encoded = subprocess.run(
        ffmpeg_command("ffmpeg", FrameGeometry(width, height), rate, bitrate),
        input=raw, capture_output=True, timeout=120, check=True).stdout
    pictures = decode_luma(encoded, width, height)
    assert len(pictures) == count
    for i, luma in enumerate(pictures):
        found = stamp.read(luma, width, width, height)
        assert found == stamp.Stamp.at(times[i], i), (i, found)
        assert abs(found.seconds_near(T0) - times[i]) < 0.0006


def test_a_newcomer_gets_a_decodable_picture_without_waiting_for_the_stream():
    with Daemon("--resolution", "640x480", "--framerate", "30") as daemon:
        first = websocket.create_connection(f"ws://127.0.0.1:{daemon.http_port}/stream",
                                            timeout=10)
        (ffmpeg,) = ffmpeg_children(daemon)
        try:
            read_header(first)
            stream_has_a_start(first, then=0)  # the stream has had a starting point
            os.kill(ffmpeg, signal.SIGSTOP)  # nothing new comes out from here on
            stream_goes_quiet(first)  # what ffmpeg had written reached the viewers
        finally:
            first.close()
        try:
            ws = websocket.create_connection(f"ws://127.0.0.1:{daemon.http_port}/stream",
                                             timeout=10)
            try:
                assert read_header(ws) == (640, 480)
                messages = []
                ws.settimeout(1.0)
                for _ in range(200):
                    try:
                        messages.append(ws.recv())
                    except websocket.WebSocketTimeoutException:
                        break
            finally:
                ws.close()
        finally:
            os.kill(ffmpeg, signal.SIGCONT)
    assert messages, "the newcomer got nothing while the stream stood still"
    # Its very first message is the starting point alone: one picture, which
    # decodes by itself (the page shows it before the rest has arrived).
    alone = decode_luma(messages[0], 640, 480)
    assert len(alone) == 1 and stamp.read(alone[0], 640, 640, 480)
    data = b"".join(messages)
    # It starts where a decoder can: the first picture is an intra picture
    # behind a sequence header...
    first_picture = next(video_pes_start(data[i:i + PACKET])
                         for i in range(0, len(data), PACKET)
                         if video_pes_start(data[i:i + PACKET]))
    assert first_picture[1] is True
    # ...and the bytes decode to the latest pictures, stamped, and recent.
    pictures = decode_luma(data, 640, 480)
    assert len(pictures) >= 1
    stamps = [stamp.read(p, 640, 640, 480) for p in pictures]
    assert all(stamps) and [s.frame for s in stamps] == sorted(s.frame for s in stamps)
    assert time.time() - stamps[-1].seconds_near(time.time()) < 5
