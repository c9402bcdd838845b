"""End to end: recordings and snapshots of the real daemon, with real
ffmpeg, on a real disk (a small tmpfs, where the test may mount one).

Two daemons for the whole module, started together: --codec h264
(keyframes every 0.5 s, 1.5 s segments, at most 1 MB kept) and --codec
mpeg1 (its keyframes every second, 2 s segments) recording onto an 8 MiB
tmpfs, which a test fills.  The tests run in the order of the daemons'
lives: snapshots, segments, the listing, the size cap, a full disk, and
last a SIGKILL of each.  Unit tests of the same: tests/test_recorder.py,
tests/test_snapshot.py, tests/test_recordings.py."""

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import websocket

from pistreaming.snapshot import FRESH_FOR
from tests.daemon import Daemon
from tests.test_snapshot import jpeg_size
from tests.test_stream import pictures_in

H264 = ("--codec", "h264", "--bitrate", "4M", "--keyframe-interval", "0.5",
        "--record-segment", "1.5s", "--record-keep", "1M")
MPEG1 = ("--codec", "mpeg1", "--record-segment", "2s", "--record-keep", "1G")
TMPFS_SIZE = 8 * 1024 * 1024


def mount_tmpfs(path):
    """Mount a small tmpfs at C{path}; None, or why it cannot be done."""
    if os.geteuid() != 0:
        return "not root: a full disk is simulated with a tmpfs, which only root mounts"
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs",
                             path], capture_output=True, text=True)
    if result.returncode != 0:
        return f"cannot mount a tmpfs here: {result.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def daemons():
    top = tempfile.mkdtemp(prefix="pistream-record-")
    h264_dir, mpeg1_dir = os.path.join(top, "h264"), os.path.join(top, "mpeg1")
    os.makedirs(mpeg1_dir)
    no_tmpfs = mount_tmpfs(mpeg1_dir)
    pair = {"h264": Daemon(*H264, "--record", h264_dir),
            "mpeg1": Daemon(*MPEG1, "--record", mpeg1_dir)}
    pair["h264"].directory, pair["mpeg1"].directory = h264_dir, mpeg1_dir
    pair["mpeg1"].no_tmpfs = no_tmpfs
    try:
        starting = [threading.Thread(target=d.start) for d in pair.values()]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join(60)
        yield pair
    finally:
        for daemon in pair.values():
            daemon.__exit__(None, None, None)
        if no_tmpfs is None:
            subprocess.run(["umount", "-l", mpeg1_dir])
        shutil.rmtree(top, ignore_errors=True)


def fetch(daemon, path, headers=None, method="GET"):
    connection = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            response.read()
    finally:
        connection.close()


def figures(daemon):
    return json.loads(fetch(daemon, "/stats.json")[2])


def listing(daemon):
    return json.loads(fetch(daemon, "/recordings/?format=json")[2])["recordings"]


def probe(path):
    """(pictures decoded, seconds) of a recording, decoded to its end by
    ffprobe, which must find no error in it."""
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries",
         "stream=nb_read_frames:format=duration", "-of", "json", path],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", (path, result.stderr)
    out = json.loads(result.stdout)
    return int(out["streams"][0]["nb_read_frames"]), float(out["format"]["duration"])


def segments_started(daemon):
    return re.findall(r"recording: (\S+Z(?:-\d+)?\.\w+) \(ffmpeg pid", daemon.output())


def wait_for_segments(daemon, count, timeout=20):
    """Until C{count} segments have begun; their names."""
    daemon.wait_for(r"recording: \S+ \(ffmpeg pid", timeout)
    deadline = time.monotonic() + timeout
    while len(segments_started(daemon)) < count:
        lines = len(daemon.lines)
        daemon.wait_for(r"recording: \S+ \(ffmpeg pid", max(0.1, deadline - time.monotonic()),
                        start=lines)
    return segments_started(daemon)


class Viewer(threading.Thread):
    """A page's WebSocket on the MPEG-1 stream: when each picture came, and
    the status messages."""

    def __init__(self, daemon):
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{daemon.http_port}/stream", timeout=10, subprotocols=["pistream"])
        self.arrivals = []
        self.status = []
        self.changed = threading.Condition()

    def run(self):
        while True:
            try:
                opcode, data = self.ws.recv_data()
            except Exception:
                return
            now = time.monotonic()
            with self.changed:
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    self.arrivals.extend([now] * pictures_in(data))
                elif opcode == websocket.ABNF.OPCODE_TEXT:
                    self.status.append(json.loads(data))
                self.changed.notify_all()

    def rate(self, seconds):
        """Pictures a second over the next C{seconds}."""
        start = time.monotonic()
        time.sleep(seconds)
        with self.changed:
            return sum(1 for t in self.arrivals if t >= start) / seconds

    def wait_status(self, key, value, timeout=15):
        deadline = time.monotonic() + timeout
        with self.changed:
            while not any(s.get(key) == value for s in self.status):
                left = deadline - time.monotonic()
                assert left > 0, f"no {key}={value} in {self.status}"
                self.changed.wait(left)

    def close(self):
        self.ws.close()


