"""/stats.json and /metrics after a known sequence of events, on the real daemon."""

import json
import os
import re
import signal
import time
import urllib.request

import websocket

from pistreaming.stats import Window
from tests.daemon import Daemon
from tests.test_stream import ffmpeg_children, read_header


def fetch(daemon, path):
    with urllib.request.urlopen(daemon.base_url + path, timeout=10) as response:
        return response.headers, response.read()


def stats(daemon):
    return json.loads(fetch(daemon, "stats.json")[1])


def metric(text, name):
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def receive(ws, seconds):
    received = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        received += len(ws.recv())
    return received


def test_the_figures_follow_what_happened():
    with Daemon("--resolution", "320x240", "--framerate", "24", "--bitrate", "400k") as daemon:
        url = f"ws://127.0.0.1:{daemon.http_port}/stream"
        daemon.wait_for(r"encoder process: ffmpeg pid", 10)
        deadline = time.monotonic() + 10
        while stats(daemon)["broadcast"]["bytes_discarded"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        before = stats(daemon)
        assert before["viewers"] == {"max": None, "count": 0, "total": 0, "list": []}
        assert before["broadcast"]["bytes_sent"] == 0
        assert before["broadcast"]["bytes_discarded"] > 0  # nobody watched

        # Two viewers come; the first leaves.
        first = websocket.create_connection(url, timeout=10)
        read_header(first)
        receive(first, 0.5)
        second = websocket.create_connection(url, timeout=10)
        second_port = second.sock.getsockname()[1]
        read_header(second)
        first.close()
        # ffmpeg is killed once, and comes back.
        (old,) = ffmpeg_children(daemon)
        mark = len(daemon.lines)
        os.kill(old, signal.SIGKILL)
        daemon.wait_for(r"encoder process: ffmpeg pid", 10, start=mark)
        receive(second, 3.0)

        now = stats(daemon)
        headers, _ = fetch(daemon, "stats.json")
        assert headers["Content-Type"] == "application/json"
        viewers = now["viewers"]
        assert (viewers["count"], viewers["total"]) == (1, 2)
        (only,) = viewers["list"]
        assert only["address"].endswith(f":{second_port}")
        assert 3.0 <= only["connected_for"] <= 30
        assert only["bytes_sent"] > 0 and only["skips"] == 0 and only["backlog"] == 0
        assert now["encoder"]["restarts"] == 1
        assert now["camera"]["source"] == "test" and now["camera"]["state"] == "ok"
        assert now["camera"]["frames_captured"] >= now["encoder"]["frames_in"] > 24
        assert now["frames_dropped_before_encoder"] == (
            now["camera"]["frames_dropped"] + now["encoder"]["frames_dropped"])
        assert now["encoder"]["bytes_in"] == now["encoder"]["frames_in"] * 320 * 240 * 3 // 2
        assert now["broadcast"]["bytes_in"] == now["encoder"]["bytes_out"]
        assert now["broadcast"]["bytes_sent"] >= only["bytes_sent"]
        assert 20 <= now["stream"]["fps"] <= 28
        assert 100_000 <= now["stream"]["bitrate"] <= 1_200_000
        assert now["uptime"] > before["uptime"]
        for stage in ("camera_to_encoder", "encoder"):
            latency = now["latency_ms"][stage]
            assert latency["count"] > 24 and 0 <= latency["p50"] <= latency["p95"] <= latency["max"]

        # /metrics says the same, in Prometheus' text format.
        headers, body = fetch(daemon, "metrics")
        assert headers["Content-Type"].startswith("text/plain")
        text = body.decode()
        assert metric(text, "pistream_viewers") == 1
        assert metric(text, "pistream_viewers_connected_total") == 2
        assert metric(text, "pistream_encoder_restarts_total") == 1
        assert metric(text, "pistream_camera_up") == 1
        assert metric(text, 'pistream_frames_dropped_total{where="encoder"}') >= 0
        assert metric(text, 'pistream_stage_latency_seconds{quantile="0.5",stage="encoder"}') > 0
        second.close()


def test_a_window_holds_its_last_minute_whether_or_not_anyone_asks():
    # Ten minutes of pictures at 30 fps, and no one reading /stats.json: the
    # daemon's memory must not fill up with the latency samples.
    window = Window(span=60)
    for number in range(30 * 600):
        window.add(number / 30, 0.004)
    assert abs(len(window.samples) - 60 * 30) <= 1
    assert abs(window.summary(600)["count"] - 60 * 30) <= 1
