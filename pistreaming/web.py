"""The HTTP side: the viewer page, the player script, and the stream at /stream.

Routes (anything else is 404; methods other than GET and HEAD are 405):

    /              the viewer page (no redirect: one round trip less)
    /index.html    the same page, with the stream's path and size filled in,
                   and its own script (static/pistream.js), style
                   (static/pistream.css) and colours (the options) inline
    /jsmpg.js      the JSMpeg player (from the npm registry, built in)
    /stream        the WebSocket stream (in mpeg1 mode, the same as the
                   separate WebSocket port); /stream?codec=mpeg1 the MPEG-1
                   stream (with --codec h264, the one made on demand, which
                   the separate WebSocket port serves too)
    /stats.json    the daemon's figures (pistreaming.stats), as JSON
    /metrics       the same figures in the Prometheus text format
    /snapshot.jpg  the latest picture as a JPEG (pistreaming.snapshot)
    /recordings/   with --record, the recordings (pistreaming.recordings)

With --passwd, all of them (the stream too) stand behind pistreaming.auth's
Gate.  Every response names no server version and carries a restrictive
Content-Security-Policy and nosniff; requests must be whole within
REQUEST_DEADLINE seconds and idle connections close after IDLE_TIMEOUT.

Before any of that, the Host header must name this camera
(pistreaming.hosts, against DNS rebinding): a request for another name gets
421 Misdirected Request, whatever its path and before any password check.
``OPTIONS *`` gets 405 (Allow: GET, HEAD, as any OPTIONS here), any other
method with ``*`` 400; a request with more than one Host header gets 400.

/stats.json lists the viewers' addresses only to a request from the
loopback interface, or when a password protects it; anyone else sees
"hidden" in their place.  /metrics carries no addresses.
"""

import base64
import gzip
import hashlib
import html
import ipaddress
import json
import os
import re
from string import Template

from autobahn.twisted.resource import WebSocketResource
from twisted.logger import Logger
from twisted.web import http, resource, server

from pistreaming.auth import Gate, address_of
from pistreaming.hosts import host_name, is_ip_literal
from pistreaming.httpchannel import IDLE_TIMEOUT, REQUEST_DEADLINE, Channel  # noqa: F401

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PLAYER = os.path.join(STATIC, "jsmpg.js")

STREAM_PATH = "stream"

log = Logger()


class PlayerMissing(Exception):
    """The JSMpeg player script was not built into the package."""


def read_static(name):
    with open(os.path.join(STATIC, name), "rb") as f:
        return f.read()


def read_player():
    try:
        return read_static("jsmpg.js")
    except FileNotFoundError:
        raise PlayerMissing(
            f"the player script {PLAYER} is missing; build it with "
            "'python setup.py build_player' (needs npm) or reinstall the package"
        ) from None


# JSMpeg's build adds a <style> element to any page that loads it (for its
# own video element, which this page does not use): an empty one, then its
# rules.  The policy allows exactly those two, by hash, so the page's console
# stays free of policy errors.
_PLAYER_STYLE = re.compile(
    r'document\.createElement\("style"\).{0,400}?\}\}\(("(?:[^"\\]|\\.)*")\)', re.S)


def csp_hash(text):
    """The policy's source expression that allows C{text} inline."""
    return b"'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()) + b"'"


def player_styles(player):
    """The policy's C{style-src} hashes for the style the player script adds
    (none if the script has no such style)."""
    found = _PLAYER_STYLE.search(player.decode("utf-8", "replace"))
    if not found:
        return b""
    rules = json.loads(found.group(1))
    return b"".join(b" " + csp_hash(text) for text in ("", rules))


class GetOnly(resource.Resource):
    """A resource that answers GET and HEAD, and 405 (with Allow) to any other
    method; twisted.web would say 501 to methods it does not know."""

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"405 method not allowed\n"
        return super().render(request)


class StaticBytes(GetOnly):
    """One fixed document.  GET and HEAD only; no children (so no listings).

    It carries an ETag (a browser that has it gets 304), and is sent gzipped
    to browsers that accept it when that is smaller (the player script is
    125 KB, a third of that compressed: it matters on a phone's wifi)."""

    def __init__(self, body, content_type):
        super().__init__()
        self.body = body
        self.content_type = content_type
        digest = hashlib.sha256(body).hexdigest()
        self.etag = b'"' + digest[:32].encode() + b'"'
        # The page asks for "name?v=<version>": that address names this very
        # content, so the browser may keep it for good and not ask again.
        self.version = digest[:16]
        packed = gzip.compress(body, 9, mtime=0)
        self.gzipped = packed if len(packed) < len(body) * 0.9 else None

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        if request.args.get(b"v") == [self.version.encode()]:
            request.setHeader(b"cache-control", b"max-age=31536000, immutable")
        else:
            request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"etag", self.etag)
        body = self.body
        if self.gzipped is not None:
            request.setHeader(b"vary", b"Accept-Encoding")
            accepted = request.getHeader(b"accept-encoding") or b""
            if re.search(rb"(^|[\s,])gzip($|[\s,;])", accepted) and b"gzip;q=0" not in accepted:
                request.setHeader(b"content-encoding", b"gzip")
                body = self.gzipped
        if request.setETag(self.etag) == http.CACHED:
            return b""  # 304 Not Modified
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    # The same headers as GET, Content-Length included, and no body.
    render_HEAD = render_GET


