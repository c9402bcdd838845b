"""The daemon's figures: counters read from each stage, rates and latencies
over a recent window.  /stats.json shows them as JSON and /metrics in the
Prometheus text format (pistreaming.web).

The JSON (L{Stats.gather}) is one object: ``uptime`` (seconds), ``stream``
(size, frame rate and bit rate set and measured), ``camera``, ``encoder``
(its ``state``: "starting", "ok" or "unavailable", and ``why``; its
counters), ``frames_dropped_before_encoder``, ``latency_ms`` (per stage:
count, p50, p95, max over the last minute), ``broadcast`` (byte counters,
skips, viewers turned away, the backlog limit), ``connections``
(``refused_pending``: connections dropped at once, on either port,
because their address had too many that had not sent their whole request
yet; ``evicted_pending``: such connections closed, the longest-waiting
first, to make room for newer ones when all the slots were taken) and
``viewers``: ``max``,
``count``, ``total`` and ``list``, one object per viewer connected now::

    {"address": "192.0.2.7:51234", "connected_since": 1700000000.0,
     "connected_for": 12.5, "bytes_sent": 123456, "backlog": 0,
     "stalled": false, "skips": 0}

``address`` is the viewer's address and port, or ``"hidden"`` when the
figures go to someone who may not see them (``gather(addresses=False)``:
pistreaming.web hides them from requests that come from another machine
without a password protecting the figures).  /metrics carries no
addresses at all.

With ``--codec h264`` there is also ``mpeg1_on_demand``: the MPEG-1
stream made of the H.264 for viewers that cannot play it
(pistreaming.ondemand), with ``running`` (whether its ffmpeg runs),
``state``, ``pid``, ``viewers`` (of that stream), ``starts`` (for viewers),
``restarts`` (after failures), ``access_units_in``,
``access_units_dropped``, ``fell_behind``, ``pictures_out`` and
``latency_ms`` (from an access unit into ffmpeg to its MPEG-1 picture
out); ``input``, what ffmpeg encodes: ``"h264"`` (the H.264, decoded) or
``"lores"`` (the raw frames of the camera's second, smaller stream), or
``null`` until a camera that may give those has said whether it does;
``width`` and ``height``, the MPEG-1 pictures' size (the ``jsmp``
header's); ``frames_in`` and ``frames_dropped``, the raw frames written to
ffmpeg and those it was too busy for.  The camera's section then has
``lores``: that stream's ``width``, ``height``, ``copying`` (whether its
frames are copied out of the camera now: only while ffmpeg runs),
``frames`` (copied so far) and ``frames_dropped`` (not copied: the reactor
had not taken the two before).  ``viewers`` and ``broadcast.turned_away``
count the viewers of both streams (``--max-viewers`` is one limit for
both), and each viewer in
``viewers.list`` says which it watches (``"stream": "h264"`` or
``"mpeg1"``).

``snapshot`` (/snapshot.jpg, pistreaming.snapshot): ``requests``,
``decodes`` (ffmpeg runs: at most one per new picture, however many ask),
``decode_failures``, ``answered_from_cache``, ``unavailable`` (503s), and
``decode_ms`` and ``answer_ms`` over the last minute.

With ``--record``, ``recording`` (pistreaming.recorder): ``state``
("recording", "starting": waiting for a keyframe, "stopped": below the
floor of free space or the directory unreadable, "failing": ffmpeg failed
and is started again after a pause) and ``why``; ``directory``,
``container``, ``segment_seconds``, ``current`` (the segment being
written), ``segments`` and ``bytes`` (on disk), ``keep_bytes``,
``free_bytes``, ``floor_bytes``, ``segments_started``,
``segments_deleted``, ``failures``, ``bytes_written`` and
``chunks_dropped`` (not taken by a slow ffmpeg).

With ``--push`` there is also ``push``: one object per media server the
stream is pushed to (pistreaming.push), in the order given::

    {"target": "rtmp://a.rtmp.youtube.com/live2/****", "state": "live",
     "since": 1700000000.0, "for": 62.5, "next_try_in": null, "pid": 4242,
     "bytes_sent": 6250000, "bytes_in": 6100000, "chunks_in": 1875,
     "dropped": 0, "fell_behind": 0, "starts": 1, "restarts": 0,
     "stalls": 0, "error": null}

``target`` is the URL with its stream key, password and query values
masked (the key is nowhere in the figures); ``state`` is ``connecting``
(ffmpeg started, nothing sent yet), ``live`` (its bytes out grow),
``backing off`` (it ended; ``next_try_in`` seconds until it starts again)
or ``stopped``; ``since`` is when that state began, ``for`` how long ago;
``bytes_sent`` is what ffmpeg sent over every run (null for RTSP, whose
muxer does not count it); ``dropped`` counts chunks not given to ffmpeg
while it was live, because it was behind (or then waited for a keyframe); ``error`` is the last
failure, with ffmpeg's last error line.
"""

