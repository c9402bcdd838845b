"""MPEG-1 on demand (pistreaming.ondemand): with --codec h264, the jsmp
stream for viewers that cannot play H.264, made by an ffmpeg that runs only
while one of them watches.

The daemon is built in-process on a SpawningReactor (tests/fakes): no
ffmpeg runs; the H.264 encoder's output is real H.264 in MPEG-TS (libx264,
as the daemon's ffmpeg writes it) and the on-demand ffmpeg's is real MPEG-1
in MPEG-TS, made once for the module by the very command the daemon runs.
The end-to-end test at the bottom runs the real daemon and real ffmpeg."""

import json
import re
import subprocess
import time
import urllib.request

import pytest
import websocket
from twisted.internet.error import ProcessTerminated
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from pistreaming.frames import stream_header
from pistreaming.h264 import frame_message, is_idr, nal_types, parse_message
from pistreaming.mpegts import PESAssembler, PictureSplitter, video_pes_start
from pistreaming.ondemand import DELIMITER, STOP_AFTER, decode_command, decoder_input
from tests.daemon import Daemon
from tests.fakes.inmemory import Network
from tests.test_service import ServiceCase, http
from tests.test_service_h264 import libx264_ts, packets
from tests.test_stream import decoded_frames, ffmpeg_children, pictures_in, pids_alive

SPS, PPS, IDR, AUD = 7, 8, 5, 9


def on_demand_output(ts):
    """What the daemon's on-demand ffmpeg makes of the H.264 in C{ts}: its
    own command, given the access units as the daemon writes them."""
    units = [decoder_input(frame_message(au, is_idr(au), None))
             for au, _ in PESAssembler().feed(ts)]
    return subprocess.run(decode_command("ffmpeg", 30, 800_000), input=b"".join(units),
                          check=True, capture_output=True, timeout=60).stdout


def pictures_of(ts):
    """MPEG-TS cut into pieces of one picture each (tables go with the
    picture that follows them)."""
    pieces, tables = [], b""
    for chunk in PictureSplitter().feed(ts):
        if chunk.picture:
            pieces.append(tables + chunk.data)
            tables = b""
        else:
            tables += chunk.data
    return pieces


@pytest.fixture(scope="class")
def streams(request):
    request.cls.small = libx264_ts("320x240", 30, 10)
    request.cls.large = libx264_ts("640x360", 10, 10)
    request.cls.long = libx264_ts("320x240", 60, 10)
    request.cls.mpeg1 = pictures_of(on_demand_output(request.cls.small))


