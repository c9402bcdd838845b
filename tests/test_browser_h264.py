"""What a person sees of an H.264 stream: the page in headless Chromium.

The stream comes from tests/h264_page_server.py (the real page, and a
prepared libx264 stream in the H.264 stream format at its real frame rate),
so that each test can put the stream where it needs it: a newcomer in
mid-group, a damaged picture, a change of size, connections cut.  At
http://127.0.0.1 the page is a secure context and decodes with WebCodecs;
at http://pistream.test (Chromium maps the name to 127.0.0.1) it is not,
and plays through Media Source Extensions (tests/test_browser_mse.py).

Every wait is Playwright's wait_for_function, bounded.
"""

from decimal import ROUND_HALF_UP, Decimal

import pytest
from PIL import ImageChops, ImageStat

from tests.browser import CHROMIUM_ARGS, INSECURE_HOST, picture
from tests.h264_page_server import PageServer
from tests.test_browser import STATUS_HISTORY, open_page, wait_for_pictures

pytestmark = pytest.mark.browser



@pytest.fixture(scope="module")
def browser():
    """Headless Chromium as tests/browser.py launches it, with one more
    flag: pistream.test is 127.0.0.1, a name that is no secure context."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.browser import CHROMIUM
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS + [f"--host-resolver-rules=MAP {INSECURE_HOST} 127.0.0.1"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with PageServer(tmp_path_factory.mktemp("h264clips")) as server:
        yield server


def state(page, *names):
    return page.evaluate("(names) => names.map((n) => window.pistream[n])", list(names))


def keyframe_lines(server):
    """The overlay's "keyframes every N s" lines for the intervals between
    the keyframes the stand-in server sent last: their capture times are
    its clock when it sent them, 2 s apart give or take its ticks on a busy
    machine; the page's line is the one for the last two it received.
    (Rounded as the page's toFixed(1): half up, on the double's value.)"""
    times = server.control("state")["key_times"]
    return {"keyframes every " + str(Decimal((b - a) / 1e6).quantize(Decimal("0.1"), ROUND_HALF_UP))
            + " s" for a, b in zip(times, times[1:])}


def wait_for_drawn(page, more_than, timeout=15_000):
    page.wait_for_function(f"() => window.pistream && window.pistream.drawn > {more_than}",
                           timeout=timeout)


def test_the_page_plays_h264_through_webcodecs(browser, server):
    ctx, page = open_page(browser, server.url())
    try:
        wait_for_pictures(page, 30)
        wait_for_drawn(page, 10)
        assert page.evaluate("window.isSecureContext")
        assert state(page, "codec", "decoder", "width", "height", "state", "path", "pathWhy") == \
            ["h264", "WebCodecs", 320, 240, "playing", "webcodecs", ""]
        assert page.locator("#status").is_hidden()
        canvas = page.locator("#video")
        assert page.evaluate("document.getElementById('video').width") == 320
        first = picture(canvas.screenshot())
        drawn = page.evaluate("window.pistream.drawn")
        wait_for_drawn(page, drawn + 15)
        second = picture(canvas.screenshot())

        page.keyboard.press("s")
        page.wait_for_function(
            "() => /keyframes every \\d/.test(document.getElementById('overlay').textContent)",
            timeout=10_000)
        lines = page.locator("#overlay").inner_text().splitlines()
        intervals = keyframe_lines(server)
        complaints = list(page.complaints)
    finally:
        ctx.close()
    # testsrc2's picture, and it moves.
    assert max(ImageStat.Stat(first).stddev) > 20
    diff = ImageChops.difference(first, second)
    assert max(ImageStat.Stat(diff).mean) > 1, ImageStat.Stat(diff).mean
    assert lines[0] == "320\u00d7240"
    assert lines[3] == "1 viewer"
    # The interval between the last two keyframes' capture times, as sent.
    assert lines[4] == "H.264 Constrained Baseline, level 1.3", lines
    assert lines[5] in intervals, (lines, intervals)
    assert lines[6:] == ["WebCodecs"], lines
    assert complaints == []


def test_a_newcomer_in_mid_group_shows_a_picture_at_once(browser, server):
    """The server sends a newcomer the group's keyframe and the 40 pictures
    since, at once: the keyframe's picture is on the canvas within 300 ms
    of the stream message, the page catches up through them without ever
    counting itself behind (on a busy machine the next keyframe may come
    before they are all decoded, and overtake the rest), and it goes on
    live."""
    server.control("midgroup", at=40)
    ctx, page = open_page(browser, server.url())
    try:
        wait_for_drawn(page, 0)
        timing = page.evaluate("window.pistream.timing")
        wait_for_pictures(page, 40, timeout=5_000)
        frames = page.evaluate("window.pistream.frames")
        wait_for_pictures(page, frames + 15, timeout=5_000)
        assert state(page, "behind", "resets", "state") == [0, 0, "playing"]
    finally:
        ctx.close()
    assert timing["drawn"] - timing["stream"] < 300, timing


def test_a_damaged_picture_is_got_over_at_the_next_keyframe(browser, server):
    ctx, page = open_page(browser, server.url(), init=STATUS_HISTORY)
    try:
        wait_for_drawn(page, 10)
        keyframes, resets = state(page, "keyframes", "resets")
        server.control("corrupt")  # answers once the damaged picture went out
        # Chromium's decoder says so; the page starts afresh at the next keyframe.
        page.wait_for_function(f"() => window.pistream.resets > {resets}", timeout=5_000)
        page.wait_for_function(f"() => window.pistream.keyframes > {keyframes}", timeout=5_000)
        drawn = page.evaluate("window.pistream.drawn")
        wait_for_drawn(page, drawn + 15, timeout=5_000)
        assert state(page, "resets", "state") == [resets + 1, "playing"]
        assert page.locator("#status").is_hidden()
        shown = page.evaluate("window.statusShown")
    finally:
        ctx.close()
    assert "picture damaged: waiting for a keyframe\u2026" in shown, shown
    assert shown[-1] == "", shown


def test_a_change_of_size_reconfigures_the_decoder(browser, server):
    ctx, page = open_page(browser, server.url(), init=STATUS_HISTORY)
    try:
        wait_for_drawn(page, 10)
        for size, codecs in (("480x360", "avc1.42c01e"), ("320x240", "avc1.42c00d")):
            width, height = map(int, size.split("x"))
            server.control("resize", clip=size)
            page.wait_for_function(
                f"() => document.getElementById('video').width === {width} && "
                f"window.pistream.state === 'playing'", timeout=5_000)
            drawn = page.evaluate("window.pistream.drawn")
            wait_for_drawn(page, drawn + 10, timeout=5_000)
            assert state(page, "width", "height", "resets") == [width, height, 0]
            assert page.evaluate("window.pistream.stream.codecs") == codecs
            assert page.evaluate("document.getElementById('video').height") == height
        shown = page.evaluate("window.statusShown")
    finally:
        ctx.close()
    assert shown.count("stream changed: waiting for a keyframe\u2026") == 2, shown
    assert shown[-1] == "", shown


def test_the_page_comes_back_by_itself_when_the_connection_is_cut(browser, server):
    ctx, page = open_page(browser, server.url(), init=STATUS_HISTORY)
    try:
        wait_for_drawn(page, 10)
        server.control("drop")
        page.wait_for_function("() => window.pistream.connects >= 2", timeout=5_000)
        drawn = page.evaluate("window.pistream.drawn")
        wait_for_drawn(page, drawn + 5, timeout=5_000)
        assert page.locator("#status").is_hidden()
        shown = page.evaluate("window.statusShown")
    finally:
        ctx.close()
    assert "reconnecting\u2026" in shown, shown
    assert not any(text.startswith("stream changed") for text in shown), shown


#: A decoder three times too slow for the stream: the browser's own, with
#: each picture held back 100 ms before it goes in, one at a time (and its
#: queue of those held, as decodeQueueSize).  Every picture's lag (ms from
#: its arrival to its decoding) is kept in window.lags.
SLOW_DECODER = """
(() => {
  const Real = window.VideoDecoder;
  class SlowDecoder {
    constructor(init) {
      this.held = [];
      this.busy = false;
      this.generation = 0;
      this.real = new Real({
        output: (frame) => { this.busy = false; init.output(frame); this.next(); },
        error: init.error,
      });
    }
    get state() { return this.real.state; }
    get decodeQueueSize() { return this.held.length; }
    configure(config) { this.real.configure(config); }
    decode(chunk) { this.held.push(chunk); this.next(); }
    next() {
      if (this.busy || !this.held.length) return;
      this.busy = true;
      const chunk = this.held.shift(), generation = this.generation;
      setTimeout(() => { if (generation === this.generation) this.real.decode(chunk); }, 100);
    }
    reset() { this.generation++; this.held = []; this.busy = false; this.real.reset(); }
    close() { this.generation++; this.held = []; this.real.close(); }
    static isConfigSupported(config) { return Real.isConfigSupported(config); }
  }
  window.VideoDecoder = SlowDecoder;
  window.lags = [];
  let value;
  Object.defineProperty(window, 'pistream', {
    configurable: true,
    get() { return value; },
    set(v) { value = v; v.onpicture = (p) => window.lags.push(p.decoded - p.received); },
  });
})();
"""


def test_a_decoder_that_falls_behind_skips_to_the_next_keyframe(browser, server):
    """It gets no more pictures until the next keyframe once it is behind:
    what it shows stays within a second of what arrived, group after group
    (without the skipping, it would grow by four seconds a group)."""
    ctx, page = open_page(browser, server.url(), init=SLOW_DECODER)
    try:
        wait_for_drawn(page, 0)
        keyframes = page.evaluate("window.pistream.keyframes")
        page.wait_for_function(f"() => window.pistream.keyframes >= {keyframes + 2}",
                               timeout=10_000)
        drawn = page.evaluate("window.pistream.drawn")
        wait_for_drawn(page, drawn + 2, timeout=5_000)  # after the latest keyframe too
        skipped, behind, resets = state(page, "skipped", "behind", "resets")
        lags = page.evaluate("window.lags")
    finally:
        ctx.close()
    assert skipped > 20 and behind >= 1 and resets == 0, (skipped, behind, resets)
    assert max(lags) < 1000, lags


#: Every picture drawn, as [when, how old (ms since its capture)], in
#: window.drawnAt.
DRAWN_AT = """
(() => {
  window.drawnAt = [];
  window.resumedAt = null;
  let value;
  Object.defineProperty(window, 'pistream', {
    configurable: true,
    get() { return value; },
    set(v) {
      value = v;
      v.onpicture = (p) => window.drawnAt.push([p.drawn, Date.now() - p.captured]);
    },
  });
})();
"""

#: The page's main thread busy for C{ms} (a busy machine): nothing of the
#: page runs meanwhile.  When it is free again is kept in window.resumedAt.
BUSY = """(ms) => {
  const end = performance.now() + ms;
  while (performance.now() < end) { /* busy */ }
  window.resumedAt = performance.now();
}"""

#: Whether, since the page was resumed, a picture less than 100 ms old was drawn.
LIVE_AGAIN = """() => window.resumedAt !== null &&
  window.drawnAt.some(([t, age]) => t > window.resumedAt && age < 100)"""


def test_after_a_stall_the_page_is_live_again_at_once(browser, server):
    """A page that could not run for 2.5 s (a busy machine) gets what piled
    up at once when it can, a keyframe among it: it shows a live picture
    within half a second, not the backlog played out."""
    ctx, page = open_page(browser, server.url(), init=DRAWN_AT)
    try:
        wait_for_drawn(page, 10)
        page.evaluate(BUSY, 2500)
        page.wait_for_function(LIVE_AGAIN, timeout=5_000)
        live = page.evaluate("window.drawnAt.find(([t, age]) => t > window.resumedAt && "
                             "age < 100)[0] - window.resumedAt")
        assert page.evaluate("window.pistream.resets") == 0
    finally:
        ctx.close()
    assert live < 500, live


#: document.hidden as a hidden tab has it (headless pages are never hidden).
HIDE = """(hidden) => {
  Object.defineProperty(document, 'hidden', { configurable: true, get: () => hidden });
  Object.defineProperty(document, 'visibilityState',
                        { configurable: true, get: () => hidden ? 'hidden' : 'visible' });
  document.dispatchEvent(new Event('visibilitychange'));
}"""


def test_a_hidden_tab_decodes_but_draws_nothing(browser, server):
    ctx, page = open_page(browser, server.url())
    try:
        wait_for_drawn(page, 10)
        page.evaluate(HIDE, True)
        frames, drawn = state(page, "frames", "drawn")
        wait_for_pictures(page, frames + 15, timeout=5_000)
        assert page.evaluate("window.pistream.drawn") <= drawn + 1
        page.evaluate(HIDE, False)
        wait_for_drawn(page, drawn + 10, timeout=5_000)
    finally:
        ctx.close()


def test_the_mpeg1_page_names_its_codec_and_decoder_too(browser, default_daemon):
    """The daemon's MPEG-1 stream still plays (its first message is the jsmp
    header), and the overlay says what plays it."""
    ctx, page = open_page(browser, default_daemon.base_url + "#stats")
    try:
        wait_for_pictures(page, 10)
        page.wait_for_function("() => window.pistream.decoder === 'wasm'", timeout=10_000)
        page.wait_for_function(
            "() => /WebAssembly/.test(document.getElementById('overlay').textContent)",
            timeout=5_000)
        lines = page.locator("#overlay").inner_text().splitlines()
        assert state(page, "codec", "stream", "state", "path") == \
            ["mpeg1", None, "playing", "mpeg1"]
    finally:
        ctx.close()
    assert lines[0] == "640\u00d7480"
    assert lines[4:] == ["MPEG-1: the camera streams MPEG-1", "JSMpeg (WebAssembly)"], lines


def test_the_daemon_with_codec_h264_plays_in_the_page(browser):
    """End to end: the daemon's test pattern through libx264 in its ffmpeg,
    its H.264 stage and fan-out, to WebCodecs in the page at 127.0.0.1; a
    second page opened in mid-group shows its first picture at once."""
    from tests.daemon import Daemon
    with Daemon("--codec", "h264", "--framerate", "30", "--keyframe-interval", "2",
                "--ws-port", "off") as daemon:
        ctx, page = open_page(browser, daemon.base_url + "#stats")
        try:
            wait_for_drawn(page, 45)
            assert state(page, "codec", "decoder", "width", "height", "state", "profile") == \
                ["h264", "WebCodecs", 640, 480, "playing", "High"]
            canvas = page.locator("#video")
            first = picture(canvas.screenshot())
            drawn = page.evaluate("window.pistream.drawn")
            wait_for_drawn(page, drawn + 15)
            second = picture(canvas.screenshot())
            page.wait_for_function(
                "() => /WebCodecs/.test(document.getElementById('overlay').textContent)",
                timeout=10_000)
            complaints = list(page.complaints)
            # a newcomer, somewhere in the group of pictures
            late_ctx, late = open_page(browser, daemon.base_url)
            try:
                wait_for_drawn(late, 0)
                assert state(late, "codec", "behind", "resets") == ["h264", 0, 0]
            finally:
                late_ctx.close()
        finally:
            ctx.close()
    # the test pattern moves: two pictures half a second apart differ
    assert ImageStat.Stat(ImageChops.difference(first, second)).mean != [0, 0, 0]
    # and it is the test pattern, not a blank canvas
    assert max(ImageStat.Stat(first).stddev) > 20
    assert complaints == []
