"""In-memory stand-ins for the network and the reactor's edges, so that tests
drive the daemon's parts on a Clock, without sockets, threads or waiting.

- L{Network}: Autobahn clients connected to a server factory (a
  StreamFactory, or a Site with the stream under /stream) through
  C{twisted.test.iosim}; each connection is pumped on demand, and a viewer
  can stop reading.
- L{SendBuffer}: the server's side of one such connection, with a send
  buffer that pauses its producer when full, as Twisted's TCP transport does.
- L{ClockTimers}: Autobahn's protocol timers on a Clock.
- L{SpawningReactor}: a MemoryReactorClock that records spawnProcess, whose
  callFromThread calls at once and whose thread pool runs calls at once.
- L{RecordingPool}: a thread pool that runs nothing by itself: the test
  plays each thread (L{Thread}), e.g. a camera's capture loop.

(Not named like a library: daemons started with this folder on PYTHONPATH
import camera stand-ins from it.)
"""

import itertools

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim


class _Call:
    """A timer Autobahn may cancel after it ran."""

    def __init__(self, delayed):
        self.delayed = delayed

    def cancel(self):
        if self.delayed.active():
            self.delayed.cancel()


class ClockTimers:
    """Autobahn's protocol timers (handshake, close, pings) on C{clock}."""

    def __init__(self, clock):
        self.clock = clock

    def call_later(self, delay, function, *args, **kwargs):
        return _Call(self.clock.callLater(delay, function, *args, **kwargs))


class SendBuffer(iosim.FakeTransport):
    """The server's side of a connection.  What is written waits here until
    the peer reads it (the pump moves it); past C{capacity} bytes the
    registered streaming producer is paused, and resumed once the peer has
    read what waited, as Twisted's TCP transport does with its buffer.
    A peer that stops reading (C{reading = False}) takes nothing."""

    def __init__(self, protocol, capacity=None, **kwargs):
        super().__init__(protocol, isServer=True, **kwargs)
        self.capacity = capacity
        self.reading = True
        self.producer_paused = False
        self.taken = 0  # bytes the peer has read

    def waiting(self):
        return sum(len(data) for data in self.stream)

    def write(self, data):
        super().write(data)
        if (self.capacity is not None and self.producer is not None and self.streamingProducer
                and not self.producer_paused and self.waiting() > self.capacity):
            self.producer_paused = True
            self.producer.pauseProducing()

    def getOutBuffer(self):
        if not self.reading:
            return None
        data = super().getOutBuffer()
        if data:
            self.taken += len(data)
        if self.producer_paused and not self.stream:
            self.producer_paused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return data


class Client(WebSocketClientProtocol):
    """A viewer: keeps what it receives, and how it was closed."""

    def __init__(self):
        super().__init__()
        self.messages = []
        self.closed = None
        self.pongs = 0

    def onMessage(self, payload, isBinary):
        self.messages.append((payload, isBinary))

    def onPong(self, payload):
        self.pongs += 1

    def onClose(self, wasClean, code, reason):
        self.closed = (code, reason)

    # what tests look at
    def binary(self):
        return [payload for payload, binary in self.messages if binary]

    def texts(self):
        return [payload for payload, binary in self.messages if not binary]


class Connection:
    def __init__(self, client, server, transport, pump):
        self.client = client
        self.server = server  # the server's protocol
        self.transport = transport  # the server's side (a SendBuffer)
        self.pump = pump

    def flush(self):
        self.pump.flush()


class Network:
    """Clients for the server factory C{factory}, connected in memory.

    Every client's traffic moves when L{flush} is called (and at connect);
    nothing moves by itself."""

    _ports = itertools.count(40000)

    def __init__(self, factory, clock, port=8084):
        self.factory = factory
        self.clock = clock
        self.port = port
        self.connections = []

    def connect(self, path="/", protocols=None, headers=None, capacity=None, host="127.0.0.1",
                client=Client, origin=None, name="127.0.0.1"):
        """A new client from address C{host}, its opening handshake done
        (C{name}: the server's name in the URL, and so in the Host header).
        Returns its L{Connection}."""
        clients = WebSocketClientFactory(f"ws://{name}:{self.port}{path}",
                                         protocols=protocols, headers=headers, origin=origin,
                                         reactor=self.clock)
        clients._batched_timer = ClockTimers(self.clock)
        clients.protocol = client
        peer = IPv4Address("TCP", host, next(self._ports))
        here = IPv4Address("TCP", "127.0.0.1", self.port)
        server = self.factory.buildProtocol(peer)
        protocol = clients.buildProtocol(here)
        server_side = SendBuffer(server, capacity, hostAddress=here, peerAddress=peer)
        client_side = iosim.FakeTransport(protocol, isServer=False,
                                          hostAddress=peer, peerAddress=here)
        pump = iosim.connect(server, server_side, protocol, client_side)
        connection = Connection(protocol, server, server_side, pump)
        self.connections.append(connection)
        return connection

    def flush(self):
        """Move everything that waits, both ways, on every connection."""
        moved = True
        while moved:
            moved = False
            for connection in self.connections:
                if connection.pump.flush():
                    moved = True

    def advance(self, seconds, step=None):
        """Advance the clock by C{seconds} (in steps of C{step}), moving
        what waits after each step."""
        step = step or seconds
        left = seconds
        while left > 1e-9:
            now = min(step, left)
            self.clock.advance(now)
            left -= now
            self.flush()


