"""makeService: the daemon's stages wired into one MultiService.

    camera (thread) -> encoder (ffmpeg) -> broadcaster (WebSocket) -> viewers

A V4L2 device or a video file has no camera thread: ffmpeg reads it itself.
With C{--codec h264} the pictures go through an H.264 stage (parameter sets,
keyframes) on their way to the broadcaster, and a camera with its own H.264
encoder (picamera2, picamera) needs no ffmpeg at all:

    camera's encoder (thread) -> H.264 stage -> broadcaster -> viewers

With C{--codec h264}, viewers that cannot play H.264 (the page without a
decoder for it, at /stream?codec=mpeg1, and clients of the original demo on
the stream's own port) get MPEG-1, made of the H.264 by an ffmpeg that runs
only while one of them watches (pistreaming.ondemand):

    H.264 stage -> on-demand ffmpeg -> MPEG-1 broadcaster -> those viewers

A camera that also gives a second, smaller stream of raw frames (picamera2's
lores) feeds that ffmpeg with them instead, at their size, and only while it
runs:

    camera's lores stream (thread) -> on-demand ffmpeg -> MPEG-1 broadcaster

Beside the viewers, taps take the same chunks: the snapshot
(pistreaming.snapshot, /snapshot.jpg), which counts pictures and decodes
the start cache when asked, and with C{--record} the recorder
(pistreaming.recorder), which copies the stream into segments through an
ffmpeg of its own (pistreaming.recordings serves them at /recordings/).
"""

import functools
import json

from twisted.application import service
from twisted.internet import error
from twisted.logger import Logger

from pistreaming.annotate import drawtext_filter
from pistreaming.broadcast import StreamFactory
from pistreaming.camera import choose_source
from pistreaming.camera.service import CameraService, Encoding
from pistreaming.encoder import Encoder, ffmpeg_command
from pistreaming.fanout import BroadcastService
from pistreaming.admission import PendingConnections
from pistreaming.frames import stream_header
from pistreaming.h264 import H264Stream
from pistreaming.hosts import HostPolicy
from pistreaming.listening import listen_service, raise_file_limit
from pistreaming.lowpriority import LowPriorityThreads
from pistreaming.memory import Collector
from pistreaming import ondemand
from pistreaming.ondemand import (OnDemand, OnDemandEncoder, OnDemandFactory, decode_command,
                                  lores_command)
from pistreaming.stats import PictureTimes, Stats
from pistreaming.web import make_site
from pistreaming.recorder import Recorder, record_command
from pistreaming.recordings import Recordings
from pistreaming.snapshot import Snapshot, SnapshotResource, snapshot_command

log = Logger()