@pytest.mark.usefixtures("streams")
class OnDemandTests(ServiceCase):
    def setUp(self):
        super().setUp()
        self.events = []

        def observer(event):
            if event.get("log_namespace", "").startswith("pistreaming.ondemand"):
                self.events.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def build_h264(self, *args):
        service = self.build("--codec", "h264", "--framerate", "30", *args)
        self.start()
        (self.h264_encoder, _, _, _), = self.reactor.spawned
        self.network = Network(service.site, self.reactor, port=8082)
        return service

    def h264_arrives(self, ts):
        """The H.264 encoder writes C{ts}; the network moves."""
        self.h264_encoder.childDataReceived(1, ts)
        self.network.flush()

    def mpeg1_viewer(self, **kwargs):
        return self.network.connect(path="/stream?codec=mpeg1", **kwargs)

    def leave(self, connection):
        connection.client.transport.loseConnection()
        self.network.flush()

    def on_demand(self, n=-1):
        """The on-demand ffmpeg's process protocol and transport (the nth
        child spawned)."""
        proto, _, args, transport = self.reactor.spawned[n]
        assert "mpeg1video" in args
        return proto, transport

    def ffmpeg_makes(self, proto, pictures):
        proto.childDataReceived(1, b"".join(pictures))
        self.network.flush()

    def lines(self):
        """What the on-demand logs said: "started", "stopping"..., and why."""
        said = []
        for event in self.events:
            for word in ("started", "stopping", "behind"):
                if word in event["log_format"]:
                    said.append((word, event.get("why")))
        return said

    def running(self):
        return self.service.stats.gather()["mpeg1_on_demand"]["running"]

    def test_no_ffmpeg_for_mpeg1_until_a_viewer_needs_it_then_the_start_cache_first(self):
        service = self.build_h264()
        all_packets = packets(self.small)
        self.h264_arrives(b"".join(all_packets[:len(all_packets) * 2 // 3]))
        h264_viewer = self.network.connect(path="/stream")
        assert len(self.reactor.spawned) == 1  # an H.264 viewer needs no MPEG-1
        assert not self.running()
        cache = [parse_message(chunk.data) for chunk, _ in service.fanout.start_cache.chunks]
        assert cache[0].keyframe and len(cache) >= 2

        viewer = self.mpeg1_viewer()
        assert len(self.reactor.spawned) == 2
        _, executable, args, transport = self.reactor.spawned[-1]
        assert args[0] == service.config.ffmpeg and args[args.index("-f") + 1] == "h264"
        assert args[args.index("-i") + 1] == "pipe:0"
        assert "-vf" not in args and "-s" not in args  # the same size: nothing scaled
        # what a decoder needs first, at once: the keyframe (with its SPS
        # and PPS) and every access unit since, each closed by a delimiter
        written = list(transport.written)
        assert len(written) == len(cache)
        assert nal_types(written[0])[:2] == [SPS, PPS] and IDR in nal_types(written[0])
        for data, message in zip(written, cache):
            assert data.endswith(DELIMITER)
            assert nal_types(data).count(AUD) == 1  # its own went; the closing one stays
            assert message.access_unit.endswith(data[:-len(DELIMITER)])
        # then each live one as it comes
        sent = service.h264.access_units
        self.h264_arrives(b"".join(all_packets[len(all_packets) * 2 // 3:]))
        assert len(transport.written) == len(written) + service.h264.access_units - sent
        assert viewer.client.closed is None and h264_viewer.client.closed is None

    def test_the_viewer_gets_jsmp_at_the_pictures_size_then_what_ffmpeg_makes(self):
        self.build_h264()
        self.h264_arrives(self.small)
        h264_viewer = self.network.connect(path="/stream")
        viewer = self.mpeg1_viewer(protocols=["pistream"])
        proto, _ = self.on_demand()
        self.ffmpeg_makes(proto, self.mpeg1)
        header, *stream = viewer.client.binary()
        assert header == stream_header(320, 240)
        assert pictures_in(b"".join(stream)) == len(self.mpeg1) == 30
        assert b"".join(stream) == b"".join(self.mpeg1)
        # the page's status messages come to it too; no H.264 description
        assert {"viewers": 1} in [json.loads(text) for text in viewer.client.texts()]
        assert not any(b'"stream"' in text for text in viewer.client.texts())
        # and the H.264 viewers get none of it
        assert all(b"jsmp" not in payload and payload[:1] != b"\x47"
                   for payload in h264_viewer.client.binary())

    def test_kept_while_viewers_come_back_within_the_grace_time_stopped_after(self):
        service = self.build_h264()
        self.h264_arrives(self.small)
        first = self.mpeg1_viewer()
        proto, transport = self.on_demand()
        self.leave(first)
        self.reactor.advance(STOP_AFTER - 0.5)
        assert not transport.stdin_closed and self.running()
        back = self.mpeg1_viewer()  # within the grace time: the same ffmpeg
        self.reactor.advance(STOP_AFTER * 2)
        assert len(self.reactor.spawned) == 2 and not transport.stdin_closed
        self.leave(back)
        self.reactor.advance(STOP_AFTER - 0.1)
        assert not transport.stdin_closed
        self.reactor.advance(0.1)
        assert transport.stdin_closed  # stopped: its input closed, then SIGTERM
        self.reactor.advance(1)
        assert transport.pid is None and not self.running()
        written = len(transport.written)
        self.h264_arrives(self.small)
        assert len(transport.written) == written  # nothing more for it
        assert len(self.reactor.spawned) == 2
        assert service.mpeg1_fanout.start_cache.chunks == []  # its pictures went with it
        # the next viewer starts a new one, fed from a keyframe again
        self.mpeg1_viewer()
        _, again = self.on_demand(2)
        assert len(self.reactor.spawned) == 3
        assert IDR in nal_types(again.written[0])
        said = self.lines()
        assert [word for word, _ in said] == ["started", "stopping", "started"]
        assert said[0][1].startswith("viewer tcp4:127.0.0.1:") and "the page" in said[0][1]
        assert said[1][1] == f"no MPEG-1 viewer for {STOP_AFTER:g}s"
        assert service.stats.gather()["mpeg1_on_demand"]["starts"] == 2

    def test_a_viewer_who_comes_while_it_stops_gets_a_new_one_once_it_is_gone(self):
        self.build_h264()
        self.h264_arrives(self.small)
        self.leave(self.mpeg1_viewer())
        _, transport = self.on_demand()
        self.reactor.advance(STOP_AFTER)
        assert transport.stdin_closed and transport.pid is not None  # still ending
        viewer = self.mpeg1_viewer()
        assert len(self.reactor.spawned) == 2  # not two at once
        self.reactor.advance(1)  # SIGTERM: gone
        assert transport.pid is None and len(self.reactor.spawned) == 3
        _, new = self.on_demand()
        assert IDR in nal_types(new.written[0]) and viewer.client.closed is None

    def test_max_viewers_counts_both_streams(self):
        service = self.build_h264("--max-viewers", "2")
        self.h264_arrives(self.small)
        h264 = self.network.connect(path="/stream")
        mpeg1 = self.mpeg1_viewer()
        third = self.mpeg1_viewer()
        fourth = self.network.connect(path="/stream")
        ws_port = Network(service.mpeg1_factory, self.reactor).connect()
        for refused in (third, fourth, ws_port):
            assert refused.client.closed == (1013, "too many viewers (2 at most)")
        assert h264.client.closed is None and mpeg1.client.closed is None
        figures = service.stats.gather()
        assert figures["viewers"]["count"] == 2
        assert sorted(v["stream"] for v in figures["viewers"]["list"]) == ["h264", "mpeg1"]
        assert figures["broadcast"]["turned_away"] == 3
        # one leaves: there is room again, on either
        self.leave(mpeg1)
        assert self.network.connect(path="/stream").client.closed is None

    def test_the_streams_own_port_serves_the_original_demo_mpeg1_on_any_path(self):
        service = self.build_h264()
        self.h264_arrives(self.small)
        (ws_port,) = [factory for _, factory, _, _ in self.reactor.tcpServers
                      if factory is not service.site]
        port = Network(ws_port, self.reactor)
        demo = port.connect(path="/any/path")
        assert demo.client.binary() == [stream_header(320, 240)]
        proto, _ = self.on_demand()
        self.ffmpeg_makes(proto, self.mpeg1[:5])
        port.flush()
        assert pictures_in(b"".join(demo.client.binary()[1:])) == 5
        assert demo.client.closed is None
        assert "stream's own port" in self.lines()[0][1]

    def test_behind_it_gets_nothing_until_a_keyframe_after_it_caught_up(self):
        service = self.build_h264()
        all_packets = packets(self.long)  # a keyframe every 10 pictures
        starts = [i for i, packet in enumerate(all_packets) if video_pes_start(packet)]
        units = [all_packets[i:j] for i, j in zip(starts, starts[1:] + [len(all_packets)])]
        assert len(units) == 60
        self.h264_arrives(b"".join(b"".join(u) for u in units[:3]))
        self.mpeg1_viewer()
        proto, transport = self.on_demand()
        assert len(transport.written) == 3
        self.reactor.advance(1.5)  # ffmpeg has made nothing of them for 1.5 s
        self.h264_arrives(b"".join(b"".join(u) for u in units[3:16]))  # keyframe 10 too
        assert len(transport.written) == 3
        self.ffmpeg_makes(proto, self.mpeg1[:3])  # it caught up
        self.h264_arrives(b"".join(b"".join(u) for u in units[16:20]))
        assert len(transport.written) == 3  # still waiting for a keyframe
        self.h264_arrives(b"".join(b"".join(u) for u in units[20:22]))
        assert len(transport.written) == 5
        assert IDR in nal_types(transport.written[3])
        figures = service.stats.gather()["mpeg1_on_demand"]
        assert figures["fell_behind"] == 1
        assert figures["access_units_dropped"] == 13 + 4
        assert [word for word, _ in self.lines()] == ["started", "behind"]

    def test_a_failed_ffmpeg_is_restarted_and_fed_from_a_keyframe_again(self):
        service = self.build_h264()
        self.h264_arrives(self.small)
        viewer = self.mpeg1_viewer(protocols=["pistream"])
        _, transport = self.on_demand()
        transport.end(Failure(ProcessTerminated(exitCode=1)))
        self.network.flush()
        assert len(self.reactor.spawned) == 2
        self.reactor.advance(0.25)  # the Encoder's first back-off
        assert len(self.reactor.spawned) == 3
        _, again = self.on_demand()
        assert IDR in nal_types(again.written[0])
        figures = service.stats.gather()["mpeg1_on_demand"]
        assert (figures["starts"], figures["restarts"], figures["running"]) == (1, 1, True)
        assert self.lines()[-1] == ("started", "restarted after a failure")
        statuses = [json.loads(t) for t in viewer.client.texts() if b'"encoder"' in t]
        assert {"encoder": "unavailable", "why": "ffmpeg exited with code 1"} in statuses

    def test_it_stops_with_the_daemon(self):
        self.build_h264()
        self.h264_arrives(self.small)
        self.mpeg1_viewer()
        _, transport = self.on_demand()
        self.stop()
        assert transport.stdin_closed and transport.pid is None
        assert len(self.reactor.spawned) == 2
        assert self.lines()[-1] == ("stopping", "the daemon stops")

    def test_a_new_size_restarts_it_and_its_viewers_get_the_new_header(self):
        service = self.build_h264()
        self.h264_arrives(self.small)
        viewer = self.mpeg1_viewer()
        _, transport = self.on_demand()
        self.h264_arrives(self.large)  # the camera came back at another size
        assert transport.stdin_closed
        self.reactor.advance(1)
        self.network.flush()
        assert len(self.reactor.spawned) == 3
        _, again = self.on_demand()
        first = parse_message(service.fanout.start_cache.chunks[0][0].data)
        assert first.access_unit.endswith(again.written[0][:-len(DELIMITER)])
        headers = [m for m in viewer.client.binary() if m[:4] == b"jsmp"]
        assert headers == [stream_header(320, 240), stream_header(640, 360)]

    def test_the_figures_say_whether_it_runs_its_viewers_and_pictures(self):
        service = self.build_h264()
        self.h264_arrives(self.small)
        before = service.stats.gather()["mpeg1_on_demand"]
        assert (before["running"], before["viewers"], before["pictures_out"]) == (False, 0, 0)
        self.mpeg1_viewer()
        proto, transport = self.on_demand()
        given = len(transport.written)  # the start cache: a keyframe and those since
        self.reactor.advance(0.02)
        self.ffmpeg_makes(proto, self.mpeg1[:given])
        figures = service.stats.gather()["mpeg1_on_demand"]
        assert (figures["running"], figures["viewers"], figures["starts"]) == (True, 1, 1)
        assert figures["pictures_out"] == given and figures["pid"] is not None
        assert figures["access_units_in"] == given
        # each picture matched to its access unit: the time ffmpeg took
        assert figures["latency_ms"]["count"] == given
        assert figures["latency_ms"]["max"] == 20.0
        metrics = http(service.site, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for line in (b"pistream_mpeg1_on_demand_up 1.0", b"pistream_mpeg1_viewers 1.0",
                     b"pistream_mpeg1_on_demand_starts_total 1.0",
                     b"pistream_mpeg1_on_demand_restarts_total 0.0",
                     b"pistream_mpeg1_on_demand_pictures_total %d.0" % given,
                     b'pistream_stage_latency_seconds{quantile="0.5",stage="mpeg1_on_demand"}'):
            assert line in metrics, line

    def test_in_mpeg1_mode_codec_mpeg1_is_the_one_stream(self):
        service = self.build("--codec", "mpeg1")
        self.start()
        assert service.on_demand is None and service.mpeg1_factory is None
        viewer = Network(service.site, self.reactor, port=8082).connect(
            path="/stream?codec=mpeg1")
        assert viewer.client.binary() == [stream_header(640, 480)]
        assert len(service.fanout.viewers) == 1 and len(self.reactor.spawned) == 1
        assert "mpeg1_on_demand" not in service.stats.gather()


def test_what_ffmpeg_is_given_of_each_message():
    aud, sps, idr = b"\x00\x00\x00\x01\x09\x10", b"\x00\x00\x00\x01\x67\x42", b"\x00\x00\x01\x65\x88"
    # its own delimiter goes (whatever its start code), one closes it
    assert decoder_input(frame_message(aud + sps + idr, True, 1.0)) == sps + idr + DELIMITER
    assert decoder_input(frame_message(aud[1:] + idr, False, None)) == idr + DELIMITER
    assert decoder_input(frame_message(sps + idr, True, None)) == sps + idr + DELIMITER


def test_the_command_decodes_at_once_and_encodes_as_mpeg1_mode_does():
    from pistreaming.encoder import output_args
    command = decode_command("/usr/bin/ffmpeg", 30, 1_000_000)
    assert command[-len(output_args(30, 1_000_000)):] == output_args(30, 1_000_000)
    before_input = command[:command.index("-i")]
    for flag in (["-probesize", "32"], ["-analyzeduration", "0"], ["-flags", "low_delay"],
                 ["-f", "h264"], ["-framerate", "30/1"]):
        assert re.search(" ".join(flag), " ".join(before_input)), flag
    assert "nobuffer" not in command  # it would drop what probing read


# -- end to end -----------------------------------------------------------------

def stats_of(daemon):
    with urllib.request.urlopen(daemon.base_url + "stats.json", timeout=10) as answer:
        return json.load(answer)


GRACE = 1.0


def test_a_real_daemon_makes_mpeg1_on_demand_and_stops_it_after(tmp_path):
    """--codec h264, the test pattern through libx264: an MPEG-1 viewer gets
    jsmp and pictures that decode, the first within 1.5 s of connecting
    while the on-demand ffmpeg was stopped; the ffmpeg goes a few seconds
    after it leaves; the original demo's client on --ws-port gets jsmp."""
    # (its grace time shortened to 1 s: the 5 s is checked on a Clock above)
    with Daemon("--codec", "h264", "--resolution", "640x480", "--framerate", "30",
                prelude=f"import pistreaming.ondemand as o; o.STOP_AFTER = {GRACE}") as daemon:
        daemon.wait_for(r"H\.264 stream: avc1", 15)
        (h264_ffmpeg,) = ffmpeg_children(daemon)
        assert stats_of(daemon)["mpeg1_on_demand"]["running"] is False

        url = f"ws://127.0.0.1:{daemon.http_port}/stream?codec=mpeg1"
        started = time.monotonic()
        ws = websocket.create_connection(url, timeout=10)
        opcode, header = ws.recv_data()
        assert header == stream_header(640, 480)
        received, first_at = [], None
        while True:
            opcode, data = ws.recv_data()
            assert opcode == websocket.ABNF.OPCODE_BINARY
            received.append(data)
            if pictures_in(data):
                first_at = time.monotonic() - started
                break
        first = decoded_frames(b"".join(received), tmp_path)
        while pictures_in(b"".join(received)) < 30:
            received.append(ws.recv())
        frames = decoded_frames(b"".join(received), tmp_path)
        figures = stats_of(daemon)["mpeg1_on_demand"]
        print(f"\nfirst MPEG-1 picture {first_at * 1000:.0f} ms after connecting "
              f"(on-demand ffmpeg stopped before); decode+encode in ffmpeg: "
              f"p50 {figures['latency_ms']['p50']} ms, p95 {figures['latency_ms']['p95']} ms "
              f"over {figures['latency_ms']['count']} pictures")
        assert first_at < 1.5
        assert len(first) >= 1 and {(f["width"], f["height"]) for f in first} == {(640, 480)}
        assert len(frames) >= 30 and {(f["width"], f["height"]) for f in frames} == {(640, 480)}
        assert figures["running"] and figures["viewers"] == 1
        on_demand = [pid for pid in ffmpeg_children(daemon) if pid != h264_ffmpeg]
        assert len(on_demand) == 1

        # the original demo's client, on the stream's own port
        demo = websocket.create_connection(f"ws://127.0.0.1:{daemon.ws_port}/", timeout=10)
        opcode, header = demo.recv_data()
        assert opcode == websocket.ABNF.OPCODE_BINARY and header == stream_header(640, 480)
        assert pictures_in(demo.recv()) >= 1
        demo.close()

        left = time.monotonic()
        ws.close()
        daemon.wait_for(r"MPEG-1 on demand: stopping ffmpeg pid", GRACE + 5)
        daemon.wait_for(r"MPEG-1 on demand: ffmpeg has stopped", 5)
        assert not pids_alive(on_demand)  # ended and reaped
        gone_after = time.monotonic() - left
        print(f"on-demand ffmpeg gone {gone_after:.1f} s after the last MPEG-1 viewer left")
        assert GRACE - 0.5 < gone_after < GRACE + 3
        assert ffmpeg_children(daemon) == [h264_ffmpeg]
        assert stats_of(daemon)["mpeg1_on_demand"]["running"] is False
