"""Listening through a shortage of file descriptors (pistreaming.listening):
a server in a subprocess with a low descriptor limit, real sockets on
127.0.0.1, every wait bounded."""

import os
import select
import socket
import subprocess
import sys
import time

import pytest

from tests.daemon import ROOT

SERVER = r"""
import os, resource, sys
sys.stdout.reconfigure(line_buffering=True)
from twisted.internet import protocol, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from pistreaming.listening import listen_service, raise_file_limit

globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if sys.argv[1] == "raise":
    resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))
    print("LIMIT", raise_file_limit(), min(hard, 65536), flush=True)
    sys.exit(0)
# Room for what is open now and a few connections more.
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 12, hard))


class Hello(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hello\n")


service = listen_service("tcp:0:interface=127.0.0.1", protocol.Factory.forProtocol(Hello),
                         reactor)
service.privilegedStartService()
service.startService()
service.when_listening().addCallback(lambda port: print("PORT", port.getHost().port))
reactor.run()
"""


class Server:
    def __init__(self, *args):
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
        self.lines = []
        self.partial = b""

    def read(self, until, seconds=10):
        """Log lines until one contains C{until} (or the time is up)."""
        deadline = time.monotonic() + seconds
        out = self.process.stdout.fileno()
        while time.monotonic() < deadline:
            if any(until in line for line in self.lines):
                return True
            ready, _, _ = select.select([out], [], [], 0.1)
            if ready:
                data = os.read(out, 65536)
                if not data:
                    break
                *done, self.partial = (self.partial + data).split(b"\n")
                self.lines += [line.decode("utf-8", "replace") for line in done]
        return any(until in line for line in self.lines)

    def count(self, text):
        return sum(text in line for line in self.lines)

    def cpu_seconds(self):
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()


def greeting(sock):
    """What the server said: b"hello\\n", or b"" if it closed the connection
    (or reset it); None if it said nothing within 5 s."""
    sock.settimeout(5)
    try:
        return sock.recv(100)
    except ConnectionResetError:
        return b""
    except socket.timeout:
        return None


@pytest.fixture
def server():
    s = Server("listen")
    yield s
    s.stop()


def test_out_of_descriptors_is_logged_once_and_recovered_from(server):
    assert server.read("PORT"), server.lines
    port = int([line for line in server.lines if "PORT" in line][-1].split()[-1])
    clients = []
    try:
        for _ in range(40):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        answers = [greeting(sock) for sock in clients]
        # Every client heard something: served, or closed at once; none hangs.
        assert None not in answers
        assert 5 <= answers.count(b"hello\n") <= 12
        assert answers.count(b"") >= 25
        assert server.read("out of file descriptors (EMFILE)")

        # More come while it is out of them: closed at once, no spinning.
        before = server.cpu_seconds()
        for _ in range(10):
            late = socket.create_connection(("127.0.0.1", port), timeout=5)
            assert greeting(late) == b""
            late.close()
            time.sleep(0.1)
        assert server.cpu_seconds() - before < 0.5
        assert server.count("out of file descriptors (EMFILE)") == 1
        assert not any("Traceback" in line or "Could not accept" in line
                       for line in server.lines), server.lines
    finally:
        for sock in clients:
            sock.close()

    # Descriptors free again: served again, and it says so.
    deadline = time.monotonic() + 10
    while True:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        answer = greeting(sock)
        sock.close()
        if answer == b"hello\n" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert answer == b"hello\n"
    assert server.read("accepting connections again")
    assert server.count("out of file descriptors (EMFILE)") == 1


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    s = Server("raise")
    try:
        assert s.read("LIMIT"), s.lines
        line = [line for line in s.lines if "LIMIT" in line][-1].split()
        assert int(line[-2]) == int(line[-1]) > 100
        assert s.read("file descriptor limit raised from 100")
    finally:
        s.stop()
