"""The daemon's figures: counters read from each stage, rates and latencies
over a recent window.  /stats.json shows them as JSON and /metrics in the
Prometheus text format (pistreaming.web).

The JSON (L{Stats.gather}) is one object: ``uptime`` (seconds), ``stream``
(size, frame rate and bit rate set and measured), ``camera``, ``encoder``,
``frames_dropped_before_encoder``, ``latency_ms`` (per stage: count, p50,
p95, max over the last minute), ``broadcast`` (byte counters, skips,
viewers turned away, the backlog limit) and ``viewers``: ``max``,
``count``, ``total`` and ``list``, one object per viewer connected now::

    {"address": "192.0.2.7:51234", "connected_since": 1700000000.0,
     "connected_for": 12.5, "bytes_sent": 123456, "backlog": 0,
     "stalled": false, "skips": 0}

``address`` is the viewer's address and port, or ``"hidden"`` when the
figures go to someone who may not see them (``gather(addresses=False)``:
pistreaming.web hides them from requests that come from another machine
without a password protecting the figures).  /metrics carries no
addresses at all.
"""

import collections
import math

from twisted.application import service
from twisted.internet import task


def percentile(sorted_values, fraction):
    """The C{fraction} percentile (nearest rank) of sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class Window:
    """Samples of one quantity over the last C{span} seconds (at most C{limit}).
    Older samples go as new ones come, so it holds a minute's worth whether
    or not anyone asks for the figures."""

    def __init__(self, span=60.0, limit=20_000):
        self.span = span
        self.samples = collections.deque(maxlen=limit)

    def add(self, when, value):
        self.samples.append((when, value))
        self._trim(when)

    def _trim(self, now):
        while self.samples and self.samples[0][0] < now - self.span:
            self.samples.popleft()

    def summary(self, now, scale=1.0, digits=1):
        self._trim(now)
        values = sorted(v for _, v in self.samples)
        if not values:
            return {"count": 0, "p50": None, "p95": None, "max": None}

        def rounded(v):
            return round(v * scale, digits)

        return {"count": len(values), "p50": rounded(percentile(values, 0.5)),
                "p95": rounded(percentile(values, 0.95)), "max": rounded(values[-1])}


class Rate:
    """The rate of a growing counter, from readings over the last C{span} seconds."""

    def __init__(self, read, span=5.0):
        self.read = read
        self.span = span
        self.readings = collections.deque()

    def sample(self, now):
        self.readings.append((now, self.read()))
        while len(self.readings) > 2 and self.readings[0][0] < now - self.span:
            self.readings.popleft()

    def value(self):
        if len(self.readings) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self.readings[0], self.readings[-1]
        if t1 <= t0 or v1 < v0:
            return 0.0
        return (v1 - v0) / (t1 - t0)


class Stats(service.Service):
    """Gathers figures from the running daemon (L{pistreaming.service.Pistream})."""

    name = "stats"
    sample_interval = 1.0

    def __init__(self, daemon, reactor):
        self.daemon = daemon
        self.reactor = reactor
        self.started_at = reactor.seconds()
        self.camera_to_encoder = Window()
        self.in_encoder = Window()
        self.bitrate = Rate(lambda: daemon.encoder.bytes_out * 8)
        self.framerate = Rate(lambda: daemon.encoder.pictures_out)
        self._sampler = None

    def picture_timing(self, captured_at, written_at, out_at):
        """From the encoder: when a picture's frame was captured, written to
        ffmpeg, and came out encoded."""
        self.camera_to_encoder.add(out_at, written_at - captured_at)
        self.in_encoder.add(out_at, out_at - written_at)

    def startService(self):
        super().startService()
        self.started_at = self.reactor.seconds()
        self._sampler = task.LoopingCall(self._sample)
        self._sampler.clock = self.reactor
        self._sampler.start(self.sample_interval, now=True)

    def stopService(self):
        super().stopService()
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()

    def _sample(self):
        now = self.reactor.seconds()
        self.bitrate.sample(now)
        self.framerate.sample(now)

    def _camera(self):
        d = self.daemon
        camera = d.camera
        if camera is None:  # a device or a file, read by ffmpeg itself
            return {
                "source": d.source.name,
                "state": "ok" if d.encoder.process is not None else "unavailable",
                "frames_captured": d.encoder.pictures_out,
                "frames_dropped": 0,
                "failures": d.encoder.restarts,
            }
        return {
            "source": camera.source.name,
            "state": camera.state,
            "frames_captured": camera.frames_captured,
            "frames_dropped": camera.frames_dropped,
            "failures": camera.failures,
        }

    def gather(self, addresses=True):
        """The figures (see the module's docstring); with C{addresses}
        false, each viewer's address is "hidden"."""
        d = self.daemon
        now = self.reactor.seconds()
        config = d.config
        camera, encoder, factory = d.camera, d.encoder, d.factory
        process = encoder.process
        viewers = factory.describe()
        return {
            "uptime": round(now - self.started_at, 3),
            "stream": {
                "width": config.width,
                "height": config.height,
                "framerate": float(config.framerate),
                "bitrate_setting": config.bitrate,
                "bitrate": round(self.bitrate.value()),
                "fps": round(self.framerate.value(), 2),
            },
            "camera": self._camera(),
            "encoder": {
                "pid": process.transport.pid if process is not None else None,
                "restarts": encoder.restarts,
                "frames_in": encoder.frames_in,
                "frames_dropped": encoder.frames_dropped,
                "bytes_in": encoder.bytes_in,
                "bytes_out": encoder.bytes_out,
                "pictures_out": encoder.pictures_out,
            },
            "frames_dropped_before_encoder": (camera.frames_dropped if camera else 0)
            + encoder.frames_dropped,
            "latency_ms": {
                "camera_to_encoder": self.camera_to_encoder.summary(now, 1000),
                "encoder": self.in_encoder.summary(now, 1000),
            },
            "broadcast": {
                "bytes_in": factory.bytes_in,
                "bytes_sent": factory.bytes_sent,
                "bytes_discarded": factory.bytes_discarded,
                "skips": factory.skips,
                "turned_away": factory.turned_away,
                "backlog_limit": factory.backlog_limit,
            },
            "viewers": {
                "max": factory.max_viewers or None,
                "count": len(factory.viewers),
                "total": factory.viewers_total,
                "list": viewers if addresses else [
                    dict(viewer, address="hidden") for viewer in viewers],
            },
        }