class SpawningReactor(MemoryReactorClock):
    """A MemoryReactorClock that records spawnProcess (MemoryReactor has
    none in the Twisted versions supported) and hands the process protocol
    a transport that records what it is told."""

    def __init__(self, ends_on=()):
        """
        @param ends_on: the signals that end a child (as SIGKILL does, and
            SIGTERM for ffmpeg); by default none: the test ends it.
        """
        super().__init__()
        self.ends_on = tuple(ends_on)
        self.from_threads = []
        self.spawned = []  # (process protocol, executable, args, transport)

    def spawnProcess(self, proto, executable, args=(), env=None, path=None, uid=None, gid=None,
                     usePTY=False, childFDs=None):
        transport = ProcessTransport(proto, 1000 + len(self.spawned), self.ends_on)
        self.spawned.append((proto, executable, list(args), transport))
        proto.makeConnection(transport)
        return transport

    #: While true, calls from threads wait (as while the reactor is busy)
    #: until L{take_from_threads}.
    holding = False

    def callFromThread(self, f, *args, **kwargs):
        if self.holding:
            self.from_threads.append((f, args, kwargs))
        else:
            f(*args, **kwargs)

    def take_from_threads(self):
        self.holding = False
        waiting, self.from_threads = self.from_threads, []
        for f, args, kwargs in waiting:
            f(*args, **kwargs)

    def getThreadPool(self):
        return SyncPool()


class SyncPool:
    """A thread pool that runs each call at once, in the caller's thread."""

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs):
        try:
            result = function(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class SyncThreadPool(SyncPool):
    """Stands in for twisted.python.threadpool.ThreadPool (the recorder's,
    the password hashing's): each call runs at once, in the caller's thread."""

    def __init__(self, minthreads=0, maxthreads=0, name=None):
        self.threadFactory = None
        self.name = name

    def start(self):
        pass

    def stop(self):
        pass


class ProcessTransport:
    """What a process protocol sees of a child that is not there: its
    writes, signals and closes are kept; L{end} ends it."""

    def __init__(self, proto, pid, ends_on=()):
        self.proto = proto
        self.ends_on = ends_on
        self.pid = pid
        self.written = []
        self.signals = []
        self.stdin_closed = False
        self.producer = None
        self.pipes = {}

    def write(self, data):
        self.written.append(data)

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, signal):
        self.signals.append(signal)
        if signal in self.ends_on and self.pid is not None:
            self.end(Failure(ProcessTerminated(signal=signal)))

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def loseConnection(self):
        self.closeStdin()

    def end(self, reason):
        """The child ended (C{reason}: a Failure of ProcessDone or ProcessTerminated)."""
        self.pid = None
        self.proto.processEnded(reason)


class Thread:
    """One call the pool was asked to run: the capture loop of one run."""

    def __init__(self, on_result, function, args, kwargs):
        self.on_result = on_result
        self.function = function
        self.output, self.stop = args
        self.returned = False

    def frames(self, count, number):
        """The camera delivers C{count} frames (filled with C{number})."""
        for _ in range(count):
            self.output.write(bytes([number]) * self.output.frame_size)

    def returns(self):
        self.returned = True
        self.on_result(True, None)

    def fails(self, error):
        self.returned = True
        self.on_result(False, Failure(error))


class RecordingPool:
    """Stands in for the service's ThreadPool: nothing runs by itself."""

    pools = []

    def __init__(self, minthreads=0, maxthreads=0, name=None):
        self.threadFactory = None
        self.started = False
        self.stopped = False
        self.threads = []
        RecordingPool.pools.append(self)

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs):
        self.threads.append(Thread(on_result, function, args, kwargs))


class Source:
    name = "scripted"
    framerate = 50

    def describe(self):
        return "a scripted source"

    def run(self, output, stopping):
        raise AssertionError("runs on the test's say-so only")