class LiveDocument(GetOnly):
    """A document made anew for each request (never cached): C{produce}
    is called with the request and gives the body."""

    def __init__(self, produce, content_type):
        super().__init__()
        self.produce = produce
        self.content_type = content_type

    def render_GET(self, request):
        body = self.produce(request)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    render_HEAD = render_GET


def is_loopback(address):
    """Whether a Twisted address (IPv4Address, IPv6Address) is on the
    loopback interface: 127.0.0.0/8, ::1, or ::ffff:127.x."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def stats_json(stats, protected=False):
    """/stats.json's producer.  The viewers' addresses are shown when a
    password protects the figures (C{protected}) or to a request from the
    loopback interface; to anyone else each is "hidden"."""
    def produce(request):
        addresses = protected or is_loopback(request.getClientAddress())
        return (json.dumps(stats.gather(addresses=addresses), indent=1) + "\n").encode("utf-8")
    return produce


def metrics_text(stats):
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    from pistreaming.metrics import StatsCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return (lambda request: generate_latest(registry)), CONTENT_TYPE_LATEST.encode()


def _tokens(value):
    return {t.strip().lower() for t in (value or b"").split(b",")}


_KEY = re.compile(rb"^[A-Za-z0-9+/]{21}[AQgw]==$")  # base64 of 16 bytes


class Stream(resource.Resource):
    """/stream: a WebSocket opening handshake goes on to Autobahn (and the
    stream's factory); anything else is answered here, with the headers
    every answer carries.  (Autobahn's own refusals go out without them,
    and with what the client sent in their status line.)

    C{/stream?codec=mpeg1} is the MPEG-1 stream's (with --codec h264, for
    pages whose browser decodes no H.264); in mpeg1 mode that is the one
    stream there is."""

    isLeaf = True

    def __init__(self, factory, mpeg1=None):
        """
        @param factory: the stream's L{pistreaming.broadcast.StreamFactory}.
        @param mpeg1: the MPEG-1 stream's, where it is another one (with
            --codec h264: pistreaming.ondemand), else None.
        """
        super().__init__()
        self.factory = factory
        self.websocket = WebSocketResource(factory)
        self.mpeg1 = mpeg1
        self.mpeg1_websocket = WebSocketResource(mpeg1) if mpeg1 is not None else None

    def render(self, request):
        if request.method != b"GET":
            return refuse(request, 405, b"405 method not allowed\n", allow=b"GET")
        headers = request.requestHeaders
        if b"websocket" not in _tokens(request.getHeader(b"upgrade")):
            request.setHeader(b"upgrade", b"websocket")
            return refuse(request, 426, b"426 the stream is a WebSocket: open the page at / "
                          b"to watch it\n")
        keys = headers.getRawHeaders(b"sec-websocket-key") or []
        versions = headers.getRawHeaders(b"sec-websocket-version") or []
        if (b"upgrade" not in _tokens(request.getHeader(b"connection"))
                or len(keys) != 1 or not _KEY.match(keys[0].strip())):
            return refuse(request, 400, b"400 not a WebSocket opening handshake\n")
        if versions != [b"13"]:
            request.setHeader(b"sec-websocket-version", b"13")
            return refuse(request, 426, b"426 WebSocket version 13 only\n")
        factory, websocket = self.factory, self.websocket
        if self.mpeg1 is not None and request.args.get(b"codec") == [b"mpeg1"]:
            factory, websocket = self.mpeg1, self.mpeg1_websocket
        # Autobahn builds the viewer's protocol within this call: it is told
        # that the HTTP port is where its connection came from.
        factory.handing_over = True
        try:
            return websocket.render(request)
        finally:
            factory.handing_over = False


def refuse(request, code, body, allow=None):
    """A short plain-text error answer from a resource's render."""
    request.setResponseCode(code)
    if allow is not None:
        request.setHeader(b"allow", allow)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    return b"" if request.method == b"HEAD" else body


class NotFound(resource.Resource):
    """404, in plain text, for any method.  (Twisted's NoResource is
    deprecated from 22.10 on, and its page is HTML.)"""

    isLeaf = True

    def render(self, request):
        return refuse(request, 404, b"404 not found\n")