import collections
import math

from twisted.application.internet import TimerService


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


class PictureTimes:
    """How long pictures took, per stage, over the last minute: the
    encoder reports each picture (L{add})."""

    def __init__(self):
        self.camera_to_encoder = Window()
        self.in_encoder = Window()

    def add(self, captured_at, written_at, out_at):
        """From the encoder: when a picture's frame was captured, written to
        ffmpeg, and came out encoded."""
        self.camera_to_encoder.add(out_at, written_at - captured_at)
        self.in_encoder.add(out_at, out_at - written_at)


class Stats(TimerService):
    """Gathers figures from the daemon's stages; samples the encoder's
    counters every C{sample_interval} seconds (for the rates)."""

    name = "stats"

    def __init__(self, reactor, config, source, encoder, fanout, stream, camera=None,
                 pending=None, times=None, sample_interval=1.0, h264=None, on_demand=None,
                 snapshot=None, recorder=None, push=None):
        """
        @param reactor: the clock.
        @param config: the L{pistreaming.options.Config} (size, rates set).
        @param source: the frame source (its C{name}).
        @param encoder: the L{pistreaming.encoder.Encoder}.
        @param fanout: the L{pistreaming.fanout.Fanout} (viewers, bytes).
        @param stream: the L{pistreaming.broadcast.StreamFactory} (viewers
            turned away, C{--max-viewers}).
        @param camera: the L{pistreaming.camera.service.CameraService}, or
            None when ffmpeg reads the source itself.
        @param pending: the L{pistreaming.admission.PendingConnections}
            (connections refused), or None.
        @param times: the L{PictureTimes} the encoder reports to; None: a
            new one.
        @param h264: the L{pistreaming.h264.H264Stream} the pictures go
            through with C{--codec h264}, else None.  With C{encoder} None
            (the camera's own encoder makes the H.264), the encoder's
            figures are the camera's.
        @param on_demand: the L{pistreaming.ondemand.OnDemand} MPEG-1
            stream (with C{--codec h264}), or None.
        @param snapshot: the L{pistreaming.snapshot.Snapshot}, or None.
        @param recorder: the L{pistreaming.recorder.Recorder} (with
            C{--record}), or None.
        @param push: the L{pistreaming.push.Pushes} (C{--push}), or None.
        """
        super().__init__(sample_interval, self._sample)
        self.clock = reactor
        self.reactor = reactor
        self.config = config
        self.source = source
        self.encoder = encoder
        self.fanout = fanout
        self.stream = stream
        self.camera = camera
        self.pending = pending
        self.times = times if times is not None else PictureTimes()
        self.started_at = reactor.seconds()
        self.h264 = h264
        self.on_demand = on_demand
        self.snapshot = snapshot
        self.recorder = recorder
        self.push = push
        if h264 is not None:
            self.bitrate = Rate(lambda: h264.bytes * 8)
            self.framerate = Rate(lambda: h264.access_units)
        else:
            self.bitrate = Rate(lambda: encoder.bytes_out * 8)
            self.framerate = Rate(lambda: encoder.pictures_out)

    def startService(self):
        self.started_at = self.reactor.seconds()
        super().startService()

    def _sample(self):
        now = self.reactor.seconds()
        self.bitrate.sample(now)
        self.framerate.sample(now)

    def _camera(self):
        camera, encoder = self.camera, self.encoder
        if camera is None:  # a device or a file, read by ffmpeg itself
            return {
                "source": self.source.name,
                "state": "ok" if encoder.process is not None else "unavailable",
                "frames_captured": encoder.pictures_out,
                "frames_dropped": 0,
                "failures": encoder.restarts,
            }
        figures = {
            "source": camera.source.name,
            "state": camera.state,
            "frames_captured": camera.frames_captured,
            "frames_dropped": camera.frames_dropped,
            "failures": camera.failures,
        }
        lores = camera.lores_figures() if hasattr(camera, "lores_figures") else None
        if lores is not None:
            figures["lores"] = lores
        return figures

    def _encoder(self):
        encoder, camera = self.encoder, self.camera
        if encoder is None:
            # The camera's own H.264 encoder: its pictures are the camera's.
            captured = camera.frames_captured if camera is not None else 0
            return {
                "where": "camera",
                "state": camera.state if camera is not None else "unavailable",
                "why": getattr(camera, "why", ""),
                "pid": None,
                "restarts": camera.failures if camera is not None else 0,
                "frames_in": captured,
                "frames_dropped": 0,
                "bytes_in": 0,
                "bytes_out": self.h264.bytes if self.h264 is not None else 0,
                "pictures_out": self.h264.access_units if self.h264 is not None else 0,
            }
        process = encoder.process
        return {
            "where": "ffmpeg",
            "state": encoder.state,
            "why": encoder.why,
            "pid": process.transport.pid if process is not None else None,
            "restarts": encoder.restarts,
            "frames_in": encoder.frames_in,
            "frames_dropped": encoder.frames_dropped,
            "bytes_in": encoder.bytes_in,
            "bytes_out": encoder.bytes_out,
            "pictures_out": encoder.pictures_out,
        }

    def _h264(self):
        """The H.264 stream's figures (none in MPEG-1)."""
        h264 = self.h264
        if h264 is None:
            return {}
        config = h264.config
        return {
            "codecs": config.codecs if config is not None else None,
            "profile": config.profile if config is not None else None,
            "level": config.level if config is not None else None,
            "keyframe_interval_setting": self.config.keyframe_interval,
            "keyframe_interval": (round(h264.measured_keyframe_interval, 3)
                                  if h264.measured_keyframe_interval is not None else None),
            "keyframes": h264.keyframes,
            "access_units_dropped": sum(h264.dropped.values()),
        }

    def gather(self, addresses=True):
        """The figures (see the module's docstring); with C{addresses}
        false, each viewer's address is "hidden"."""
        now = self.reactor.seconds()
        config = self.config
        camera, encoder, fanout, stream = self.camera, self.encoder, self.fanout, self.stream
        viewers = fanout.describe()
        encoder_figures = self._encoder()
        on_demand = self.on_demand
        mpeg1 = None
        if on_demand is not None:
            mpeg1 = on_demand.figures(now)
            viewers = ([dict(viewer, stream="h264") for viewer in viewers]
                       + [dict(viewer, stream="mpeg1") for viewer in on_demand.fanout.describe()])
        figures = {
            "uptime": round(now - self.started_at, 3),
            "stream": dict({
                "codec": config.codec,
                "width": config.width,
                "height": config.height,
                "framerate": float(config.framerate),
                "bitrate_setting": config.bitrate,
                "bitrate": round(self.bitrate.value()),
                "fps": round(self.framerate.value(), 2),
            }, **self._h264()),
            "camera": self._camera(),
            "encoder": encoder_figures,
            "frames_dropped_before_encoder": (camera.frames_dropped if camera else 0)
            + (encoder.frames_dropped if encoder is not None else 0),
            "latency_ms": {
                "camera_to_encoder": self.times.camera_to_encoder.summary(now, 1000),
                "encoder": self.times.in_encoder.summary(now, 1000),
            },
            "broadcast": {
                "bytes_in": fanout.bytes_in,
                "bytes_sent": fanout.bytes_sent,
                "bytes_discarded": fanout.bytes_discarded,
                "skips": fanout.skips,
                "turned_away": stream.turned_away + (mpeg1["turned_away"] if mpeg1 else 0),
                "backlog_limit": fanout.backlog_limit,
            },
            "connections": {
                "refused_pending": self.pending.refused if self.pending is not None else 0,
                "evicted_pending": self.pending.evicted if self.pending is not None else 0,
            },
            "viewers": {
                "max": stream.max_viewers or None,
                "count": len(fanout.viewers) + (mpeg1["viewers"] if mpeg1 else 0),
                "total": fanout.viewers_total + (mpeg1["viewers_total"] if mpeg1 else 0),
                "list": viewers if addresses else [
                    dict(viewer, address="hidden") for viewer in viewers],
            },
        }
        if mpeg1 is not None:
            figures["mpeg1_on_demand"] = mpeg1
        if self.snapshot is not None:
            figures["snapshot"] = self.snapshot.figures(now)
        if self.recorder is not None:
            figures["recording"] = self.recorder.figures(now)
        if self.push is not None:
            figures["push"] = self.push.figures(now)
        return figures