class Pistream(service.MultiService):
    """The running daemon; its stages are attributes for tests and stats."""

    def __init__(self, config, reactor, source, why, player=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        geometry = config.geometry
        self.source = source
        second_of_video = config.bitrate // 8
        self.authenticator = self.hashing = None
        if config.passwd:
            from pistreaming.auth import CHECKS, RESERVED_CHECKS, Authenticator, PasswordFile
            # Passwords are hashed on threads of lower priority than the
            # stream's: wrong ones sent on purpose cannot slow the pictures.
            self.hashing = LowPriorityThreads(reactor, CHECKS + RESERVED_CHECKS,
                                              "password-hashing")
            self.hashing.setServiceParent(self)
            self.authenticator = Authenticator(PasswordFile(config.passwd), reactor,
                                               run_in_thread=self.hashing.run)
        # Which names requests may give in Host (DNS rebinding), and the
        # connections that have not sent a whole request yet, capped per
        # address and overall (one count for both ports).
        self.hosts = HostPolicy(config.allow_hosts)
        self.pending = PendingConnections()
        h264 = config.codec == "h264"
        # The same limits for every viewer, of whichever stream.
        limits = dict(
            # Half a second of video in the kernel, at most, per viewer.
            send_buffer=max(64 * 1024, second_of_video // 2),
            backlog_limit=config.backlog_bytes, stuck_timeout=config.viewer_timeout,
            authenticator=self.authenticator, allow_origins=config.allow_origins,
            max_viewers=config.max_viewers, hosts=self.hosts, pending=self.pending)
        self.factory = StreamFactory(
            None if h264 else stream_header(config.width, config.height), reactor,
            codec=config.codec, on_newcomer=self._newcomer if h264 else None, **limits)
        self.fanout = self.factory.fanout
        self.times = PictureTimes()
        # Consumers beside the viewers (a push to a media server, a recorder,
        # the snapshot): each is given every chunk the viewers are given, as
        # the fan-out has it (an MPEG-TS Chunk in mpeg1 mode, an access-unit
        # message in h264 mode), in the reactor thread, with C{tap.feed(chunk)};
        # a tap never blocks and drops what it cannot take.
        self.taps = []
        self.h264 = None
        # With H.264, the MPEG-1 stream for viewers that cannot play it,
        # made while one of them watches: its own fan-out, the same limits,
        # one count of viewers for --max-viewers.
        self.mpeg1_factory = self.mpeg1_fanout = self.on_demand = None
        if h264:
            self.h264 = H264Stream(self._h264_out, self._h264_config,
                                   config.keyframe_interval, reactor.seconds,
                                   on_state=self._h264_state,
                                   request_keyframe=self._request_keyframe)
            self.mpeg1_factory = OnDemandFactory(
                stream_header(config.width, config.height), reactor, codec="mpeg1", **limits)
            self.mpeg1_fanout = self.mpeg1_factory.fanout
            self.factory.counted_with = (self.mpeg1_factory,)
            self.mpeg1_factory.counted_with = (self.factory,)
            self.on_demand = OnDemand(
                OnDemandEncoder(
                    decode_command(config.ffmpeg, config.framerate, config.bitrate),
                    self.mpeg1_fanout.broadcast, reactor,
                    start_cache=lambda: [chunk for chunk, _ in self.fanout.start_cache.chunks],
                    framerate=config.framerate, request_keyframe=self._request_keyframe,
                    on_state=self._mpeg1_encoder_state,
                    lores_command=functools.partial(lores_command, config.ffmpeg,
                                                    config.framerate, config.bitrate)),
                self.mpeg1_factory, reactor, stop_after=ondemand.STOP_AFTER)
        self.encoder = None
        self.camera = None
        if h264 and getattr(source, "encodes_h264", False):
            # The camera's own encoder: no ffmpeg, no raw frame in Python
            # (but those of its second, smaller stream, if it has one, while
            # an MPEG-1 viewer watches).
            lores_size = getattr(source, "lores_size", None)
            self.camera = CameraService(source, geometry.frame_size, self._camera_picture,
                                        reactor, on_state=self._camera_state,
                                        h264=Encoding.of(config),
                                        lores=self.on_demand if lores_size else None)
            if lores_size:
                self.on_demand.expect_lores(lores_size, self.camera.want_lores)
        else:
            # A source ffmpeg reads itself says how; the others hand raw frames over.
            video_input = (source.ffmpeg_input(config.codec) if hasattr(source, "ffmpeg_input")
                           else None)
            filters = []
            if config.annotate:
                filters.append(drawtext_filter(config.annotate, config.font, config.height))
            self.encoder = Encoder(
                ffmpeg_command(config.ffmpeg, geometry, config.framerate, config.bitrate,
                               video_input, filters, codec=config.codec,
                               keyframe_interval=config.keyframe_interval,
                               x264_preset=config.x264_preset),
                self.h264.feed if h264 else self._stream_out, reactor,
                framerate=config.framerate, timings=self.times.add,
                reads_stdin=video_input is None, frame_size=geometry.frame_size,
                on_state=self._encoder_state, codec=config.codec,
            )
            if video_input is None:
                self.camera = CameraService(source, geometry.frame_size, self.encoder.feed,
                                            reactor, on_state=self._camera_state)
        self.camera_reason = why
        # --push: one supervised ffmpeg per media server, each a tap
        # (pistreaming.push), started at the fan-out's latest keyframe.
        self.push = None
        if config.push:
            from pistreaming.push import Pushes
            self.push = Pushes(config, reactor, start_cache=lambda: [
                chunk for chunk, _ in self.fanout.start_cache.chunks])
            self.taps.extend(self.push.targets)
        self._taps(config, reactor)
        self.stats = Stats(reactor, config, source, self.encoder, self.fanout, self.factory,
                           camera=self.camera, pending=self.pending, times=self.times,
                           h264=self.h264, on_demand=self.on_demand, snapshot=self.snapshot,
                           recorder=self.recorder, push=self.push)
        self.site = make_site(config, self.factory, stats=self.stats, player=player,
                              authenticator=self.authenticator, reactor=reactor,
                              hosts=self.hosts, pending=self.pending,
                              mpeg1_factory=self.mpeg1_factory,
                              snapshot=SnapshotResource(self.snapshot),
                              recordings=(Recordings(self.recorder)
                                          if self.recorder is not None else None))

        # Listening ports first: a port that cannot be bound stops start-up.
        self.http = listen_service(config.http, self.site, reactor)
        self.http.setServiceParent(self)
        self.ws = None
        if config.ws:
            # The original demo's clients decode MPEG-1 only.
            self.ws = listen_service(config.ws, self.mpeg1_factory or self.factory, reactor)
            self.ws.setServiceParent(self)
        BroadcastService(self.fanout, reactor).setServiceParent(self)
        if self.on_demand is not None:
            mpeg1 = BroadcastService(self.mpeg1_fanout, reactor)
            mpeg1.name = "broadcast-mpeg1"
            mpeg1.setServiceParent(self)
            self.on_demand.setServiceParent(self)
        self.stats.setServiceParent(self)
        if self.recorder is not None:
            self.recorder.setServiceParent(self)
        if self.encoder is not None:
            self.encoder.setServiceParent(self)
        if self.camera is not None:
            self.camera.setServiceParent(self)
        if self.push is not None:
            self.push.setServiceParent(self)
        # Last: it freezes what the others are made of once they have started.
        self.collector = Collector(reactor)
        self.collector.setServiceParent(self)

    def _taps(self, config, reactor):
        """The snapshot, and with --record the recorder: taps of the stream."""
        ffmpeg, codec = config.ffmpeg, config.codec
        self.snapshot = Snapshot(
            codec, lambda: [chunk for chunk, _ in self.fanout.start_cache.chunks],
            self._picture_size,
            lambda last, width: snapshot_command(ffmpeg, codec, last, width), reactor)
        self.taps.append(self.snapshot)
        self.recorder = None
        if config.record:
            self.recorder = Recorder(
                config.record, codec,
                lambda path: record_command(ffmpeg, codec, path), reactor,
                segment_length=config.record_segment, keep=config.record_keep,
                framerate=config.framerate, on_state=self._recording_state)
            self.taps.append(self.recorder)
            self._recording_state(self.recorder.state, self.recorder.why)

    def _picture_size(self):
        stream = self.h264.config if self.h264 is not None else None
        if stream is not None:
            return stream.width, stream.height
        return self.config.width, self.config.height

    def _recording_state(self, state, why):
        # The page's overlay says whether the camera records (a key of its
        # own for the reason: "why" is the camera's and the encoder's).
        self._status(recording=state, recording_why=why)

    def _status(self, **status):
        # To the viewers of every stream (the MPEG-1 one's are made of the
        # same pictures).
        self.fanout.set_status(**status)
        if self.mpeg1_fanout is not None:
            self.mpeg1_fanout.set_status(**status)

    def _camera_state(self, state, why):
        # Viewers (the page) are told, so a stalled camera does not look like
        # a frozen picture.
        self._status(camera=state, why=why)

    # H.264
    def _camera_picture(self, data, keyframe, captured_at):
        self.h264.feed(data, captured_at)

    def _stream_out(self, chunk):
        # The stream as it is encoded: to the viewers, then to the taps.
        self.fanout.broadcast(chunk)
        for tap in self.taps:
            tap.feed(chunk)

    def _h264_out(self, chunk):
        # To the H.264 viewers and the taps, and to the MPEG-1 encoder while
        # it runs.
        self._stream_out(chunk)
        self.on_demand.encoder.feed_h264(chunk)

    def _h264_config(self, stream):
        # The stream's description: every viewer's first message, and sent
        # again to all of them when it changes.
        message = {"stream": stream.message(self.config.keyframe_interval)}
        self.fanout.set_header(json.dumps(message).encode(), binary=False)
        log.info("H.264 stream: {codecs} ({profile}, level {h264_level}), {width}x{height}",
                 codecs=stream.codecs, profile=stream.profile, h264_level=stream.level,
                 width=stream.width, height=stream.height)
        self.on_demand.set_size(stream.width, stream.height)

    def _h264_state(self, state, why):
        # Pictures that cannot be decoded (corrupt, or no parameter sets):
        # the page says so, as it does for a stalled camera.
        self._status(video=state, why=why)

    def _mpeg1_encoder_state(self, state, why):
        # The on-demand MPEG-1 encoder is the encoder of its viewers' stream.
        self.mpeg1_fanout.set_status(encoder=state, why=why)

    def _request_keyframe(self):
        """Ask the camera's own encoder for a keyframe: a newcomer then has
        a fresh one, and a viewer whose pictures were dropped gets one soon
        (the camera service asks at most once a second).  Where the camera
        cannot (ffmpeg's libx264), the keyframe kept for newcomers serves."""
        if self.camera is None or not self.camera.h264:
            return False
        return self.camera.request_keyframe()

    def _newcomer(self):
        self._request_keyframe()

    def _encoder_state(self, state, why):
        # A source that ffmpeg reads itself (a webcam, a file) fails as ffmpeg
        # does: for the page that is the camera.  Otherwise the encoder is a
        # stage of its own, and the page says which one stopped.
        if self.camera is None:
            self._status(camera="unavailable" if state != "ok" else "ok", why=why)
        else:
            self._status(encoder=state, why=why)

    def privilegedStartService(self):
        # Ports are bound here (before twistd drops privileges); a port that
        # cannot be bound stops start-up with one line that names the option.
        for svc, option, endpoint in ((self.http, "--http", self.config.http),
                                      (self.ws, "--ws-port", self.config.ws)):
            if svc is None:
                continue
            try:
                svc.privilegedStartService()
            except error.CannotListenError as e:
                why = e.socketError.strerror if hasattr(e.socketError, "strerror") else e.socketError
                raise SystemExit(
                    f"twistd pistream: error: {option} {endpoint}: cannot listen "
                    f"on port {e.port}: {str(why).lower()}"
                ) from None
        for svc in self:
            if svc not in (self.http, self.ws):
                svc.privilegedStartService()

    def startService(self):
        log.info("camera: {camera} chosen ({why})",
                 camera=self.source.name, why=self.camera_reason)
        if self.camera is None:
            log.info("camera: {camera}, read by ffmpeg", camera=self.source.describe())
        super().startService()
        for svc, what in ((self.ws, "websockets server"), (self.http, "HTTP server")):
            if svc is None:
                continue
            svc.when_listening().addCallback(self._listening, what)

    def _listening(self, port, what):
        address = port.getHost()
        log.info("{what} on port {port} ({address})", what=what,
                 port=address.port, address=f"{address.host}:{address.port}")
        return port


def makeService(config, reactor, source=None, player=None):
    """Build the daemon for C{config} on C{reactor}.

    @param source: a frame source; by default chosen from C{config.camera}.
    """
    why = "given"
    # Before the pending-connection caps are sized from it (a quarter of it).
    raise_file_limit()
    if source is None:
        source, why = choose_source(config)
    return Pistream(config, reactor, source, why, player=player)
