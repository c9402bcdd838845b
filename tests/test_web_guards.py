"""The web layer's guards, driven in-process through the real request path
(pistreaming.web's Site, Channel and Request over a StringTransport): the
Host check against DNS rebinding, the headers every answer carries, and
who may see the viewers' addresses in /stats.json."""

import base64
import json
import re
from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from pistreaming import web
from pistreaming.auth import Authenticator, PasswordFile, hash_password
from pistreaming.broadcast import StreamFactory
from pistreaming.frames import stream_header
from pistreaming.hosts import HostPolicy
from pistreaming.options import Config
from pistreaming.stats import Stats

HOSTNAME = "campi"
SERVER = IPv4Address("TCP", "192.0.2.1", 8082)
OUTSIDE = IPv4Address("TCP", "192.0.2.7", 40000)
PAGES = ["/", "/index.html", "/jsmpg.js", "/stats.json", "/metrics", "/nothing-here"]
VIEWER = "198.51.100.23:51234"


# -- the site, a stand-in daemon for its figures, and the password check ---------

class Hashing:
    """A reactor's thread pool that runs the password hashing at once, and
    counts it."""

    def __init__(self):
        self.runs = 0

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.runs += 1
        try:
            result = f(*args, **kwargs)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


class Checks:
    """Records the Authenticator's checks (the Gate's one way in)."""

    def __init__(self, authenticator, hashing):
        self.calls = []
        self.hashing = hashing
        check = authenticator.authenticate

        def authenticate(authorization, *args, **kwargs):
            self.calls.append(authorization)
            return check(authorization, *args, **kwargs)
        authenticator.authenticate = authenticate


ALICE = b"Basic " + base64.b64encode(b"alice:wonder land")


def fake_stats(reactor):
    """Stats over just what it reads, with one viewer watching."""
    fanout = SimpleNamespace(
        bytes_in=0, bytes_sent=0, bytes_discarded=0, skips=0,
        backlog_limit=1000, viewers={1: None}, viewers_total=1,
        describe=lambda: [{"address": VIEWER, "connected_since": 1.0, "connected_for": 2.0,
                           "bytes_sent": 100, "backlog": 7, "stalled": False, "skips": 0}])
    stream = SimpleNamespace(turned_away=0, max_viewers=0)
    encoder = SimpleNamespace(process=None, restarts=0, frames_in=0, frames_dropped=0,
                              bytes_in=0, bytes_out=0, pictures_out=0, state="ok", why=None)
    return Stats(reactor, Config(codec="mpeg1", ffmpeg="/usr/bin/ffmpeg"), SimpleNamespace(name="file"),
                 encoder, fanout, stream)


@pytest.fixture(scope="module")
def password_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "passwd"
    path.write_text("alice:" + hash_password("wonder land", iterations=1000) + "\n")
    return str(path)


def make(hosts=HostPolicy(allowed=["camera.example"], hostname=HOSTNAME), password=None):
    """The site, with its own clock; with a C{password} file, behind the Gate."""
    reactor = MemoryReactorClock()
    hashing = Hashing()
    reactor.getThreadPool = lambda: hashing
    reactor.callFromThread = lambda f, *args, **kwargs: f(*args, **kwargs)
    stats = fake_stats(reactor)
    authenticator = checks = None
    if password:
        authenticator = Authenticator(PasswordFile(password), reactor)
        checks = Checks(authenticator, hashing)
    factory = StreamFactory(stream_header(640, 480), reactor)
    factory.hosts = hosts  # the stream's own check of the handshake, where it has one
    site = web.make_site(Config(codec="mpeg1", ffmpeg="/usr/bin/ffmpeg"), factory, stats=stats,
                         player=b"//", authenticator=authenticator, reactor=reactor,
                         hosts=hosts)
    return SimpleNamespace(site=site, reactor=reactor, checks=checks)


class Answer:
    def __init__(self, data):
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())

    def header(self, name):
        values = self.headers.get(name.lower(), [])
        assert len(values) <= 1, (name, values)
        return values[0] if values else None


