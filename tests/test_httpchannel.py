"""The HTTP connection (pistreaming.httpchannel.Channel) as a client meets
it: the real Site from make_site (or a Site whose page answers when the test
says) over an in-memory transport that buffers and applies back-pressure the
way a TCP transport does, on a fake clock; and a check that the channel uses
no private name of Twisted's."""

import ast
import inspect
import re
from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web import resource, server

from pistreaming import httpchannel, web
from pistreaming.admission import PendingConnections
from pistreaming.auth import Authenticator
from pistreaming.broadcast import StreamFactory
from pistreaming.frames import stream_header
from pistreaming.httpchannel import (IDLE_TIMEOUT, MAX_PIPELINED, MAX_UNPARSED,
                                     REQUEST_DEADLINE)
from pistreaming.options import Config

SERVER = IPv4Address("TCP", "192.0.2.1", 8082)
PLAYER = bytes(range(256)) * 489  # 125 KB, like the JSMpeg build
GET_PLAYER = b"GET /jsmpg.js HTTP/1.1\r\nHost: campi\r\n\r\n"
GET_PAGE = b"GET /index.html HTTP/1.1\r\nHost: campi\r\n\r\n"
GET_MISSING = b"GET /missing HTTP/1.1\r\nHost: campi\r\n\r\n"


class TCPLikeTransport(StringTransport):
    """A connection whose client reads only when told to.

    Like Twisted's TCP transport it pauses its producer (the channel) when it
    holds more than C{bufferSize} unsent bytes, and resumes it once the
    client has taken them all; and while the channel has paused it
    (pauseProducing), what the client sends stays with the client (in the
    kernel, for TCP) and is handed over in reads of at most 64 KiB."""

    bufferSize = 2 ** 16
    readSize = 2 ** 16

    def __init__(self, peer):
        super().__init__(hostAddress=SERVER, peerAddress=peer)
        self.producerPaused = False
        self.unsent = b""  # what the client sent that was not read yet
        self.most_held = 0  # the most this side ever held unsent

    def write(self, data):
        super().write(data)
        held = len(self.value())
        self.most_held = max(self.most_held, held)
        if self.producer is not None and self.streaming and held > self.bufferSize:
            self.producerPaused = True
            self.producer.pauseProducing()

    def send(self, data):
        """The client sends C{data}; the channel reads it when it reads."""
        self.unsent += data
        self.deliver()

    def deliver(self):
        while self.unsent and self.producerState == "producing" and not self.disconnecting:
            chunk, self.unsent = self.unsent[:self.readSize], self.unsent[self.readSize:]
            self.protocol.dataReceived(chunk)

    def receive(self):
        """The client reads all that was sent to it."""
        data = self.value()
        self.clear()
        if self.producer is not None and self.producerPaused:
            self.producerPaused = False
            self.producer.resumeProducing()
        self.deliver()
        return data


class Connections:
    """Opens connections to one Site on a fake clock."""

    def __init__(self, pending=None, password=False):
        self.clock = MemoryReactorClock()
        authenticator = None
        if password:
            authenticator = Authenticator(SimpleNamespace(users=lambda: {}), self.clock)
        factory = StreamFactory(stream_header(640, 480), self.clock)
        self.site = web.make_site(Config(codec="mpeg1", ffmpeg="/usr/bin/ffmpeg"), factory, player=PLAYER,
                                  authenticator=authenticator, reactor=self.clock,
                                  pending=pending)

    def open(self, host="198.51.100.7", port=40000):
        peer = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        channel = self.site.buildProtocol(peer)
        transport = TCPLikeTransport(peer)
        transport.protocol = channel
        channel.makeConnection(transport)
        return transport

    def advance(self, seconds):
        self.clock.advance(seconds)


@pytest.fixture
def conns():
    return Connections()


@pytest.fixture
def events():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


class Answers:
    """Reads answers as a client does, chunk by chunk: their status codes,
    in order (bodies skipped by their Content-Length)."""

    def __init__(self):
        self.statuses = []
        self.buffer = b""
        self.skip = 0

    def feed(self, data):
        buffer, at = self.buffer + data, 0
        while True:
            if self.skip:
                skipped = min(self.skip, len(buffer) - at)
                self.skip -= skipped
                at += skipped
                if self.skip:
                    break
            end = buffer.find(b"\r\n\r\n", at)
            if end < 0:
                break
            lines = buffer[at:end].split(b"\r\n")
            self.statuses.append(int(lines[0].split(b" ")[1]))
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.skip = int(value)
            at = end + 4
        self.buffer = buffer[at:]
        return self