# -- snapshots --------------------------------------------------------------------

def snapshot(daemon, query=""):
    deadline = time.monotonic() + 15
    while True:
        status, headers, body = fetch(daemon, "/snapshot.jpg" + query)
        if status != 503 or time.monotonic() > deadline:
            break
        assert headers["retry-after"] == "1"
        time.sleep(0.2)  # as its Retry-After asks (shorter: the first picture is near)
    assert status == 200, body
    assert headers["content-type"] == "image/jpeg" and headers["cache-control"] == "no-store"
    return body


def test_the_snapshot_is_a_jpeg_of_the_picture_and_scales_down(daemons):
    for daemon in daemons.values():
        assert jpeg_size(snapshot(daemon)) == (640, 480)
        assert jpeg_size(snapshot(daemon, "?width=320")) == (320, 240)
        assert fetch(daemon, "/snapshot.jpg?width=641")[0] == 400


def test_many_asking_cost_a_few_decodes_and_the_picture_changes(daemons):
    daemon = daemons["h264"]
    first = snapshot(daemon)
    before = figures(daemon)["snapshot"]["decodes"]
    connections = threading.local()

    def ask(_):
        if not hasattr(connections, "one"):
            connections.one = http.client.HTTPConnection("127.0.0.1", daemon.http_port,
                                                         timeout=10)
        started = time.monotonic()
        connections.one.request("GET", "/snapshot.jpg")
        response = connections.one.getresponse()
        body = response.read()
        answered = time.monotonic() - started
        assert response.status == 200 and body[:2] == b"\xff\xd8"
        time.sleep(max(0.0, 0.08 - answered))  # 8 at 12.5 a second: 100 a second
        return answered

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        times = list(pool.map(ask, range(200)))
    took = time.monotonic() - started
    decodes = figures(daemon)["snapshot"]["decodes"] - before
    # 200 requests in about 2 s: a decode when the JPEG is a second old.
    assert 1.5 < took < 4
    assert decodes <= took / FRESH_FOR + 2, decodes
    assert sorted(times)[100] < 0.2, sorted(times)  # answers within 200 ms
    # A picture of now, not of then (a second or so later: how long a JPEG
    # is kept grows where decoding is slow, as on a busy machine).
    deadline = time.monotonic() + 10
    while snapshot(daemon) == first:
        assert time.monotonic() < deadline, "the snapshot never changed"
        time.sleep(0.25)


# -- recordings --------------------------------------------------------------------

def test_segments_roll_over_at_their_length_and_each_plays_to_its_end(daemons):
    # (codec, --record-segment, extension, segments to wait for, seconds
    # between keyframes: --keyframe-interval 0.5; MPEG-1's intra picture a second)
    for codec, length, extension, count, every in (("h264", 1.5, ".mp4", 3, 0.5),
                                                   ("mpeg1", 2.0, ".ts", 3, 1.0)):
        daemon = daemons[codec]
        names = wait_for_segments(daemon, count)
        assert all(name.endswith(extension) for name in names)
        complete = []
        for name in names[:-1]:  # (linked: --record-keep may delete them meanwhile)
            kept = os.path.join(daemon.directory, "kept-" + name)
            try:
                os.link(os.path.join(daemon.directory, name), kept)
                complete.append(kept)
            except FileNotFoundError:
                pass
        assert complete
        for number, kept in enumerate(complete):
            pictures, seconds = probe(kept)
            os.unlink(kept)
            # the set length, as the camera took it, cut at the next keyframe
            # (on time as a rule; later by at most the keyframe interval where
            # a busy machine dropped the pictures around it)
            assert length - 0.25 < seconds < length + every, (codec, kept, pictures, seconds)
            # every picture of it: after the first segment, which spans the
            # daemon's start (where the test pattern itself, beside two
            # other test workers, may make fewer than 24 a second)
            if number > 0 or names[0] != os.path.basename(kept)[len("kept-"):]:
                assert pictures >= length * 24 * 0.8, (codec, kept, pictures, seconds)


