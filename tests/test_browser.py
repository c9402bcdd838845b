"""What a person sees: the page from the running daemon, in headless Chromium.

The canvas must show a picture (the test pattern's colour bars), the picture
must change over time, keep its aspect on a phone-sized screen, and come back
by itself when the daemon restarts.

One browser serves the module (tests/conftest.py), each test in a context of
its own; the tests that only watch (or kill ffmpeg, which the daemon
restarts) share one daemon of the default configuration (640x480 at 24 fps),
and those that stop, freeze or reconfigure it start their own.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import ImageChops, ImageStat
import websocket

from tests.browser import picture
from tests.daemon import ROOT, Daemon
from tests.test_stream import (
    ffmpeg_children, pictures_in, read_header, stream_goes_quiet, stream_has_a_start)

pytestmark = pytest.mark.browser

BACKGROUND = (0x33, 0x33, 0x33)  # the page's default --bgcolor


def open_page(browser, url, init="", **context):
    """A new context and page on C{url}; what the page says on its console
    (errors and warnings) and its uncaught errors are kept in
    C{page.complaints}."""
    ctx = browser.new_context(**context)
    if init:
        ctx.add_init_script(init)
    page = ctx.new_page()
    page.complaints = []
    page.on("console", lambda m: m.type in ("error", "warning")
            and page.complaints.append(f"console {m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.complaints.append(f"page error: {e}"))
    page.set_default_timeout(15_000)
    page.goto(url)
    return ctx, page


def wait_for_pictures(page, more_than, timeout=15_000):
    page.wait_for_function(f"() => window.pistream && window.pistream.frames > {more_than}",
                           timeout=timeout)


def test_the_page_shows_a_live_picture_that_changes(browser, default_daemon):
    daemon = default_daemon
    ctx, page = open_page(browser, daemon.base_url)  # "/" is the page itself
    try:
        assert page.locator("#status").inner_text() in ("connecting\u2026", "")
        wait_for_pictures(page, 10)
        assert page.locator("#status").is_hidden()
        # JSMpeg's WebAssembly decoder takes over (the page's policy allows it)
        page.wait_for_function("() => window.pistream.decoder === 'wasm'", timeout=10_000)
        state = page.evaluate("({w: window.pistream.width, h: window.pistream.height,"
                              " cw: document.getElementById('video').width,"
                              " url: window.pistream.url})")
        assert (state["w"], state["h"], state["cw"]) == (640, 480, 640)
        assert state["url"] == f"ws://127.0.0.1:{daemon.http_port}/stream"
        canvas = page.locator("#video")
        first = picture(canvas.screenshot())
        page.wait_for_function("() => window.pistream.frames > %d"
                               % (page.evaluate("window.pistream.frames") + 12))
        second = picture(canvas.screenshot())
    finally:
        ctx.close()
    # A picture, not a blank canvas: the six colour bars are there.
    assert max(ImageStat.Stat(first).stddev) > 20
    w, h = first.size
    bars = [first.getpixel((int((i + 0.5) * w / 6), int(h * 0.6))) for i in range(6)]
    assert len({tuple(c // 32 for c in bar) for bar in bars}) >= 5, bars
    # And it moves.
    diff = ImageChops.difference(first, second)
    assert max(ImageStat.Stat(diff).mean) > 2, ImageStat.Stat(diff).mean


def test_the_page_plays_without_an_error_or_warning_in_its_console(browser, default_daemon):
    """Nothing for a person who opens the browser's console to worry about:
    no script error, and no policy violation (the player script's own style
    is allowed by its hash, nothing else is inline), through a second of
    pictures and the switch to the WebAssembly decoder."""
    ctx, page = open_page(browser, default_daemon.base_url)
    try:
        wait_for_pictures(page, 24)
        page.wait_for_function("() => window.pistream.decoder === 'wasm'", timeout=10_000)
        complaints = list(page.complaints)
    finally:
        ctx.close()
    assert complaints == []


def test_a_page_opened_while_the_encoder_stands_still_decodes_all_of_its_start(browser):
    """The start the daemon sends a newcomer (an intra picture and what
    followed) is all decoded: the page shows its first picture before it
    decodes the rest, and loses none of it doing so."""
    with Daemon("--resolution", "640x480", "--framerate", "30") as daemon:
        (ffmpeg,) = ffmpeg_children(daemon)
        watcher = websocket.create_connection(f"ws://127.0.0.1:{daemon.http_port}/stream",
                                              timeout=10)
        try:
            read_header(watcher)
            stream_has_a_start(watcher)  # somewhere past the stream's first intra picture
            os.kill(ffmpeg, signal.SIGSTOP)  # nothing new comes out from here on
            stream_goes_quiet(watcher)  # what ffmpeg had written reached the daemon
        except BaseException:
            os.kill(ffmpeg, signal.SIGCONT)
            raise
        finally:
            watcher.close()
        try:
            ws = websocket.create_connection(f"ws://127.0.0.1:{daemon.http_port}/stream",
                                             timeout=10)
            try:
                read_header(ws)
                # the starting point on its own, then what followed it
                ws.settimeout(1.0)
                messages = [ws.recv(), ws.recv()]
            finally:
                ws.close()
            counts = [pictures_in(m) for m in messages]
            assert counts[0] == 1 and counts[1] >= 1
            pictures = sum(counts)
            ctx, page = open_page(browser, daemon.base_url)
            try:
                # Every one of them (the last one at least once the next
                # begins, should the demuxer wait for that).
                wait_for_pictures(page, pictures - 2)
                assert page.evaluate("window.pistream.drawn") >= 1
                assert page.evaluate("window.pistream.state") == "playing"
                assert page.evaluate("window.pistream.frames") in (pictures - 1, pictures)
            finally:
                ctx.close()
        finally:
            os.kill(ffmpeg, signal.SIGCONT)


def test_without_webassembly_the_javascript_decoder_plays(browser, default_daemon):
    """A browser without WebAssembly (or one whose policy refuses it) gets
    the picture all the same, from JSMpeg's JavaScript decoder."""
    ctx, page = open_page(browser, default_daemon.base_url, init="delete window.WebAssembly;")
    try:
        wait_for_pictures(page, 24)
        assert page.evaluate("window.pistream.decoder") == "js"
        assert page.evaluate("window.pistream.player.wasm") == "none"
    finally:
        ctx.close()


