"""/snapshot.jpg (pistreaming.snapshot), in-process: the daemon built on a
SpawningReactor, fed real MPEG-1 and H.264 as its encoder writes them;
the decoders it starts are the reactor's records, answered by the test.
What is asked of them: one decode per new picture however many ask, the
start cache in and its last picture out, a bounded ?width=, 503 with
Retry-After before the first picture.  One test per codec runs the very
command the daemon would on the start cache it would give: a JPEG of the
picture's size comes out.  The real daemon: tests/test_recording_daemon.py."""

import subprocess

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessTerminated
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from pistreaming.encoder import output_args
from pistreaming.h264 import HEADER
from pistreaming.snapshot import FRESH_FOR, snapshot_command
from tests.test_service import ServiceCase
from tests.test_service_h264 import libx264_ts

JPEG = b"\xff\xd8\xff\xe0 a picture \xff\xd9"
JPEG2 = b"\xff\xd8\xff\xe0 a newer picture \xff\xd9"


def mpeg1_ts(size, frames):
    args = output_args(30, 800_000, codec="mpeg1")
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30",
         "-frames:v", str(frames), *args[:-1], "-"], check=True, capture_output=True).stdout


@pytest.fixture(scope="class")
def streams(request):
    # 40 pictures, keyframes at 0 and 30 (MPEG-1: one a second) or every 10.
    request.cls.streams = {"mpeg1": mpeg1_ts("320x240", 40),
                           "h264": libx264_ts("320x240", 40, 10)}


def get(site, path, headers=b"", method=b"GET"):
    """A request to C{site}; the transport its answer is (or will be) written to."""
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8082))
    channel.makeConnection(transport)
    transport.channel = channel
    channel.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         + headers + b"\r\n")
    return transport


def answer(transport):
    """(status, headers (lower-case names), body) of a whole answer, or None."""
    raw = transport.value()
    if b"\r\n\r\n" not in raw:
        return None
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = {name.lower(): value for name, value in
               (line.split(b": ", 1) for line in lines[1:])}
    return int(lines[0].split(b" ")[1]), headers, body


