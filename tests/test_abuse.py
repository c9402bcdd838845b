"""Bad input thrown at a running daemon, while a healthy viewer watches.

Malformed and oversized HTTP requests, malformed and oversized WebSocket
handshakes, random bytes to every port, hundreds of connections dropped
mid-handshake, bad credentials, foreign origins, and viewers sending junk
frames.  The cases of a group go in at once, several connections at a time,
nobody waiting for a picture between them; a healthy viewer, connected all
along, must get pictures the whole time with no pause over half a second
between two, a new one after each group, and at the end its pictures must
be gapless: every picture's timestamp one frame after the last, none
missing.  The daemon must not log a traceback.
"""

import base64
import functools
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import websocket

from pistreaming.mpegts import PACKET, video_pes_start
from tests.daemon import ROOT, Daemon

RATE = 24
USER, PASSWORD = "watcher", "s3cret pass"
GOOD = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class HealthyViewer(threading.Thread):
    """Reads the stream all along; notes when each picture arrived and its PTS."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(url, header=[f"Authorization: {GOOD}"], timeout=10)
        assert self.ws.recv()[:4] == b"jsmp"
        self.pictures = []  # (arrival, pts)
        self.lock = threading.Condition()
        self.stopping = False
        self.error = None

    def run(self):
        try:
            self.ws.settimeout(5)
            while not self.stopping:
                data = self.ws.recv()
                now = time.monotonic()
                for i in range(0, len(data), PACKET):
                    start = video_pes_start(data[i:i + PACKET])
                    if start is not None and start[0] is not None:
                        with self.lock:
                            self.pictures.append((now, start[0]))
                            self.lock.notify_all()
        except Exception as e:  # the test looks at it
            if not self.stopping:
                self.error = e

    def count(self):
        with self.lock:
            return len(self.pictures)

    def wait_for_picture_after(self, count, timeout=3.0):
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.pictures) <= count:
                left = deadline - time.monotonic()
                if left <= 0 or self.error:
                    return False
                self.lock.wait(left)
        return True


def send_raw(port, data, read=True, timeout=0.3):
    """Send bytes to a port; return what comes back (possibly nothing)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            sock.sendall(data)
        except OSError:
            return b""
        if not read:
            return b""
        got = b""
        try:
            while len(got) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        return got
    finally:
        sock.close()


def handshake(path="/stream", host="127.0.0.1", extra=b"", key=None, version=b"13",
              upgrade=b"websocket"):
    key = key if key is not None else base64.b64encode(os.urandom(16))
    return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
            b"Upgrade: " + upgrade + b"\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: " + version + b"\r\n"
            + extra + b"\r\n")


def http_cases():
    long = b"a" * 20_000
    yield b"GARBAGE\r\n\r\n"
    yield b"GET\r\n\r\n"
    yield b"GET / HTTP/9.9\r\n\r\n"
    yield b"GET / HTTP/1.1 extra\r\n\r\n"
    yield b"GET /" + long + b" HTTP/1.1\r\nHost: x\r\n\r\n"          # request line too long
    yield b"GET / HTTP/1.1\r\nX-Big: " + long + b"\r\n\r\n"            # a header too long
    yield b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(600)) + b"\r\n"
    yield b"GET / HTTP/1.1\r\n" + b"X: " + b"b" * 8000 + b"\r\nY: " + b"c" * 9000 + b"\r\n\r\n"
    yield b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"
    yield b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n"
    yield b"POST /index.html HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n"
    yield b"GET /\x00\x01\x02 HTTP/1.1\r\n\r\n"
    yield b"GET /index.html HTTP/1.1\r\nHost: x\r\nAuthorization: Basic !!!\r\n\r\n"
    yield b"GET /index.html HTTP/1.1\r\nAuthorization: Basic " + base64.b64encode(b"nocolon") + b"\r\n\r\n"
    yield b"GET /index.html HTTP/1.1\r\nAuthorization: Basic " + base64.b64encode(long) + b"\r\n\r\n"
    yield b"GET /index.html HTTP/1.1\r\nAuthorization: Digest x\r\n\r\n"
    yield b"GET http://evil/ HTTP/1.1\r\n\r\n"
    yield b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n"
    yield b"GET /../../../../etc/passwd HTTP/1.1\r\nAuthorization: " + GOOD.encode() + b"\r\n\r\n"
    yield b"GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nAuthorization: " + GOOD.encode() + b"\r\n\r\n"
    yield b"\r\n" * 5000
    yield b"GET / HTTP/1.1\r\n\tfolded: header\r\n\r\n"
    yield b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 50                       # pipelined
    yield bytes(range(256)) * 10


def handshake_cases():
    auth = b"Authorization: " + GOOD.encode() + b"\r\n"
    yield handshake()                                             # no credentials
    yield handshake(extra=b"Authorization: Basic " + base64.b64encode(b"watcher:wrong") + b"\r\n")
    yield handshake(extra=auth + b"Origin: https://evil.example\r\n")   # a foreign origin
    yield handshake(extra=auth + b"Origin: null\r\n")
    yield handshake(extra=auth, key=b"")
    yield handshake(extra=auth, key=b"not base64!")
    yield handshake(extra=auth, version=b"8")
    yield handshake(extra=auth, version=b"abc")
    yield handshake(extra=auth, upgrade=b"h2c")
    yield handshake(extra=auth + b"Sec-WebSocket-Protocol: " + b"p," * 4000 + b"\r\n")
    yield handshake(extra=auth + b"Sec-WebSocket-Extensions: permessage-deflate; "
                    + b"x" * 10000 + b"\r\n")
    yield handshake(path="/stream?" + "q" * 10000, extra=auth)
    yield handshake(extra=auth)[:40]                               # cut short