# The test pattern's bars, left to right, as which of red, green and blue
# stand out in each.
BARS = [("red",), ("blue",), ("green",), ("red", "blue"), ("red", "green"), ("green", "blue")]

BAR_COLOURS = """() => {
  const canvas = document.getElementById('video');
  const w = canvas.width, h = canvas.height;
  const data = canvas.getContext('2d').getImageData(0, 0, w, h).data;
  const median = (v) => v.sort((a, b) => a - b)[v.length >> 1];
  const bars = [];
  for (let bar = 0; bar < 6; bar++) {
    const r = [], g = [], b = [];
    for (let y = Math.round(h * 0.3); y < h * 0.75; y += 2) {
      for (let x = Math.round((bar + 0.25) * w / 6); x < (bar + 0.75) * w / 6; x += 2) {
        const o = (y * w + x) * 4;
        r.push(data[o]); g.push(data[o + 1]); b.push(data[o + 2]);
      }
    }
    bars.push([median(r), median(g), median(b)]);
  }
  return bars;
}"""


def standing_out(rgb):
    names = ("red", "green", "blue")
    low = min(rgb)
    return tuple(n for n, v in zip(names, rgb) if v - low > 60)


@pytest.mark.parametrize("init,renderer", [
    ("", "canvas2d (VideoFrame)"),
    ("delete window.VideoFrame;", "canvas2d"),  # JSMpeg's renderer
])
def test_the_2d_canvas_shows_the_colours_right(browser, default_daemon, init, renderer):
    """Without a GPU the page draws with the 2D canvas: the browser converts
    the decoder's planes (WebCodecs' VideoFrame), or, where it cannot,
    JSMpeg's renderer does; either way the bars come out in their colours
    (the chroma planes in their places)."""
    ctx, page = open_page(browser, default_daemon.base_url, init=init)
    try:
        wait_for_pictures(page, 10)
        assert page.evaluate("window.pistream.renderer").split(" (software")[0] == renderer
        bars = page.evaluate(BAR_COLOURS)
    finally:
        ctx.close()
    assert [standing_out(rgb) for rgb in bars] == [tuple(sorted(
        names, key=("red", "green", "blue").index)) for names in BARS], bars


