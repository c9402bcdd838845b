"""The WebSocket side: every viewer gets the stream header, then the video.

The factory owns the set of open viewers.  Each chunk of MPEG-TS packets from
the encoder is framed once (a prepared message, never compressed) and the same
bytes are written to every open viewer.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

#: Viewers never need to send anything; anything bigger than this is refused.
MAX_INCOMING = 4096

CLOSE_GOING_AWAY = 1001

# Module-level: Autobahn's classes carry their own (level-filtered) loggers in
# a class attribute named "log", which must not be replaced.
log = Logger(namespace="pistreaming.broadcast")


class ViewerProtocol(WebSocketServerProtocol):
    def onOpen(self):
        self.factory.add_viewer(self)

    def onMessage(self, payload, isBinary):
        # Viewers have nothing to say; what they send is dropped.
        pass

    def onClose(self, wasClean, code, reason):
        self.factory.remove_viewer(self)


class StreamFactory(WebSocketServerFactory):
    protocol = ViewerProtocol

    def __init__(self, header, reactor):
        """
        @param header: the first message each viewer gets (C{b'jsmp'} + size).
        """
        super().__init__(server=None, reactor=reactor)
        # Served on two ports (the HTTP one, under /stream, and its own), so
        # the Host header's port is not checked against one of them.
        self.externalPort = None
        self.setProtocolOptions(
            maxFramePayloadSize=MAX_INCOMING,
            maxMessagePayloadSize=MAX_INCOMING,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=1,
            # A viewer that breaks the protocol (e.g. too big a message) gets a
            # close frame with the reason code before the TCP connection ends.
            failByDrop=False,
            # A plain HTTP request for the stream gets an error, not a status page.
            webStatus=False,
            autoPingInterval=10,
            autoPingTimeout=10,
        )
        self.header = header
        self.viewers = set()
        self.bytes_discarded = 0
        self.bytes_sent = 0

    def add_viewer(self, viewer):
        viewer.sendMessage(self.header, isBinary=True)
        self.viewers.add(viewer)
        log.info("viewer {peer} connected; {viewers} watching",
                      peer=viewer.peer, viewers=len(self.viewers))

    def remove_viewer(self, viewer):
        if viewer in self.viewers:
            self.viewers.discard(viewer)
            log.info("viewer {peer} left; {viewers} watching",
                          peer=viewer.peer, viewers=len(self.viewers))

    def broadcast(self, chunk):
        """Send C{chunk} (whole MPEG-TS packets) to every open viewer."""
        if not self.viewers:
            self.bytes_discarded += len(chunk)
            return
        message = self.prepareMessage(chunk, isBinary=True, doNotCompress=True)
        for viewer in self.viewers:
            if viewer.state == WebSocketProtocol.STATE_OPEN:
                viewer.sendPreparedMessage(message)
                self.bytes_sent += len(chunk)

    def close_all(self, reason="server shutting down"):
        # sendClose() only lets applications use 1000 and 3000-4999; 1001
        # ("going away") is the code that says what happens here.
        for viewer in list(self.viewers):
            if viewer.state == WebSocketProtocol.STATE_OPEN:
                viewer.sendCloseFrame(code=CLOSE_GOING_AWAY, reasonUtf8=reason.encode())


class BroadcastService(service.Service):
    """Closes every viewer's WebSocket when the daemon stops."""

    name = "broadcast"
    log = Logger()
    #: How long viewers get to answer the close before they are cut off.
    close_timeout = 0.5

    def __init__(self, factory, reactor):
        self.factory = factory
        self.reactor = reactor

    def startService(self):
        super().startService()
        self.log.info("broadcast: MPEG-TS to WebSocket viewers, header {header}",
                      header=self.factory.header.hex())

    def stopService(self):
        super().stopService()
        viewers = list(self.factory.viewers)
        if not viewers:
            return defer.succeed(None)
        self.log.info("closing {viewers} viewer connections", viewers=len(viewers))
        self.factory.close_all()
        d = defer.Deferred()

        def cut_off():
            # A normal close (FIN after what is buffered), not an abort: an
            # abort's RST would make the viewer's kernel discard the close
            # frame it has not read yet.  Exiting closes whatever remains.
            for viewer in viewers:
                if viewer.transport is not None:
                    viewer.dropConnection(abort=False)
            d.callback(None)

        self.reactor.callLater(self.close_timeout, cut_off)
        return d
