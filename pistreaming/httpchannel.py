"""The HTTP connection: how a request may arrive, and what one connection
may make the daemon hold.

What one client connection can do:

- Its request (line and headers) must arrive whole within REQUEST_DEADLINE
  seconds: from the moment the connection opens for the first request, from
  the first byte of it for the later ones of a keep-alive connection.  Bytes
  that do not finish a request extend nothing: neither that deadline nor the
  idle timeout.  Too slow: ``408`` and the connection closes.
- Between requests a keep-alive connection may stay idle IDLE_TIMEOUT
  seconds (the Site's timeout), counted from the end of the last answer.
- A request body is refused unread (``413``); framing the daemon does not
  accept (odd Content-Length or Transfer-Encoding forms, folded header
  lines, control characters) gets ``400`` (a plain ``Content-Length: 0``
  is answered as if it were not there), and so does a request line or
  header line over MAX_LINE bytes or headers over 16 KiB in all.
- Pipelined requests are answered one by one, and the next one is not even
  parsed while the connection holds more unsent data than its transport's
  buffer (64 KiB for TCP): a client that sends requests and never reads
  answers makes the daemon hold that, one answer, and at most MAX_UNPARSED
  bytes of its requests, however many it sends.  Browsers never pipeline:
  after MAX_PIPELINED pipelined answers in a row the connection closes (the
  kernel would take hundreds of small answers that are never read, each of
  them work).
- A connection that has not finished a request yet counts as *pending*
  (L{pistreaming.admission.PendingConnections}, the Site's C{pending}); one
  over its address's cap is answered ``429`` (``Retry-After: 1``) and
  closed; with every slot taken, the longest-pending one is answered
  ``408`` and closed to make room.

Every answer the channel writes itself (400, 408, 413, 429, 503) carries the
same C{Server} and C{X-Content-Type-Options} headers as the Site's, and
nothing the client sent.

This needs more of twisted.web's HTTPChannel than its public interface
gives (its unparsed buffer, whether a request is being answered, its bad
request answer, its network producer): those attributes are the same from
Twisted 22.4 to the newest, and tests/test_httpchannel.py fails on both
pinned versions if any of them stops doing what these bounds rely on.
"""

import weakref

from twisted.logger import Logger
from twisted.protocols import basic
from twisted.web import http

from pistreaming.admission import address_key
from pistreaming.auth import address_of

#: Seconds a request (its line and headers) may take to arrive.
REQUEST_DEADLINE = 10
#: Seconds an idle connection (keep-alive, between requests) stays open.
IDLE_TIMEOUT = 60
#: Longest request line or header line, in bytes.
MAX_LINE = 16384
#: Bytes of a connection's further requests kept unparsed while its answers
#: wait to be sent; a client that sends more than that meanwhile (it cannot
#: over TCP: reading stops) is cut off.
MAX_UNPARSED = 128 * 1024
#: Requests a connection may have answered in a row while the next one was
#: already there (pipelined); after that it closes.
MAX_PIPELINED = 16
#: Seconds between two log lines about refused connections from one address.
REFUSAL_LOG_INTERVAL = 60

log = Logger()

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    503: b"Service Unavailable",
}


