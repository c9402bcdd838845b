"""The daemon's figures (pistreaming.stats) as Prometheus metrics, for /metrics.

Only counts and totals: no viewer's address, whoever asks."""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def _gauge(name, doc, value, labels=None):
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def _counter(name, doc, value):
    family = CounterMetricFamily(name, doc)
    family.add_metric([], value)
    return family


#: A push's states (pistreaming.push.Push), each a series of
#: pistream_push_state.
PUSH_STATES = ("connecting", "live", "backing off", "stopped")


def _push_families(pushes):
    """Each --push target's figures, labelled by its URL with the key masked."""
    up = GaugeMetricFamily("pistream_push_up",
                           "1 while the push to a media server is live (its bytes out grow).",
                           labels=["target"])
    state = GaugeMetricFamily(
        "pistream_push_state",
        "The push's state: 1 for the one it is in (connecting, live, backing off, "
        "stopped), 0 for the others.", labels=["target", "state"])
    seconds = GaugeMetricFamily("pistream_push_state_seconds",
                                "Seconds the push has been in its state.", labels=["target"])
    sent = CounterMetricFamily("pistream_push_sent_bytes",
                               "Bytes ffmpeg sent to the media server (not for RTSP).",
                               labels=["target"])
    restarts = CounterMetricFamily("pistream_push_restarts",
                                   "Times the push's ffmpeg was started again after a failure.",
                                   labels=["target"])
    dropped = CounterMetricFamily(
        "pistream_push_dropped_chunks",
        "Chunks of the stream not given to the push's ffmpeg: it was behind, or "
        "waited for a keyframe.", labels=["target"])
    for push in pushes:
        target = push["target"]
        up.add_metric([target], 1 if push["state"] == "live" else 0)
        for name in PUSH_STATES:
            state.add_metric([target, name], 1 if push["state"] == name else 0)
        seconds.add_metric([target], push["for"])
        if push["bytes_sent"] is not None:
            sent.add_metric([target], push["bytes_sent"])
        restarts.add_metric([target], push["restarts"])
        dropped.add_metric([target], push["dropped"])
    return [up, state, seconds, sent, restarts, dropped]


