"""Listening ports that live through running out of file descriptors.

Twisted's TCP port logs "Could not accept new connection" on every accept
that fails for want of a descriptor (EMFILE, ENFILE) and, since the
connection stays queued and the listening socket readable, tries again at
once: the daemon spins and its log floods while every page load and viewer
waits in the queue.  Here a port keeps one spare descriptor: out of
descriptors, it closes the spare, takes the waiting connections off the
queue and closes them at once (the client sees the connection closed, not a
hang), opens the spare again, and says so in the log once; once a
connection is accepted again, it says that too.  If even that frees
nothing, it stops accepting for a moment instead of spinning.

L{raise_file_limit} raises the soft descriptor limit as far as the hard one
allows (up to FILE_LIMIT), so that it takes far more connections to get
there; L{listen_service} is C{strports.service} with such ports.

The port is Twisted's TCP port with its public C{doRead} (and the accept
loop in it) replaced; it uses no private Twisted attribute.  Its one
difference from the reactor's own ports: a TLS port's closing line in the
log says "TCP Port N Closed" (Twisted's reactor marks its TLS ports with a
private attribute, used for that line only; its opening line still names
TLS).
"""

import errno
import os
import resource
import socket

from twisted.application import service
from twisted.internet import address, defer, endpoints, tcp
from twisted.internet.interfaces import IReactorSSL, IReactorTCP
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from zope.interface import implementer

#: The soft descriptor limit L{raise_file_limit} asks for (or the hard one,
#: if lower).
FILE_LIMIT = 65536
#: The least length of the queue of connections waiting to be accepted.
LISTEN_BACKLOG = 511
#: Seconds without a shortage before a port says it is accepting again.
RECOVERED_AFTER = 2.0
#: Seconds a port stops accepting when it could free no descriptor at all.
PAUSE = 0.5
#: Connections taken off the queue and closed per turn, at most.
DROP_BATCH = 100

log = Logger()

_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_NONE_WAITING = (errno.EAGAIN, errno.EWOULDBLOCK)
# Netfilter refused it, or the client gave up before it was accepted.
_SKIP = (errno.EPERM, errno.ECONNABORTED, errno.EINTR)