def test_on_a_phone_the_picture_fills_the_width_and_keeps_its_aspect(browser, default_daemon):
    ctx, page = open_page(browser, default_daemon.base_url + "index.html",
                          viewport={"width": 390, "height": 844},
                          device_scale_factor=1, is_mobile=True, has_touch=True)
    try:
        wait_for_pictures(page, 5)
        shot = picture(page.screenshot())
    finally:
        ctx.close()
    width, height = shot.size
    assert (width, height) == (390, 844)
    rows = [y for y in range(height)
            if any(shot.getpixel((x, y)) != BACKGROUND for x in range(0, width, 13))]
    top, bottom = rows[0], rows[-1]
    # 640x480 scaled to 390 wide is 292.5 high, centred.
    assert abs((bottom - top + 1) - 292.5) <= 3, (top, bottom)
    assert abs((top + bottom) / 2 - height / 2) <= 3, (top, bottom)
    columns = [x for x in range(width) if shot.getpixel((x, height // 2)) != BACKGROUND]
    assert columns[0] <= 1 and columns[-1] >= width - 2


def restart_on(port, seconds=10):
    """A daemon on C{port} again (the port may take a moment to be free)."""
    deadline = time.monotonic() + seconds
    while True:
        daemon = Daemon("--http", f"tcp:{port}:interface=127.0.0.1", "--ws-port", "off",
                        start_timeout=5)
        try:
            return daemon.start()
        except AssertionError:
            daemon.stop()
            if time.monotonic() > deadline:
                raise


#: Notes every text the page's status line shows ("" while it is hidden) in
#: window.statusShown, so that a test can see what was shown in between.
STATUS_HISTORY = """
document.addEventListener('DOMContentLoaded', () => {
  const status = document.getElementById('status');
  window.statusShown = [];
  new MutationObserver(() => window.statusShown.push(status.hidden ? '' : status.textContent))
    .observe(status, {attributes: true, childList: true, characterData: true, subtree: true});
});
"""


def test_the_page_comes_back_by_itself_after_the_daemon_restarts(browser):
    first = Daemon("--ws-port", "off").start()
    port = first.http_port
    ctx = None
    try:
        ctx, page = open_page(browser, first.base_url, init=STATUS_HISTORY)
        wait_for_pictures(page, 5)
    finally:
        first.stop()
    try:
        before = page.evaluate("window.pistream.frames")
        # Back at once: the page tries again 0.5, 1.5, 3.5... s after the
        # close, and says so meanwhile (it may be back before we look).
        second = restart_on(port)
        try:
            wait_for_pictures(page, before + 5, timeout=15_000)
            assert page.evaluate("window.pistream.connects") >= 2
            assert page.locator("#status").is_hidden()
            shown = page.evaluate("window.statusShown")
            assert "reconnecting\u2026" in shown, shown
            assert shown[-1] == "", shown
        finally:
            second.stop()
    finally:
        if ctx is not None:
            ctx.close()


def test_the_picture_comes_back_after_ffmpeg_is_killed_without_a_reload(browser, default_daemon):
    daemon = default_daemon  # it restarts ffmpeg by itself: the daemon stays fit to share
    ctx, page = open_page(browser, daemon.base_url)
    try:
        wait_for_pictures(page, 10)
        (ffmpeg,) = ffmpeg_children(daemon)
        mark = len(daemon.lines)
        os.kill(ffmpeg, signal.SIGKILL)
        daemon.wait_for(r"encoder process: ffmpeg pid", 10, start=mark)
        before = page.evaluate("window.pistream.frames")
        wait_for_pictures(page, before + 24)  # a second of pictures, on the same page
        assert page.evaluate("window.pistream.connects") == 1
        assert page.locator("#status").is_hidden()
    finally:
        ctx.close()


#: The camera service's stall timeout (4 s) has no option: the daemon of the
#: stall test has it at 1 s, so that the test waits for the page, not the clock.
SHORT_STALL = ("from pistreaming.camera.service import CameraService\n"
               "assert CameraService.stall_timeout > 1.0, 'no stall_timeout to shorten'\n"
               "CameraService.stall_timeout = 1.0")


def test_a_camera_that_stops_is_shown_as_unavailable_then_comes_back(browser):
    fakes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")
    env = {"PYTHONPATH": fakes, "FAKE_PICAMERA": "stall-after:48"}
    with Daemon("--framerate", "24", camera="picamera", env=env, prelude=SHORT_STALL) as daemon:
        ctx, page = open_page(browser, daemon.base_url)
        try:
            wait_for_pictures(page, 5)
            # 2 s of frames, then nothing: after the stall timeout the daemon
            # says so, and the page shows it instead of a frozen picture.
            page.wait_for_function("() => window.pistream.camera === 'unavailable'", timeout=15_000)
            assert page.locator("#status").inner_text() == "camera unavailable\u2026"
            assert page.evaluate("document.body.classList.contains('stale')")
            daemon.wait_for(r"camera picamera: no frame for [\d.]+s; retrying in 1.0s", 5)
            # The camera is opened again and delivers: the picture is live again.
            page.wait_for_function("() => window.pistream.camera === 'ok'", timeout=15_000)
            page.wait_for_function("() => window.pistream.state === 'playing'", timeout=5_000)
            assert page.locator("#status").is_hidden()
        finally:
            ctx.close()


def test_the_overlay_shows_rate_bit_rate_and_viewers(browser, default_daemon):
    # (The pages of the tests before have closed: this one is the only viewer.)
    ctx, page = open_page(browser, default_daemon.base_url)
    try:
        wait_for_pictures(page, 10)
        assert page.locator("#overlay").is_hidden()
        page.keyboard.press("s")
        overlay = page.locator("#overlay")
        page.wait_for_function(
            "() => /fps/.test(document.getElementById('overlay').textContent) && "
            "window.pistream.viewers === 1", timeout=5_000)
        # once two seconds of pictures are in its window, about 24 fps
        page.wait_for_function(
            "() => parseFloat(document.getElementById('overlay').textContent"
            ".split('\\n')[1]) >= 20", timeout=10_000)
        lines = overlay.inner_text().splitlines()
        assert lines[0] == "640\u00d7480"
        fps = float(lines[1].split()[0])
        assert 20 <= fps <= 28, lines
        assert lines[2].endswith("kbit/s") and int(lines[2].split()[0]) > 100
        assert lines[3] == "1 viewer"
        page.keyboard.press("s")
        assert overlay.is_hidden()
    finally:
        ctx.close()


def test_past_max_viewers_the_page_says_the_camera_is_busy(browser):
    with Daemon("--max-viewers", "1") as daemon:
        first = websocket.create_connection(f"ws://127.0.0.1:{daemon.http_port}/stream",
                                            timeout=10)
        try:
            ctx, page = open_page(browser, daemon.base_url)
            try:
                page.wait_for_function(
                    "() => document.getElementById('status').textContent.startsWith('camera busy')",
                    timeout=10_000)
                assert page.locator("#status").inner_text() == \
                    "camera busy: too many viewers (1 at most)\u2026"
            finally:
                ctx.close()
        finally:
            first.close()


def test_with_a_password_the_browser_asks_once_and_plays(browser, tmp_path):
    path = tmp_path / "passwd"
    subprocess.run([sys.executable, "-m", "pistreaming.passwd", "--stdin", str(path), "ann"],
                   input="pw for ann\n", text=True, check=True, timeout=60,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    with Daemon("--passwd", str(path)) as daemon:
        # The browser sends the credentials the person typed for the page with
        # every request of the page, the WebSocket handshake included.
        ctx, page = open_page(browser, daemon.base_url,
                              http_credentials={"username": "ann", "password": "pw for ann"})
        try:
            wait_for_pictures(page, 10)
        finally:
            ctx.close()
        ctx = browser.new_context(http_credentials={"username": "ann", "password": "wrong"})
        try:
            page = ctx.new_page()
            response = page.goto(daemon.base_url + "index.html")
            assert response.status == 401
        finally:
            ctx.close()
