"""The whole service, built in-process by makeService on a MemoryReactorClock:
which ports it listens on with what, the settings that reach each part,
start and stop.  Nothing listens for real, no ffmpeg runs, no thread starts:
the reactor records what it is asked, the camera's thread pool only records,
and time passes when the test says."""

import base64
import os
import signal
import tempfile

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from pistreaming.auth import hash_password
from pistreaming import lowpriority
from pistreaming.camera import service as camera_service
from pistreaming.options import Options
from pistreaming.service import makeService
from tests.fakes.inmemory import (Network, RecordingPool, Source, SpawningReactor,
                                  SyncThreadPool)

#: A moment, exact in binary.
TICK = 1 / 1024


def options(*args):
    parsed = Options()
    parsed.parseOptions(list(args))
    return parsed.config


def http(site, request, peer="127.0.0.1"):
    """What C{site} answers C{request} (bytes) from C{peer}."""
    channel = site.buildProtocol(IPv4Address("TCP", peer, 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 50000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8082))
    channel.makeConnection(transport)
    channel.dataReceived(request)
    return transport.value()


def status(answer):
    return int(answer.split(b" ", 2)[1])


class ServiceCase(unittest.TestCase):
    def setUp(self):
        RecordingPool.pools = []
        self.patch(camera_service, "ThreadPool", RecordingPool)
        # The password hashing's threads: each hash at once, in the test's
        # thread, which must not be made nicer for it.
        self.lowered = []
        self.patch(lowpriority, "ThreadPool", SyncThreadPool)
        self.patch(lowpriority, "lower_thread_priority", self.lowered.append)
        self.reactor = SpawningReactor(ends_on=(signal.SIGTERM, signal.SIGKILL))

    def build(self, *args):
        # MPEG-1 where the test gives no --codec: most of these tests were
        # written for it (H.264, the default, is tested in test_service_h264).
        if not any(a.startswith("--codec") for a in args):
            args = ("--codec", "mpeg1") + args
        self.service = makeService(options(*args), reactor=self.reactor, source=Source(),
                                   player=b"//")
        return self.service

    def start(self):
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if not self.service.running:
            return
        done = []
        self.service.stopService().addCallback(done.append)
        self.reactor.advance(10)
        assert len(done) == 1


class WiringTests(ServiceCase):
    def test_both_ports_are_listened_on_with_their_factories(self):
        service = self.build("--http", "tcp:8090:interface=127.0.0.1",
                             "--ws-port", "8091")
        self.start()
        listening = {port: (factory, interface)
                     for port, factory, _, interface in self.reactor.tcpServers}
        assert listening == {8090: (service.site, "127.0.0.1"),
                             8091: (service.factory, listening[8091][1])}
        # and the stream is also under /stream on the HTTP port
        network = Network(service.site, self.reactor, port=8090)
        viewer = network.connect(path="/stream")
        assert viewer.client.messages[0][0][:4] == b"jsmp"
        assert len(service.fanout.viewers) == 1

    def test_without_a_ws_port_only_the_http_port_listens(self):
        service = self.build("--ws-port", "none")
        self.start()
        assert [(port, factory) for port, factory, _, _ in self.reactor.tcpServers] == [
            (8082, service.site)]

    def test_the_settings_reach_the_stream(self):
        service = self.build("--resolution", "320x240", "--bitrate", "800k",
                             "--viewer-timeout", "3", "--backlog", "64k", "--max-viewers", "2",
                             "--allow-origin", "https://friend.example")
        fanout, factory = service.fanout, service.factory
        assert fanout.header == b"jsmp\x01\x40\x00\xf0"
        assert (fanout.stuck_timeout, fanout.backlog_limit) == (3.0, 64_000)
        assert fanout.send_buffer == 64 * 1024  # half a second of 800k, at least 64 KiB
        assert factory.max_viewers == 2
        assert factory.allow_origins == ("https://friend.example",)

    def test_the_host_policy_holds_on_both_ports(self):
        service = self.build("--allow-host", "cam.example")
        self.start()
        for host, expected in ((b"evil.example", 421), (b"cam.example", 200)):
            answer = http(service.site, b"GET /index.html HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert status(answer) == expected, answer
        network = Network(service.factory, self.reactor)
        refused = network.connect(name="evil.example")
        assert refused.client.messages == [] and refused.transport.disconnecting
        viewer = network.connect(name="cam.example")
        assert viewer.client.messages[0][0][:4] == b"jsmp"

    def test_one_count_of_pending_connections_for_both_ports(self):
        service = self.build()
        self.start()
        assert service.site.pending is service.factory.pending is service.pending
        # a connection that has sent nothing is pending, whichever port it came to
        channel = service.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))
        channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 1)))
        viewer = service.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 2))
        viewer.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 2)))
        assert service.pending.count == 2
        for connection in (channel, viewer):
            connection.connectionLost(Failure(ConnectionDone()))
        assert service.pending.count == 0

    def test_past_max_viewers_newcomers_are_closed_with_a_reason(self):
        service = self.build("--max-viewers", "2")
        self.start()
        network = Network(service.factory, self.reactor)
        first, second, third = (network.connect() for _ in range(3))
        assert third.client.closed == (1013, "too many viewers (2 at most)")
        assert first.client.closed is None and second.client.closed is None
        assert len(service.fanout.viewers) == 2
        # on the HTTP port too (one limit)
        late = Network(service.site, self.reactor, port=8082).connect(path="/stream")
        assert late.client.closed == (1013, "too many viewers (2 at most)")
        assert service.factory.turned_away == 2


