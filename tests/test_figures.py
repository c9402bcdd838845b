"""Stats, built from the stages it reads, on a Clock: what /stats.json and
/metrics say about the encoder's state, refused connections and rates."""

import re
from types import SimpleNamespace

from twisted.internet.task import Clock

from pistreaming.admission import PendingConnections
from pistreaming.broadcast import StreamFactory
from pistreaming.frames import stream_header
from pistreaming.mpegts import Chunk
from pistreaming.options import Config
from pistreaming.stats import Stats
from pistreaming.web import metrics_text


def encoder():
    return SimpleNamespace(process=None, restarts=0, frames_in=0, frames_dropped=0,
                           bytes_in=0, bytes_out=0, pictures_out=0,
                           state="starting", why=None)


def make():
    clock = Clock()
    stream = StreamFactory(stream_header(640, 480), clock, max_viewers=3)
    pending = PendingConnections(per_address=1, total=10)
    parts = SimpleNamespace(clock=clock, encoder=encoder(), stream=stream, pending=pending)
    parts.stats = Stats(clock, Config(codec="mpeg1", ffmpeg="/usr/bin/ffmpeg"), SimpleNamespace(name="test"),
                        parts.encoder, stream.fanout, stream, pending=pending)
    return parts


def metric(stats, name):
    text = metrics_text(stats)[0](None).decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_the_encoder_s_state_is_shown():
    parts = make()
    figures = parts.stats.gather()["encoder"]
    assert (figures["state"], figures["why"]) == ("starting", None)
    assert metric(parts.stats, "pistream_encoder_up") == 0
    parts.encoder.state = "ok"
    assert parts.stats.gather()["encoder"]["state"] == "ok"
    assert metric(parts.stats, "pistream_encoder_up") == 1
    parts.encoder.state, parts.encoder.why = "unavailable", "ffmpeg could not be started"
    figures = parts.stats.gather(addresses=False)["encoder"]
    assert (figures["state"], figures["why"]) == ("unavailable", "ffmpeg could not be started")
    assert metric(parts.stats, "pistream_encoder_up") == 0


def test_connections_refused_for_too_many_pending_are_counted():
    parts = make()
    assert parts.stats.gather()["connections"] == {"refused_pending": 0, "evicted_pending": 0}
    assert metric(parts.stats, "pistream_connections_refused_pending_total") == 0
    parts.pending.per_address, parts.pending.total = 1, 2
    closed = []
    assert parts.pending.admit("192.0.2.7", lambda: closed.append("first"))
    assert not parts.pending.admit("192.0.2.7")
    assert not parts.pending.admit("192.0.2.7")
    assert parts.pending.admit("192.0.2.8")
    assert parts.pending.admit("192.0.2.9")  # all taken: the first makes room
    assert closed == ["first"]
    assert parts.stats.gather()["connections"] == {"refused_pending": 2, "evicted_pending": 1}
    assert metric(parts.stats, "pistream_connections_refused_pending_total") == 2
    assert metric(parts.stats, "pistream_connections_evicted_pending_total") == 1


def test_rates_come_from_samples_on_the_clock_and_counters_from_the_fan_out():
    parts = make()
    stats, clock = parts.stats, parts.clock
    stats.startService()
    try:
        for _ in range(5):  # a sample as it starts, then one a second
            parts.encoder.bytes_out += 1000
            parts.encoder.pictures_out += 25
            clock.advance(1.0)
        parts.stream.fanout.broadcast(Chunk(b"\x47" + bytes(187), picture=True, keyframe=True))
        figures = stats.gather()
        assert figures["uptime"] == 5.0
        assert figures["stream"]["bitrate"] == 8000
        assert figures["stream"]["fps"] == 25.0
        assert figures["broadcast"]["bytes_in"] == 188
        assert figures["broadcast"]["bytes_discarded"] == 188  # nobody watched
        assert figures["viewers"] == {"max": 3, "count": 0, "total": 0, "list": []}
    finally:
        stats.stopService()
    assert not clock.getDelayedCalls()
