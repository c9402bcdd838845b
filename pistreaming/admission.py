"""How many connections may be opened and not yet have finished a request.

A connection counts as *pending* from the moment it is accepted until its
first request has arrived whole (HTTP: line and headers; the stream's own
port: the WebSocket handshake).  Pending connections are capped per client
address and overall, so that clients that open connections and never
finish a request (slow loris, dribbled request lines) cannot take the file
descriptors and slots that viewers and page loads need.

A connection past its address's cap is refused at once.  When the overall
cap is reached, a newcomer is not refused: the connection that has been
pending longest is closed to make room for it (a request that is being
sent normally takes milliseconds, so the oldest pending connection is the
likeliest to be one that never finishes).  Many addresses together can
thus keep at most C{total} connections waiting, and never stop a page load
or a viewer from getting in.

Addresses are counted by :func:`address_key`: IPv4 addresses one by one,
IPv6 ones by their /64 (one host usually holds a whole /64, and can rotate
through billions of addresses in it).
"""

import collections
import ipaddress
import resource

#: Pending connections one address (an IPv6 /64) may have at once.
PER_ADDRESS = 16
#: Pending connections in all, at most; also never more than a quarter of
#: the file descriptors the process may open (see L{default_total}): 256
#: under the usual soft limit of 1024, 4096 once the daemon has raised it.
TOTAL = 4096


def address_key(host):
    """What connections and failures are counted by for the address C{host}
    (text, as in Twisted's IPv4Address/IPv6Address.host): an IPv4 address
    itself (an IPv4-mapped IPv6 address too), an IPv6 address's /64
    ("2001:db8:1:2::/64"), anything else as it is."""
    if not isinstance(host, str):
        return str(host)
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def default_total():
    """TOTAL, or a quarter of the process's file descriptor limit if less."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return TOTAL
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return TOTAL
    return max(8, min(TOTAL, soft // 4))


class PendingConnections:
    """Counts connections that have not finished a request yet.

    Protocols call L{admit} when a connection opens (and close it at once
    if it says no), L{release} exactly once when its request is complete or
    the connection is lost before that, and L{admit} again if a keep-alive
    connection starts waiting for another request.  A protocol that gives
    C{admit} an C{evict} callable (which closes its connection) may be
    closed to make room when the overall cap is reached; it passes the same
    callable to L{release}."""

    def __init__(self, per_address=PER_ADDRESS, total=None):
        self.per_address = per_address
        self.total = default_total() if total is None else total
        self.by_address = {}
        self.count = 0
        #: Connections closed because their address was at its cap, or
        #: because the overall cap was reached and none could be evicted.
        self.refused = 0
        #: Pending connections closed to make room for newer ones.
        self.evicted = 0
        # evict callable -> address key, oldest first
        self._evictable = collections.OrderedDict()

    def admit(self, key, evict=None):
        """Whether one more pending connection from C{key} (an
        L{address_key}) may go on; if so it is counted.  With the overall
        cap reached, the longest-pending evictable connection is closed
        (its C{evict} called) to make room."""
        held = self.by_address.get(key, 0)
        if held >= self.per_address:
            self.refused += 1
            return False
        if self.count >= self.total and not self._evict_oldest():
            self.refused += 1
            return False
        self.by_address[key] = self.by_address.get(key, 0) + 1
        self.count += 1
        if evict is not None:
            self._evictable[evict] = key
        return True

    def _evict_oldest(self):
        while self._evictable:
            evict, key = self._evictable.popitem(last=False)
            self._uncount(key)
            self.evicted += 1
            evict()
            return True
        return False

    def release(self, key, evict=None):
        """One pending connection from C{key} finished its request or closed
        (C{evict}: the callable it was admitted with, if any)."""
        if evict is not None:
            if self._evictable.pop(evict, None) is None:
                return  # evicted already: no longer counted
        self._uncount(key)

    def _uncount(self, key):
        held = self.by_address.get(key, 0)
        if held <= 0:
            return
        if held == 1:
            del self.by_address[key]
        else:
            self.by_address[key] = held - 1
        self.count -= 1
