"""Which names the daemon answers to: the Host header check that stops DNS
rebinding.

A page on some web site can make its own name resolve to the camera's
address (DNS rebinding); the browser then counts the camera as that site,
sends its requests there with that site's name in ``Host``, and lets the
page read the answers.  Checking ``Host`` against the names the camera is
really reached by closes that door: IP literals (v4 and [v6]),
``localhost`` (and names under it), the machine's host name and
``HOSTNAME.local`` (mDNS), and the names given with ``--allow-host``.
``--allow-host '*'`` turns the check off, for those behind a proxy that
rewrites ``Host``.

A request without a Host header (HTTP/1.0 tools) is allowed: browsers
always send one, so rebinding cannot leave it out.
"""

import ipaddress
import re
import socket

_PORT = re.compile(r":\d{1,5}$")


def host_name(host):
    """The name part of a Host header's value (str or bytes), lower-case,
    without port, brackets or a trailing dot; None if it is not a host."""
    if isinstance(host, bytes):
        try:
            host = host.decode("ascii")
        except UnicodeDecodeError:
            return None
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or (host[end + 1:] and not _PORT.fullmatch(host[end + 1:])):
            return None
        name = host[1:end]
        try:
            ipaddress.IPv6Address(name.split("%", 1)[0])
        except ValueError:
            return None
        return name.lower()
    host = _PORT.sub("", host)
    name = host.rstrip(".").lower()
    if not name or not re.fullmatch(r"[a-z0-9_.-]+", name) or len(name) > 253:
        return None
    return name


def is_ip_literal(name):
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def machine_names(hostname=None):
    """The names this machine answers to on its own: its host name (short
    and as given) and the mDNS name HOSTNAME.local."""
    hostname = (hostname if hostname is not None else socket.gethostname()).rstrip(".").lower()
    names = {"localhost"}
    if hostname:
        short = hostname.split(".", 1)[0]
        names.update({hostname, short, short + ".local"})
    return frozenset(names)


def parse_allowed_host(text):
    """One --allow-host value, checked: '*' or a host name (a leading
    '*.' allows the name's subdomains, e.g. *.example.com).  ValueError
    with the reason if it is neither."""
    text = text.strip()
    if text == "*":
        return text
    wildcard = text.startswith("*.")
    name = host_name(text[2:] if wildcard else text)
    if name is None or ":" in text.strip("[]"):
        raise ValueError(f"{text!r} is not a host name (for example camera.example.com)")
    return "*." + name if wildcard else name


class HostPolicy:
    """Answers whether a request's Host header names this daemon."""

    def __init__(self, allowed=(), hostname=None):
        """
        @param allowed: names from --allow-host ("*" allows any; "*.NAME"
            any name under NAME).
        @param hostname: the machine's host name (by default, the system's).
        """
        allowed = tuple(allowed)
        self.any = "*" in allowed
        self.names = machine_names(hostname) | {a for a in allowed if not a.startswith("*")}
        self.suffixes = tuple(a[1:] for a in allowed if a.startswith("*."))

    def allows(self, host):
        """Whether a Host header's value (str or bytes; None when the
        request had none) is one of this daemon's names."""
        if self.any or host is None:
            return True
        name = host_name(host)
        if name is None:
            return False
        if is_ip_literal(name) or name in self.names:
            return True
        return name.endswith(".localhost") or any(name.endswith(s) for s in self.suffixes)
