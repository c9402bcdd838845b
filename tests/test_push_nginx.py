"""End to end with real media servers: the daemon on its test pattern pushes
to nginx with its RTMP module (Debian's nginx and libnginx-mod-rtmp, which
``./dev test`` installs), run unprivileged from a temporary directory on
loopback ports, and to ffmpeg receiving RTSP and SRT.

One nginx and two daemons serve the whole module, and the tests run in
order, as a story: the daemons start before nginx does (their pushes back
off), then nginx comes up and both pushes go live; nginx's statistics page
shows an H.264 publisher of each daemon's size (--codec h264: the camera's
H.264 copied; --codec mpeg1: encoded for the push, with silent AAC) and its
HLS segments decode; nginx is killed and started again, then stopped with
SIGSTOP and let go, while a local viewer keeps its full rate; and no log
line, /stats.json or /metrics ever holds a stream key.  The push's timeouts
are shortened for the test through the daemon's prelude (the defaults are
checked on a Clock in tests/test_push.py).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
import websocket

from pistreaming.h264 import parse_message
from tests.daemon import Daemon
from tests.nginx import Nginx, NginxMissing, free_port

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")

KEY_H264 = "h264-k3y-5ecret"
KEY_MPEG1 = "mpeg1-k3y-5ecret"
SRT_KEY = "srt-5treamid-5ecret"
RTSP_PASSWORD = "rtsp-pa55-5ecret"
SECRETS = (KEY_H264, KEY_MPEG1, SRT_KEY, RTSP_PASSWORD)

#: The push's timeouts in the test's daemons (seconds).
TIMEOUT = 1.0
FIRST_DELAY = 0.25
MAX_DELAY = 1.0
PRELUDE = (f"import pistreaming.push as p; p.TIMEOUT = {TIMEOUT}; "
           f"p.FIRST_DELAY = {FIRST_DELAY}; p.MAX_DELAY = {MAX_DELAY}")
RATE = 30


class Receiver:
    """ffmpeg listening for a push (RTSP or SRT) and keeping what it gets."""

    def __init__(self, directory, name, input_args):
        self.out = os.path.join(str(directory), name + ".ts")
        self.process = subprocess.Popen(
            [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", *input_args,
             "-map", "0:v", "-c", "copy", "-f", "mpegts", self.out],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def stats_of(daemon):
    with urllib.request.urlopen(daemon.base_url + "stats.json", timeout=5) as r:
        return r.read().decode()


def pushes_of(daemon):
    return json.loads(stats_of(daemon))["push"]


def wait_until(predicate, timeout, what, every=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not {what} within {timeout}s"
        time.sleep(every)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """nginx (not started), the RTSP and SRT receivers, and the two
    daemons, started before nginx."""
    directory = tmp_path_factory.mktemp("push")
    try:
        nginx = Nginx(directory)
    except NginxMissing as e:
        pytest.fail(str(e))
    rtsp_port, srt_port = free_port(), free_port(socket.SOCK_DGRAM)
    receivers = [
        Receiver(directory, "rtsp", ["-rtsp_flags", "listen",
                                     "-i", f"rtsp://127.0.0.1:{rtsp_port}/garden"]),
        Receiver(directory, "srt", ["-i", f"srt://127.0.0.1:{srt_port}?mode=listener"]),
    ]
    h264 = Daemon(
        "--codec", "h264", "--resolution", "320x240", "--framerate", str(RATE),
        "--keyframe-interval", "0.5", "--ws-port", "off",
        "--push", f"rtmp://127.0.0.1:{nginx.rtmp}/live/{KEY_H264}",
        "--push", f"rtsp://cam:{RTSP_PASSWORD}@127.0.0.1:{rtsp_port}/garden",
        "--push", f"srt://127.0.0.1:{srt_port}?streamid={SRT_KEY}&latency=20000",
        prelude=PRELUDE)
    mpeg1 = Daemon(
        "--codec", "mpeg1", "--resolution", "352x288", "--framerate", str(RATE),
        "--keyframe-interval", "0.5", "--ws-port", "off", "--push-audio", "silent",
        "--push", f"rtmp://127.0.0.1:{nginx.rtmp}/live/{KEY_MPEG1}",
        prelude=PRELUDE)
    starting = [threading.Thread(target=d.start) for d in (h264, mpeg1)]
    try:
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join(60)
        assert h264.http_port and mpeg1.http_port, "a daemon did not start"
        yield SimpleNamespace(nginx=nginx, h264=h264, mpeg1=mpeg1, receivers=receivers,
                              rtsp_port=rtsp_port, srt_port=srt_port)
    finally:
        nginx.stop()
        stopping = [threading.Thread(target=d.stop) for d in (h264, mpeg1)
                    if d.process is not None]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join(15)
        for receiver in receivers:
            receiver.stop()


def rtmp_push(daemon):
    return pushes_of(daemon)[0]


def both_live(nginx, h264, mpeg1):
    return (rtmp_push(h264)["state"] == "live" and rtmp_push(mpeg1)["state"] == "live"
            and nginx.publisher(KEY_H264) is not None
            and nginx.publisher(KEY_MPEG1) is not None)


def live(scene):
    """Both RTMP pushes live on nginx (started if a test before did not)."""
    if scene.nginx.process is None or scene.nginx.process.poll() is not None:
        scene.nginx.start()
    wait_until(lambda: both_live(scene.nginx, scene.h264, scene.mpeg1), MAX_DELAY + 5,
               "live on nginx")


class Viewer(threading.Thread):
    """A local viewer of the h264 daemon's /stream: when each picture
    arrived, and how old it was (from its capture time)."""

    def __init__(self, daemon):
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{daemon.http_port}/stream",
                                              timeout=10)
        self.connected_at = time.monotonic()
        self.arrivals = []
        self.ages = []
        self.running = True
        self.start()

    def run(self):
        while self.running:
            try:
                opcode, data = self.ws.recv_data()
            except Exception:
                return
            if opcode == websocket.ABNF.OPCODE_BINARY:
                now, arrived = time.time(), time.monotonic()
                self.arrivals.append(arrived)
                captured = parse_message(data).capture_time
                if captured is not None:
                    self.ages.append((arrived, now - captured))

    def stop(self):
        self.running = False
        self.ws.close()
        self.join(5)

    def check_full_rate(self, since, until):
        """Pictures at the stream's rate from C{since} to C{until}
        (monotonic), none late, no gap.  (Not counting the first quarter
        second: a newcomer gets the pictures since the last keyframe at
        once.)"""
        since = max(since, self.connected_at + 0.25)
        times = [t for t in self.arrivals if since <= t <= until]
        seconds = until - since
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(times) >= RATE * seconds * 0.85, (len(times), seconds)
        assert max(gaps) < 0.3, max(gaps)
        # (The newcomer's pictures since the keyframe, sent at once, are as
        # old as the keyframe: the window leaves them out, as it does above.)
        ages = [age for t, age in self.ages if since <= t <= until]
        assert ages and max(ages) < 0.5, max(ages)
        return len(times) / seconds, max(gaps)


def test_daemons_started_before_nginx_go_live_once_nginx_is_up(scene):
    nginx, h264, mpeg1 = scene.nginx, scene.h264, scene.mpeg1
    for daemon in (h264, mpeg1):
        first = wait_until(lambda: rtmp_push(daemon)["restarts"] >= 1 and rtmp_push(daemon),
                           10, "backing off while nginx is down")
        assert first["state"] in ("backing off", "connecting")
        assert "Connection refused" in first["error"]
    nginx.start()
    up = time.monotonic()
    wait_until(lambda: both_live(nginx, h264, mpeg1), MAX_DELAY + 5, "live on nginx")
    print(f"\nboth pushes live {time.monotonic() - up:.2f} s after nginx was up")


def test_nginx_shows_h264_of_the_right_size_and_its_hls_decodes(scene):
    nginx = scene.nginx
    live(scene)
    for key, size, audio in ((KEY_H264, (320, 240), None), (KEY_MPEG1, (352, 288), "AAC")):
        publisher = wait_until(
            lambda: (lambda p: p if p is not None and p.find("meta/video/width") is not None
                     else None)(nginx.publisher(key)), 5, f"{key}'s metadata on nginx")
        video = publisher.find("meta/video")
        assert video.findtext("codec") == "H264"
        assert (int(video.findtext("width")), int(video.findtext("height"))) == size
        assert publisher.findtext("meta/audio/codec") == audio
    # Each stream's HLS: a whole segment, decoded with ffprobe.
    hls = os.path.join(nginx.dir, "hls")
    for key, size in ((KEY_H264, (320, 240)), (KEY_MPEG1, (352, 288))):
        def segments():
            # (the newest is still being written)
            names = sorted((n for n in os.listdir(hls) if re.fullmatch(re.escape(key) + r"-\d+\.ts", n)),
                           key=lambda n: int(n.rsplit("-", 1)[1][:-3]))
            return names[:-1]
        segment = wait_until(segments, 10, f"an HLS segment of {key}")[-1]
        probe = subprocess.run(
            [FFPROBE, "-v", "error", "-select_streams", "v:0", "-count_frames",
             "-show_entries", "stream=codec_name,width,height,nb_read_frames", "-of", "json",
             os.path.join(hls, segment)], capture_output=True, text=True, timeout=30)
        (stream,) = json.loads(probe.stdout)["streams"]
        assert probe.stderr == ""
        assert stream["codec_name"] == "h264" and (stream["width"], stream["height"]) == size
        assert int(stream["nb_read_frames"]) >= RATE // 2  # half a second at least


def test_nginx_killed_the_push_backs_off_and_is_live_again_with_the_viewer_at_full_rate(scene):
    nginx, h264, mpeg1 = scene.nginx, scene.h264, scene.mpeg1
    live(scene)
    viewer = Viewer(h264)
    try:
        since = time.monotonic()
        restarts = rtmp_push(h264)["restarts"]
        nginx.signal(signal.SIGKILL)
        failed = wait_until(lambda: rtmp_push(h264)["restarts"] > restarts and rtmp_push(h264),
                            5, "the push restarted after nginx was killed")
        assert failed["state"] in ("backing off", "connecting")
        nginx.start()
        wait_until(lambda: both_live(nginx, h264, mpeg1), MAX_DELAY + 5, "live again")
        rate, gap = viewer.check_full_rate(since, time.monotonic())
    finally:
        viewer.stop()
    print(f"\nlocal viewer while nginx was killed and restarted: {rate:.1f} pictures/s, "
          f"longest gap {gap * 1000:.0f} ms")


def test_nginx_stopped_the_push_is_restarted_within_its_timeout(scene):
    nginx, h264 = scene.nginx, scene.h264
    live(scene)
    viewer = Viewer(h264)
    mark = len(h264.lines)
    try:
        since = time.monotonic()
        nginx.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        # The kernel's buffers on both sides take a few hundred kilobytes
        # first (seconds of video): ffmpeg sends until they are full.
        sent, last_growth = rtmp_push(h264)["bytes_sent"], stopped
        pattern = r"push rtmp://\S+: ffmpeg (made no progress for|exited with code)"
        while not h264.search(pattern, start=mark):
            assert time.monotonic() - stopped < 15, "not restarted within 15 s"
            now_sent = rtmp_push(h264)["bytes_sent"]
            if now_sent != sent:
                sent, last_growth = now_sent, time.monotonic()
            time.sleep(0.05)
        restarted = time.monotonic()
        # Within its timeout once nothing more goes out (plus a report
        # of ffmpeg's progress and a round of the watchdog).
        assert restarted - last_growth <= TIMEOUT + 1.5, restarted - last_growth
        # (No push is live while nginx is stopped: its own line says when.)
        resumed = len(h264.lines)
        nginx.signal(signal.SIGCONT)
        h264.wait_for(r"push rtmp://\S+: live, ", 10, start=resumed)
        assert rtmp_push(h264)["state"] == "live"
        rate, gap = viewer.check_full_rate(since, time.monotonic())
    finally:
        viewer.stop()
    print(f"\npush restarted {restarted - stopped:.1f} s after nginx stopped, "
          f"{restarted - last_growth:.1f} s after its bytes out stopped (timeout {TIMEOUT} s); "
          f"local viewer {rate:.1f} pictures/s, longest gap {gap * 1000:.0f} ms")


def test_rtsp_and_srt_pushes_reach_their_receivers(scene):
    pushes = pushes_of(scene.h264)
    assert [p["target"] for p in pushes] == [
        f"rtmp://127.0.0.1:{scene.nginx.rtmp}/live/****",
        f"rtsp://cam:****@127.0.0.1:{scene.rtsp_port}/garden",
        f"srt://127.0.0.1:{scene.srt_port}?streamid=****&latency=20000"]
    for push in pushes[1:]:
        assert push["starts"] >= 1 and push["chunks_in"] > 0, push
    for receiver in scene.receivers:
        receiver.stop()
        probe = subprocess.run(
            [FFPROBE, "-v", "error", "-select_streams", "v:0", "-count_frames",
             "-show_entries", "stream=codec_name,width,height,nb_read_frames", "-of", "json",
             receiver.out], capture_output=True, text=True, timeout=30)
        (stream,) = json.loads(probe.stdout)["streams"]
        assert stream["codec_name"] == "h264" and (stream["width"], stream["height"]) == (320, 240)
        assert int(stream["nb_read_frames"]) >= RATE, (receiver.out, stream)


def test_no_key_in_any_log_line_stats_or_metrics(scene):
    for daemon in (scene.h264, scene.mpeg1):
        with urllib.request.urlopen(daemon.base_url + "metrics", timeout=5) as r:
            metrics = r.read().decode()
        stats = stats_of(daemon)
        output = daemon.output()
        for secret in SECRETS:
            assert secret not in output and secret not in stats and secret not in metrics
        assert "push rtmp://127.0.0.1:" in output and "/live/****" in output
        assert re.search(r'pistream_push_up\{target="rtmp://127\.0\.0\.1:\d+/live/\*\*\*\*"\} 1\.0',
                         metrics), metrics
        assert re.search(r"pistream_push_restarts_total\{target=\"rtmp://[^\"]+\"\} [1-9]", metrics)