def jpeg_size(jpeg):
    """(width, height) from a JPEG's start-of-frame marker."""
    at = 2
    while at < len(jpeg):
        marker, length = jpeg[at + 1], int.from_bytes(jpeg[at + 2:at + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return (int.from_bytes(jpeg[at + 7:at + 9], "big"),
                    int.from_bytes(jpeg[at + 5:at + 7], "big"))
        at += 2 + length
    raise AssertionError("no start of frame")


@pytest.mark.usefixtures("streams")
class SnapshotTests(ServiceCase):
    codec = "h264"

    def setUp(self):
        super().setUp()
        self.warnings = []

        def observer(event):
            if event.get("log_namespace") == "pistreaming.snapshot":
                self.warnings.append(event["log_level"].name)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def build_codec(self, codec, *args):
        self.codec = codec
        service = self.build("--codec", codec, "--framerate", "30", "--resolution", "320x240",
                             *args)
        self.start()
        self.encoder = self.reactor.spawned[0][0]
        return service

    def pictures(self, first, last):
        """The encoder writes pictures C{first}..C{last} - 1 of the stream."""
        ts = self.streams[self.codec]
        starts = [i for i in range(0, len(ts), 188)
                  if ts[i + 1] & 0x40 and (ts[i + 1] & 0x1F) << 8 | ts[i + 2] == 0x100]
        starts.append(len(ts))
        begin = 0 if first == 0 else starts[first]
        self.encoder.childDataReceived(1, ts[begin:starts[last]])

    def decoders(self):
        return [(proto, args, transport) for proto, _, args, transport in self.reactor.spawned
                if "mjpeg" in args]

    def figures(self):
        return self.service.stats.gather()["snapshot"]

    def test_before_the_first_picture_503_with_retry_after(self):
        for codec in ("h264", "mpeg1"):
            service = self.build_codec(codec)
            status, headers, body = answer(get(service.site, b"/snapshot.jpg"))
            assert (status, headers[b"retry-after"], headers[b"cache-control"]) == (
                503, b"1", b"no-store")
            assert body == b"503 no picture yet\n" and self.decoders() == []
            self.stop()

    def test_many_requests_are_one_decode_of_the_start_cache(self):
        for codec in ("h264", "mpeg1"):
            service = self.build_codec(codec)
            self.pictures(0, 35)  # a keyframe at 30 (MPEG-1; H.264: at 30 too)
            waiting = [get(service.site, b"/snapshot.jpg") for _ in range(50)]
            (proto, args, transport), = self.decoders()
            # the start cache: the keyframe at 30 and the 4 pictures since;
            # the last of those 5 is the one asked for
            cache = [chunk for chunk, _ in service.fanout.start_cache.chunks]
            given = (b"".join(c.data[HEADER.size:] for c in cache) if codec == "h264"
                     else b"".join(c.data for c in cache))
            assert b"".join(transport.written) == given and transport.stdin_closed
            assert args[args.index("-vf") + 1] == "select=eq(n\\,4)"
            assert args == snapshot_command(service.config.ffmpeg, codec, 4)
            assert [answer(t) for t in waiting] == [None] * 50
            proto.outReceived(JPEG[:5])
            proto.outReceived(JPEG[5:])
            transport.end(Failure(ProcessDone(0)))
            for t in waiting:
                status, headers, body = answer(t)
                assert (status, body) == (200, JPEG)
                assert headers[b"content-type"] == b"image/jpeg"
                assert headers[b"cache-control"] == b"no-store"
                assert headers[b"content-length"] == b"%d" % len(JPEG)
            figures = self.figures()
            assert (figures["requests"], figures["decodes"]) == (50, 1)
            self.stop()
            self.reactor.spawned.clear()

    def test_the_jpeg_is_kept_until_a_newer_picture_and_a_second(self):
        service = self.build_codec("h264")
        self.pictures(0, 12)
        get(service.site, b"/snapshot.jpg")
        (proto, _, transport), = self.decoders()
        proto.outReceived(JPEG)
        transport.end(Failure(ProcessDone(0)))
        self.pictures(12, 20)  # newer pictures, but the JPEG is not a second old yet...
        self.reactor.advance(FRESH_FOR - 0.1)
        assert answer(get(service.site, b"/snapshot.jpg"))[2] == JPEG
        assert len(self.decoders()) == 1
        self.reactor.advance(0.2)  # ...now it is
        pending = get(service.site, b"/snapshot.jpg")
        assert len(self.decoders()) == 2 and answer(pending) is None
        proto, _, transport = self.decoders()[1]
        proto.outReceived(JPEG2)
        transport.end(Failure(ProcessDone(0)))
        assert answer(pending)[2] == JPEG2
        self.reactor.advance(5)  # no newer picture since: it is still the latest
        assert answer(get(service.site, b"/snapshot.jpg"))[2] == JPEG2
        assert len(self.decoders()) == 2 and self.figures()["answered_from_cache"] == 2

    def test_a_slow_decode_keeps_its_jpeg_longer(self):
        """Many pictures since the keyframe (a long keyframe interval) make a
        slow decode: the JPEG is then kept four times as long as it took, so
        that decoding takes a quarter of a core at most."""
        service = self.build_codec("h264")
        self.pictures(0, 12)
        get(service.site, b"/snapshot.jpg")
        (proto, _, transport), = self.decoders()
        self.reactor.advance(0.75)  # decoding
        proto.outReceived(JPEG)
        transport.end(Failure(ProcessDone(0)))
        self.pictures(12, 20)
        self.reactor.advance(2.9)
        assert answer(get(service.site, b"/snapshot.jpg"))[2] == JPEG
        assert len(self.decoders()) == 1
        self.reactor.advance(0.2)
        get(service.site, b"/snapshot.jpg")
        assert len(self.decoders()) == 2

    def test_width_is_a_bounded_whole_number_and_scales_the_picture_down(self):
        service = self.build_codec("mpeg1")
        self.pictures(0, 5)
        for bad in (b"abc", b"0", b"15", b"321", b"99999999", b"-5", b"1e3", b"160&width=80"):
            status, headers, body = answer(get(service.site, b"/snapshot.jpg?width=" + bad))
            assert status == 400 and body.startswith(b"400 width"), bad
        assert self.decoders() == []
        get(service.site, b"/snapshot.jpg?width=160")
        (_, args, _), = self.decoders()
        assert args[args.index("-vf") + 1] == "select=eq(n\\,4),scale=160:-2"
        get(service.site, b"/snapshot.jpg?width=320")  # the picture's own width
        get(service.site, b"/snapshot.jpg?width=80")  # waits its turn: one decode at a time
        assert len(self.decoders()) == 1
        first = self.decoders()[0]
        first[0].outReceived(JPEG)
        first[2].end(Failure(ProcessDone(0)))
        (_, args, _) = self.decoders()[1]
        assert args[args.index("-vf") + 1] == "select=eq(n\\,4)"

    def test_a_decode_that_fails_or_hangs_is_503_and_said_once(self):
        service = self.build_codec("h264")
        self.pictures(0, 12)
        first = get(service.site, b"/snapshot.jpg")
        proto, _, transport = self.decoders()[0]
        proto.errReceived(b"[h264 @ 0x1] error while decoding\nInvalid data found\n")
        transport.end(Failure(ProcessTerminated(exitCode=1)))
        status, headers, body = answer(first)
        assert (status, headers[b"retry-after"]) == (503, b"1")
        assert body == b"503 the picture could not be decoded: Invalid data found\n"
        second = get(service.site, b"/snapshot.jpg")
        _, _, transport = self.decoders()[1]
        self.reactor.advance(5)  # hangs: killed
        assert transport.signals == [9] and answer(second)[0] == 503
        assert self.warnings == ["warn"]
        assert self.figures()["decode_failures"] == 2

    def test_a_client_gone_before_the_picture_is_no_trouble(self):
        service = self.build_codec("h264")
        self.pictures(0, 12)
        gone = get(service.site, b"/snapshot.jpg")
        gone.channel.connectionLost(Failure(ConnectionDone()))
        proto, _, transport = self.decoders()[0]
        proto.outReceived(JPEG)
        transport.end(Failure(ProcessDone(0)))
        assert answer(get(service.site, b"/snapshot.jpg"))[2] == JPEG

    def test_head_says_what_get_would_without_the_picture(self):
        service = self.build_codec("h264")
        self.pictures(0, 12)
        head = get(service.site, b"/snapshot.jpg", method=b"HEAD")
        proto, _, transport = self.decoders()[0]
        proto.outReceived(JPEG)
        transport.end(Failure(ProcessDone(0)))
        status, headers, body = answer(head)
        assert (status, headers[b"content-length"], body) == (200, b"%d" % len(JPEG), b"")

    def test_the_decoders_command_gives_the_last_picture_of_the_start_cache(self):
        """The real ffmpeg, on what the daemon would give it: a JPEG of the
        picture's size, and ?width= scales it in proportion."""
        for codec in ("h264", "mpeg1"):
            service = self.build_codec(codec)
            self.pictures(0, 36)
            get(service.site, b"/snapshot.jpg?width=161")
            (proto, args, transport), = self.decoders()
            out = subprocess.run(args, input=b"".join(transport.written), capture_output=True,
                                 timeout=60)
            assert out.returncode == 0, out.stderr
            assert out.stdout[:2] == b"\xff\xd8" and jpeg_size(out.stdout) == (161, 120)
            whole = snapshot_command("ffmpeg", codec, 5)
            out = subprocess.run(whole, input=b"".join(transport.written), capture_output=True,
                                 check=True, timeout=60)
            assert jpeg_size(out.stdout) == (320, 240)
            self.stop()
            self.reactor.spawned.clear()