NOT_FOUND = NotFound()


class Root(resource.Resource):
    def __init__(self, pages, stream, trees=None):
        """
        @param pages: name -> resource of a page with nothing after its name.
        @param trees: name -> resource that takes the rest of the path
            (/recordings/...).
        """
        super().__init__()
        self.pages = pages
        self.stream = stream
        self.trees = trees or {}

    def getChild(self, name, request):
        if name == b"":
            if request.postpath:  # "//something"
                return NOT_FOUND
            # The page itself, not a redirect to it: a browser opening
            # http://pi:8082/ saves a round trip before its first picture.
            # (The page's addresses are relative: the same from either.)
            return self.pages[b"index.html"]
        if name == STREAM_PATH.encode() and not request.postpath:
            return self.stream
        tree = self.trees.get(name)
        if tree is not None:
            return tree
        page = self.pages.get(name)
        if page is not None and not request.postpath:
            return page
        return NOT_FOUND

    def render(self, request):  # "/" itself never reaches here; getChild(b"") does.
        return NOT_FOUND.render(request)


def shown(raw, limit=100):
    """Something a client sent, for a log line: at most C{limit} bytes,
    anything but printable ASCII escaped."""
    text = repr(bytes(raw[:limit]))[2:-1]
    return text + ("..." if len(raw) > limit else "")


class Request(server.Request):
    """Checks the Host header before anything else (no route, no password
    check, for a name this camera does not answer to), answers the
    asterisk form (C{OPTIONS *}) itself, and adds the headers every response
    carries, naming no server version, whichever way the answer goes out."""

    #: Whether the Host header was found to name this camera.
    host_allowed = False

    def process(self):
        self.site = self.channel.site
        self.setHeader(b"date", http.datetimeToString())
        hosts = self.requestHeaders.getRawHeaders(b"host") or []
        if len(hosts) > 1:
            self.answer(400, b"Bad Request", b"400 a request names one host\n")
            return
        host = hosts[0] if hosts else None
        policy = self.site.hosts
        if policy is not None and not policy.allows(host):
            self.misdirected(host)
            return
        self.host_allowed = True
        if self.path == b"*":
            # Twisted answers these itself without the headers below.
            if self.method == b"OPTIONS":
                self.answer(405, b"Method Not Allowed",
                            b"405 method not allowed\n", allow=b"GET, HEAD")
            else:
                self.answer(400, b"Bad Request", b"400 * is an address for OPTIONS only\n")
            return
        super().process()

    def misdirected(self, host):
        log.warn("HTTP request from {address} for {host}, a name this camera does not "
                 "answer to: 421 (if it is this camera's, add it with --allow-host)",
                 address=address_of(self.getClientAddress()), host=shown(host))
        name = host_name(host)
        name = name.encode("ascii") if name is not None and not is_ip_literal(name) else b"NAME"
        self.answer(421, b"Misdirected Request",
                    b"421 this camera does not answer to that name; if it is the "
                    b"camera's, start pistream with --allow-host " + name + b"\n")

    def answer(self, code, message, body, allow=None):
        """A short plain-text answer, given here rather than by a resource."""
        body = refuse(self, code, body, allow)
        self.setResponseCode(code, message)  # (Twisted has no phrase for 421)
        if body:
            self.write(body)
        self.finish()

    def write(self, data):
        if not self.startedWriting:
            self.add_standard_headers()
        super().write(data)

    def add_standard_headers(self):
        self.setHeader(b"server", b"pistream")
        self.setHeader(b"x-content-type-options", b"nosniff")
        self.setHeader(b"referrer-policy", b"no-referrer")
        # The policy names the request's host for the stream only if it is
        # this camera's.
        host = self.getHeader(b"host") if self.host_allowed else None
        self.setHeader(b"content-security-policy", content_security_policy(
            host, self.site.styles, self.site.scripts))


