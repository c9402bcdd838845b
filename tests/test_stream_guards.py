"""What a viewer's connection may not do: flood the daemon with frames or
bytes, name a host the camera is not, hold connections open without a
handshake; and what a refused handshake looks like.

The stream's protocol is driven in memory (a StringTransport per
connection, a task.Clock for time): every byte it receives is written here
by hand, every byte it sends is read back.
"""

import base64
import os
import struct

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from pistreaming import auth
from pistreaming.admission import PendingConnections
from pistreaming.broadcast import (FLOOD_FRAMES, INCOMING_BURST, INCOMING_RATE, MAX_INCOMING,
                                   StreamFactory)
from pistreaming.frames import stream_header
from pistreaming.hosts import HostPolicy

HEADER = stream_header(640, 480)
PORT = 8084
CLIENT = "203.0.113.7"


class Transport(StringTransport):
    """A StringTransport that says whether it was aborted, and (like TCP's)
    does not mind an unregisterProducer without a producer."""

    aborted = False

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()

    def unregisterProducer(self):
        self.producer = None


class Connection:
    """One viewer's connection to a StreamFactory, in memory."""

    def __init__(self, factory, client=CLIENT, transport=None):
        peer = (IPv6Address("TCP", client, 40000) if ":" in client
                else IPv4Address("TCP", client, 40000))
        self.protocol = factory.buildProtocol(peer)
        self.transport = transport or Transport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", PORT), peerAddress=peer)
        self.protocol.makeConnection(self.transport)
        self.read = 0  # how much of the server's output was looked at
        self.lost = False

    def send(self, data):
        self.protocol.dataReceived(data)

    def output(self):
        return self.transport.value()

    @property
    def closed(self):
        return self.transport.disconnecting

    def lose(self):
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def open(self, host=f"127.0.0.1:{PORT}", **headers):
        self.send(handshake(host, **headers))
        assert self.output().startswith(b"HTTP/1.1 101 "), self.output()[:200]
        return self

    def frames(self):
        """The frames the server sent after its 101 answer: [(opcode, payload)]."""
        data = self.output()
        data = data[data.index(b"\r\n\r\n") + 4:]
        frames = []
        while len(data) >= 2:
            opcode, length = data[0] & 0x0F, data[1] & 0x7F
            i = 2
            if length == 126:
                length, i = struct.unpack("!H", data[2:4])[0], 4
            elif length == 127:
                length, i = struct.unpack("!Q", data[2:10])[0], 10
            frames.append((opcode, data[i:i + length]))
            data = data[i + length:]
        return frames

    def close_code(self):
        """The code of the close frame the server sent, or None."""
        closes = [payload for opcode, payload in self.frames() if opcode == 8]
        assert len(closes) <= 1
        return struct.unpack("!H", closes[0][:2])[0] if closes else None

    def answer_pings(self):
        for opcode, payload in self.frames()[self.read:]:
            if opcode == 9:
                self.send(frame(10, payload))
        self.read = len(self.frames())


