"""End to end: the real daemon, real ffmpeg, a real WebSocket client.

What a viewer receives must decode (with ffmpeg) to pictures of the configured
size, arriving at about the configured rate; the daemon must survive ffmpeg's
death and stop promptly with viewers connected.

The tests that only watch, or that kill ffmpeg and see the daemon recover,
share a daemon of the default configuration (tests/conftest.py); those that
stop the daemon or run another configuration start their own.
"""

import contextlib
import json
import re
import os
import signal
import struct
import subprocess
import threading
import time

import pytest
import websocket

from pistreaming.mpegts import PACKET, video_pes_start
from tests.daemon import Daemon

SEQUENCE_HEADER = b"\x00\x00\x01\xb3"


def connect(url, timeout=10):
    ws = websocket.create_connection(url, timeout=timeout)
    return ws


def read_header(ws):
    opcode, data = ws.recv_data()
    assert opcode == websocket.ABNF.OPCODE_BINARY
    assert len(data) == 8 and data[:4] == b"jsmp"
    return struct.unpack(">HH", data[4:])


def collect(ws, seconds):
    """Binary messages received for C{seconds}; asserts each is whole TS packets."""
    chunks = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        opcode, data = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_BINARY
        assert len(data) % 188 == 0 and len(data) > 0
        assert all(data[i] == 0x47 for i in range(0, len(data), 188))
        chunks.append(data)
    return b"".join(chunks)


def pictures_in(message):
    return sum(1 for i in range(0, len(message), PACKET)
               if video_pes_start(message[i:i + PACKET]))


def stream_has_a_start(ws, then=3, timeout=10):
    """Reads the stream until a sequence header (a starting point) and
    C{then} pictures after it have passed."""
    deadline = time.monotonic() + timeout
    seen = b""
    while SEQUENCE_HEADER not in seen:
        assert time.monotonic() < deadline, "no starting point in the stream"
        seen = seen[-3:] + ws.recv()
    after = 0
    while after < then:
        assert time.monotonic() < deadline, "no pictures after the starting point"
        after += pictures_in(ws.recv())


def stream_goes_quiet(ws, quiet=0.3, timeout=10):
    """Reads the stream until nothing has come for C{quiet} seconds."""
    deadline = time.monotonic() + timeout
    ws.settimeout(quiet)
    while True:
        assert time.monotonic() < deadline, "the stream went on"
        try:
            ws.recv()
        except websocket.WebSocketTimeoutException:
            return


def decoded_frames(ts_bytes, tmp_path):
    path = tmp_path / "received.ts"
    path.write_bytes(ts_bytes)
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "frame=pts_time,width,height", "-of", "json", str(path)],
        capture_output=True, timeout=60, check=True,
    )
    return json.loads(result.stdout)["frames"]


