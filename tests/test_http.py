"""Every HTTP route of the running daemon, as a browser or curl sees it."""

import base64
import hashlib
import http.client
import os
import re

import pytest

from pistreaming import web
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


def test_root_is_the_page_itself_without_a_redirect(daemon):
    response, body = request(daemon, "GET", "/")
    assert response.status == 200
    assert response.getheader("Location") is None
    assert body == request(daemon, "GET", "/index.html")[1]


def test_the_page_carries_the_stream_and_its_size(daemon):
    response, body = request(daemon, "GET", "/index.html")
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/html; charset=utf-8"
    page = body.decode()
    assert 'data-stream="stream"' in page
    assert 'data-width="800" data-height="600"' in page
    assert '<canvas id="video" width="800" height="600"' in page
    assert re.search(r'<script src="jsmpg.js\?v=[0-9a-f]{16}" defer></script>', page)
    assert "$" not in page.replace(inline_script(page), "")  # every placeholder was filled


def inline_script(page):
    return re.search(r"<script>(.*?)</script>", page, re.S).group(1)


def inline_style(page):
    return re.search(r"<style>(.*?)</style>", page, re.S).group(1)


def test_the_page_carries_its_own_script_and_style_inline(daemon):
    """The page's script runs as the browser reads the page (the stream's
    socket opens without waiting for a file), and its style, colours
    included, comes with it: the package's files of those names."""
    page = request(daemon, "GET", "/index.html")[1].decode()
    with open(os.path.join(STATIC, "pistream.js"), encoding="utf-8") as f:
        assert inline_script(page).strip() == f.read().strip()
    style = inline_style(page)
    with open(os.path.join(STATIC, "pistream.css"), encoding="utf-8") as f:
        assert f.read().strip() in style
    assert style.rstrip().endswith(":root { --fg: #abcdef; --bg: #101010; }")
    assert 'rel="stylesheet"' not in page


def test_the_page_names_each_file_by_its_version_and_that_address_is_kept(daemon):
    """A browser keeps the page's files for good (no request at the next
    visit) because their addresses change when their content does; the
    plain address, or a stale version, is revalidated every time."""
    _, body = request(daemon, "GET", "/index.html")
    addresses = re.findall(r'(?:src|href)="([a-z.]+)\?v=([0-9a-f]{16})"', body.decode())
    assert [name for name, _ in addresses] == ["jsmpg.js"]
    for name, version in addresses:
        response, content = request(daemon, "GET", f"/{name}?v={version}")
        assert response.status == 200
        assert response.getheader("Cache-Control") == "max-age=31536000, immutable"
        assert hashlib.sha256(content).hexdigest()[:16] == version
        for other in (f"/{name}", f"/{name}?v=0000000000000000"):
            response, again = request(daemon, "GET", other)
            assert response.getheader("Cache-Control") == "no-cache"
            assert again == content


def test_the_player_is_the_jsmpeg_build_from_npm(daemon):
    response, body = request(daemon, "GET", "/jsmpg.js")
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/javascript")
    with open(os.path.join(STATIC, "jsmpg.js"), "rb") as f:
        assert body == f.read()
    assert b"JSMpeg" in body and len(body) > 50_000


@pytest.mark.parametrize("path", ["/index.html", "/jsmpg.js", "/"])
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
    # the page carries its own script, style and colours: no files of theirs
    "/pistream.js", "/pistream.css", "/theme.css", "/pistream.js?v=0000000000000000",
    "/jsmpg.js/", "//index.html", "/stream/x", "/favicon.ico",
    # no file outside the page's directory, in any spelling
    "/../setup.py", "/%2e%2e/setup.py", "/%2E%2E/%2E%2E/etc/passwd", "/%252e%252e/setup.py",
    "/..%2fsetup.py", "/..%5csetup.py", "/..\\setup.py", "/static/..%2f..%2fsetup.py",
    "/./index.html/..", "/%2e/pistream.js", "/pistream.js%00.css", "/....//setup.py",
    "/static/../../pistreaming/web.py", "/jsmpg.js/../../../etc/passwd",
])
def test_anything_else_is_404(daemon, path):
    response, body = request(daemon, "GET", path)
    assert response.status == 404, path
    assert b"Index of" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/", "/index.html", "/jsmpg.js"])