def statuses(data):
    """The status codes of the whole answers in C{data}, in order."""
    answers = Answers().feed(data)
    assert not answers.buffer and not answers.skip, data[-200:]
    return answers.statuses


def head_of(data):
    lines = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0], headers


def assert_our_answer(data, code):
    """C{data} is one answer C{code} with the headers every answer carries,
    and the connection closes after it."""
    status, headers = head_of(data)
    assert status.startswith(b"HTTP/1.1 %d " % code), data[:300]
    assert headers[b"server"] == [b"pistream"]
    assert headers[b"x-content-type-options"] == [b"nosniff"]
    assert headers[b"connection"] == [b"close"]
    assert statuses(data) == [code]


def failures(events):
    return [e for e in events
            if e.get("log_failure") is not None or e.get("log_level", LogLevel.info) >= LogLevel.warn]


# -- pipelined requests that are never read ---------------------------------

def test_pipelined_requests_that_are_not_read_leave_little_held(conns, events):
    t = conns.open()
    t.send(GET_PLAYER * 4000)
    answer = len(PLAYER) + 1000
    # The daemon holds its transport's buffer and one answer on top at most;
    # what is read of the requests and not parsed is one read.
    assert len(t.value()) <= 64 * 1024 + answer
    channel = t.protocol
    assert channel.clearLineBuffer() == b""  # the line parser holds nothing...
    assert channel._unparsed_size <= 64 * 1024  # ...the channel one read at most
    assert len(channel.requests) <= 1
    assert len(t.unsent) == 4000 * len(GET_PLAYER) - t.readSize  # the rest waits
    assert t.producerState == "paused"  # nothing more is read

    # Read, it gets answers one by one, never holding more; a client that
    # goes on pipelining is closed after MAX_PIPELINED answers in a row.
    got = Answers()
    for _ in range(100):
        more = t.receive()
        if not more:
            break
        got.feed(more)
    assert t.most_held <= 64 * 1024 + answer
    assert got.statuses == [200] * MAX_PIPELINED and not got.buffer
    assert t.disconnecting
    closing = [e for e in events if "pipelined" in e.get("log_format", "")]
    assert len(closing) == 1 and closing[0]["log_level"] == LogLevel.info


def test_pipelined_401s_without_credentials_are_bounded_too():
    conns = Connections(password=True)
    t = conns.open()
    t.send(GET_PLAYER * 4000)
    assert statuses(t.value()) == [401] * MAX_PIPELINED
    assert t.disconnecting
    assert len(t.value()) <= MAX_PIPELINED * 2048


def test_a_few_pipelined_requests_are_all_answered_as_the_client_reads(conns):
    t = conns.open()
    t.send(GET_PLAYER * 10)  # 1.2 MB of answers
    assert len(t.value()) <= 64 * 1024 + len(PLAYER) + 1000
    got = Answers()
    for _ in range(100):
        more = t.receive()
        if not more:
            break
        got.feed(more)
        assert len(t.value()) <= 64 * 1024 + len(PLAYER) + 1000
    assert got.statuses == [200] * 10
    assert not t.disconnecting
    t.send(GET_PAGE)  # and goes on as usual
    assert statuses(t.receive()) == [200]


def test_a_viewer_that_reads_gets_its_answers_at_once(conns):
    # (a small answer first: one over the transport's 64 KiB, as the page
    # with its inline script may be, rightly holds the next request until
    # the client has read it)
    t = conns.open()
    for _ in range(3):
        t.send(GET_MISSING + GET_PLAYER)
        assert statuses(t.receive()) == [404, 200]
    assert t.producerState == "producing"


def test_a_client_that_sends_ever_more_while_held_is_cut_off(conns):
    t = conns.open()
    t.send(GET_PLAYER * 10)
    assert t.protocol._held
    t.readSize = 1024 * 1024  # as if a transport handed over more than TCP's one read
    t.producerState = "producing"
    t.send(b"X" * (MAX_UNPARSED + 1))
    assert t.disconnected or t.disconnecting


