"""The HTTP side: the viewer page, the player script, and the stream at /stream.

Routes (anything else is 404; methods other than GET and HEAD are 405):

    /              redirect to index.html
    /index.html    the viewer page, with the stream's path and size filled in
    /jsmpg.js      the JSMpeg player (from the npm registry, built in)
    /pistream.js   the page's own script
    /pistream.css  the page's style
    /stream        the WebSocket stream (same as the separate WebSocket port)
    /stats.json    the daemon's figures (pistreaming.stats), as JSON
    /metrics       the same figures in the Prometheus text format
"""

import html
import json
import os
from string import Template

from autobahn.twisted.resource import WebSocketResource
from twisted.web import resource, server

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PLAYER = os.path.join(STATIC, "jsmpg.js")

STREAM_PATH = "stream"


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
    """One fixed document.  GET and HEAD only; no children (so no listings)."""

    def __init__(self, body, content_type):
        super().__init__()
        self.body = body
        self.content_type = content_type

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        return self.body

    def render_HEAD(self, request):
        # The same headers as GET, Content-Length included, and no body.
        self.render_GET(request)
        request.setHeader(b"content-length", b"%d" % len(self.body))
        return b""


class LiveDocument(GetOnly):
    """A document made anew for each request (never cached)."""

    def __init__(self, produce, content_type):
        super().__init__()
        self.produce = produce
        self.content_type = content_type

    def render_GET(self, request):
        body = self.produce()
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body

    render_HEAD = render_GET


def stats_json(stats):
    return lambda: (json.dumps(stats.gather(), indent=1) + "\n").encode("utf-8")


def metrics_text(stats):
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    from pistreaming.metrics import StatsCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return (lambda: generate_latest(registry)), CONTENT_TYPE_LATEST.encode()


class RedirectToPage(GetOnly):
    def render_GET(self, request):
        # Relative, so that it works behind a reverse proxy under a prefix.
        request.setResponseCode(302)
        request.setHeader(b"location", b"index.html")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return b'<a href="index.html">index.html</a>\n'


class Root(resource.Resource):
    def __init__(self, pages, stream):
        super().__init__()
        self.pages = pages
        self.stream = stream
        self.redirect = RedirectToPage()

    def getChild(self, name, request):
        if name == b"":
            if request.postpath:  # "//something"
                return resource.NoResource()
            return self.redirect
        if name == STREAM_PATH.encode() and not request.postpath:
            return self.stream
        page = self.pages.get(name)
        if page is not None and not request.postpath:
            return page
        return resource.NoResource()

    def render(self, request):  # "/" itself never reaches here; getChild(b"") does.
        return resource.NoResource().render(request)


class Request(server.Request):
    """Adds the headers every response carries, and names no server version."""

    def render(self, resrc):
        self.setHeader(b"server", b"pistream")
        self.setHeader(b"x-content-type-options", b"nosniff")
        super().render(resrc)


def render_page(template, config):
    values = {
        "width": str(config.width),
        "height": str(config.height),
        "stream": STREAM_PATH,
        "color": config.color,
        "bgcolor": config.bgcolor,
    }
    escaped = {k: html.escape(v, quote=True) for k, v in values.items()}
    return Template(template).substitute(escaped).encode("utf-8")


def make_site(config, stream_factory, stats=None, player=None):
    """The Site for C{config}; C{stream_factory} serves /stream and C{stats}
    (a L{pistreaming.stats.Stats}) /stats.json and /metrics."""
    if player is None:
        player = read_player()
    template = read_static("index.html").decode("utf-8")
    pages = {
        b"index.html": StaticBytes(render_page(template, config), b"text/html; charset=utf-8"),
        b"jsmpg.js": StaticBytes(player, b"text/javascript; charset=utf-8"),
        b"pistream.js": StaticBytes(read_static("pistream.js"), b"text/javascript; charset=utf-8"),
        b"pistream.css": StaticBytes(read_static("pistream.css"), b"text/css; charset=utf-8"),
    }
    if stats is not None:
        pages[b"stats.json"] = LiveDocument(stats_json(stats), b"application/json")
        pages[b"metrics"] = LiveDocument(*metrics_text(stats))
    root = Root(pages, WebSocketResource(stream_factory))
    site = server.Site(root)
    site.requestFactory = Request
    site.displayTracebacks = False
    return site