def raise_file_limit(wanted=FILE_LIMIT):
    """Raise the soft RLIMIT_NOFILE to C{wanted}, or to the hard limit if
    lower (never lowers it); logged if it changes.  Returns the soft limit
    now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        log.warn("could not raise the file descriptor limit from {old} to {new}: {why}",
                 old=soft, new=target, why=e)
        return soft
    log.info("file descriptor limit raised from {old} to {new}", old=soft, new=target)
    return target


class Port(tcp.Port):
    """A TCP port that keeps a spare descriptor to drop connections with
    when the process (or the system) has no descriptor left."""

    pause = PAUSE
    #: The port number it listens on, once listening.
    _port_number = None
    _spare = None
    _resuming = None
    _recovering = None
    _short_at = 0.0
    #: Whether accepting has been failing for want of descriptors.
    exhausted = False
    #: Connections closed unanswered since it has.
    dropped = 0

    def startListening(self):
        super().startListening()
        self._port_number = self.getHost().port
        self._reserve()

    def _reserve(self):
        if self._spare is None:
            try:
                self._spare = open(os.devnull, "rb")
            except OSError:
                self._spare = None  # again at the next shortage

    def connectionLost(self, reason):
        if self._spare is not None:
            self._spare.close()
            self._spare = None
        for call in (self._resuming, self._recovering):
            if call is not None and call.active():
                call.cancel()
        self._resuming = self._recovering = None
        return super().connectionLost(reason)

    def doRead(self):
        accepted = 0
        for _ in range(self.numberAccepts):
            try:
                skt, addr = self.socket.accept()
            except OSError as e:
                if e.errno in _NONE_WAITING:
                    break
                if e.errno in _SKIP:
                    continue
                if e.errno in _OUT_OF_DESCRIPTORS:
                    self._out_of_descriptors(e.errno)
                    break
                log.failure("could not accept a connection on port {port}",
                            port=self._port_number)
                break
            accepted += 1
            if self.exhausted and self._recovering is None:
                # Said once the shortage has been over for a while, not at the
                # first descriptor freed in the middle of it (a burst would
                # otherwise log a line per batch).
                self._recovering = self.reactor.callLater(RECOVERED_AFTER, self._recovered)
            try:
                self._connect(skt, addr)
            except Exception:
                log.failure("could not set up a connection on port {port}",
                            port=self._port_number)
        # As Twisted does: accept more at a time while connections keep coming.
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)

    def _connect(self, skt, addr):
        # As twisted.internet.tcp.Port.doRead does.
        if len(addr) == 4:
            # IPv6: keep the scope ID.
            host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            addr = tuple([host[0]] + list(addr[1:]))
        # An IPv6 socket's addresses are (host, port, flow info, scope ID).
        kind = address.IPv6Address if len(addr) == 4 else address.IPv4Address
        protocol = self.factory.buildProtocol(kind("TCP", *addr))
        if protocol is None:
            skt.close()
            return
        session = self.sessionno
        self.sessionno = session + 1
        transport = self.transport(skt, protocol, addr, self, session, self.reactor)
        protocol.makeConnection(transport)

    def _out_of_descriptors(self, code):
        closed = 0
        if self._spare is not None:
            self._spare.close()
            self._spare = None
            for _ in range(DROP_BATCH):
                try:
                    skt, _ = self.socket.accept()
                except OSError:
                    break
                skt.close()
                closed += 1
            self._reserve()
        self.dropped += closed
        self._short_at = self.reactor.seconds()
        if not self.exhausted:
            self.exhausted = True
            log.warn("out of file descriptors ({error}) on port {port}: new connections are "
                     "closed unanswered until some are free", error=errno.errorcode[code],
                     port=self._port_number)
        if not closed and self._resuming is None:
            # Nothing could be taken off the queue: the socket stays readable;
            # rather than trying again at once, wait a moment.
            self.stopReading()
            self._resuming = self.reactor.callLater(self.pause, self._resume)

    def _recovered(self):
        self._recovering = None
        if not self.exhausted:
            return
        quiet = self.reactor.seconds() - self._short_at
        if quiet < RECOVERED_AFTER:  # short again meanwhile: look later
            self._recovering = self.reactor.callLater(RECOVERED_AFTER - quiet, self._recovered)
            return
        log.info("accepting connections again on port {port} ({dropped} closed "
                 "unanswered while out of file descriptors)",
                 port=self._port_number, dropped=self.dropped)
        self.exhausted = False
        self.dropped = 0

    def _resume(self):
        self._resuming = None
        if self.connected and not self.disconnecting:
            self._reserve()
            self.startReading()


@implementer(IReactorTCP, IReactorSSL)
class _Listening:
    """A reactor whose TCP and TLS ports are L{Port}s; anything else is the
    reactor's own."""

    def __init__(self, reactor):
        self._reactor = reactor

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        # Twisted's default queue of 50 unaccepted connections overflows
        # under a burst (the kernel drops SYNs; clients retry 1, 3, 7 s
        # later); nginx's 511 does not, and costs nothing.
        listening = Port(port, factory, max(backlog, LISTEN_BACKLOG), interface, self._reactor)
        listening.startListening()
        return listening

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        # As the reactor's own listenSSL does (but for marking the port as
        # TLS in a private attribute, which only its closing log line reads).
        from twisted.protocols.tls import TLSMemoryBIOFactory
        return self.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory),
                              backlog, interface)


class ListeningService(service.Service):
    """What C{strports.service} gives, on public API only: listens on an
    endpoint in privilegedStartService (before twistd drops privileges; an
    error there is raised at once), stops listening when stopped; and
    L{when_listening} gives the listening port."""

    def __init__(self, endpoint, factory):
        self.endpoint = endpoint
        self.factory = factory
        #: The IListeningPort, once listening.
        self.port = None
        self._listening = None
        self._waiting = []

    def privilegedStartService(self):
        super().privilegedStartService()
        self._listen()

    def startService(self):
        super().startService()
        if self._listening is None:  # not started through privilegedStartService
            self._listen()

    def _listen(self):
        failed = []
        self._listening = self.endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, failed.append)
        if failed:  # a TCP or TLS endpoint has tried by now: say so at once
            self._listening = None
            failed[0].raiseException()
        self._listening.addErrback(
            lambda f: log.failure("listening failed", f))

    def _listened(self, port):
        self.port = port
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)
        return port

    def when_listening(self):
        """A Deferred that fires with the listening port (an
        IListeningPort: its getHost() names the address and port)."""
        if self.port is not None:
            return defer.succeed(self.port)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def stopService(self):
        super().stopService()
        listening, self._listening = self._listening, None
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        if listening is not None:
            listening.cancel()
        return None


def listen_service(description, factory, reactor):
    """The service listening on C{description} (an endpoint string, as
    C{strports.service} takes: C{tcp:8082:interface=...}, C{ssl:...}) for
    C{factory}, with L{Port}s on a real reactor."""
    if isinstance(reactor, PosixReactorBase):
        reactor = _Listening(reactor)
    return ListeningService(endpoints.serverFromString(reactor, description), factory)