def ask(site, method, path, host="127.0.0.1:8082", headers=(), peer=OUTSIDE):
    """One request over a fresh connection; the answer as it went out."""
    lines = [f"{method} {path} HTTP/1.1".encode("latin-1")]
    if host is not None:
        lines.append(b"Host: " + (host if isinstance(host, bytes) else host.encode("latin-1")))
    lines += [name.encode() + b": " + value.encode() for name, value in headers]
    channel = site.buildProtocol(peer)
    transport = StringTransport(hostAddress=SERVER, peerAddress=peer)
    transport.protocol = channel  # as a TCP transport has (the stream takes it over)
    channel.makeConnection(transport)
    channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")
    return Answer(transport.value())


def upgrade(host):
    return [("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"),
            ("Origin", f"http://{host}")]


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def lines_about(events, word):
    return [formatEvent(e) for e in events if word in formatEvent(e)]


# -- the Host header ------------------------------------------------------------

ALLOWED = ["127.0.0.1:8082", "[::1]:8082", "localhost", "localhost:8082", HOSTNAME,
           HOSTNAME + ".local:8082", "CamPi.Local", "camera.example", "camera.example:8082",
           "192.0.2.1", None]


@pytest.mark.parametrize("host", ALLOWED)
@pytest.mark.parametrize("path", PAGES)
def test_the_camera_s_own_names_are_answered(host, path):
    answer = ask(make().site, "GET", path, host=host)
    assert answer.status == (404 if path == "/nothing-here" else 200), answer.status_line


@pytest.mark.parametrize("host", ["127.0.0.1:8082", HOSTNAME + ".local:8082", "camera.example"])
def test_the_stream_is_opened_for_the_camera_s_own_names(host):
    answer = ask(make().site, "GET", "/stream", host=host, headers=upgrade(host))
    assert answer.status == 101, answer.status_line


REFUSED = ["evil.example", "evil.example:8082", "camera.example.evil.example",
           "127.0.0.1.evil.example", "a" * 300, "evil.example:8082:1", "[::1]evil",
           "campi .evil", "\u00e9vil.example"]


@pytest.mark.parametrize("host", REFUSED)
@pytest.mark.parametrize("path", PAGES)
def test_another_name_gets_421_whatever_the_path(host, path):
    answer = ask(make().site, "GET", path, host=host)
    assert answer.status == 421, answer.status_line
    assert answer.status_line == "HTTP/1.1 421 Misdirected Request"
    assert answer.header("Content-Type") == "text/plain; charset=utf-8"
    assert b"--allow-host" in answer.body
    assert b"viewers" not in answer.body and b"<html" not in answer.body.lower()


def test_the_421_names_the_option_to_add_a_sane_name_only():
    site = make().site
    assert ask(site, "GET", "/", host="evil.example:8082").body == (
        b"421 this camera does not answer to that name; if it is the camera's, "
        b"start pistream with --allow-host evil.example\n")
    assert ask(site, "GET", "/", host="x y").body.endswith(b"--allow-host NAME\n")


@pytest.mark.parametrize("path", PAGES + ["/stream"])
def test_a_name_with_a_nul_is_refused_before_any_password_check(path, password_file):
    """(Twisted 26 refuses such a header itself, with a bare 400; 22.4
    passes it on, and the Host check answers 421.)"""
    guarded = make(password=password_file)
    answer = ask(guarded.site, "GET", path, host=b"campi\x00.evil",
                 headers=[("Authorization", ALICE.decode())])
    assert answer.status in (400, 421), answer.status_line
    assert answer.header("WWW-Authenticate") is None and b"viewers" not in answer.body
    assert guarded.checks.calls == [] and guarded.checks.hashing.runs == 0


def test_a_stream_upgrade_for_another_name_gets_421_not_a_websocket():
    answer = ask(make().site, "GET", "/stream", host="evil.example:8082",
                 headers=upgrade("evil.example:8082"))
    assert answer.status == 421
    assert answer.header("Upgrade") is None and answer.header("Sec-WebSocket-Accept") is None