class StatsCollector:
    """A prometheus_client collector that reads the figures at each scrape."""

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        s = self.stats.gather(addresses=False)
        stream, camera, encoder = s["stream"], s["camera"], s["encoder"]
        broadcast, viewers = s["broadcast"], s["viewers"]
        yield _gauge("pistream_uptime_seconds", "Seconds since the daemon started.",
                     s["uptime"])
        yield _gauge("pistream_stream_info",
                     "The stream's codec (mpeg1, h264) and, for H.264, its profile and "
                     "level; the value is always 1.", 1,
                     {"codec": stream["codec"], "profile": stream.get("profile") or "",
                      "level": stream.get("level") or ""})
        if stream["codec"] == "h264":
            if stream["keyframe_interval"] is not None:
                yield _gauge("pistream_keyframe_interval_seconds",
                             "Seconds between the last two H.264 keyframes.",
                             stream["keyframe_interval"])
            yield _counter("pistream_keyframes", "H.264 keyframes (IDR pictures) sent.",
                           stream["keyframes"])
            yield _counter("pistream_access_units_dropped",
                           "H.264 pictures dropped: corrupt, or before the stream's "
                           "parameter sets or the next keyframe.",
                           stream["access_units_dropped"])
        mpeg1 = s.get("mpeg1_on_demand")
        if mpeg1 is not None:
            yield _gauge("pistream_mpeg1_on_demand_up",
                         "1 while the MPEG-1 encoder for viewers that cannot play H.264 "
                         "runs (it runs only while one of them watches).",
                         1 if mpeg1["running"] else 0)
            yield _gauge("pistream_mpeg1_viewers",
                         "Viewers of the MPEG-1 stream made on demand, connected now.",
                         mpeg1["viewers"])
            yield _counter("pistream_mpeg1_on_demand_starts",
                           "Times the on-demand MPEG-1 encoder was started for viewers.",
                           mpeg1["starts"])
            yield _counter("pistream_mpeg1_on_demand_restarts",
                           "Times the on-demand MPEG-1 encoder was restarted after a "
                           "failure.", mpeg1["restarts"])
            yield _counter("pistream_mpeg1_on_demand_pictures",
                           "MPEG-1 pictures the on-demand encoder made.",
                           mpeg1["pictures_out"])
            yield _counter("pistream_mpeg1_on_demand_access_units_dropped",
                           "H.264 pictures not given to the on-demand encoder: before a "
                           "keyframe, or while it was behind.", mpeg1["access_units_dropped"])
        pushes = s.get("push")
        if pushes:
            yield from _push_families(pushes)
        yield _gauge("pistream_viewers", "Viewers connected now (of every stream).",
                     viewers["count"])
        yield _counter("pistream_viewers_connected", "Viewers that have connected.",
                       viewers["total"])
        yield _gauge("pistream_viewers_backlog_bytes",
                     "Bytes waiting in viewers' queues, all viewers together.",
                     sum(v["backlog"] for v in viewers["list"]))
        yield _counter("pistream_viewers_turned_away",
                       "Viewers turned away (--max-viewers).", broadcast["turned_away"])
        yield _counter("pistream_viewer_skips",
                       "Times a viewer fell behind and skipped ahead.", broadcast["skips"])
        yield _gauge("pistream_camera_up", "1 while the camera delivers frames.",
                     1 if camera["state"] == "ok" else 0)
        yield _counter("pistream_camera_failures", "Times the camera failed or stalled.",
                       camera["failures"])
        yield _counter("pistream_frames_captured", "Frames the camera delivered.",
                       camera["frames_captured"])
        dropped = CounterMetricFamily(
            "pistream_frames_dropped",
            "Frames dropped before the encoder, by where (camera hand-off, or "
            "ffmpeg still busy).", labels=["where"])
        dropped.add_metric(["camera"], camera["frames_dropped"])
        dropped.add_metric(["encoder"], encoder["frames_dropped"])
        yield dropped
        yield _gauge("pistream_encoder_up",
                     "1 while pictures come out of the encoder (ffmpeg, or the camera's "
                     "own H.264 encoder); 0 while it starts, or stopped and is being "
                     "restarted.", 1 if encoder["state"] == "ok" else 0)
        yield _counter("pistream_encoder_frames", "Frames written to ffmpeg.",
                       encoder["frames_in"])
        yield _counter("pistream_encoder_pictures", "Pictures ffmpeg encoded.",
                       encoder["pictures_out"])
        yield _counter("pistream_encoder_restarts", "Times ffmpeg was restarted.",
                       encoder["restarts"])
        yield _counter("pistream_encoder_in_bytes", "Raw bytes written to ffmpeg.",
                       encoder["bytes_in"])
        yield _counter("pistream_encoder_out_bytes", "Encoded bytes read from ffmpeg.",
                       encoder["bytes_out"])
        yield _counter("pistream_sent_bytes", "Video bytes written to viewers.",
                       broadcast["bytes_sent"])
        yield _counter("pistream_discarded_bytes",
                       "Video bytes discarded because nobody watched.",
                       broadcast["bytes_discarded"])
        yield _counter("pistream_connections_refused_pending",
                       "Connections dropped at once because too many had not sent "
                       "their request yet.", s["connections"]["refused_pending"])
        yield _counter("pistream_connections_evicted_pending",
                       "Connections that had not sent their request yet, closed to make "
                       "room for newer ones.", s["connections"]["evicted_pending"])
        yield _gauge("pistream_bitrate_bits_per_second",
                     "Encoded bit rate over the last seconds.", stream["bitrate"])
        yield _gauge("pistream_framerate_per_second",
                     "Encoded pictures per second over the last seconds.", stream["fps"])
        latency = GaugeMetricFamily(
            "pistream_stage_latency_seconds",
            "Time frames spend in a stage over the last minute, by quantile.",
            labels=["stage", "quantile"])
        stages = dict(s["latency_ms"])
        if mpeg1 is not None:
            stages["mpeg1_on_demand"] = mpeg1["latency_ms"]
        for stage, summary in stages.items():
            for quantile, key in (("0.5", "p50"), ("0.95", "p95"), ("1", "max")):
                if summary[key] is not None:
                    latency.add_metric([stage, quantile], summary[key] / 1000)
        yield latency
        snapshot = s.get("snapshot")
        if snapshot is not None:
            yield _counter("pistream_snapshot_requests", "Requests for /snapshot.jpg.",
                           snapshot["requests"])
            yield _counter("pistream_snapshot_decodes",
                           "Pictures decoded for /snapshot.jpg (at most one per new picture, "
                           "however many ask).", snapshot["decodes"])
            yield _counter("pistream_snapshot_decode_failures",
                           "Decodes for /snapshot.jpg that gave no picture.",
                           snapshot["decode_failures"])
        recording = s.get("recording")
        if recording is not None:
            yield _gauge("pistream_recording_up",
                         "1 while a segment is being recorded (--record); 0 while waiting for "
                         "a keyframe, stopped (disk full) or failing.",
                         1 if recording["state"] == "recording" else 0)
            yield _gauge("pistream_recording_info",
                         "The recorder's state (recording, starting, stopped, failing); the "
                         "value is always 1.", 1, {"state": recording["state"]})
            yield _gauge("pistream_recording_bytes", "Bytes the recorded segments take.",
                         recording["bytes"])
            yield _gauge("pistream_recording_segments", "Recorded segments on disk.",
                         recording["segments"])
            if recording["free_bytes"] is not None:
                yield _gauge("pistream_recording_free_bytes",
                             "Bytes free on the recordings' disk.", recording["free_bytes"])
            if recording["keep_bytes"] is not None:
                yield _gauge("pistream_recording_keep_bytes",
                             "Bytes the recordings may take (--record-keep).",
                             recording["keep_bytes"])
            yield _counter("pistream_recording_segments_deleted",
                           "Oldest segments deleted to stay within --record-keep.",
                           recording["segments_deleted"])
            yield _counter("pistream_recording_failures",
                           "Times the recording's ffmpeg failed (a write error, a full or "
                           "hung disk).", recording["failures"])
            yield _counter("pistream_recording_written_bytes",
                           "Bytes of the stream given to the recording's ffmpeg.",
                           recording["bytes_written"])
            yield _counter("pistream_recording_dropped_chunks",
                           "Pieces of the stream not recorded because ffmpeg did not take "
                           "them.", recording["chunks_dropped"])
