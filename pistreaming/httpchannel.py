"""The HTTP connection: how a request may arrive, and what one connection
may make the daemon hold.

Requests must arrive whole within REQUEST_DEADLINE seconds; idle
connections close after IDLE_TIMEOUT (set by the Site).  Request bodies are
refused, not read.
"""

from twisted.logger import Logger
from twisted.web import http

from pistreaming.auth import address_of

#: Seconds a request (its line, headers and any body) may take to arrive.
REQUEST_DEADLINE = 10
#: Seconds an idle connection (keep-alive, between requests) stays open.
IDLE_TIMEOUT = 60

log = Logger()


class Channel(http.HTTPChannel):
    """An HTTP connection whose requests must arrive whole within
    REQUEST_DEADLINE seconds (a slow-loris client is cut off), on top of
    the idle timeout the Site sets."""

    request_deadline = REQUEST_DEADLINE
    _deadline = None

    def lineReceived(self, line):
        if self._deadline is None:
            self._deadline = self.callLater(self.request_deadline, self._too_slow)
        return super().lineReceived(line)

    def allHeadersReceived(self):
        # Nothing here takes a request body: one is refused at once, not
        # read (a client cannot make the daemon store it).
        headers = self.requests[-1].requestHeaders
        length = headers.getRawHeaders(b"content-length", [b"0"])[-1].strip()
        if headers.hasHeader(b"transfer-encoding") or length not in (b"0", b""):
            self._refuse(b"413 Content Too Large")
            return
        return super().allHeadersReceived()

    def allContentReceived(self):
        self._cancel_deadline()
        return super().allContentReceived()

    def connectionLost(self, reason):
        self._cancel_deadline()
        return super().connectionLost(reason)

    def _cancel_deadline(self):
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self):
        self._deadline = None
        log.info("HTTP client {address} did not send its request within {seconds}s; "
                 "closing", address=address_of(self.transport.getPeer()),
                 seconds=self.request_deadline)
        self._refuse(b"408 Request Timeout")

    def _refuse(self, status):
        self._cancel_deadline()
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nConnection: close\r\n"
                             b"Content-Length: 0\r\n\r\n")
        self.dataReceived = lambda data: None  # whatever else comes is ignored
        self.transport.loseConnection()
