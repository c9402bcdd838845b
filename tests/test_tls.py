"""TLS: an ssl: endpoint serves the page over https and the stream over wss,
on the same port; a browser on https plays it."""

import http.client
import ssl
import subprocess

import pytest
import websocket

from tests.daemon import Daemon


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, as the README shows how to make."""
    where = tmp_path_factory.mktemp("tls")
    key, cert = where / "key.pem", where / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return key, cert


def https_endpoint(key, cert):
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


@pytest.fixture(scope="module")
def daemon(certificate):
    """One daemon on https for the tests that only watch it."""
    key, cert = certificate
    with Daemon("--http", https_endpoint(key, cert), "--ws-port", "off") as daemon:
        yield daemon


def test_page_and_stream_over_tls_on_one_port(certificate, daemon):
    _, cert = certificate
    context = ssl.create_default_context(cafile=str(cert))
    conn = http.client.HTTPSConnection("127.0.0.1", daemon.http_port, context=context,
                                       timeout=10)
    conn.request("GET", "/index.html")
    response = conn.getresponse()
    assert response.status == 200 and b"<canvas" in response.read()
    conn.close()
    ws = websocket.create_connection(
        f"wss://127.0.0.1:{daemon.http_port}/stream",
        sslopt={"ca_certs": str(cert)}, timeout=10)
    try:
        assert ws.recv()[:4] == b"jsmp"
        assert len(ws.recv()) % 188 == 0
    finally:
        ws.close()
    # plain http on the TLS port gets nothing
    plain = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        plain.request("GET", "/index.html")
        plain.getresponse().read()


@pytest.mark.browser
def test_a_browser_on_https_plays_the_stream_over_wss(daemon, browser):
    context = browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        page.goto(f"https://127.0.0.1:{daemon.http_port}/")
        page.wait_for_function("() => window.pistream.frames > 10", timeout=20_000)
        assert page.evaluate("window.pistream.url") == \
            f"wss://127.0.0.1:{daemon.http_port}/stream"
    finally:
        context.close()


def test_an_unreadable_certificate_stops_the_daemon_with_one_line(certificate, tmp_path):
    key, _ = certificate
    missing = tmp_path / "missing.pem"
    result = Daemon("--http", https_endpoint(key, missing)).run_to_exit()
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("twistd pistream: error: --http: ")
    assert "missing.pem" in line and "no such file" in line