def test_other_methods_get_405_with_allow(daemon, method, path):
    response, _ = request(daemon, method, path)
    assert response.status == 405
    assert sorted(m.strip() for m in response.getheader("Allow").split(",")) == ["GET", "HEAD"]


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_request_body_is_refused_unread(daemon, method):
    response, _ = request(daemon, method, "/index.html", body=b"x" * 5000)
    assert response.status == 413
    assert response.getheader("Connection") == "close"


def test_no_server_version_no_sniffing_and_a_strict_content_policy(daemon):
    response, _ = request(daemon, "GET", "/index.html")
    assert response.getheader("Server") == "pistream"
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    policy = dict(part.strip().split(" ", 1)
                  for part in response.getheader("Content-Security-Policy").split(";"))
    assert policy["default-src"] == "'none'"
    # Inline, only the page's own script and style, by their hashes, and the
    # style the player script adds (empty, then with its rules).
    page = request(daemon, "GET", "/index.html")[1].decode()
    assert policy["script-src"] == "'self' 'wasm-unsafe-eval' " + sha256(inline_script(page))
    assert policy["style-src"] == ("'self' " + sha256(inline_style(page)) +
                                   web.player_styles(web.read_player()).decode())
    assert policy["style-src"].count("'sha256-") == 3
    assert policy["frame-ancestors"] == "'none'"
    host = f"127.0.0.1:{daemon.http_port}"
    assert policy["connect-src"] == f"'self' ws://{host} wss://{host}"


def sha256(text):
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_an_inline_part_that_would_end_its_element_early_is_refused():
    assert web.inline("a < b\n", "script") == "\na < b\n"
    for text, tag in (("x = '</script>';", "script"), ("/* </STYLE> */", "style"),
                      ("<!-- x", "script")):
        with pytest.raises(ValueError):
            web.inline(text, tag)


def test_a_strange_host_header_is_left_out_of_the_policy(daemon):
    response, _ = request(daemon, "GET", "/index.html", headers={"Host": "x\" y"})
    assert "connect-src 'self';" in response.getheader("Content-Security-Policy")


def test_the_player_comes_gzipped_with_an_etag_and_is_not_sent_twice(daemon):
    import gzip
    plain, body = request(daemon, "GET", "/jsmpg.js")
    packed, packed_body = request(daemon, "GET", "/jsmpg.js", headers={"Accept-Encoding": "gzip"})
    assert plain.getheader("Content-Encoding") is None
    assert packed.getheader("Content-Encoding") == "gzip"
    assert packed.getheader("Vary") == "Accept-Encoding"
    assert gzip.decompress(packed_body) == body and len(packed_body) < len(body) / 2
    etag = plain.getheader("ETag")
    assert etag and packed.getheader("ETag") == etag
    again, again_body = request(daemon, "GET", "/jsmpg.js", headers={"If-None-Match": etag})
    assert again.status == 304 and again_body == b""


def test_a_plain_get_of_the_stream_is_refused_with_an_http_error(daemon):
    response, _ = request(daemon, "GET", "/stream")
    assert 400 <= response.status < 500


def test_the_daemon_survived_all_of_that(daemon):
    response, _ = request(daemon, "GET", "/index.html")
    assert response.status == 200
    assert "Traceback" not in daemon.output()


def test_the_policy_allows_the_player_style_by_its_hash_only():
    player = (b'x=1;!function(A,t){var s=document.createElement("style");'
              b'e.appendChild(s),s.appendChild(document.createTextNode(A))}}(".a{top:0}\\n");')
    assert web.player_styles(player) == (
        b" 'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"  # "" (the empty element)
        b" 'sha256-" + base64.b64encode(hashlib.sha256(b".a{top:0}\n").digest()) + b"'")
    assert web.player_styles(b"var x = 1;") == b""
