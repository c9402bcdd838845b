"""TLS: an ssl: endpoint serves the page over https and the stream over wss,
on the same port, with a certificate from a local certificate authority made
as README says; a browser on https at a LAN name plays it through WebCodecs."""

import http.client
import json
import ssl
import subprocess

import pytest
import websocket

from tests.daemon import Daemon
from tests.browser import INSECURE_HOST


#: The name the LAN knows the camera by, in these tests (the browser maps it
#: to 127.0.0.1): a name, not localhost, so only TLS makes a secure context.
LAN_NAME = INSECURE_HOST


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A key and a certificate signed by a local certificate authority, made
    with README's commands (Security, TLS); the CA's certificate is what
    the devices trust."""
    where = tmp_path_factory.mktemp("tls")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=pistreaming local CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=where)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "pi.csr",
            "-subj", f"/CN={LAN_NAME}", cwd=where)
    (where / "pi.ext").write_text(
        f"subjectAltName=DNS:{LAN_NAME},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "pi.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "825", "-out", "cert.pem", "-extfile", "pi.ext",
            cwd=where)
    return where / "key.pem", where / "cert.pem", where / "ca.pem"


def https_endpoint(key, cert):
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


@pytest.fixture(scope="module")
def daemon(certificate):
    """One daemon on https, with the default codec (H.264), for the tests
    that only watch it."""
    key, cert, _ = certificate
    with Daemon("--http", https_endpoint(key, cert), "--ws-port", "off",
                "--allow-host", LAN_NAME, codec=None) as daemon:
        yield daemon


def test_page_and_stream_over_tls_on_one_port(certificate, daemon):
    _, _, ca = certificate
    # A client that trusts the local CA, and nothing else, checks the name.
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", daemon.http_port, context=context,
                                       timeout=10)
    conn.request("GET", "/index.html")
    response = conn.getresponse()
    assert response.status == 200 and b"<canvas" in response.read()
    conn.close()
    ws = websocket.create_connection(
        f"wss://127.0.0.1:{daemon.http_port}/stream",
        sslopt={"ca_certs": str(ca)}, timeout=10)
    try:
        description = json.loads(ws.recv())["stream"]
        assert (description["codec"], description["width"]) == ("h264", 640)
        first = ws.recv()
        assert isinstance(first, bytes) and first[0] & 1, "the first picture is a keyframe"
    finally:
        ws.close()
    # plain http on the TLS port gets nothing
    plain = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        plain.request("GET", "/index.html")
        plain.getresponse().read()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium that resolves the LAN name to 127.0.0.1."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.browser import launch
    with sync_api.sync_playwright() as playwright:
        chromium = launch(playwright, lan_name=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.browser
def test_a_browser_on_https_at_a_lan_name_plays_through_webcodecs(daemon, browser):
    """At a LAN name over https the page is a secure context, so it plays
    through WebCodecs (on plain http at that name it would take MSE).  The
    browser was told to accept the certificate, as a person does who clicks
    through a self-signed one's warning (Chromium: the page is then still a
    secure context) or whose device trusts the local CA."""
    context = browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        page.goto(f"https://{LAN_NAME}:{daemon.http_port}/")
        page.wait_for_function("() => window.pistream.frames > 10", timeout=20_000)
        assert page.evaluate("[window.isSecureContext, window.pistream.path, "
                             "window.pistream.url]") == \
            [True, "webcodecs", f"wss://{LAN_NAME}:{daemon.http_port}/stream"]
    finally:
        context.close()


def test_an_unreadable_certificate_stops_the_daemon_with_one_line(certificate, tmp_path):
    key, _, _ = certificate
    missing = tmp_path / "missing.pem"
    result = Daemon("--http", https_endpoint(key, missing)).run_to_exit()
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("twistd pistream: error: --http: ")
    assert "missing.pem" in line and "no such file" in line