@pytest.mark.parametrize("path", PAGES + ["/stream"])
def test_another_name_is_refused_before_any_password_check(path, password_file):
    guarded = make(password=password_file)
    answer = ask(guarded.site, "GET", path, host="evil.example",
                 headers=[("Authorization", ALICE.decode())])
    assert answer.status == 421
    assert answer.header("WWW-Authenticate") is None
    assert guarded.checks.calls == [] and guarded.checks.hashing.runs == 0
    # The same request for the camera's own name goes through the check.
    assert ask(guarded.site, "GET", "/", headers=[("Authorization", ALICE.decode())]).status == 200
    assert guarded.checks.calls == [ALICE] and guarded.checks.hashing.runs > 0


def test_a_refusal_is_logged_in_one_line_with_the_name_cut_short_and_escaped(logged):
    ask(make().site, "GET", "/", host=b"evil\x1b[31m" + b"e" * 300)
    [line] = lines_about(logged, "421")
    assert "\n" not in line and "\x1b" not in line
    assert "192.0.2.7" in line and "--allow-host" in line
    assert "evil\\x1b[31m" in line
    assert len(line) < 400


def test_more_than_one_host_header_is_refused():
    site = make().site
    answer = ask(site, "GET", "/", host="127.0.0.1:8082", headers=[("Host", "evil.example")])
    assert answer.status == 400


def test_without_a_policy_any_name_is_answered():
    assert ask(make(hosts=None).site, "GET", "/", host="evil.example").status == 200


def test_allow_host_star_answers_any_name():
    assert ask(make(hosts=HostPolicy(["*"])).site, "GET", "/", host="evil.example").status == 200


# -- the headers every answer carries -------------------------------------------

def carries_the_standard_headers(answer, host_in_policy=None):
    assert answer.header("Server") == "pistream"
    assert answer.header("X-Content-Type-Options") == "nosniff"
    assert answer.header("Referrer-Policy") == "no-referrer"
    policy = answer.header("Content-Security-Policy")
    assert policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    connect = re.search(r"connect-src ([^;]*)", policy).group(1)
    if host_in_policy is None:
        assert connect == "'self'"
    else:
        assert connect == f"'self' ws://{host_in_policy} wss://{host_in_policy}"
    assert "twisted" not in repr(answer.headers).lower()


@pytest.mark.parametrize("method,path,status", [
    ("OPTIONS", "*", 405), ("GET", "*", 400), ("HEAD", "*", 400), ("POST", "*", 400),
    ("OPTIONS", "/", 405), ("DELETE", "/index.html", 405), ("GET", "/nothing-here", 404),
    ("GET", "/index.html", 200), ("GET", "/stats.json", 200), ("HEAD", "/jsmpg.js", 200),
])
def test_every_answer_carries_the_headers_and_no_server_version(method, path, status):
    answer = ask(make().site, method, path)
    assert answer.status == status, answer.status_line
    carries_the_standard_headers(answer, "127.0.0.1:8082")


def test_options_star_is_refused_like_options_anywhere_and_get_star_is_bad():
    site = make().site
    star, slash = ask(site, "OPTIONS", "*"), ask(site, "OPTIONS", "/")
    assert star.status_line == slash.status_line == "HTTP/1.1 405 Method Not Allowed"
    assert star.header("Allow") == slash.header("Allow") == "GET, HEAD"
    get = ask(site, "GET", "*")
    assert get.status_line == "HTTP/1.1 400 Bad Request"
    assert get.header("Content-Length") == str(len(get.body))


def test_a_421_carries_the_headers_without_the_name_in_its_policy():
    answer = ask(make().site, "GET", "/", host="evil.example:8082")
    carries_the_standard_headers(answer, host_in_policy=None)


def test_a_401_carries_the_headers(password_file):
    answer = ask(make(password=password_file).site, "GET", "/index.html")
    assert answer.status == 401
    carries_the_standard_headers(answer, "127.0.0.1:8082")


