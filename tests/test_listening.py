"""Listening through a shortage of file descriptors (pistreaming.listening):
a port on a Clock, with the kernel's descriptors and queue played by the
test; then a server in a subprocess with a low descriptor limit, real
sockets on 127.0.0.1, every wait bounded and ended by what the server says."""

import ast
import errno
import inspect
import os
import re
import select
import socket
import subprocess
import sys
import time

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from pistreaming import listening
from tests.daemon import ROOT

#: A moment, exact in binary (so that times add up to the delays exactly).
TICK = 1 / 1024


class Kernel:
    """The process's free descriptors and the listening socket's queue, as
    accept() sees them: it takes a descriptor first (EMFILE when none is
    left, even with connections waiting), then a waiting connection (EAGAIN
    when there is none)."""

    def __init__(self, free):
        self.free = free
        self.waiting = 0
        self.accepts = 0

    def descriptor(self):
        if self.free == 0:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        self.free -= 1
        return Descriptor(self)

    def open(self, path, mode="r"):
        """What the port opens its spare descriptor with."""
        return self.descriptor()

    def accept(self):
        """The listening socket's."""
        self.accepts += 1
        taken = self.descriptor()
        if not self.waiting:
            taken.close()
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        self.waiting -= 1
        return taken, ("127.0.0.1", 40000 + self.accepts)


class Descriptor:
    def __init__(self, kernel):
        self.kernel = kernel
        self.closed = False

    def close(self):
        if not self.closed:
            self.closed = True
            self.kernel.free += 1


class NoProtocols(Factory):
    """Accepted connections are closed at once (buildProtocol gives None)."""

    def buildProtocol(self, addr):
        return None


