"""Who may watch: passwords, origins, the viewer limit, and what viewers and
HTTP clients may not do."""

import base64
import http.client
import os
import socket
import subprocess
import sys
import time

import pytest
import websocket
from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest

from pistreaming import web
from pistreaming.auth import (PasswordFile, hash_password, parse_password_file,
                              verify_password)
from pistreaming.broadcast import StreamFactory, origin_matches_host
from pistreaming.frames import stream_header
from pistreaming.options import Config
from tests.daemon import ROOT, Daemon
from tests.helpers import wait_until


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


@pytest.mark.parametrize("path", ["/", "/index.html", "/jsmpg.js", "/pistream.js",
                                  "/stats.json", "/metrics", "/stream", "/nope"])
def test_without_credentials_everything_is_401_with_a_challenge(guarded, path):
    response, body = get(guarded.http_port, path)
    assert response.status == 401
    assert response.getheader("WWW-Authenticate") == 'Basic realm="pistream"'
    assert b"JSMpeg" not in body and b"viewers" not in body


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
        response, _ = get(guarded.http_port, "/pistream.css", bob)  # bob logged in before
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
        response, _ = get(guarded.http_port, "/pistream.css", bob)
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


def test_pages_of_other_sites_cannot_open_the_stream():
    with Daemon("--allow-origin", "https://friend.example") as daemon:
        url = f"ws://127.0.0.1:{daemon.http_port}/stream"
        own = f"http://127.0.0.1:{daemon.http_port}"
        for origin, allowed in [(own, True), ("https://friend.example", True),
                                ("https://evil.example", False), (None, True)]:
            kwargs = {"origin": origin} if origin else {"suppress_origin": True}
            if allowed:
                ws = websocket.create_connection(url, timeout=10, **kwargs)
                assert ws.recv()[:4] == b"jsmp"
                ws.close()
            else:
                with pytest.raises(websocket.WebSocketBadStatusException) as e:
                    websocket.create_connection(url, timeout=10, **kwargs)
                assert e.value.status_code == 403
        # the stream's own port too
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(f"ws://127.0.0.1:{daemon.ws_port}/",
                                        origin="https://evil.example", timeout=10)
        assert daemon.search(r"refused a page from https://evil.example")


# -- the viewer limit --------------------------------------------------------

def test_past_max_viewers_newcomers_are_closed_with_a_reason():
    with Daemon("--max-viewers", "2") as daemon:
        url = f"ws://127.0.0.1:{daemon.http_port}/stream"
        first = websocket.create_connection(url, timeout=10)
        second = websocket.create_connection(url, timeout=10)
        third = websocket.create_connection(url, timeout=10)
        try:
            frame = third.recv_frame()
            assert frame.opcode == websocket.ABNF.OPCODE_CLOSE
            code = int.from_bytes(frame.data[:2], "big")
            assert (code, frame.data[2:]) == (1013, b"too many viewers (2 at most)")
            assert first.recv()[:4] == b"jsmp" and second.recv()[:4] == b"jsmp"
        finally:
            for ws in (first, second, third):
                ws.close()
        assert daemon.search(r"turned away: 2 watching, 2 at most")


# -- viewers that talk -----------------------------------------------------

class ChattyViewerTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_a_viewer_that_keeps_sending_is_closed(self):
        from autobahn.twisted.websocket import WebSocketClientFactory
        from tests.test_broadcast import Viewer as Listening

        class Viewer(Listening):
            pongs = 0

            def onPong(self, payload):
                self.pongs += 1

        factory = StreamFactory(stream_header(640, 480), reactor)
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        clients = WebSocketClientFactory(f"ws://127.0.0.1:{port.getHost().port}/", reactor=reactor)
        clients.protocol = Viewer
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        quiet = yield endpoint.connect(clients)
        chatty = yield endpoint.connect(clients)
        yield wait_until(lambda: quiet.messages and chatty.messages, 5, what="headers")
        for _ in range(5):
            chatty.sendMessage(b"hi")  # a few are ignored
        chatty.sendPing()  # answered after the server has read the messages
        yield wait_until(lambda: chatty.pongs == 1, 5, what="the pong")
        assert chatty.closed is None
        for _ in range(30):
            chatty.sendMessage(b"hello?")
        yield wait_until(lambda: chatty.closed is not None, 5, what="the chatty one closed")
        assert chatty.closed == (1008, "viewers do not send")
        assert quiet.closed is None
        quiet.transport.abortConnection()
        yield wait_until(lambda: not factory.viewers, 5, what="both gone")


# -- HTTP clients that take their time ----------------------------------------

class SlowClientTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        factory = StreamFactory(stream_header(640, 480), reactor)
        self.site = web.make_site(Config(ffmpeg="/usr/bin/ffmpeg"), factory, player=b"//",
                                  reactor=reactor)
        self.site.protocol = type("QuickChannel", (web.Channel,), {"request_deadline": 0.5})
        self.site.timeOut = 1.0
        self.port = yield endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(self.site)
        self.addCleanup(self.port.stopListening)

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=5)
        sock.setblocking(False)
        self.addCleanup(sock.close)
        return sock

    @staticmethod
    def answer(sock):
        try:
            return sock.recv(4096)
        except BlockingIOError:
            return None

    @defer.inlineCallbacks
    def test_a_request_that_dribbles_in_is_cut_off(self):
        sock = self.connect()
        sock.send(b"GET /index.html HTTP/1.1\r\nHost: x\r\n")
        got = []

        def dribble():
            try:
                sock.send(b"X-Slow: 1\r\n")  # a header now and then, never the end
            except OSError:
                pass
            data = self.answer(sock)
            if data is not None:
                got.append(data)
            return bool(got)

        yield wait_until(dribble, 5, interval=0.1, what="the 408")
        assert got[0].startswith(b"HTTP/1.1 408 Request Timeout")

    @defer.inlineCallbacks
    def test_an_idle_connection_is_closed(self):
        sock = self.connect()
        sock.send(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
        yield wait_until(lambda: self.answer(sock) is not None, 5, what="the page")
        started = reactor.seconds()
        got = []

        def closed():
            data = self.answer(sock)
            if data is not None:
                got.append(data)
            return data == b""

        yield wait_until(closed, 5, what="the idle connection closed")
        assert 0.5 < reactor.seconds() - started < 4