def test_requests_sent_while_held_wait_unparsed_and_bounded(conns):
    t = conns.open()
    t.send(GET_PLAYER * 2)  # the first answer fills the transport: held
    assert t.protocol._held
    assert t.producerState == "paused"  # even with little waiting: nothing more is read
    answered = t.value()
    t.producerState = "producing"  # as if a transport handed over more anyway
    t.send(GET_PAGE)
    assert t.value() == answered  # not parsed, let alone answered
    t.readSize = 1024 * 1024
    t.send(GET_PAGE * (MAX_UNPARSED // len(GET_PAGE)))
    assert t.disconnected  # cut off, not answered
    assert t.value() == answered


# -- deadlines ---------------------------------------------------------------

@pytest.mark.parametrize("every", [0.5, 3, 9.9])
def test_a_dribbled_request_is_cut_off_ten_seconds_from_the_open(conns, events, every):
    t = conns.open()
    conns.advance(0.1)
    sent = 0.1
    for byte in GET_PAGE[:-4]:
        if sent + every >= REQUEST_DEADLINE:
            break
        conns.advance(every)
        sent += every
        t.send(bytes([byte]))
    conns.advance(REQUEST_DEADLINE - sent - 0.01)
    assert t.value() == b""
    conns.advance(0.02)
    assert_our_answer(t.value(), 408)
    assert t.disconnecting
    logged = [e for e in events if "did not send its request" in e.get("log_format", "")]
    assert len(logged) == 1 and logged[0]["log_level"] == LogLevel.info
    assert failures(events) == []


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(conns):
    t = conns.open()
    conns.advance(REQUEST_DEADLINE - 0.01)
    assert not t.disconnecting
    conns.advance(0.02)
    assert_our_answer(t.value(), 408)


def test_a_keep_alive_request_has_its_own_deadline(conns):
    t = conns.open()
    conns.advance(8)
    t.send(GET_PAGE)  # 8 s into the first deadline: in time
    assert statuses(t.receive()) == [200]
    conns.advance(30)  # idle, in keep-alive
    assert not t.disconnecting
    t.send(GET_PAGE[:5])
    conns.advance(REQUEST_DEADLINE - 0.01)
    for byte in GET_PAGE[5:-4]:
        t.send(bytes([byte]))  # bytes that do not finish it extend nothing
    assert t.value() == b""
    conns.advance(0.02)
    assert_our_answer(t.value(), 408)


def test_a_second_request_that_comes_whole_is_answered(conns):
    t = conns.open()
    t.send(GET_PAGE)
    assert statuses(t.receive()) == [200]
    conns.advance(IDLE_TIMEOUT - 1)
    t.send(GET_PAGE)
    assert statuses(t.receive()) == [200]
    conns.advance(IDLE_TIMEOUT - 1)  # the idle time starts again at the answer
    assert not t.disconnecting


def test_an_idle_keep_alive_connection_closes_after_the_idle_timeout(conns):
    t = conns.open()
    t.send(GET_PAGE)
    assert statuses(t.receive()) == [200]
    conns.advance(IDLE_TIMEOUT - 0.01)
    assert not t.disconnecting
    conns.advance(0.02)
    assert t.disconnecting and t.value() == b""  # closed, no answer needed


def test_bytes_late_in_the_idle_time_do_not_extend_it(conns):
    t = conns.open()
    t.send(GET_PAGE)
    assert statuses(t.receive()) == [200]
    conns.advance(IDLE_TIMEOUT - 2)
    t.send(b"G")
    conns.advance(2.01)  # the idle time is up, whatever came
    assert_our_answer(t.value(), 408)


def test_a_client_that_never_reads_a_408_is_dropped(conns):
    t = conns.open()
    t.send(GET_PLAYER * 10)  # held: answers wait to be sent
    conns.advance(IDLE_TIMEOUT + 0.01)
    assert t.disconnecting
    conns.advance(t.protocol.abortTimeout)
    assert t.disconnected  # aborted, not waited for


# -- the pending-connection caps --------------------------------------------

def test_the_caps_refuse_the_next_connection_and_free_a_slot(events):
    pending = PendingConnections(per_address=2, total=3)
    conns = Connections(pending=pending)
    first, second = conns.open(port=1), conns.open(port=2)
    third = conns.open(port=3)  # over its address's cap
    assert_our_answer(third.value(), 429)
    assert head_of(third.value())[1].get(b"retry-after") == [b"1"]
    assert third.disconnecting
    other = conns.open("203.0.113.9")
    assert pending.count == 3

    first.send(GET_PAGE[:-2])  # not whole: still pending
    assert pending.count == 3
    first.send(b"\r\n")  # whole: answered, no longer pending while answered...
    assert statuses(first.receive()) == [200]
    assert pending.count == 3  # ...then waiting for the next one again
    second.send(b"GET /index.html HTTP/1.1\r\nHost: campi\r\nConnection: close\r\n\r\n")
    assert statuses(second.receive()) == [200] and second.disconnecting
    assert pending.count == 2
    again = conns.open(port=4)  # the slot second freed
    assert again.value() == b""
    assert pending.count == 3
    again.protocol.connectionLost(None)
    other.protocol.connectionLost(None)
    assert pending.count == 1
    refused = [e for e in events if "too many connections" in e.get("log_format", "")]
    assert len(refused) == 1
    assert failures(events) == []


def test_with_every_slot_taken_the_longest_waiting_makes_room(events):
    # Many addresses dribbling requests fill the overall cap: a page load
    # still gets in, and the connection that has waited longest goes (408).
    pending = PendingConnections(per_address=2, total=3)
    conns = Connections(pending=pending)
    dribblers = [conns.open(f"203.0.113.{i}") for i in range(3)]
    for d in dribblers:
        d.send(b"GET / HT")
    conns.advance(1)
    page = conns.open("198.51.100.7")
    assert page.value() == b"" and not page.disconnecting
    assert_our_answer(dribblers[0].value(), 408)
    assert [d.disconnecting for d in dribblers] == [True, False, False]
    assert pending.count == 3 and pending.evicted == 1
    page.send(GET_PAGE)
    assert statuses(page.receive()) == [200]
    dribblers[0].protocol.connectionLost(None)  # its release counts nothing twice
    assert pending.count == 3
    assert failures(events) == []


def test_refusals_are_logged_once_a_minute_per_address(events):
    pending = PendingConnections(per_address=1, total=10)
    conns = Connections(pending=pending)
    conns.open()
    for port in range(2, 12):
        assert_our_answer(conns.open(port=port).value(), 429)
    conns.advance(61)  # the first was cut off at its deadline meanwhile
    assert conns.open(port=20).value() == b""
    assert_our_answer(conns.open(port=21).value(), 429)
    refused = [e for e in events if "too many connections" in e.get("log_format", "")]
    assert len(refused) == 2


def test_an_ipv6_client_is_counted_by_its_64():
    pending = PendingConnections(per_address=2, total=10)
    conns = Connections(pending=pending)
    conns.open("2001:db8:1:2::1")
    conns.open("2001:db8:1:2::ffff")
    assert_our_answer(conns.open("2001:db8:1:2:abcd::5").value(), 429)
    assert conns.open("2001:db8:1:3::1").value() == b""


class Full(PendingConnections):
    """Caps that admit no more once told so."""

    full = False

    def admit(self, key, evict=None):
        return False if self.full else super().admit(key, evict)


def test_a_keep_alive_connection_over_the_cap_closes_after_its_answer():
    pending = Full()
    conns = Connections(pending=pending)
    t = conns.open()
    pending.full = True  # others took the address's slots meanwhile
    t.send(GET_PAGE)
    assert statuses(t.value()) == [200]  # answered, then closed: it would be pending
    assert t.disconnecting
    assert pending.count == 0


def test_a_viewer_on_the_http_port_is_not_pending():
    pending = PendingConnections(per_address=2, total=10)
    conns = Connections(pending=pending)
    t = conns.open()
    t.send(b"GET /stream HTTP/1.1\r\nHost: 192.0.2.1:8082\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert t.value().startswith(b"HTTP/1.1 101 ")
    assert pending.count == 0
    conns.advance(REQUEST_DEADLINE + IDLE_TIMEOUT + 1)
    assert pending.count == 0


# -- framing -----------------------------------------------------------------

FRAMING = [
    (b"Content-Length: 00\r\n", 400),
    (b"Content-Length: +0\r\n", 400),
    (b"Content-Length: -1\r\n", 400),
    (b"Content-Length: 1\r\n", 413),
    (b"Content-Length: 1e3\r\n", 400),
    (b"Content-Length: 99999999999999999999\r\n", 413),
    (b"Content-Length: 0, 0\r\n", 400),
    (b"Content-Length: 0\r\nContent-Length: 0\r\n", 400),
    (b"Content-Length: 0\r\nContent-Length: 5\r\n", 400),
    (b"Content-Length:\r\n", 400),
    (b"Content-Length : 0\r\n", 400),
    (b"Transfer-Encoding: chunked\r\n", 413),
    (b"Transfer-Encoding: Chunked\r\n", 413),
    (b"Transfer-Encoding: identity\r\n", 400),
    (b"Transfer-Encoding: gzip\r\n", 400),
    (b"Transfer-Encoding: gzip, chunked\r\n", 400),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
    (b"Transfer-Encoding: chunked, chunked\r\n", 400),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", 400),
    (b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", 400),
    (b"Transfer-Encoding: identity\r\nContent-Length: 0\r\n", 400),
    (b"Content-Length:\r\n 0\r\n", 400),  # obs-fold
    (b"Transfer-Encoding:\r\n\tchunked\r\n", 400),
    (b"X-Other: a\r\n b\r\n", 400),
    (b"Content-Length: 0\x00\r\n", 400),
    (b"Content-Length: 0\rX\r\n", 400),
    (b"Content-Length: 0\nTransfer-Encoding: chunked\r\n", 400),
]


@pytest.mark.parametrize("framing,code", FRAMING)
def test_every_framing_form_gets_an_answer_and_no_traceback(conns, events, framing, code):
    t = conns.open()
    t.send(b"GET /index.html HTTP/1.1\r\nHost: campi\r\n" + framing + b"\r\n" + b"x" * 10)
    assert_our_answer(t.value(), code)
    assert t.disconnecting
    assert failures(events) == []
    assert not [e for e in events if "Traceback" in str(e)]


def test_a_get_that_says_it_has_no_body_is_answered(conns):
    t = conns.open()
    t.send(b"GET /index.html HTTP/1.1\r\nHost: campi\r\nContent-Length: 0\r\n\r\n")
    assert statuses(t.value()) == [200]


def test_a_post_that_says_it_has_no_body_gets_its_405(conns):
    t = conns.open()
    t.send(b"POST /index.html HTTP/1.1\r\nHost: campi\r\nContent-Length: 0\r\n\r\n")
    assert statuses(t.value()) == [405]


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"GET"])
def test_a_body_is_refused_unread(conns, method):
    t = conns.open()
    t.send(method + b" /index.html HTTP/1.1\r\nHost: campi\r\nContent-Length: 5000\r\n\r\n"
           + b"x" * 5000)
    assert_our_answer(t.value(), 413)


# -- long lines and bad request lines ---------------------------------------

@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: campi\r\n\r\n",  # request line
    b"GET /" + b"a" * 17000,  # ...that never ends
    b"GET / HTTP/1.1\r\nHost: campi\r\nX-Long: " + b"b" * 17000 + b"\r\n\r\n",  # one header
    b"GET / HTTP/1.1\r\nHost: campi\r\nX-Long: " + b"b" * 17000,  # ...that never ends
    b"GET / HTTP/1.1\r\nHost: campi\r\n" + (b"X-Many: " + b"c" * 8000 + b"\r\n") * 3,
    b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 501 + b"\r\n",  # too many headers
    b"GET /\r\n\r\n",  # no version
    b"GET / HTTP/1.1 extra\r\n\r\n",
    b"\xff\xfe / HTTP/1.1\r\n\r\n",
    b"\r\n\r\n\r\n",
])
def test_long_lines_and_bad_request_lines_get_400(conns, events, request_bytes):
    t = conns.open()
    t.send(request_bytes)
    assert_our_answer(t.value(), 400)
    assert t.disconnecting
    assert failures(events) == []