class PortOnAClock(unittest.TestCase):
    """L{listening.Port}'s answers to a shortage, and their timing."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.logged = []

        def observer(event):
            if event.get("log_namespace") == listening.__name__:
                self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def listen(self, free):
        """A port listening (as startListening leaves it) with C{free}
        descriptors left, before its spare takes one."""
        kernel = Kernel(free)
        listening.open = kernel.open  # what the module's open() finds first
        self.addCleanup(delattr, listening, "open")
        port = listening.Port(8082, NoProtocols(), 50, "127.0.0.1", self.clock)
        port.socket = kernel
        port.connected = True
        port._port_number = 8082
        port.numberAccepts = 100
        port._reserve()
        port.startReading()
        return port, kernel

    def test_out_of_descriptors_the_waiting_are_dropped_and_that_is_said_once(self):
        port, kernel = self.listen(free=1)
        assert kernel.free == 0  # the spare took the last one
        kernel.waiting = 5
        port.doRead()
        # The spare let go of, the 5 taken off the queue and closed, the spare back.
        assert (kernel.waiting, kernel.free, port.dropped) == (0, 0, 5)
        assert port.exhausted and port in self.clock.readers
        kernel.waiting = 3
        self.clock.advance(0.25)
        port.doRead()
        assert (kernel.waiting, kernel.free, port.dropped) == (0, 0, 8)
        assert self.logged == [
            "out of file descriptors (EMFILE) on port 8082: new connections are closed "
            "unanswered until some are free"]
        # A round each time, not a spin: the accept that fails, one for each
        # connection dropped, one that finds the queue empty.
        assert kernel.accepts == (1 + 5 + 1) + (1 + 3 + 1)

    def test_when_nothing_can_be_freed_it_stops_accepting_for_a_moment_not_spins(self):
        port, kernel = self.listen(free=0)  # not even a spare
        kernel.waiting = 2
        port.doRead()
        assert kernel.accepts == 1 and kernel.waiting == 2
        assert port not in self.clock.readers
        self.clock.advance(listening.PAUSE - TICK)
        assert port not in self.clock.readers
        self.clock.advance(TICK)
        assert port in self.clock.readers
        assert len(self.logged) == 1

    def test_accepting_again_is_said_once_the_shortage_has_been_over_a_while(self):
        port, kernel = self.listen(free=1)
        kernel.waiting = 4
        port.doRead()  # short at 0
        assert port.dropped == 4
        self.clock.advance(0.5)
        kernel.free = 3  # connections served before have ended
        kernel.waiting = 1
        port.doRead()  # accepted at 0.5: said at 2.5, if nothing runs short meanwhile
        self.clock.advance(0.5)
        kernel.free, kernel.waiting = 0, 2
        port.doRead()  # short again at 1.0: said at 3.0
        assert port.dropped == 6
        kernel.free = 3
        self.clock.advance(listening.RECOVERED_AFTER - TICK)
        assert len(self.logged) == 1 and port.exhausted
        self.clock.advance(TICK)
        assert self.logged[1:] == [
            "accepting connections again on port 8082 (6 closed unanswered while out of "
            "file descriptors)"]
        assert not port.exhausted and port.dropped == 0
        assert not self.clock.getDelayedCalls()

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

import socket
from pistreaming import listening
# The delay before "accepting connections again" is tested on a Clock.
listening.RECOVERED_AFTER = 0.2
real_accept = socket.socket.accept


def accept(sock):
    print("ACCEPT", flush=True)  # written before the connection is closed
    return real_accept(sock)


socket.socket.accept = accept


class Hello(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hello\n")

    def connectionLost(self, reason):
        print("LOST", flush=True)  # its descriptor has been closed


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

    def _take(self, seconds):
        """Lines the server writes within C{seconds} (0: what is there now);
        False once it has closed its output."""
        out = self.process.stdout.fileno()
        if not select.select([out], [], [], max(0.0, seconds))[0]:
            return True
        data = os.read(out, 65536)
        if not data:
            return False
        *done, self.partial = (self.partial + data).split(b"\n")
        self.lines += [line.decode("utf-8", "replace") for line in done]
        return True

    def read_until(self, condition, seconds=10):
        """Output lines as they come until C{condition()} holds (or the
        time is up); whether it holds."""
        deadline = time.monotonic() + seconds
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0 or not self._take(left):
                return condition()
        return True

    def read(self, until, seconds=10):
        """Output lines until one contains C{until} (or the time is up)."""
        return self.read_until(lambda: any(until in line for line in self.lines), seconds)

    def read_written(self):
        """What the server has written so far."""
        out = self.process.stdout.fileno()
        while select.select([out], [], [], 0)[0] and self._take(0):
            pass

    def count(self, text):
        return sum(text in line for line in self.lines)

    def lines_that_are(self, text):
        return sum(line == text for line in self.lines)

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

        # More come while it is out of them: closed at once.
        for _ in range(10):
            late = socket.create_connection(("127.0.0.1", port), timeout=5)
            assert greeting(late) == b""
            late.close()
        assert server.count("out of file descriptors (EMFILE)") == 1
        assert not any("Traceback" in line or "Could not accept" in line
                       for line in server.lines), server.lines
    finally:
        for sock in clients:
            sock.close()

    # Descriptors free again (the server has closed the connections it
    # served): served again at once, and it says so.
    served = answers.count(b"hello\n")
    assert server.read_until(lambda: server.lines_that_are("LOST") == served), server.lines
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    answer = greeting(sock)
    sock.close()
    assert answer == b"hello\n"
    assert server.read("accepting connections again")
    assert server.count("out of file descriptors (EMFILE)") == 1
    # No spinning at any point: a port that spins calls accept() again and
    # again; this one takes connections in rounds (the failing accept, those
    # it takes, the one that finds none left): fewer than three calls a
    # connection, and it made 51.
    server.read_written()
    accepts = server.lines_that_are("ACCEPT")
    assert accepts <= 3 * 51, f"{accepts} accept() calls for 51 connections"


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    s = Server("raise")
    try:
        assert s.read("LIMIT"), s.lines
        line = [line for line in s.lines if "LIMIT" in line][-1].split()
        assert int(line[-2]) == int(line[-1]) > 100
        assert s.read("file descriptor limit raised from 100")
    finally:
        s.stop()


# -- no private Twisted name ----------------------------------------------------

def private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def twisted_names(cls):
    """The private names of the Twisted classes C{cls} inherits from: their
    class attributes, and any _name in their source (what their methods set
    on the instance)."""
    names = set()
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("twisted."):
            names.update(vars(base))
            names.update(re.findall(r"\b_\w+", inspect.getsource(base)))
    return {n for n in names if private(n)}


def test_the_ports_use_no_private_twisted_name():
    tree = ast.parse(inspect.getsource(listening))
    imported = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and any(map(private, (node.module or "").split(".") + [a.name for a in node.names]))]
    assert imported == []
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    ours = {}
    for name, node in classes.items():
        cls = getattr(listening, name)
        mine = {n for n in vars(cls) if private(n)}
        mine.update(target.attr for target in ast.walk(node)
                    if isinstance(target, ast.Attribute) and isinstance(target.ctx, ast.Store)
                    and isinstance(target.value, ast.Name) and target.value.id == "self")
        used = {a.attr for a in ast.walk(node) if isinstance(a, ast.Attribute) and private(a.attr)}
        # What each class uses is its own, and none of its own is Twisted's.
        assert used - mine == set(), name
        assert mine & twisted_names(cls) == set(), name
        ours[name] = mine
    # Outside the classes too (listenTCP's port, for one), no private attribute.
    outside = {a.attr for a in ast.walk(tree) if isinstance(a, ast.Attribute) and private(a.attr)}
    assert outside - set().union(*ours.values()) == set()
    assert {"_realPortNumber", "_buildAddr", "_type"} <= twisted_names(listening.Port)