def decode_last_picture(ts_bytes, width, height, tmp_path):
    """The last picture as raw YUV420 planes (Y, U, V)."""
    path = tmp_path / "picture.ts"
    path.write_bytes(ts_bytes)
    result = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo",
         "-pix_fmt", "yuv420p", "pipe:1"],
        capture_output=True, timeout=60, check=True,
    )
    size = width * height * 3 // 2
    frame = result.stdout[-size:]
    y = frame[:width * height]
    u = frame[width * height:width * height + size // 6]
    v = frame[width * height + size // 6:]
    return y, u, v


def pids_alive(pids):
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


def ffmpeg_children(daemon):
    found = []
    for pid in daemon.pids():
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "ffmpeg":
                    found.append(pid)
        except FileNotFoundError:
            pass
    return found


@pytest.mark.parametrize("size,rate,bitrate,via", [
    ((640, 480), 24, "800k", "http"),  # the default configuration
    ((1296, 730), 15, "1M", "ws-port"),  # padded to 1312x736 by the camera
])
def test_viewer_receives_decodable_pictures_at_the_configured_size_and_rate(
        size, rate, bitrate, via, tmp_path, request):
    width, height = size
    seconds = 3.0
    if (size, rate, bitrate) == ((640, 480), 24, "800k"):
        running = contextlib.nullcontext(request.getfixturevalue("default_daemon"))
    else:
        running = Daemon("--resolution", f"{width}x{height}", "--framerate", str(rate),
                         "--bitrate", bitrate)
    with running as daemon:
        if via == "http":
            url = f"ws://127.0.0.1:{daemon.http_port}/stream"
        else:
            url = f"ws://127.0.0.1:{daemon.ws_port}/"
        ws = connect(url)
        try:
            assert read_header(ws) == (width, height)
            started = time.monotonic()
            data = collect(ws, seconds)
            elapsed = time.monotonic() - started
        finally:
            ws.close()
    frames = decoded_frames(data, tmp_path)
    assert {(f["width"], f["height"]) for f in frames} == {(width, height)}
    # The decoder starts at the first intra picture (at most one second in).
    assert len(frames) >= rate * (elapsed - 1.2) * 0.8, (len(frames), elapsed)
    assert len(frames) <= rate * elapsed * 1.1 + 2
    times = [float(f["pts_time"]) for f in frames]
    measured = (len(times) - 1) / (times[-1] - times[0])
    assert abs(measured - rate) / rate < 0.1, measured
    # Not garbled by the padding: the colour bars stand straight, top to bottom.
    y, u, v = decode_last_picture(data, width, height, tmp_path)
    cw, ch = width // 2, height // 2
    upper, lower = int(ch * 0.3), int(ch * 0.7)  # between the grey bands
    for plane in (u, v):
        for bar in range(6):
            x = int((bar + 0.5) * cw / 6)
            top, bottom = plane[upper * cw + x], plane[lower * cw + x]
            assert abs(top - bottom) < 24, (bar, top, bottom)
    bars = [u[upper * cw + int((bar + 0.5) * cw / 6)] for bar in range(6)]
    assert max(bars) - min(bars) > 100


class ReadingViewer(threading.Thread):
    """A viewer that reads all the time, as a browser does, and notes the close."""

    def __init__(self, url, enough=10_000):
        super().__init__(daemon=True)
        self.ws = connect(url)
        self.header = read_header(self.ws)
        self.received = 0
        self.enough = enough
        #: Set once C{enough} bytes have come.
        self.flowing = threading.Event()
        self.close_code = None
        self.error = None

    def run(self):
        try:
            for _ in range(100_000):
                frame = self.ws.recv_frame()
                if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                    self.close_code = struct.unpack(">H", frame.data[:2])[0]
                    return
                self.received += len(frame.data)
                if self.received >= self.enough:
                    self.flowing.set()
        except Exception as e:  # the test asserts on what was seen
            self.error = e


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_is_prompt_with_a_viewer_connected(signum):
    with Daemon() as daemon:
        viewer = ReadingViewer(f"ws://127.0.0.1:{daemon.http_port}/stream")
        viewer.start()
        try:
            assert viewer.flowing.wait(10), (viewer.received, viewer.error)
            children = ffmpeg_children(daemon)
            assert len(children) == 1
            code, took = daemon.stop(signum, timeout=10)
            assert took < 2.0, took
            # twistd ends by re-raising the signal it was stopped with, so the
            # exit status says "terminated by SIGTERM/SIGINT", as for any daemon.
            assert code in (0, -signum)
            viewer.join(5)
            # The viewer was told the server is going away.
            assert viewer.close_code == 1001, viewer.error
        finally:
            viewer.ws.close()
        assert pids_alive(children) == []
        assert "Traceback" not in daemon.output()


def test_viewers_stay_connected_when_ffmpeg_is_killed(default_daemon):
    daemon = default_daemon
    viewers = [connect(f"ws://127.0.0.1:{daemon.http_port}/stream"),
               connect(f"ws://127.0.0.1:{daemon.ws_port}/")]
    try:
        for ws in viewers:
            read_header(ws)
            collect(ws, 0.5)
        (old,) = ffmpeg_children(daemon)
        mark = len(daemon.lines)
        os.kill(old, signal.SIGKILL)
        daemon.wait_for(r"ffmpeg was killed by signal 9 .*restarting in", 5, start=mark)
        started = daemon.wait_for(r"encoder process: ffmpeg pid (\d+)", 5, start=mark)
        # (Its pid from the log: just after the fork, the child may not be
        # called ffmpeg yet.)
        new = int(started.group(1))
        assert new != old and new in daemon.pids()
        # Both viewers, still on the same sockets, get a fresh picture start.
        for ws in viewers:
            data = b""
            deadline = time.monotonic() + 5
            while SEQUENCE_HEADER not in data and time.monotonic() < deadline:
                data += collect(ws, 0.2)
            assert SEQUENCE_HEADER in data
    finally:
        for ws in viewers:
            ws.close()


def test_repeated_ctrl_c_during_shutdown_is_harmless():
    with Daemon() as daemon:
        ws = connect(f"ws://127.0.0.1:{daemon.http_port}/stream")
        read_header(ws)
        collect(ws, 0.2)  # the reactor is running: video flows
        ws.close()
        started = time.monotonic()
        # Stopped while they are sent, so that all of them are waiting when it
        # runs again: this test's process may itself be held up between two
        # sends (on a busy machine), and the shutdown finished by then.
        daemon.process.send_signal(signal.SIGSTOP)
        for signum in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            daemon.process.send_signal(signum)
        daemon.process.send_signal(signal.SIGCONT)
        code = daemon.process.wait(10)
        took = time.monotonic() - started
        assert took < 2.0, took
        assert code in (0, -signal.SIGINT, -signal.SIGTERM)  # whichever came first
        daemon.wait_for(r"Server Shut Down", 5)
        # (Two signals sent at once may reach the process as one.)
        assert re.search(r"already shutting down \(SIG(INT|TERM)\)", daemon.output())
        assert "Traceback" not in daemon.output()


def test_an_ffmpeg_removed_during_an_upgrade_comes_back_without_a_restart(tmp_path):
    """The executable disappears (a package upgrade replacing it), ffmpeg dies:
    the daemon says why, the page hears that the encoder is down, the back-off
    goes on, and once the executable is back the picture returns to the same
    viewer without restarting the daemon."""
    import json
    import shutil
    ffmpeg = tmp_path / "ffmpeg"
    ffmpeg.symlink_to(shutil.which("ffmpeg"))
    with Daemon("--framerate", "24", "--ffmpeg", str(ffmpeg)) as daemon:
        ws = websocket.create_connection(f"ws://127.0.0.1:{daemon.http_port}/stream",
                                         subprotocols=["pistream"], timeout=10)
        try:
            read_header(ws)
            statuses = []

            def until(predicate, timeout):
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    opcode, data = ws.recv_data()
                    if opcode == websocket.ABNF.OPCODE_TEXT:
                        statuses.append(json.loads(data))
                    if predicate(opcode, data):
                        return True
                return False

            assert until(lambda op, data: op == websocket.ABNF.OPCODE_BINARY, 5)
            (old,) = ffmpeg_children(daemon)
            mark = len(daemon.lines)
            ffmpeg.unlink()
            os.kill(old, signal.SIGKILL)
            daemon.wait_for(r"encoder: cannot start .*ffmpeg: no such file or directory; "
                            r"trying again in", 10, start=mark)
            assert until(lambda op, data: op == websocket.ABNF.OPCODE_TEXT
                         and json.loads(data).get("encoder") == "unavailable", 5), statuses
            ffmpeg.symlink_to(shutil.which("ffmpeg"))
            daemon.wait_for(r"encoder process: ffmpeg pid (\d+)", 15, start=mark)
            assert until(lambda op, data: op == websocket.ABNF.OPCODE_TEXT
                         and json.loads(data).get("encoder") == "ok", 5), statuses
            data = b""
            deadline = time.monotonic() + 5
            while SEQUENCE_HEADER not in data and time.monotonic() < deadline:
                opcode, chunk = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    data += chunk
            assert SEQUENCE_HEADER in data
            assert "Traceback" not in daemon.output()
        finally:
            ws.close()
