"""makeService: the daemon's stages wired into one MultiService.

    camera (thread) -> encoder (ffmpeg) -> broadcaster (WebSocket) -> viewers

A V4L2 device or a video file has no camera thread: ffmpeg reads it itself.
With C{--codec h264} the pictures go through an H.264 stage (parameter sets,
keyframes) on their way to the broadcaster, and a camera with its own H.264
encoder (picamera2, picamera) needs no ffmpeg at all:

    camera's encoder (thread) -> H.264 stage -> broadcaster -> viewers
"""

import json
from types import SimpleNamespace

from twisted.application import service
from twisted.internet import error
from twisted.logger import Logger

from pistreaming.annotate import drawtext_filter
from pistreaming.broadcast import StreamFactory
from pistreaming.camera import choose_source
from pistreaming.camera.service import CameraService
from pistreaming.encoder import Encoder, ffmpeg_command
from pistreaming.fanout import BroadcastService
from pistreaming.admission import PendingConnections
from pistreaming.frames import stream_header
from pistreaming.h264 import H264Stream
from pistreaming.hosts import HostPolicy
from pistreaming.listening import listen_service, raise_file_limit
from pistreaming.memory import Collector
from pistreaming.stats import PictureTimes, Stats
from pistreaming.web import make_site

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
        self.authenticator = None
        if config.passwd:
            from pistreaming.auth import Authenticator, PasswordFile
            self.authenticator = Authenticator(PasswordFile(config.passwd), reactor)
        # Which names requests may give in Host (DNS rebinding), and the
        # connections that have not sent a whole request yet, capped per
        # address and overall (one count for both ports).
        self.hosts = HostPolicy(config.allow_hosts)
        self.pending = PendingConnections()
        h264 = config.codec == "h264"
        self.factory = StreamFactory(
            None if h264 else stream_header(config.width, config.height), reactor,
            # Half a second of video in the kernel, at most, per viewer.
            send_buffer=max(64 * 1024, second_of_video // 2),
            backlog_limit=config.backlog_bytes, stuck_timeout=config.viewer_timeout,
            authenticator=self.authenticator, allow_origins=config.allow_origins,
            max_viewers=config.max_viewers, hosts=self.hosts, pending=self.pending,
            codec=config.codec, on_newcomer=self._newcomer if h264 else None)
        self.fanout = self.factory.fanout
        self.times = PictureTimes()
        self.h264 = None
        if h264:
            self.h264 = H264Stream(self.fanout.broadcast, self._h264_config,
                                   config.keyframe_interval, reactor.seconds,
                                   on_state=self._h264_state,
                                   request_keyframe=self._request_keyframe)
        self.encoder = None
        self.camera = None
        if h264 and getattr(source, "encodes_h264", False):
            # The camera's own encoder: no ffmpeg, no raw frame in Python.
            encoding = SimpleNamespace(bitrate=config.bitrate, framerate=config.framerate,
                                       keyframe_interval=config.keyframe_interval,
                                       profile="baseline")
            self.camera = CameraService(source, geometry.frame_size, self._camera_picture,
                                        reactor, on_state=self._camera_state, h264=encoding)
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
                               keyframe_interval=config.keyframe_interval),
                self.h264.feed if h264 else self.fanout.broadcast, reactor,
                framerate=config.framerate, timings=self.times.add,
                reads_stdin=video_input is None, frame_size=geometry.frame_size,
                on_state=self._encoder_state, codec=config.codec,
            )
            if video_input is None:
                self.camera = CameraService(source, geometry.frame_size, self.encoder.feed,
                                            reactor, on_state=self._camera_state)
        self.camera_reason = why
        self.stats = Stats(reactor, config, source, self.encoder, self.fanout, self.factory,
                           camera=self.camera, pending=self.pending, times=self.times,
                           h264=self.h264)
        self.site = make_site(config, self.factory, stats=self.stats, player=player,
                              authenticator=self.authenticator, reactor=reactor,
                              hosts=self.hosts, pending=self.pending)

        # Listening ports first: a port that cannot be bound stops start-up.
        self.http = listen_service(config.http, self.site, reactor)
        self.http.setServiceParent(self)
        self.ws = None
        if config.ws:
            self.ws = listen_service(config.ws, self.factory, reactor)
            self.ws.setServiceParent(self)
        BroadcastService(self.fanout, reactor).setServiceParent(self)
        self.stats.setServiceParent(self)
        if self.encoder is not None:
            self.encoder.setServiceParent(self)
        if self.camera is not None:
            self.camera.setServiceParent(self)
        # Last: it freezes what the others are made of once they have started.
        self.collector = Collector(reactor)
        self.collector.setServiceParent(self)

    def _camera_state(self, state, why):
        # Viewers (the page) are told, so a stalled camera does not look like
        # a frozen picture.
        self.fanout.set_status(camera=state, why=why)

    # H.264
    def _camera_picture(self, data, keyframe, captured_at):
        self.h264.feed(data, captured_at)

    def _h264_config(self, stream):
        # The stream's description: every viewer's first message, and sent
        # again to all of them when it changes.
        message = {"stream": stream.message(self.config.keyframe_interval)}
        self.fanout.set_header(json.dumps(message).encode(), binary=False)
        log.info("H.264 stream: {codecs} ({profile}, level {h264_level}), {width}x{height}",
                 codecs=stream.codecs, profile=stream.profile, h264_level=stream.level,
                 width=stream.width, height=stream.height)

    def _h264_state(self, state, why):
        # Pictures that cannot be decoded (corrupt, or no parameter sets):
        # the page says so, as it does for a stalled camera.
        self.fanout.set_status(video=state, why=why)

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
            self.fanout.set_status(camera="unavailable" if state != "ok" else "ok", why=why)
        else:
            self.fanout.set_status(encoder=state, why=why)

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
