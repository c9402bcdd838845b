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
  header line over MAX_LINE bytes or headers over 16 KiB in all.  So does
  anything Twisted's own parser would refuse: a request line that is not
  ``METHOD SP TARGET SP HTTP/1.0`` (or ``HTTP/1.1``) with a token for the
  method and visible ASCII for the target, a header line that is not
  ``NAME: VALUE`` with a token for the name, more than 500 header lines, a
  second empty line before a request line.
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

Only twisted.web's public interface is used: the channel keeps its own
account of what Twisted keeps in private attributes (whether a request is
being answered, the bytes of later requests, whether the transport's buffer
is full, the method), and a line reaches Twisted's parser only once it is
known to parse, so none of Twisted's own bare ``400`` answers is left on
the pinned versions (Twisted 22.4 to 26.10).  A check a later Twisted adds
would answer its own bare ``400``; tests/test_httpchannel.py asserts that
every refusal is ours, and that this module uses no private Twisted name.
"""

import re
import weakref

from twisted.internet import interfaces
from twisted.logger import Logger
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
#: Bytes of later requests kept while one is answered before the transport
#: stops reading (until the answer is done).
EAGER_READ = 16 * 1024
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
    eager_read = EAGER_READ

    site = None
    _deadline = None
    #: The address key the connection is counted as pending under, if it is.
    _pending_key = None
    #: Whether the line and headers of a request are being read.
    _in_headers = False
    #: Whether the connection is closing: whatever else comes is dropped.
    _closing = False
    #: Whether a request is being answered (from its dispatch to requestDone).
    _answering = False
    #: Whether parsing waits for the transport to send what it holds.
    _held = False
    #: Whether the transport holds more than its buffer's worth (it paused
    #: this channel, its producer, and has not resumed it yet).
    _transport_full = False
    #: Answers in a row whose next request was already there.
    _pipelined = 0
    #: The forced close that follows an answer of ours, if one is due.
    _abort_call = None
    #: Bytes of later requests kept unparsed (while one is answered, or held).
    _unparsed = ()
    _unparsed_size = 0
    # The request being read: whether the one empty line allowed before it
    # came, its header lines and their size so far (request line included),
    # and its framing header lines, kept back from Twisted's parser.
    _blank_seen = False
    _header_count = 0
    _header_size = 0
    _framing = ()

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
        if self._closing or self.transport is None:
            return  # refused, or the connection is a WebSocket's now
        if self._answering or self._held:
            self._keep(data)
            return
        if data:
            self._start_deadline()
        super().dataReceived(data)

    def lineReceived(self, line):
        # Everything Twisted would answer its own bare 400 to is refused here
        # first, with ours; what reaches Twisted parses.
        if self._closing:
            return
        if self._deadline is None:
            self._start_deadline()  # pipelined: this request's bytes are here
        self._header_size += len(line)
        if (self._header_size > self.totalHeadersSize
                or b"\r" in line or b"\n" in line or b"\x00" in line):
            return self._refuse(400)
        if not self._in_headers:
            if not line:
                # One empty line may come before a request (old browsers
                # send one after a POST body); Twisted lets it, and no more.
                if self._blank_seen:
                    return self._refuse(400)
                self._blank_seen = True
                return None
            if request_method(line) is None:
                return self._refuse(400)
            self._in_headers = True
            self._header_count = 0
            self._framing = []
            return super().lineReceived(line)
        if not line:
            # The end of the headers: the framing is decided here, before
            # Twisted reads any of it.
            self._in_headers = False
            refusal = framing_refusal([(name, value) for name, value, _ in self._framing])
            if refusal is not None:
                return self._refuse(refusal)
            for _, _, kept in self._framing:  # a plain "Content-Length: 0"
                super().lineReceived(kept)
            return super().lineReceived(line)
        if line[:1] in b" \t":
            # A folded (obsolete) header line: nothing sends them but
            # clients that try to confuse framing.
            return self._refuse(400)
        name, colon, value = line.partition(b":")
        self._header_count += 1
        if not colon or not _TOKEN.fullmatch(name) or self._header_count > self.maxHeaders:
            return self._refuse(400)
        name = name.lower()
        if name in (b"content-length", b"transfer-encoding"):
            self._framing.append((name, value.strip(b" \t"), line))
            return None
        return super().lineReceived(line)

    def lineLengthExceeded(self, line):
        self._refuse(400)

    def allHeadersReceived(self):
        # The request is in: it is answered now, no longer pending.
        self._cancel_deadline()
        self._release()
        return super().allHeadersReceived()

    def allContentReceived(self):
        if self._closing:
            return None
        # What comes while the request is answered waits, unparsed, in
        # rawDataReceived and dataReceived (Twisted 22.4 went on parsing
        # pipelined requests while one was answered later).
        self._answering = True
        self._blank_seen = False
        self._header_size = 0
        self.setRawMode()
        return super().allContentReceived()

    def rawDataReceived(self, data):
        # Raw mode is only ever a request being answered (what follows it
        # waits), or a body after its refusal (dropped): no body is read.
        if self._answering and not self._closing and self.transport is not None:
            self._keep(data)

    def _keep(self, data):
        """Keep C{data} (later requests) unparsed, within the bounds."""
        if not data:
            return
        if not self._unparsed:
            self._unparsed = []
        self._unparsed.append(data)
        self._unparsed_size += len(data)
        if self._unparsed_size > self.max_unparsed:
            if self._held:
                log.info("HTTP client {address} sent {size} bytes of requests while its "
                         "answers waited to be sent; closing", address=self._address(),
                         size=self._unparsed_size)
            else:
                log.info("HTTP client {address} sent {size} bytes of requests while one "
                         "was answered; closing", address=self._address(),
                         size=self._unparsed_size)
            self._abort()
        elif self._unparsed_size > self.eager_read:
            self._pause_reading()  # until requestDone, or the transport's resume

    def _take_unparsed(self):
        data = b"".join(self._unparsed)
        self._unparsed, self._unparsed_size = (), 0
        return data

    # -- between requests -------------------------------------------------

    def requestDone(self, request):
        # What came after this request: what the line parser still holds of
        # the bytes that brought it, then what was kept while it was answered.
        waiting = self.clearLineBuffer() + self._take_unparsed()
        if self.persistent and not self._closing:
            # Pipelined: the next request was here before this answer was
            # done.  Browsers never pipeline; a client that keeps doing it
            # gets MAX_PIPELINED answers in a row, then the connection closes
            # (each answer costs the daemon work, even if unread).
            self._pipelined = self._pipelined + 1 if waiting else 0
            if self._pipelined >= self.max_pipelined:
                log.info("HTTP client {address} pipelined {count} requests without reading "
                         "the answers; closing", address=self._address(),
                         count=self._pipelined)
                self.persistent = False
            elif not self._admit():
                # Over the caps while waiting for another request: the
                # answer goes out, then the connection closes.
                self.persistent = False
            elif self._transport_full:
                # The transport holds more than its buffer's worth: no more
                # requests are read or parsed until it has sent it.
                self._held = True
        super().requestDone(request)
        if not self.persistent or self._closing:
            self._closing = True  # that answer was the last
            return
        self._answering = False
        if self._held:
            self._keep(waiting)
            if not self._closing:
                self._pause_reading()
        else:
            self._resume_reading()
            if waiting:
                self.setLineMode(waiting)  # the next request, already here

    def pauseProducing(self):
        # The transport holds more than its buffer's worth.
        self._transport_full = True
        super().pauseProducing()

    def resumeProducing(self):
        # The transport has sent what it held.
        self._transport_full = False
        super().resumeProducing()
        if self._held and not self._closing and not self._answering:
            self._held = False
            self._resume_reading()
            waiting = self._take_unparsed()
            if waiting:
                self.setLineMode(waiting)  # parse what waited

    def _pause_reading(self):
        # The transport (TCP, or TLS over it) is a push producer: paused, it
        # stops reading from the socket.
        reading = interfaces.IPushProducer(self.transport, None)
        if reading is not None and not self._closing:
            reading.pauseProducing()

    def _resume_reading(self):
        reading = interfaces.IPushProducer(self.transport, None)
        if reading is not None and not self._closing:
            reading.resumeProducing()

    def timeoutConnection(self):
        if self._in_headers or self._unparsed_size or self._deadline is not None:
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
        self._drop_unparsed()
        self.transport.write(answer(code, retry_after))
        self.loseConnection()
        # A client that does not read is not waited for long.
        if self.abortTimeout is not None and self._abort_call is None:
            self._abort_call = self.callLater(self.abortTimeout, self.forceAbortClient)

    def _abort(self):
        self._closing = True
        self._cancel_deadline()
        self.setTimeout(None)
        self._release()
        self._drop_unparsed()
        self.transport.abortConnection()

    def _drop_unparsed(self):
        self.clearLineBuffer()
        self._take_unparsed()

    def connectionLost(self, reason):
        self._cancel_deadline()
        self._release()
        self._closing = True
        self._drop_unparsed()
        if self._abort_call is not None:
            if self._abort_call.active():
                self._abort_call.cancel()
            self._abort_call = None
        return super().connectionLost(reason)


#: A token (RFC 9110 section 5.6.2): a method, a header's name.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A request line the daemon reads: METHOD SP TARGET SP HTTP/1.x, the
#: target in visible ASCII.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) [\x21-\x7e]+ HTTP/1\.[01]")


def request_method(line):
    """The method of the request line C{line}, or None if the daemon does
    not read it: anything but METHOD SP TARGET SP HTTP/1.0 or HTTP/1.1,
    with a token for the method and visible ASCII for the target."""
    match = _REQUEST_LINE.fullmatch(line)
    return match.group(1) if match else None


def framing_refusal(framing):
    """The status a request gets for its framing header lines, or None.
    C{framing}: (name, value) of each Content-Length or Transfer-Encoding
    line, in order, the name lowercased and the value without surrounding
    blanks.  A body (its length given, or chunked) is 413; any other
    framing is 400, but for a plain "Content-Length: 0", which says there
    is no body (some clients send it with every request) and is answered as
    if it were not there."""
    encodings = [value for name, value in framing if name == b"transfer-encoding"]
    lengths = [value for name, value in framing if name == b"content-length"]
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