def answer(code, retry_after=None):
    """The whole answer the channel writes for C{code}: a short text, the
    headers every answer carries, C{Retry-After} if given, and
    C{Connection: close}."""
    reason = _REASONS[code]
    body = b"%d %s\n" % (code, reason.lower())
    retry = b"Retry-After: %d\r\n" % retry_after if retry_after is not None else b""
    return (b"HTTP/1.1 %d %s\r\n" % (code, reason) + retry +
            b"Server: pistream\r\n"
            b"X-Content-Type-Options: nosniff\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body) + body)


class _RefusalLog:
    """Says whether a refusal for an address should be logged: at most once
    a REFUSAL_LOG_INTERVAL per address (a bounded table)."""

    def __init__(self):
        self.last = {}

    def should_log(self, key, now):
        last = self.last.get(key)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            return False
        if len(self.last) >= 1024:
            self.last = {k: t for k, t in self.last.items()
                         if now - t < REFUSAL_LOG_INTERVAL}
        self.last[key] = now
        return True


#: Each PendingConnections' refusal log.
_refusal_logs = weakref.WeakKeyDictionary()


class Channel(http.HTTPChannel):
    """An HTTP/1.1 connection that a client can make hold only a small,
    fixed amount, and not for long (see the module's description)."""

    request_deadline = REQUEST_DEADLINE
    MAX_LENGTH = MAX_LINE
    max_unparsed = MAX_UNPARSED
    max_pipelined = MAX_PIPELINED
    _pipelined = 0

    site = None
    _deadline = None
    #: The address key the connection is counted as pending under, if it is.
    _pending_key = None
    #: Whether the line and headers of a request are being read.
    _in_headers = False
    #: Whether the connection is closing on an answer of ours.
    _closing = False
    #: Whether parsing waits for the transport to send what it holds.
    _held = False

    # -- opening, and the pending-connection caps -------------------------

    def connectionMade(self):
        super().connectionMade()
        # The first request's deadline runs from the open.
        self._start_deadline()
        if not self._admit():
            # Its address has too many unfinished requests (429), or, where
            # no pending connection could make room, everyone has (503).
            pending = self._pending()
            full = pending.by_address.get(address_key(self._address()), 0) >= pending.per_address
            self._refuse(429 if full else 503, why="pending", retry_after=1)

    def _pending(self):
        return getattr(self.site, "pending", None)

    def _address(self):
        return address_of(self.transport.getPeer())

    def _admit(self):
        pending = self._pending()
        if pending is None:
            return True
        key = address_key(self._address())
        if not pending.admit(key, self._evicted):
            return False
        self._pending_key = key
        return True

    def _evicted(self):
        # The longest-pending connection, closed to make room for a newer one
        # (pistreaming.admission): it has had its chance to send a request.
        self._refuse(408)

    def _release(self):
        key, self._pending_key = self._pending_key, None
        if key is not None:
            self._pending().release(key, self._evicted)

    def _refusal_logged(self, key):
        refusals = _refusal_logs.setdefault(self._pending(), _RefusalLog())
        clock = getattr(self.site, "reactor", None)
        now = clock.seconds() if clock is not None else 0
        return refusals.should_log(key, now)

    # -- reading requests -------------------------------------------------

    def resetTimeout(self):
        # Twisted restarts the idle timeout on every byte received; here
        # bytes that do not finish a request extend nothing.  The idle
        # timeout still starts anew at the end of each answer (requestDone).
        pass

    def dataReceived(self, data):
        if self._closing:
            return
        if data and not self._handlingRequest and not self._held:
            self._start_deadline()
        super().dataReceived(data)
        if self._held and len(self._buffer) > self.max_unparsed:
            log.info("HTTP client {address} sent {size} bytes of requests while its "
                     "answers waited to be sent; closing", address=self._address(),
                     size=len(self._buffer))
            self._abort()

    def lineReceived(self, line):
        if self._closing:
            return
        if self._deadline is None:
            self._start_deadline()  # pipelined: this request's bytes are here
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            return self._respondToBadRequestAndDisconnect()
        if self._in_headers:
            if not line:
                self._in_headers = False
            elif line[:1] in b" \t":
                # A folded (obsolete) header line: nothing sends them but
                # clients that try to confuse framing.
                return self._respondToBadRequestAndDisconnect()
        elif line:
            self._in_headers = True
        return super().lineReceived(line)

    def lineLengthExceeded(self, line):
        self._respondToBadRequestAndDisconnect()

    def allHeadersReceived(self):
        # The request is in: it is answered now, no longer pending.
        self._cancel_deadline()
        self._release()
        refusal = framing_refusal(self.requests[-1].requestHeaders, self._command)
        if refusal is not None:
            self._refuse(refusal)
            return
        return super().allHeadersReceived()

    def allContentReceived(self):
        if self._closing:
            return  # refused in allHeadersReceived
        # What comes while the request is answered waits, unparsed, in
        # rawDataReceived (Twisted 22.4 went on parsing pipelined requests
        # while one was answered later; later versions do this themselves).
        self.setRawMode()
        return super().allContentReceived()

    def rawDataReceived(self, data):
        if not self._handlingRequest:
            return super().rawDataReceived(data)
        self._dataBuffer.append(data)
        size = sum(map(len, self._dataBuffer))
        if size > self.max_unparsed:
            log.info("HTTP client {address} sent {size} bytes of requests while one "
                     "was answered; closing", address=self._address(), size=size)
            self._abort()
        elif size > self._optimisticEagerReadSize:
            self._networkProducer.pauseProducing()  # until requestDone

    # -- between requests -------------------------------------------------

    def requestDone(self, request):
        if self.persistent and not self._closing:
            # Pipelined: the next request was here before this answer was
            # done.  Browsers never pipeline; a client that keeps doing it
            # gets MAX_PIPELINED answers in a row, then the connection closes
            # (each answer costs the daemon work, even if unread).
            if self._buffer or self._dataBuffer:
                self._pipelined += 1
            else:
                self._pipelined = 0
            if self._pipelined >= self.max_pipelined:
                log.info("HTTP client {address} pipelined {count} requests without reading "
                         "the answers; closing", address=self._address(),
                         count=self._pipelined)
                self.persistent = False
            elif not self._admit():
                # Over the caps while waiting for another request: the
                # answer goes out, then the connection closes.
                self.persistent = False
            elif self._waitingForTransport:
                # The transport holds more than its buffer's worth: no more
                # requests are read or parsed until it has sent it.
                self._held = True
                self.paused = True  # LineReceiver stops parsing
        super().requestDone(request)
        if self._held:
            self._networkProducer.pauseProducing()
        elif self.persistent and not self._closing and self._buffer:
            self._start_deadline()  # the next request is already here, in part

    def resumeProducing(self):
        super().resumeProducing()
        if self._held and not self._closing and not self._handlingRequest:
            self._held = False
            self.paused = False
            if self._buffer:
                self._start_deadline()
                # Parse what waited (the transport reads again too).
                basic.LineReceiver.dataReceived(self, b"")

    def timeoutConnection(self):
        if self._in_headers or self._buffer or self._deadline is not None:
            self._too_slow()  # a request had started: it gets its 408
        else:
            super().timeoutConnection()

    # -- deadline ---------------------------------------------------------

    def _start_deadline(self):
        if self._deadline is None and not self._closing:
            self._deadline = self.callLater(self.request_deadline, self._too_slow)

    def _cancel_deadline(self):
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self):
        self._deadline = None
        if self._closing:
            return
        log.info("HTTP client {address} did not send its request within {seconds}s; "
                 "closing", address=self._address(), seconds=self.request_deadline)
        self._refuse(408)

    # -- closing ----------------------------------------------------------

    def _respondToBadRequestAndDisconnect(self):
        # Twisted's own 400 (bad request line, bad header, too many or too
        # long headers) carries no headers; this one carries ours.
        self._refuse(400)

    def _refuse(self, code, why=None, retry_after=None):
        """Answer C{code} and close; whatever else comes is ignored."""
        if self._closing:
            return
        self._closing = True
        self._cancel_deadline()
        self.setTimeout(None)
        if why == "pending":
            key = address_key(self._address())
            if self._refusal_logged(key):
                log.info("HTTP client {address} has too many connections that have not "
                         "finished a request ({count} in all); refusing more for now",
                         address=self._address(), count=self._pending().count)
        self._release()
        self.paused = True
        self.transport.write(answer(code, retry_after))
        self.loseConnection()
        # A client that does not read is not waited for long.
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def _abort(self):
        self._closing = True
        self._cancel_deadline()
        self.setTimeout(None)
        self._release()
        self.paused = True
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self._cancel_deadline()
        self._release()
        self._closing = True
        return super().connectionLost(reason)


def framing_refusal(headers, method=b"GET"):
    """The status a request C{method} with C{headers} gets for its framing
    (Twisted has already answered 400 to two framing headers and to a
    Content-Length that is not digits), or None: a body (its length given,
    or chunked) is 413; any other framing header is 400, but for a plain
    "Content-Length: 0", which says there is no body (some clients send it
    with every request) and is answered as if it were not there."""
    encodings = headers.getRawHeaders(b"transfer-encoding")
    lengths = headers.getRawHeaders(b"content-length")
    if encodings:
        if len(encodings) == 1 and encodings[0].lower() == b"chunked" and not lengths:
            return 413
        return 400
    if lengths:
        if len(lengths) == 1 and lengths[0].isdigit() and int(lengths[0]) > 0:
            return 413
        if lengths != [b"0"]:
            return 400
    return None