def test_a_request_line_just_under_the_limit_is_read(conns):
    t = conns.open()
    t.send(b"GET /" + b"a" * 16000 + b" HTTP/1.1\r\nHost: campi\r\n\r\n")
    assert statuses(t.value()) == [404]
    assert b"a" * 100 not in t.value().split(b"\r\n")[0]  # nothing echoed in the status


# -- what Twisted's own parser would refuse: our 400, never its bare one ------

@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost campi\r\n\r\n",  # no colon
    b"GET / HTTP/1.1\r\nHo st: campi\r\n\r\n",  # a name that is not a token
    b"GET / HTTP/1.1\r\nHost\t: campi\r\n\r\n",
    b"GET / HTTP/1.1\r\n: campi\r\n\r\n",  # no name
    b"GET / HTTP/1.1\r\nX(y): z\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-\xc3\xa9: z\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-A: b\x00c\r\n\r\n",  # NUL, CR or LF in a value
    b"GET / HTTP/1.1\r\nX-A: b\rc\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-A: b\nc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: campi\r\nContent-Length: 0\r\n" + b"X-A: b\r\n" * 499 + b"\r\n",
    b"GET\t/\tHTTP/1.1\r\n\r\n",
    b"GET  / HTTP/1.1\r\n\r\n",
    b" GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1 \r\n\r\n",
    b"GET  HTTP/1.1\r\n\r\n",  # no target
    b"G(T / HTTP/1.1\r\n\r\n",  # a method that is not a token
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/1.2\r\n\r\n",
    b"GET / http/1.1\r\n\r\n",
    b"GET / HTTP/1.1x\r\n\r\n",
    b"GET /\x7f HTTP/1.1\r\n\r\n",
    b"GET /\x80 HTTP/1.1\r\n\r\n",
    b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",
    b"\r\nGET /missing HTTP/1.1\r\nHost: campi\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: campi\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
])
def test_what_twisteds_parser_would_refuse_gets_our_400(conns, events, request_bytes):
    t = conns.open()
    t.send(request_bytes)
    data = t.value()
    if request_bytes.startswith(b"\r\nGET"):
        # One empty line before a request is let through, not two.
        assert statuses(data[:data.index(b"HTTP/1.1 400")]) == [404]
        data = data[data.index(b"HTTP/1.1 400"):]
    elif b"chunked" in request_bytes:
        assert_our_answer(data, 413)  # refused before a byte of the body is read
        return
    assert_our_answer(data, 400)
    assert t.disconnecting
    assert failures(events) == []


