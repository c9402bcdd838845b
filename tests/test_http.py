"""Every HTTP route of the running daemon, as a browser or curl sees it."""

import http.client
import os

import pytest

from pistreaming.web import STATIC
from tests.daemon import Daemon


@pytest.fixture(scope="module")
def daemon():
    with Daemon("--resolution", "800x600", "--color", "#abcdef", "--bgcolor", "#101010") as d:
        yield d


def request(daemon, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def test_root_redirects_to_the_page_relative_to_itself(daemon):
    response, _ = request(daemon, "GET", "/")
    assert response.status == 302
    assert response.getheader("Location") == "index.html"


def test_the_page_carries_the_stream_and_its_size(daemon):
    response, body = request(daemon, "GET", "/index.html")
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/html; charset=utf-8"
    page = body.decode()
    assert 'data-stream="stream"' in page
    assert 'data-width="800" data-height="600"' in page
    assert '<canvas id="video" width="800" height="600"' in page
    assert "--fg: #abcdef; --bg: #101010;" in page
    assert '<script src="jsmpg.js" defer></script>' in page
    assert '<script src="pistream.js"></script>' in page
    assert "$" not in page  # every placeholder was filled


def test_the_player_is_the_jsmpeg_build_from_npm(daemon):
    response, body = request(daemon, "GET", "/jsmpg.js")
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/javascript")
    with open(os.path.join(STATIC, "jsmpg.js"), "rb") as f:
        assert body == f.read()
    assert b"JSMpeg" in body and len(body) > 50_000


@pytest.mark.parametrize("path,kind", [("/pistream.js", "text/javascript"),
                                       ("/pistream.css", "text/css")])
def test_the_pages_own_script_and_style(daemon, path, kind):
    response, body = request(daemon, "GET", path)
    assert response.status == 200
    assert response.getheader("Content-Type").startswith(kind)
    assert len(body) > 100


@pytest.mark.parametrize("path", ["/index.html", "/jsmpg.js", "/", "/pistream.css"])
def test_head_answers_like_get_without_the_body(daemon, path):
    get, get_body = request(daemon, "GET", path)
    head, head_body = request(daemon, "HEAD", path)
    assert head_body == b""
    assert head.status == get.status
    assert head.getheader("Content-Length") == str(len(get_body))
    for name in ("Content-Type", "Location", "Cache-Control"):
        assert head.getheader(name) == get.getheader(name)


@pytest.mark.parametrize("path", [
    "/nope", "/index.htm", "/static/", "/static/index.html", "/index.html/x",
    "/jsmpg.js/", "/../setup.py", "/%2e%2e/setup.py", "//index.html",
    "/stream/x", "/favicon.ico",
])
def test_anything_else_is_404(daemon, path):
    response, body = request(daemon, "GET", path)
    assert response.status == 404, path
    assert b"Index of" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/", "/index.html", "/jsmpg.js"])
def test_other_methods_get_405_with_allow(daemon, method, path):
    response, _ = request(daemon, method, path, body=b"x" if method != "OPTIONS" else None)
    assert response.status == 405
    assert sorted(m.strip() for m in response.getheader("Allow").split(",")) == ["GET", "HEAD"]


def test_no_server_version_and_no_sniffing(daemon):
    response, _ = request(daemon, "GET", "/index.html")
    assert response.getheader("Server") == "pistream"
    assert response.getheader("X-Content-Type-Options") == "nosniff"


def test_a_plain_get_of_the_stream_is_refused_with_an_http_error(daemon):
    response, _ = request(daemon, "GET", "/stream")
    assert 400 <= response.status < 500


def test_the_daemon_survived_all_of_that(daemon):
    response, _ = request(daemon, "GET", "/index.html")
    assert response.status == 200
    assert "Traceback" not in daemon.output()