@pytest.mark.parametrize("method,path", [
    ("BREW", "/index.html"), ("OPTIONS", "*"), ("GET", "*"), ("GET", "/%0d%0aX-Evil:%201"),
    ("OPTIONS", "/stats.json"),
])
def test_nothing_the_client_sent_comes_back_in_the_status_line(method, path):
    answer = ask(make().site, method, path, host="evil.example")
    assert answer.status_line == "HTTP/1.1 421 Misdirected Request"
    answer = ask(make().site, method, path)
    assert re.fullmatch(r"HTTP/1\.1 \d{3} [A-Za-z ]+", answer.status_line)
    assert method not in answer.status_line and "Evil" not in answer.status_line
    assert "x-evil" not in answer.headers


# -- the viewers' addresses -------------------------------------------------------

def viewers(site, peer, headers=()):
    answer = ask(site, "GET", "/stats.json", peer=peer, headers=headers)
    assert answer.status == 200
    return json.loads(answer.body)["viewers"]


def test_another_machine_sees_the_viewers_but_not_their_addresses():
    listed = viewers(make().site, OUTSIDE)
    assert listed["count"] == 1
    [viewer] = listed["list"]
    assert viewer["address"] == "hidden"
    assert viewer["bytes_sent"] == 100 and viewer["backlog"] == 7  # the rest is there


@pytest.mark.parametrize("peer", [
    IPv4Address("TCP", "127.0.0.1", 40000), IPv4Address("TCP", "127.8.9.10", 40000),
    IPv6Address("TCP", "::1", 40000), IPv6Address("TCP", "::ffff:127.0.0.1", 40000),
])
def test_the_camera_itself_sees_the_addresses(peer):
    [viewer] = viewers(make().site, peer)["list"]
    assert viewer["address"] == VIEWER


@pytest.mark.parametrize("peer", [
    IPv6Address("TCP", "2001:db8::7", 40000), IPv6Address("TCP", "::ffff:192.0.2.7", 40000),
    IPv4Address("TCP", "10.0.0.127", 40000),
])
def test_other_addresses_do_not(peer):
    [viewer] = viewers(make().site, peer)["list"]
    assert viewer["address"] == "hidden"


def test_with_a_password_the_addresses_are_shown_to_those_who_have_it(password_file):
    [viewer] = viewers(make(password=password_file).site, OUTSIDE,
                       headers=[("Authorization", ALICE.decode())])["list"]
    assert viewer["address"] == VIEWER


def test_metrics_carry_no_address_whoever_asks():
    for peer in (OUTSIDE, IPv4Address("TCP", "127.0.0.1", 40000)):
        answer = ask(make().site, "GET", "/metrics", peer=peer)
        assert answer.status == 200
        assert b"pistream_viewers_backlog_bytes 7.0" in answer.body
        assert b"198.51.100.23" not in answer.body and b"51234" not in answer.body


# -- /stream on this port, when it is not a WebSocket handshake ------------------

@pytest.mark.parametrize("method,headers,status", [
    ("GET", [], 426), ("POST", [], 405), ("BREW", [], 405), ("HEAD", [], 405),
    ("GET", [("Upgrade", "web\x01socket")], 426),
    ("GET", [("Upgrade", "websocket"), ("Connection", "Upgrade"),
             ("Sec-WebSocket-Key", "<script>x</script>=="), ("Sec-WebSocket-Version", "13")], 400),
    ("GET", [("Upgrade", "websocket"), ("Connection", "Upgrade"),
             ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
             ("Sec-WebSocket-Version", "<b>12</b>")], 426),
    ("GET", [("Upgrade", "websocket"), ("Connection", "keep-alive"),
             ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")],
     400),
])
def test_the_stream_refuses_what_is_not_a_handshake_itself(method, headers, status):
    answer = ask(make().site, method, "/stream", headers=headers)
    assert answer.status == status, answer.status_line
    assert re.fullmatch(r"HTTP/1\.1 \d{3} [A-Za-z ]+", answer.status_line)
    carries_the_standard_headers(answer, "127.0.0.1:8082")
    assert b"<" not in answer.body and b"BREW" not in answer.body