def fill(total):
    """A request whose line and header lines are C{total} bytes in all."""
    head = [b"GET /index.html HTTP/1.1", b"Host: campi"]
    filler = b"X-Fill: "
    size = sum(map(len, head)) + len(filler)
    return b"\r\n".join(head + [filler + b"f" * (total - size)]) + b"\r\n\r\n"


@pytest.mark.parametrize("request_bytes", [
    b"GET /index.html HTTP/1.1\r\nHost: campi\r\n" + b"X-A: b\r\n" * 498 + b"\r\n",  # 500
    fill(16384),
    b"GET /index.html HTTP/1.1\r\nHost: campi\r\nContent-Length: \t0 \r\n\r\n",
    b"GET /index.html HTTP/1.1\r\nHost: campi\r\ncontent-length:0\r\n\r\n",
    b"GET /index.html HTTP/1.1\r\nHost: campi\r\nX-Empty:\r\nX-!#$%&'*+.^_`|~: v\r\n\r\n",
    b"GET /index.html HTTP/1.1\r\nHost: campi\r\nX-Bytes: \xc3\xa9\x7f\r\n\r\n",
    b"\r\nGET /index.html HTTP/1.1\r\nHost: campi\r\n\r\n",
    b"GET /index.html?a=%C3%A9&b=~!$'()*+,;:@/? HTTP/1.1\r\nHost: campi\r\n\r\n",
])
def test_requests_at_the_edge_of_the_limits_are_answered(conns, request_bytes):
    t = conns.open()
    t.send(request_bytes)
    assert statuses(t.value()) == [200]
    assert not t.disconnecting