def handshake(host=f"127.0.0.1:{PORT}", origin=None, authorization=None, upgrade=True,
              path=b"/"):
    lines = [b"GET " + path + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + (host.encode("latin-1") if isinstance(host, str) else host))
    if upgrade:
        lines += [b"Upgrade: websocket", b"Connection: Upgrade"]
    lines += [b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)),
              b"Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append(b"Origin: " + (origin.encode("latin-1") if isinstance(origin, str)
                                    else origin))
    if authorization is not None:
        lines.append(b"Authorization: " + authorization.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


def frame(opcode, payload=b"", fin=True):
    """A masked client frame."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def status_line(data):
    return data.split(b"\r\n", 1)[0]


def headers_of(data):
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return {name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in head)}


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def factory(clock):
    return StreamFactory(HEADER, clock, hosts=HostPolicy(hostname="camera"))


@pytest.fixture
def logged():
    """What pistreaming.broadcast logs during the test, as text."""
    lines = []

    def observer(event):
        if event.get("log_namespace") == "pistreaming.broadcast":
            from twisted.logger import formatEvent
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


# -- floods: every frame and every byte counts --------------------------------

@pytest.mark.parametrize("flood", [
    pytest.param(lambda: frame(10, b"unasked"), id="pongs"),
    pytest.param(lambda: frame(9, b"hello?"), id="pings"),
    pytest.param(lambda: frame(0, b"", fin=False), id="empty-continuations"),
])
def test_a_flood_of_small_frames_is_closed_with_1008(factory, clock, logged, flood):
    viewer = Connection(factory).open()
    if flood().startswith(b"\x00"):  # continuations continue a message that never ends
        viewer.send(frame(2, b"", fin=False))
    viewer.send(b"".join(flood() for _ in range(1000)))  # in one go, under the byte limit
    assert viewer.close_code() == 1008
    # What followed the frame over the limit was not even parsed: at most
    # FLOOD_FRAMES pings were answered.
    assert len([f for f in viewer.frames() if f[0] == 10]) <= FLOOD_FRAMES
    assert [line for line in logged if "closing it" in line] == [
        f"viewer tcp4:{CLIENT}:40000 sent {FLOOD_FRAMES + 1} frames in 10s; closing it"]
    # Whatever it sends while it closes is dropped; it does not close
    # itself, so it is cut off within a second.
    before = len(viewer.output())
    viewer.send(frame(8, struct.pack("!H", 1000)) * 10)
    assert len(viewer.output()) == before and not viewer.closed
    clock.advance(1)
    assert viewer.transport.aborted


def test_frames_spread_over_time_count_too(factory, clock):
    viewer = Connection(factory).open()
    for i in range(FLOOD_FRAMES):
        viewer.send(frame(10, b"unasked"))
        clock.advance(0.4)
    assert viewer.close_code() is None
    viewer.send(frame(10, b"unasked"))  # the 21st in 8 s
    assert viewer.close_code() == 1008


def test_a_healthy_viewer_that_answers_pings_and_pongs_now_and_then_stays(factory, clock):
    viewer = Connection(factory).open()
    for second in range(600):
        clock.advance(1)
        viewer.answer_pings()
        if second % 5 == 0:
            viewer.send(frame(10, b"still here"))  # unasked, now and then
    assert viewer.close_code() is None
    assert not viewer.closed
    assert viewer.protocol in factory.viewers
    assert len([f for f in viewer.frames() if f[0] == 9]) >= 50  # it was pinged all along


def test_a_byte_flood_of_legal_frames_is_closed_before_it_is_parsed(factory, clock, logged):
    viewer = Connection(factory).open()
    message = frame(2, b"x" * MAX_INCOMING)  # the biggest a viewer may send
    flood = message * (INCOMING_BURST // len(message) + 1)
    viewer.send(flood)
    assert viewer.close_code() == 1008
    assert not viewer.protocol._heard  # not one of its frames was read
    assert [line for line in logged if "closing it" in line] == [
        f"viewer tcp4:{CLIENT}:40000 sent more than {INCOMING_RATE // 1024} KiB/s; closing it"]
    clock.advance(1)
    assert viewer.transport.aborted


def test_the_byte_limit_is_an_average_with_a_small_burst(factory, clock):
    viewer = Connection(factory).open()
    # A kilobyte a second, for a minute: fine.
    for _ in range(60):
        clock.advance(1)
        viewer.answer_pings()
        viewer.send(frame(2, b"x" * 1000))
    assert viewer.close_code() is None
    # Then the biggest messages there are, as fast as they go: the burst
    # allowance passes, and the one after it is one too many.
    message = frame(2, b"x" * MAX_INCOMING)
    sent = 0
    while viewer.close_code() is None and sent < 100:
        viewer.send(message)
        sent += 1
    assert viewer.close_code() == 1008
    assert sent == INCOMING_BURST // len(message) + 1


def test_a_frame_too_big_is_refused_and_the_rest_of_it_not_read(factory, clock):
    viewer = Connection(factory).open()
    header = frame(2, b"x" * 70000)[:14]  # announces 70000 bytes
    viewer.send(header)
    assert viewer.close_code() == 1009  # Autobahn's: too big
    viewer.send(b"y" * (10 * INCOMING_BURST))  # and the payload keeps coming
    assert viewer.protocol.data == b""  # dropped, not buffered
    clock.advance(1)
    assert viewer.transport.aborted


# -- the handshake: Host first ------------------------------------------------

@pytest.mark.parametrize("host", [f"127.0.0.1:{PORT}", f"[::1]:{PORT}", "localhost",
                                  f"localhost:{PORT}", "camera.local", "192.0.2.1"])
def test_the_camera_s_own_names_may_open_the_stream(factory, host):
    Connection(factory).open(host=host)


def test_another_name_is_a_misdirected_request(factory, logged):
    viewer = Connection(factory)
    viewer.send(handshake("rebound.example:8084", origin="http://rebound.example:8084"))
    out = viewer.output()
    assert status_line(out) == b"HTTP/1.1 421 Misdirected Request"
    assert (b"misdirected request: rebound.example is not a name this camera answers to; "
            b"add it with --allow-host") in out
    assert viewer.closed
    assert logged == [f"viewer tcp4:{CLIENT}:40000: refused a request for rebound.example "
                      "(not a name this camera answers to; --allow-host adds one)"]


def test_the_host_is_checked_before_the_password(clock):
    class Authenticator:
        asked = 0

        def authenticate(self, *args):
            self.asked += 1
            return defer.succeed("alice")

    authenticator = Authenticator()
    factory = StreamFactory(HEADER, clock, authenticator=authenticator,
                            hosts=HostPolicy(hostname="camera"))
    viewer = Connection(factory)
    viewer.send(handshake("rebound.example", origin="http://\x00evil"))
    assert status_line(viewer.output()) == b"HTTP/1.1 421 Misdirected Request"
    assert authenticator.asked == 0


def test_allow_host_adds_names(clock):
    factory = StreamFactory(HEADER, clock, hosts=HostPolicy(["cam.example.org"], "camera"))
    Connection(factory).open(host="cam.example.org:8084")


# -- what a refused handshake looks like -----------------------------------------

def assert_standard_answer(out, status):
    assert status_line(out) == status
    headers = headers_of(out)
    assert headers[b"server"] == b"pistream"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"content-type"].startswith(b"text/plain")
    body = out.split(b"\r\n\r\n", 1)[1]
    assert int(headers[b"content-length"]) == len(body)
    assert all(32 <= b < 127 or b in b"\r\n" for b in out)


def test_a_nul_in_the_origin_goes_nowhere(factory):
    viewer = Connection(factory)
    viewer.send(handshake(origin=b"http://evil\x00.example\r\x7f"))
    out = viewer.output()
    assert status_line(out) in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 403 Forbidden")
    assert_standard_answer(out, status_line(out))
    assert b"evil" not in status_line(out)
    assert viewer.closed


def test_another_site_s_page_gets_a_plain_403(factory):
    viewer = Connection(factory)
    viewer.send(handshake(origin="http://elsewhere.example:" + "9" * 4))
    out = viewer.output()
    assert_standard_answer(out, b"HTTP/1.1 403 Forbidden")
    assert b"elsewhere" not in out.split(b"\r\n\r\n")[0]


def test_a_plain_http_request_gets_426_with_upgrade(factory):
    viewer = Connection(factory)
    viewer.send(handshake(upgrade=False))
    out = viewer.output()
    assert_standard_answer(out, b"HTTP/1.1 426 Upgrade Required")
    assert headers_of(out)[b"upgrade"] == b"websocket"


def test_autobahn_s_own_refusals_echo_nothing_in_the_status_line(factory):
    viewer = Connection(factory)
    viewer.send(b"GET /#fragment\x01<script> HTTP/1.1\r\nHost: localhost\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    out = viewer.output()
    assert_standard_answer(out, b"HTTP/1.1 400 Bad Request")
    assert b"script" not in status_line(out)


def test_the_101_answer_names_the_server(factory):
    viewer = Connection(factory).open()
    assert headers_of(viewer.output())[b"server"] == b"pistream"


def test_a_request_too_big_is_refused(factory):
    viewer = Connection(factory)
    viewer.send(b"GET / HTTP/1.1\r\nX-Filler: " + b"a" * 17000)
    assert_standard_answer(viewer.output(), b"HTTP/1.1 400 Bad Request")
    assert viewer.closed


# -- passwords: too many attempts ---------------------------------------------------

class TooManyAttempts(UnauthorizedLogin):
    def __init__(self, status, retry_after):
        super().__init__("too many attempts")
        self.status = status
        self.retry_after = retry_after


class Refusing:
    def __init__(self, error):
        self.error = error

    def challenge(self):
        return b'Basic realm="pistream"'

    def authenticate(self, authorization, address, what):
        return defer.fail(self.error)


@pytest.mark.parametrize("status,phrase", [(429, b"Too Many Requests"),
                                           (503, b"Service Unavailable")])
def test_too_many_attempts_is_refused_with_its_status_and_retry_after(
        clock, monkeypatch, status, phrase):
    monkeypatch.setattr(auth, "TooManyAttempts", TooManyAttempts, raising=False)
    factory = StreamFactory(HEADER, clock, hosts=HostPolicy(hostname="camera"),
                            authenticator=Refusing(TooManyAttempts(status, 29.5)))
    viewer = Connection(factory)
    viewer.send(handshake(authorization="Basic YWxpY2U6d3Jvbmc="))
    out = viewer.output()
    assert_standard_answer(out, b"HTTP/1.1 %d %s" % (status, phrase))
    assert headers_of(out)[b"retry-after"] == b"30"
    assert viewer.closed


def test_a_wrong_password_is_refused_with_401_and_a_challenge(clock):
    factory = StreamFactory(HEADER, clock, hosts=HostPolicy(hostname="camera"),
                            authenticator=Refusing(UnauthorizedLogin("no")))
    viewer = Connection(factory)
    viewer.send(handshake(authorization="Basic YWxpY2U6d3Jvbmc="))
    out = viewer.output()
    assert_standard_answer(out, b"HTTP/1.1 401 Unauthorized")
    assert headers_of(out)[b"www-authenticate"] == b'Basic realm="pistream"'


# -- pending connections on the stream's own port ----------------------------------

@pytest.fixture
def pending():
    return PendingConnections(per_address=16, total=64)


def test_the_17th_unfinished_connection_from_one_address_is_dropped(
        clock, pending, logged):
    factory = StreamFactory(HEADER, clock, hosts=HostPolicy(hostname="camera"),
                            pending=pending)
    waiting = [Connection(factory) for _ in range(16)]
    assert not any(c.closed for c in waiting)
    extra = Connection(factory)
    assert extra.transport.aborted
    assert extra.output() == b""
    assert Connection(factory).transport.aborted
    drops = [line for line in logged if "dropped a connection" in line]
    assert drops == [f"stream port: dropped a connection from {CLIENT}: 16 of its connections "
                     "have not sent their request (16 at most); more are dropped without a "
                     "word for a minute"]
    # Another address is not held up.
    assert not Connection(factory, client="203.0.113.8").closed
    # A handshake that completes frees its slot...
    waiting[0].open()
    assert not Connection(factory).closed
    # ...and so does a connection that goes away.
    waiting[1].lose()
    assert not Connection(factory).closed
    assert Connection(factory).transport.aborted
    # The refusal is logged again after a minute, not before.
    clock.advance(59)
    assert Connection(factory).transport.aborted
    assert len([line for line in logged if "dropped a connection" in line]) == 1
    clock.advance(1)
    assert Connection(factory).transport.aborted
    assert len([line for line in logged if "dropped a connection" in line]) == 2


def test_ipv6_addresses_are_counted_by_their_64(clock, pending):
    factory = StreamFactory(HEADER, clock, hosts=HostPolicy(hostname="camera"),
                            pending=pending)
    for i in range(16):
        assert not Connection(factory, client=f"2001:db8:1:2::{i + 1:x}").closed
    assert Connection(factory, client="2001:db8:1:2:ffff::1").transport.aborted
    assert not Connection(factory, client="2001:db8:1:3::1").closed


def test_a_pending_slot_is_released_once(clock, pending):
    factory = StreamFactory(HEADER, clock, hosts=HostPolicy(hostname="camera"),
                            pending=pending)
    viewer = Connection(factory).open()
    other = Connection(factory)
    assert pending.count == 1
    viewer.lose()
    assert pending.count == 1
    other.send(handshake("rebound.example"))  # refused: released
    other.lose()
    assert pending.count == 0


def test_with_every_slot_taken_the_longest_waiting_makes_room(clock):
    pending = PendingConnections(per_address=16, total=4)
    factory = StreamFactory(HEADER, clock, hosts=HostPolicy(hostname="camera"),
                            pending=pending)
    waiting = [Connection(factory, client=f"203.0.113.{i}") for i in range(4)]
    viewer = Connection(factory, client="198.51.100.7")
    assert not viewer.closed
    assert waiting[0].transport.aborted and not any(w.closed for w in waiting[1:])
    assert pending.count == 4 and pending.evicted == 1
    waiting[0].lose()  # its own release counts nothing twice
    assert pending.count == 4
    viewer.open()
    assert pending.count == 3


def test_connections_from_the_http_port_are_not_counted_here(clock, pending):
    factory = StreamFactory(HEADER, clock, hosts=HostPolicy(hostname="camera"),
                            pending=pending)

    class Port:
        factory = object()  # the web site

    transport = Transport(hostAddress=IPv4Address("TCP", "192.0.2.1", 8080),
                          peerAddress=IPv4Address("TCP", CLIENT, 40000))
    transport.server = Port()
    viewers = [Connection(factory, transport=Transport(
        hostAddress=transport.getHost(), peerAddress=transport.getPeer()))
        for _ in range(16)]
    assert pending.count == 16
    through_http = Connection(factory, transport=transport)
    assert not through_http.closed
    assert pending.count == 16
    through_http.open()
    through_http.lose()
    assert pending.count == 16
    assert not any(v.closed for v in viewers)


def test_a_dribbled_handshake_is_cut_10_seconds_after_the_open(factory, clock):
    viewer = Connection(factory)
    request = handshake()
    for i in range(len(request) - 1):
        viewer.send(request[i:i + 1])
        if clock.seconds() < 9.8:
            clock.advance(0.1)
    clock.advance(9.99 - clock.seconds())
    assert not viewer.closed
    clock.advance(0.02)
    assert viewer.closed and viewer.transport.aborted