def junk_frames():
    """Frames a viewer must not send, after a good handshake."""
    yield bytes([0x83, 0x80]) + os.urandom(4)                      # reserved opcode
    yield bytes([0x82, 0x05]) + b"hello"                           # unmasked
    yield bytes([0x82, 0xFF]) + struct.pack(">Q", 2**62) + os.urandom(4)  # huge length
    yield bytes([0xF2, 0x80]) + os.urandom(4)                      # reserved bits
    yield bytes([0x89, 0xFE]) + struct.pack(">H", 300) + os.urandom(4) + b"p" * 300  # long ping
    yield bytes([0x01, 0x85]) + b"\x00\x00\x00\x00" + b"\xff\xfe\xfd\xfc\xfb"      # bad UTF-8
    yield bytes([0x88, 0x82, 0, 0, 0, 0]) + b"\x03"                # broken close
    yield os.urandom(5000)


#: Connections a group's cases open at once: fewer than the daemon's cap on
#: pending connections per address (pistreaming.admission.PER_ADDRESS, 16),
#: so that every case reaches the parser instead of being refused unread.
AT_ONCE = 8
#: The longest pause the healthy viewer may see between two pictures (24 a
#: second come normally).
LONGEST_PAUSE = 0.5


@pytest.fixture(scope="module")
def password_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("abuse") / "passwd"
    subprocess.run([sys.executable, "-m", "pistreaming.passwd", "--stdin", str(path), USER],
                   input=PASSWORD + "\n", text=True, check=True, timeout=60,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    return path


def junk_frame(port, frame, linger=1.0):
    """A good handshake, then a frame a viewer must not send; the stream read
    for C{linger} seconds at most, or until the daemon closes the connection
    (a frame cut short leaves it waiting for the rest, as it should)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        sock.sendall(handshake(extra=b"Authorization: " + GOOD.encode() + b"\r\n",
                               path="/stream"))
        sock.recv(4096)
        sock.sendall(frame)
        deadline = time.monotonic() + linger
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                if not sock.recv(65536):
                    break
        except OSError:
            pass
    finally:
        sock.close()


def drop_mid_handshake(port, cut, reset):
    """A handshake cut after C{cut} bytes, then the connection dropped
    (with a reset if C{reset})."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(handshake(extra=b"Authorization: " + GOOD.encode() + b"\r\n")[:cut])
    sock.close()


def groups(ports, rng):
    """(group name, [(case name, action)]) for every case, in the order sent."""
    yield "http", [(f"http {i}", functools.partial(send_raw, ports["http"], data))
                   for i, data in enumerate(http_cases())]
    for port_name, port in ports.items():
        yield f"handshakes on {port_name}", [
            (f"handshake {i} on {port_name}", functools.partial(send_raw, port, data))
            for i, data in enumerate(handshake_cases())]
        yield f"random bytes on {port_name}", [
            (f"random bytes {i} on {port_name}", functools.partial(
                send_raw, port, os.urandom(rng.choice([1, 7, 188, 1000, 8192, 65536]))))
            for i in range(20)]
        yield f"junk frames on {port_name}", [
            (f"junk frame {i} on {port_name}", functools.partial(junk_frame, port, frame))
            for i, frame in enumerate(junk_frames())]
    # a few hundred connections dropped mid-handshake, some with a reset
    yield "dropped mid-handshake", [
        (f"dropped mid-handshake {i}", functools.partial(
            drop_mid_handshake, ports["http" if i % 2 else "ws"], rng.randrange(1, 120),
            i % 3 == 0))
        for i in range(300)]


def attempt(action):
    try:
        action()
    except OSError:
        pass  # the daemon may close on us: that is its right


def test_the_daemon_shrugs_off_bad_input_and_the_picture_never_stops(password_file, capsys):
    rng = random.Random(6)
    with Daemon("--framerate", str(RATE), "--passwd", str(password_file)) as daemon:
        ports = {"http": daemon.http_port, "ws": daemon.ws_port}
        viewer = HealthyViewer(f"ws://127.0.0.1:{daemon.http_port}/stream")
        viewer.start()
        assert viewer.wait_for_picture_after(0, 10)
        first = viewer.count()
        tried = 0
        silent_after = []
        with ThreadPoolExecutor(AT_ONCE) as pool:
            for name, cases in groups(ports, rng):
                list(pool.map(attempt, [action for _, action in cases]))
                tried += len(cases)
                # Still live once the whole group is in: a new picture.
                if not viewer.wait_for_picture_after(viewer.count()):
                    silent_after.append(name)
        # a last stretch of pictures after the last case
        assert viewer.wait_for_picture_after(viewer.count() + RATE // 4)
        viewer.stopping = True
        viewer.ws.close()
        viewer.join(5)
        with capsys.disabled():
            print(f"\n  abuse: {tried} cases tried against the running daemon; the viewer "
                  f"got {len(viewer.pictures)} pictures, none missing")
        assert silent_after == [], f"no new picture after: {silent_after}"
        assert viewer.error is None, viewer.error
        pts = [p for _, p in viewer.pictures]
        steps = [round((b - a) * RATE) for a, b in zip(pts, pts[1:])]
        assert set(steps) == {1}, "pictures missing from the healthy viewer's stream"
        # Pictures all along, while the cases went in: no pause in the stream.
        arrivals = [t for t, _ in viewer.pictures[first - 1:]]
        pauses = [b - a for a, b in zip(arrivals, arrivals[1:])]
        assert max(pauses) < LONGEST_PAUSE, max(pauses)
        assert "Traceback" not in daemon.output()
        assert tried > 400