def test_headers_one_byte_over_16_kib_get_400(conns):
    t = conns.open()
    t.send(fill(16385))
    assert_our_answer(t.value(), 400)


def test_a_get_that_says_it_has_no_body_keeps_its_header(conns):
    seen = []
    t = conns.open()
    t.protocol.requestFactory = recording(t.protocol.requestFactory, seen)
    t.send(b"GET /index.html HTTP/1.1\r\nHost: campi\r\nContent-Length: 0\r\n\r\n")
    assert statuses(t.value()) == [200]
    assert seen[0].getHeader(b"content-length") == b"0"


def recording(factory, seen):
    def make(*args, **kwargs):
        request = factory(*args, **kwargs)
        seen.append(request)
        return request
    return make


def test_an_http_1_0_request_is_answered_and_closed(conns):
    t = conns.open()
    t.send(b"GET /index.html HTTP/1.0\r\n\r\n" + GET_PAGE)
    assert statuses(t.value()) == [200]
    assert t.disconnecting


# -- requests that come while one is answered --------------------------------

class Held(resource.Resource):
    """Answers when the test says so."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.waiting = []

    def render_GET(self, request):
        self.waiting.append(request)
        return server.NOT_DONE_YET

    def answer(self):
        request = self.waiting.pop(0)
        request.setHeader(b"content-length", b"3")
        request.write(b"ok\n")
        request.finish()


@pytest.fixture
def held():
    clock = MemoryReactorClock()
    page = Held()
    site = web.Site(page, reactor=clock, timeout=IDLE_TIMEOUT)

    def open_one():
        channel = site.buildProtocol(IPv4Address("TCP", "198.51.100.7", 40000))
        transport = TCPLikeTransport(IPv4Address("TCP", "198.51.100.7", 40000))
        transport.protocol = channel
        channel.makeConnection(transport)
        return transport

    return SimpleNamespace(page=page, clock=clock, open=open_one)


def test_a_request_that_comes_while_one_is_answered_waits_its_turn(held):
    t = held.open()
    t.send(GET_PAGE + GET_PAGE[:10])
    t.send(GET_PAGE[10:] + GET_PAGE)
    assert len(held.page.waiting) == 1  # the next ones are not parsed yet
    held.page.answer()
    assert statuses(t.receive()) == [200]
    assert len(held.page.waiting) == 1
    held.page.answer()
    held.page.answer()
    assert statuses(t.receive()) == [200, 200]
    assert not t.disconnecting


def test_reading_stops_while_one_is_answered_and_resumes_after(held):
    t = held.open()
    t.readSize = 4096
    padded = b"GET / HTTP/1.1\r\nHost: campi\r\nX-Pad: " + b"p" * 8000 + b"\r\n\r\n"
    t.send(padded * 6)  # 48 KB
    # A little is read ahead (16 KiB); the rest stays with the client.
    assert t.producerState == "paused"
    assert 16 * 1024 < t.protocol._unparsed_size <= 16 * 1024 + t.readSize
    assert len(t.unsent) >= 5 * len(padded) - 16 * 1024 - t.readSize
    got = Answers()
    while held.page.waiting:
        held.page.answer()
        got.feed(t.receive())
        assert t.protocol._unparsed_size <= 16 * 1024 + t.readSize
    assert got.statuses == [200] * 6 and not t.unsent
    assert t.producerState == "producing" and not t.disconnecting


def test_a_client_that_sends_ever_more_while_one_is_answered_is_cut_off(held, events):
    t = held.open()
    t.readSize = 1024 * 1024  # as if a transport handed over more than TCP's one read
    t.send(GET_PAGE)
    t.send(b"X" * MAX_UNPARSED)
    assert not t.disconnected
    t.producerState = "producing"
    t.send(b"X")
    assert t.disconnected
    logged = [e for e in events if "while one was answered" in e.get("log_format", "")]
    assert len(logged) == 1 and logged[0]["log_level"] == LogLevel.info


# -- no private Twisted name ----------------------------------------------------

def private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def twisted_names(cls):
    """Every private name the Twisted classes C{cls} inherits from define
    or use (class attributes, and any _name in their source: attributes
    their methods set on the instance)."""
    names = set()
    for base in cls.__mro__[1:]:
        if not base.__module__.startswith("twisted."):
            continue
        names.update(n for n in vars(base) if private(n))
        names.update(re.findall(r"\b_\w+", inspect.getsource(base)))
    return {n for n in names if private(n)}


def private_names_used(module):
    """The private attribute names C{module}'s source uses (obj._x,
    getattr(obj, "_x")), and the private names it imports."""
    used, imported = set(), set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Attribute) and private(node.attr):
            used.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and private(node.args[1].value)):
            used.add(node.args[1].value)
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            imported.update(p for p in parts if private(p))
            imported.update(a.name for a in node.names if private(a.name))
        elif isinstance(node, ast.Import):
            imported.update(p for a in node.names for p in a.name.split(".") if private(p))
    return used, imported


def test_the_channel_uses_no_private_twisted_name():
    used, imported = private_names_used(httpchannel)
    assert imported == set()
    ours = {n for n in vars(httpchannel.Channel) if private(n)}
    # Every private name it uses is its own (defined in its class)...
    assert used - ours == set()
    # ...and none of its own is one of Twisted's (no private hook overridden,
    # no Twisted attribute shadowed).
    theirs = twisted_names(httpchannel.Channel)
    assert {"_handlingRequest", "_buffer", "_respondToBadRequestAndDisconnect"} <= theirs
    assert ours & theirs == set()