def test_the_recordings_are_listed_and_served_with_range(daemons):
    daemon = daemons["h264"]
    wait_for_segments(daemon, 3)
    recordings = listing(daemon)
    done = [r for r in recordings if not r["recording"]]
    assert recordings[-1]["recording"] and done
    for r in done:
        path = os.path.join(daemon.directory, r["name"])
        if os.path.exists(path):  # (not deleted meanwhile: --record-keep)
            # its length, cut at the next keyframe (every 0.5 s): at most one late
            assert 1.25 < r["length"] < 1.5 + 0.5, r
    r = done[-1]
    with open(os.path.join(daemon.directory, r["name"]), "rb") as f:
        content = f.read()
    status, headers, body = fetch(daemon, "/recordings/" + r["name"])
    assert (status, headers["content-type"], body) == (200, "video/mp4", content)
    status, headers, body = fetch(daemon, "/recordings/" + r["name"],
                                  {"Range": "bytes=100-1099"})
    assert (status, headers["content-range"], body) == (
        206, f"bytes 100-1099/{len(content)}", content[100:1100])
    for path in ("/recordings/../stats.json", "/recordings/%2e%2e/stats.json",
                 "/recordings/" + r["name"] + "/x", "/recordings/notes.txt"):
        assert fetch(daemon, path)[0] == 404, path
    status, _, page = fetch(daemon, "/recordings/")
    assert status == 200 and r["name"].encode() in page


def test_the_oldest_go_when_the_recordings_pass_the_size_kept(daemons):
    daemon = daemons["h264"]
    found = daemon.wait_for(r"recording: deleted \d+ oldest segment\(s\), ([^\s:]+)", 20)
    first = segments_started(daemon)[0]
    assert found.group(1) == first and not os.path.exists(
        os.path.join(daemon.directory, first))
    recording = figures(daemon)["recording"]
    # at most what is kept, and the segment being written
    assert recording["segments_deleted"] >= 1
    assert recording["bytes"] <= 1_000_000 + 1_000_000, recording


def test_a_full_disk_stops_recording_and_not_the_stream(daemons):
    daemon = daemons["mpeg1"]
    if daemon.no_tmpfs:
        pytest.skip(daemon.no_tmpfs)
    wait_for_segments(daemon, 2)
    viewer = Viewer(daemon)
    viewer.start()
    try:
        viewer.wait_status("recording", "recording")
        before = viewer.rate(0.75)
        disk = os.statvfs(daemon.directory)
        filler = os.path.join(daemon.directory, "filler")
        lines = len(daemon.lines)
        with open(filler, "wb") as f:  # leave about 150 kB: below the floor of 419 kB
            f.write(b"\0" * max(0, disk.f_bavail * disk.f_frsize - 150_000))
        daemon.wait_for(r"recording stopped: only .* free on the disk of .*, below the "
                        r"floor of 419 kB; it resumes when 629 kB are free", 15, start=lines)
        viewer.wait_status("recording", "stopped")
        during = viewer.rate(1.0)
        assert figures(daemon)["recording"]["state"] == "stopped"
        metrics = fetch(daemon, "/metrics")[2].decode()
        assert re.search(r"^pistream_recording_up 0\.0$", metrics, re.M)
        # the viewers were not held up (nor the daemon stopped)
        assert during >= 0.8 * before, (before, during)
        lines = len(daemon.lines)
        os.unlink(filler)
        daemon.wait_for(r"recording resumes", 15, start=lines)
        name = daemon.wait_for(r"recording: (\S+) \(ffmpeg pid", 15, start=lines).group(1)
        viewer.wait_status("recording", "recording")
        assert name not in segments_started(daemon)[:-1]  # a new segment
    finally:
        viewer.close()


def test_a_killed_daemon_leaves_a_last_segment_that_plays(daemons):
    for codec, length in (("h264", 1.5), ("mpeg1", 2.0)):
        daemon = daemons[codec]
        # When its segment has 0.7 s in it, and is not about to end.
        lines = len(daemon.lines)
        (current,) = [r for r in listing(daemon) if r["recording"]]
        if current["length"] > length - 0.5:
            name = daemon.wait_for(r"recording: (\S+) \(ffmpeg pid", 5, start=lines).group(1)
            time.sleep(0.7)
        else:
            name = current["name"]
            time.sleep(max(0.0, 0.7 - current["length"]))
        daemon.kill()  # SIGKILL, the daemon and its ffmpeg children: a power cut
        assert daemon.process.returncode == -signal.SIGKILL
        assert segments_started(daemon)[-1] == name
        pictures, seconds = probe(os.path.join(daemon.directory, name))
        # all but the last half second at most
        assert pictures >= 5, (codec, name, pictures, seconds)
