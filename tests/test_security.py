"""Who may watch: passwords, origins, the viewer limit, and what viewers and
HTTP clients may not do."""

import base64
import http.client
import os
import subprocess
import sys
import time

import pytest
import websocket
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pistreaming import web
from pistreaming.auth import (PasswordFile, hash_password, parse_password_file,
                              verify_password)
from pistreaming.broadcast import StreamFactory, origin_matches_host
from pistreaming.frames import stream_header
from pistreaming.options import Config, Options
from pistreaming.service import makeService
from tests.daemon import ROOT, Daemon
from tests.fakes.inmemory import Network, Source, SpawningReactor


def passwd(path, user, password, *extra):
    result = subprocess.run(
        [sys.executable, "-m", "pistreaming.passwd", *extra, str(path), user],
        input=password + "\n", capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    return result


@pytest.fixture(scope="module")
def password_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "passwd"
    assert passwd(path, "alice", "wonder land", "--stdin").returncode == 0
    assert passwd(path, "bob", "builder", "--stdin").returncode == 0
    return path


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


# -- the password file and its command ------------------------------------

def test_passwords_are_stored_salted_and_hashed(password_file):
    text = password_file.read_text()
    assert "wonder" not in text and "builder" not in text
    users = parse_password_file(text)
    assert sorted(users) == ["alice", "bob"]
    assert verify_password("wonder land", users["alice"])
    assert not verify_password("wonder", users["alice"])
    assert hash_password("x") != hash_password("x")  # a fresh salt each time
    assert oct(password_file.stat().st_mode & 0o777) == "0o640"


def test_the_command_changes_removes_and_lists_users(tmp_path):
    path = tmp_path / "users"
    assert passwd(path, "carol", "one", "--stdin").returncode == 0
    first = parse_password_file(path.read_text())["carol"]
    assert passwd(path, "carol", "two", "--stdin").returncode == 0
    assert verify_password("two", parse_password_file(path.read_text())["carol"])
    assert parse_password_file(path.read_text())["carol"] != first
    listed = subprocess.run([sys.executable, "-m", "pistreaming.passwd", "--list", str(path)],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert listed.stdout == "carol\n"
    assert passwd(path, "carol", "", "--delete").returncode == 0
    assert parse_password_file(path.read_text()) == {}
    bad = passwd(path, "dave:x", "pw", "--stdin")
    assert bad.returncode != 0 and "no ':'" in bad.stderr


def test_a_bad_password_file_stops_the_daemon_with_one_line(tmp_path):
    broken = tmp_path / "broken"
    broken.write_text("alice:plaintext\n")
    for path, expected in [(tmp_path / "missing", "no such file or directory"),
                           (broken, "line 1: not NAME:pbkdf2-sha256$ITERATIONS$SALT$KEY")]:
        result = Daemon("--passwd", str(path)).run_to_exit()
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("twistd pistream: error: --passwd: ") and expected in line


def test_the_file_is_read_again_when_it_changes(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"ann:{hash_password('a')}\n")
    users = PasswordFile(str(path))
    assert list(users.users()) == ["ann"]
    path.write_text(f"ann:{hash_password('a')}\nben:{hash_password('b')}\n")
    assert sorted(users.users()) == ["ann", "ben"]
    path.write_text("garbage\n")  # a broken edit: the users read before stay
    assert sorted(users.users()) == ["ann", "ben"]
    path.unlink()  # and so does a deleted file
    assert sorted(users.users()) == ["ann", "ben"]
    path.write_text(f"cy:{hash_password('c')}\n")
    assert list(users.users()) == ["cy"]


# -- the running daemon with --passwd -------------------------------------

@pytest.fixture(scope="module")
def guarded(password_file):
    with Daemon("--passwd", str(password_file)) as daemon:
        yield daemon


@pytest.mark.parametrize("path", [b"/", b"/index.html", b"/jsmpg.js",
                                  b"/stats.json", b"/metrics", b"/stream", b"/nope"])
def test_without_credentials_everything_is_401_with_a_challenge(password_file, path):
    # In-process: the daemon's Site (makeService on a MemoryReactorClock),
    # one request over a StringTransport.
    options = Options()
    options.parseOptions(["--passwd", str(password_file)])
    service = makeService(options.config, reactor=SpawningReactor(), source=Source(),
                          player=b"//")
    peer = IPv4Address("TCP", "127.0.0.1", 50000)
    channel = service.site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert b'\r\nWWW-Authenticate: Basic realm="pistream"' in head
    assert b"JSMpeg" not in body and b"viewers" not in body and b"jsmp" not in body


def test_with_credentials_the_page_and_the_stream_are_there(guarded):
    good = {"Authorization": basic("alice", "wonder land")}
    response, body = get(guarded.http_port, "/index.html", good)
    assert response.status == 200 and b"<canvas" in body
    response, _ = get(guarded.http_port, "/stats.json", good)
    assert response.status == 200
    for url in (f"ws://127.0.0.1:{guarded.http_port}/stream",
                f"ws://127.0.0.1:{guarded.ws_port}/"):
        ws = websocket.create_connection(url, header=[f"Authorization: {good['Authorization']}"],
                                         timeout=10)
        try:
            assert ws.recv()[:4] == b"jsmp"
        finally:
            ws.close()


@pytest.mark.parametrize("port_name", ["http_port", "ws_port"])
def test_the_stream_refuses_wrong_credentials_on_either_port(guarded, port_name):
    port = getattr(guarded, port_name)
    url = f"ws://127.0.0.1:{port}/stream" if port_name == "http_port" else f"ws://127.0.0.1:{port}/"
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(url, header=[f"Authorization: {basic('bob', 'nope')}"],
                                    timeout=30)
    assert e.value.status_code == 401


def test_failures_are_logged_with_the_address_and_then_refused(password_file):
    with Daemon("--passwd", str(password_file)) as guarded:
        mark = len(guarded.lines)
        bob = {"Authorization": basic("bob", "builder")}
        response, _ = get(guarded.http_port, "/jsmpg.js", bob)  # bob logged in before
        assert response.status == 200
        answers = []
        for i in range(8):
            started = time.monotonic()
            response, _ = get(guarded.http_port, "/index.html",
                              {"Authorization": basic("mallory", f"guess {i}")})
            answers.append((response.status, response.getheader("Retry-After"),
                            time.monotonic() - started))
        response, _ = get(guarded.http_port, "/index.html")  # no credentials: logged
        guarded.wait_for(r"/index.html from 127\.0\.0\.1 without credentials: 401", 5,
                         start=mark)
        guarded.wait_for(r"authentication failed for /index.html from 127\.0\.0\.1 "
                         r"\(user mallory; wrong 1 times in 5 min\)", 5, start=mark)
        guarded.wait_for(r"\(user mallory; wrong 4 times in 5 min\); refusing it for 1s", 5,
                         start=mark)
        # The first few are checked and answered 401; then the address is
        # refused before its passwords are looked at, at once, with 429 and
        # the seconds until it may try again.
        assert [status for status, _, _ in answers[:4]] == [401] * 4, answers
        refused = [(retry, seconds) for status, retry, seconds in answers[4:] if status == 429]
        assert refused and all(retry in ("1", "2", "4") and seconds < 1.0
                               for retry, seconds in refused), answers
        guarded.wait_for(r"authentication for /index.html from 127\.0\.0\.1: too many failed "
                         r"attempts; refusing for [124]s", 5, start=mark)
        # A user who logged in from this address before is not held up.
        started = time.monotonic()
        response, _ = get(guarded.http_port, "/jsmpg.js", bob)
        assert (response.status, response.getheader("Retry-After")) == (200, None)
        assert time.monotonic() - started < 2.0


# -- origins ---------------------------------------------------------------

@pytest.mark.parametrize("origin,host,ok", [
    ("http://cam.local:8082", "cam.local:8082", True),
    ("http://CAM.local:8082", "cam.local:8082", True),
    ("https://cam.example.com", "cam.example.com", True),    # behind a TLS proxy
    ("http://cam.example.com", "cam.example.com:80", True),
    ("http://evil.example.com", "cam.local:8082", False),
    ("http://cam.local:9999", "cam.local:8082", False),
    ("http://cam.local.evil.com:8082", "cam.local:8082", False),
    ("null", "cam.local:8082", False),
    ("file://", "cam.local:8082", False),
    ("http://[::1]:8082", "[::1]:8082", True),
])
def test_an_origin_is_the_pages_own_when_host_and_port_agree(origin, host, ok):
    assert origin_matches_host(origin, host) is ok


class OriginTests(unittest.TestCase):
    """In memory, on a Clock: the stream on both ports, as the daemon wires it."""

    def test_pages_of_other_sites_cannot_open_the_stream(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = task.Clock()
        factory = StreamFactory(stream_header(640, 480), clock,
                                allow_origins=("https://friend.example",))
        site = web.make_site(Config(codec="mpeg1", ffmpeg="/usr/bin/ffmpeg"), factory, player=b"//",
                             reactor=clock)
        on_http = Network(site, clock, port=8082)
        for origin, allowed in [("http://127.0.0.1:8082", True),  # the page's own
                                ("https://friend.example", True),
                                ("https://evil.example", False),
                                ("http://127.0.0.1:9999", False),
                                (None, True)]:  # not a browser
            viewer = on_http.connect(path="/stream", origin=origin)
            if allowed:
                assert viewer.client.messages[0][0][:4] == b"jsmp", origin
            else:
                assert viewer.client.messages == [] and viewer.transport.disconnecting, origin
        # the stream's own port too
        refused = Network(factory, clock).connect(origin="https://evil.example")
        assert refused.client.messages == [] and refused.transport.disconnecting
        said = [e["log_format"].format(**e) for e in events
                if "refused a page" in e.get("log_format", "")]
        assert [line.split("refused a page from ")[1].split(" ")[0] for line in said] == [
            "https://evil.example", "http://127.0.0.1:9999", "https://evil.example"]


# -- viewers that talk -----------------------------------------------------

class ChattyViewerTests(unittest.TestCase):
    """In memory, on a Clock."""

    def test_a_viewer_that_keeps_sending_is_closed(self):
        clock = task.Clock()
        factory = StreamFactory(stream_header(640, 480), clock)
        network = Network(factory, clock)
        quiet, chatty = network.connect(), network.connect()
        for _ in range(5):
            chatty.client.sendMessage(b"hi")  # a few are ignored
        chatty.client.sendPing()  # answered after the server has read the messages
        network.flush()
        assert chatty.client.pongs == 1 and chatty.client.closed is None
        # One frame a second goes on for ever (FLOOD_FRAMES in FLOOD_WINDOW s) ...
        for _ in range(60):
            clock.advance(1)
            chatty.client.sendMessage(b"still here")
            network.flush()
        assert chatty.client.closed is None
        # ... a burst does not.
        for _ in range(30):
            chatty.client.sendMessage(b"hello?")
        network.flush()
        # closed (what it sends, its answer to the close included, is not
        # even read: it is cut off after the close handshake's second)
        assert chatty.server.ignoring
        network.advance(1.0)
        assert chatty.client.closed == (1008, "viewers do not send")
        assert quiet.client.closed is None
        assert list(factory.fanout.viewers) == [quiet.server]