class PasswordTests(ServiceCase):
    def setUp(self):
        super().setUp()
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "passwd")
        with open(path, "w") as f:
            f.write(f"alice:{hash_password('wonder land', iterations=1000)}\n")
        self.service = self.build("--passwd", path)
        self.start()

    @staticmethod
    def basic(user, password):
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def test_the_page_and_the_stream_need_the_password_on_both_ports(self):
        service = self.service
        assert service.site.resource.authenticator is service.factory.authenticator
        answer = http(service.site, b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status(answer) == 401
        good = self.basic("alice", "wonder land").encode()
        answer = http(service.site, b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Authorization: " + good + b"\r\n\r\n")
        assert status(answer) == 200
        # (Hashed on a thread it made nicer than the daemon's.)
        assert self.lowered == [lowpriority.NICENESS]
        for network, path in ((Network(service.factory, self.reactor), "/"),
                              (Network(service.site, self.reactor, port=8082), "/stream")):
            refused = network.connect(path=path)
            assert refused.client.messages == [] and refused.transport.disconnecting
            viewer = network.connect(path=path, headers={
                "Authorization": self.basic("alice", "wonder land")})
            assert viewer.client.messages[0][0][:4] == b"jsmp"


class StartStopTests(ServiceCase):
    def test_start_runs_ffmpeg_and_the_camera(self):
        service = self.build("--resolution", "320x240", "--framerate", "24")
        self.start()
        ((proto, executable, args, transport),) = self.reactor.spawned
        assert executable == service.config.ffmpeg and args == service.encoder.command
        assert "320x240" in args and service.encoder.process is proto
        (pool,) = RecordingPool.pools
        (thread,) = pool.threads
        assert pool.started and not thread.stop.is_set()
        # a frame from the camera goes to ffmpeg
        thread.frames(1, 7)
        assert transport.written == [bytes([7]) * service.config.geometry.frame_size]
        assert service.encoder.frames_in == 1

    def test_stop_closes_viewers_and_ends_ffmpeg_and_the_camera_then_fires(self):
        service = self.build()
        self.start()
        viewers = [Network(service.factory, self.reactor).connect() for _ in range(2)]
        ((_, _, _, transport),) = self.reactor.spawned
        (pool,) = RecordingPool.pools
        (thread,) = pool.threads
        done = []
        service.stopService().addCallback(done.append)
        for viewer in viewers:
            viewer.flush()
            assert viewer.client.closed[0] == 1001
        assert transport.stdin_closed and thread.stop.is_set()
        # ffmpeg ends at SIGTERM (0.8 s); the capture thread, stuck, is waited
        # for 1.5 s at most: then the stop is done, and nothing is left pending.
        self.reactor.advance(0.8)
        assert transport.signals == [signal.SIGTERM] and transport.pid is None
        self.reactor.advance(1.5 - 0.8 - TICK)
        assert done == []
        self.reactor.advance(TICK)
        assert len(done) == 1
        assert not self.reactor.getDelayedCalls()
        assert len(self.reactor.spawned) == 1  # not restarted


class FileSource(Source):
    """A source that ffmpeg reads itself (as a webcam or a video file)."""

    name = "file"

    def ffmpeg_input(self, codec="mpeg1"):
        return ["-re", "-i", "/nonexistent/clip.mp4"], []


class EncoderStateTests(ServiceCase):
    """What the page hears when ffmpeg stops: for a source ffmpeg reads
    itself, that the camera is unavailable and why; otherwise that the
    encoder stopped.  Told to viewers that asked for status (the page)."""

    def viewer(self, service):
        client = Network(service.factory, self.reactor).connect(protocols=["pistream"])
        return client

    def end_ffmpeg(self, stderr):
        from twisted.internet.error import ProcessTerminated
        proto, _, _, transport = self.reactor.spawned[-1]
        proto.errReceived(stderr)
        transport.end(Failure(ProcessTerminated(exitCode=1)))

    def test_a_webcam_that_fails_shows_as_the_camera_unavailable(self):
        service = makeService(options(), reactor=self.reactor, source=FileSource(),
                              player=b"//")
        self.service = service
        self.start()
        assert service.camera is None
        self.end_ffmpeg(b"/dev/video0: No such device\n")
        assert service.fanout.status == {
            "camera": "unavailable", "why": "ffmpeg exited with code 1: /dev/video0: No such device"}
        figures = service.stats.gather()
        assert figures["camera"]["state"] == "unavailable"
        assert figures["encoder"]["state"] == "unavailable"

    def test_an_encoder_that_fails_shows_as_the_encoder_stopped(self):
        service = self.build()
        self.start()
        self.end_ffmpeg(b"Conversion failed!\n")
        assert service.fanout.status == {
            "encoder": "unavailable", "why": "ffmpeg exited with code 1: Conversion failed!"}
        assert service.stats.gather()["encoder"]["why"] == \
            "ffmpeg exited with code 1: Conversion failed!"