_HOST = re.compile(rb"^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


def content_security_policy(host, styles=b"", scripts=b""):
    """Only this site's own scripts and styles, and the inline ones named by
    hash in C{scripts} and C{styles} (the page's own, see L{inline}, and the
    player's style, see L{player_styles}); its images and stream;
    WebAssembly for the player's decoder; the video element's media from a
    blob: URL (Media Source Extensions, the H.264 path where the page is no
    secure context) and from this site (a recording played at
    /recordings/); no frames, no forms, no plugins."""
    connect = b"'self'"
    if host and _HOST.match(host):
        # Older browsers do not count ws: and wss: to this host as 'self'.
        connect += b" ws://" + host + b" wss://" + host
    return (b"default-src 'none'; script-src 'self' 'wasm-unsafe-eval'" + scripts + b"; "
            b"style-src 'self'" + styles + b"; img-src 'self' data:; media-src 'self' blob:; "
            b"connect-src " + connect + b"; "
            b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Site(server.Site):
    """The daemon's HTTP site: L{Channel} connections, L{Request}s, and no
    tracebacks shown to clients."""

    protocol = Channel
    requestFactory = Request
    displayTracebacks = False

    def __init__(self, resource, styles=b"", scripts=b"", hosts=None, pending=None, **kwargs):
        """
        @param styles: what the policy's style-src allows besides 'self':
            the page's inline style and the player's (L{player_styles}), by hash.
        @param scripts: what the policy's script-src allows besides 'self'
            and WebAssembly: the page's inline script, by hash.
        @param hosts: the L{pistreaming.hosts.HostPolicy} every request's
            Host header must pass (None: no check).
        @param pending: the L{pistreaming.admission.PendingConnections}
            the connections (L{Channel}) are counted in (None: not counted).
        @param kwargs: for twisted.web.server.Site (timeout, reactor).
        """
        super().__init__(resource, **kwargs)
        self.styles = styles
        self.scripts = scripts
        self.hosts = hosts
        self.pending = pending


def inline(text, tag):
    """C{text} as the content of an inline <script> or <style> element.
    (The page carries its own script and style: a browser runs the script as
    it reads the page, so the stream's socket opens without waiting for a
    file, even a cached one, and nothing holds the first paint back.)"""
    lowered = text.lower()
    if "</" + tag in lowered or "<!--" in lowered:
        raise ValueError(f"the page's inline {tag} must not contain </{tag} or <!--")
    return "\n" + text.strip("\n") + "\n"


def render_page(template, config, versions, script, style):
    """The page, with the stream's address and size, the address of each
    of its files carrying that file's version (C{versions}: template name to
    L{StaticBytes}), and C{script} and C{style} inline (already through
    L{inline})."""
    values = {
        "width": str(config.width),
        "height": str(config.height),
        "stream": STREAM_PATH,
    }
    values.update({name: part.version for name, part in versions.items()})
    escaped = {k: html.escape(v, quote=True) for k, v in values.items()}
    escaped.update(script=script, style=style)
    return Template(template).substitute(escaped).encode("utf-8")


def render_theme(config):
    # The colours were checked by the options: #rgb, #rrggbb or a name.
    return (f":root {{ --fg: {config.color}; --bg: {config.bgcolor}; }}\n").encode("ascii")


def make_site(config, stream_factory, stats=None, player=None, authenticator=None,
              reactor=None, hosts=None, pending=None, mpeg1_factory=None, snapshot=None,
              recordings=None):
    """The Site for C{config}; C{stream_factory} serves /stream (and
    C{mpeg1_factory}, if given, /stream?codec=mpeg1) and C{stats}
    (a L{pistreaming.stats.Stats}) /stats.json and /metrics.  With an
    C{authenticator} (pistreaming.auth), all of it needs credentials.
    C{hosts} (a L{pistreaming.hosts.HostPolicy}) is the names requests may
    be for (None: any); C{pending} (a
    L{pistreaming.admission.PendingConnections}) counts the connections
    that have not sent a whole request yet (None: not counted).
    C{snapshot} serves /snapshot.jpg and C{recordings} /recordings/ (each
    None: not served)."""
    if player is None:
        player = read_player()
    template = read_static("index.html").decode("utf-8")
    page_script, page_style, theme = (
        read_static("pistream.js"), read_static("pistream.css"), render_theme(config))
    player_js = StaticBytes(player, b"text/javascript; charset=utf-8")
    script = inline(page_script.decode("utf-8"), "script")
    style = inline((page_style + theme).decode("utf-8"), "style")
    pages = {
        b"jsmpg.js": player_js,
        b"index.html": StaticBytes(
            render_page(template, config, {"jsmpg_js": player_js}, script, style),
            b"text/html; charset=utf-8"),
    }
    if stats is not None:
        pages[b"stats.json"] = LiveDocument(
            stats_json(stats, protected=authenticator is not None), b"application/json")
        pages[b"metrics"] = LiveDocument(*metrics_text(stats))
    if snapshot is not None:
        pages[b"snapshot.jpg"] = snapshot
    trees = {b"recordings": recordings} if recordings is not None else {}
    root = Root(pages, Stream(stream_factory, mpeg1=mpeg1_factory), trees)
    if authenticator is not None:
        root = Gate(root, authenticator)
    kwargs = {"reactor": reactor} if reactor is not None else {}
    return Site(root, styles=b" " + csp_hash(style) + player_styles(player),
                scripts=b" " + csp_hash(script), hosts=hosts, pending=pending,
                timeout=IDLE_TIMEOUT, **kwargs)
