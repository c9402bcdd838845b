"""H.264 through Media Source Extensions, and the page's choice of path.

The page at http://pistream.test (Chromium maps the name to 127.0.0.1) is
no secure context, so the browser has no WebCodecs there: the page plays
the H.264 stream on a <video> through MSE.  Where the browser has neither,
the page asks for MPEG-1 (the stream's address with ?codec=mpeg1) and plays
it with JSMpeg.  The stream comes from tests/h264_page_server.py (the real
page; a prepared libx264 stream at its real frame rate, and an MPEG-1 one
beside it), so that each test can put the stream where it needs it.
Safari cannot run here: its shape (ManagedMediaSource and no MediaSource)
is made in Chromium by an init script.

Every wait is Playwright's wait_for_function, bounded.
"""

import pytest
from PIL import ImageChops, ImageStat

from tests.browser import picture
from tests.test_browser import STATUS_HISTORY, open_page, wait_for_pictures
from tests.test_browser_h264 import (  # noqa: F401 (fixtures)
    BUSY, HIDE, INSECURE_HOST, browser, keyframe_lines, server, state, wait_for_drawn)

pytestmark = pytest.mark.browser

#: Every picture shown, in window.shownAt as [when (performance.now()),
#: how old (ms since its capture, or null), the id of the element it is on,
#: seconds buffered].  window.resumedAt: set by BUSY.
SHOWN_AT = """
(() => {
  window.shownAt = [];
  window.resumedAt = null;
  let value;
  Object.defineProperty(window, 'pistream', {
    configurable: true,
    get() { return value; },
    set(v) {
      value = v;
      v.onpicture = (p) => window.shownAt.push(
        [p.drawn, p.captured ? Date.now() - p.captured : null, p.element.id, v.buffered]);
    },
  });
})();
"""

#: Whether, since the page was resumed, a picture less than 150 ms old was shown.
LIVE_AGAIN = """() => window.resumedAt !== null &&
  window.shownAt.some(([t, age]) => t > window.resumedAt && age !== null && age < 150)"""

#: Whether the server has no viewer left, as last asked from the page (a
#: predicate for wait_for_function with polling: it asks again each time;
#: an async predicate would not be awaited there).
VIEWERS_GONE = """() => {
  fetch('/control/state').then((r) => r.json()).then((s) => { window.viewersNow = s.viewers; });
  return window.viewersNow === 0;
}"""

NO_WEBCODECS_NO_MSE = """
delete window.VideoDecoder;
delete window.MediaSource;
delete window.ManagedMediaSource;
"""

#: What Safari on an iPhone (iOS 17.1 and later) offers: ManagedMediaSource
#: and no MediaSource (here Chromium's own MediaSource under that name).
SAFARI = """
window.ManagedMediaSource = window.MediaSource;
delete window.MediaSource;
"""


def insecure(server):
    return server.url(host=INSECURE_HOST)


def overlay_lines(page, pattern):
    page.wait_for_function(
        f"() => /{pattern}/.test(document.getElementById('overlay').textContent)",
        timeout=10_000)
    return page.locator("#overlay").inner_text().splitlines()


def test_the_page_plays_h264_through_mse_where_it_is_no_secure_context(browser, server):
    ctx, page = open_page(browser, insecure(server) + "#stats", init=SHOWN_AT)
    try:
        wait_for_drawn(page, 10)
        assert not page.evaluate("window.isSecureContext")
        assert state(page, "codec", "decoder", "path", "pathWhy", "width", "height", "state") == \
            ["h264", "MSE", "mse", "not a secure context", 320, 240, "playing"]
        assert page.locator("#live").is_visible()
        assert page.locator("#video").is_hidden()
        assert page.evaluate("document.getElementById('live').videoWidth") == 320
        live = page.locator("#live")
        first = picture(live.screenshot())
        drawn = page.evaluate("window.pistream.drawn")
        wait_for_drawn(page, drawn + 15)
        second = picture(live.screenshot())
        lines = overlay_lines(page, "keyframes every \\d")
        intervals = keyframe_lines(server)
        shown = page.evaluate("window.shownAt")
        complaints = list(page.complaints)
    finally:
        ctx.close()
    # testsrc2's picture, and it moves.
    assert max(ImageStat.Stat(first).stddev) > 20
    assert max(ImageStat.Stat(ImageChops.difference(first, second)).mean) > 1
    # The interval between the last two keyframes' capture times, as the
    # stand-in server sent them.
    assert lines[4] == "H.264 Constrained Baseline, level 1.3", lines
    assert lines[5] in intervals, (lines, intervals)
    assert lines[6] == "MSE: not a secure context", lines
    assert lines[7].startswith("lag "), lines
    # Each picture is told with the element it is on and its capture time.
    assert {element for _, _, element, _ in shown} == {"live"}, shown
    assert all(age is not None and 0 <= age < 1000 for _, age, _, _ in shown), shown
    assert complaints == []


def test_the_page_keeps_to_the_live_edge(browser, server):
    """Frozen for 3 s (a busy machine), the page shows a live picture
    soon after it runs again; over 4 s after, what it shows stays
    live and the <video>'s buffer stays small (bench/latency soaks longer)."""
    ctx, page = open_page(browser, insecure(server), init=SHOWN_AT)
    try:
        wait_for_drawn(page, 10)
        page.evaluate(BUSY, 3000)
        page.wait_for_function(LIVE_AGAIN, timeout=5_000)
        live = page.evaluate("window.shownAt.find(([t, age]) => t > window.resumedAt && "
                             "age !== null && age < 150)[0] - window.resumedAt")
        since = page.evaluate("window.shownAt.length")
        start = page.evaluate("performance.now()")
        page.wait_for_function(f"() => performance.now() - {start} > 4000",
                               polling=1000, timeout=20_000)
        shown = page.evaluate(f"window.shownAt.slice({since})")
        seeks, resets = state(page, "seeks", "resets")
    finally:
        ctx.close()
    # Live again means a jump, and a jump decodes from the keyframe before
    # it (up to a 2 s group of pictures); what arrived meanwhile is jumped
    # to, or made up by playing faster.  At most 120 ms in 27 runs beside
    # the whole suite; bench/latency measures it alone (5-48 ms).
    assert live < 1000, live
    assert len(shown) > 4 * 25, len(shown)  # 30 fps, a few lost at most
    ages = sorted(age for _, age, _, _ in shown)
    median, p95 = ages[len(ages) // 2], ages[int(len(ages) * 0.95)]
    assert median < 100 and p95 < 200, (median, p95)
    # (What piled up in the freeze goes from the buffer within a second.)
    buffered = [b for t, _, _, b in shown if t > start + 1000 and b is not None]
    assert buffered and max(buffered) < 4.5, max(buffered)
    assert resets == 0 and seeks >= 1, (seeks, resets)


#: Every playback rate the page sets on a <video>, in window.rates.
RATES = """
(() => {
  window.rates = [];
  const rate = Object.getOwnPropertyDescriptor(HTMLMediaElement.prototype, 'playbackRate');
  Object.defineProperty(HTMLMediaElement.prototype, 'playbackRate', {
    configurable: true,
    get() { return rate.get.call(this); },
    set(v) { window.rates.push(v); rate.set.call(this, v); },
  });
})();
"""


def test_a_short_stall_is_made_up_by_playing_faster(browser, server):
    """Frozen for 0.3 s, too little to jump, the page plays faster than
    the camera until it is live again: within a second, not the 2 s that
    a tenth faster would take."""
    ctx, page = open_page(browser, insecure(server), init=SHOWN_AT + RATES)
    try:
        wait_for_drawn(page, 10)
        page.wait_for_function("() => window.pistream.lag !== null && window.pistream.lag < 0.1",
                               timeout=5_000)
        seeks = page.evaluate("window.pistream.seeks")
        page.evaluate("window.rates = []")
        page.evaluate(BUSY, 300)
        page.wait_for_function(LIVE_AGAIN, timeout=5_000)
        live = page.evaluate("window.shownAt.find(([t, age]) => t > window.resumedAt && "
                             "age !== null && age < 150)[0] - window.resumedAt")
        page.wait_for_function("() => window.pistream.rate === 1.05", timeout=5_000)
        after, rates = page.evaluate("[window.pistream.seeks, window.rates]")
    finally:
        ctx.close()
    assert after == seeks, (seeks, after)
    assert max(rates) >= 1.3 and rates[-1] == 1.05, rates
    assert live < 1000, live


#: The page lets go of the stream 10 s after its tab is hidden; here the
#: test does not wait those 10 s of real time: that one timer runs at 0.3 s.
SHORT_RELEASE = """
(() => {
  const setTimeoutAsIs = window.setTimeout;
  window.setTimeout = (f, ms, ...args) => setTimeoutAsIs(f, ms === 10000 ? 300 : ms, ...args);
})();
"""


def test_a_hidden_tab_lets_go_and_is_live_again_when_it_shows(browser, server):
    ctx, page = open_page(browser, insecure(server), init=SHORT_RELEASE + SHOWN_AT)
    try:
        wait_for_drawn(page, 10)
        page.evaluate(HIDE, True)
        page.wait_for_function(VIEWERS_GONE, polling=250, timeout=15_000)
        page.evaluate(HIDE, False)
        page.evaluate("window.resumedAt = performance.now()")
        page.wait_for_function(LIVE_AGAIN, timeout=5_000)
        live = page.evaluate("window.shownAt.find(([t, age]) => t > window.resumedAt && "
                             "age !== null && age < 150)[0] - window.resumedAt")
        assert state(page, "connects", "path", "state") == [2, "mse", "playing"]
    finally:
        ctx.close()
    # Live again means a new MediaSource fed from the keyframe the daemon
    # keeps and every picture since (up to a 2 s group), jumped to once it
    # is there.  At most 55 ms in 15 runs beside the whole suite;
    # bench/latency measures it alone: 75-300 ms (docs/benchmarks.rst).
    assert live < 1000, live


def test_a_change_of_size_starts_the_video_afresh(browser, server):
    ctx, page = open_page(browser, insecure(server), init=STATUS_HISTORY)
    try:
        wait_for_drawn(page, 10)
        for size, codecs in (("480x360", "avc1.42c01e"), ("320x240", "avc1.42c00d")):
            width, height = map(int, size.split("x"))
            server.control("resize", clip=size)
            page.wait_for_function(
                f"() => document.getElementById('live').videoWidth === {width} && "
                f"window.pistream.state === 'playing'", timeout=5_000)
            drawn = page.evaluate("window.pistream.drawn")
            wait_for_drawn(page, drawn + 10, timeout=5_000)
            assert state(page, "width", "height", "resets", "path") == [width, height, 0, "mse"]
            assert page.evaluate("window.pistream.stream.codecs") == codecs
            assert page.evaluate("document.getElementById('live').videoHeight") == height
        shown = page.evaluate("window.statusShown")
    finally:
        ctx.close()
    assert shown.count("stream changed: waiting for a keyframe\u2026") == 2, shown
    assert shown[-1] == "", shown


def test_the_page_comes_back_by_itself_when_the_connection_is_cut(browser, server):
    ctx, page = open_page(browser, insecure(server), init=STATUS_HISTORY)
    try:
        wait_for_drawn(page, 10)
        server.control("drop")
        page.wait_for_function("() => window.pistream.connects >= 2", timeout=5_000)
        drawn = page.evaluate("window.pistream.drawn")
        wait_for_drawn(page, drawn + 10, timeout=5_000)
        assert state(page, "path", "state") == ["mse", "playing"]
        assert page.locator("#status").is_hidden()
        assert page.locator("#live").is_visible() and page.locator("#video").is_hidden()
        shown = page.evaluate("window.statusShown")
    finally:
        ctx.close()
    assert "reconnecting\u2026" in shown, shown


def test_a_damaged_picture_is_got_over(browser, server):
    """Chromium's pipeline either conceals the damage or fails; either way
    the page plays on (from the next keyframe, on a fresh MediaSource,
    where it failed)."""
    ctx, page = open_page(browser, insecure(server), init=STATUS_HISTORY)
    try:
        wait_for_drawn(page, 10)
        keyframes = page.evaluate("window.pistream.keyframes")
        server.control("corrupt")  # answers once the damaged picture went out
        page.wait_for_function(f"() => window.pistream.keyframes > {keyframes}", timeout=5_000)
        drawn = page.evaluate("window.pistream.drawn")
        wait_for_drawn(page, drawn + 15, timeout=5_000)
        assert state(page, "state", "path") == ["playing", "mse"]
        assert page.locator("#status").is_hidden()
        resets, error = state(page, "resets", "error")
    finally:
        ctx.close()
    assert resets <= 1, (resets, error)


@pytest.mark.parametrize("host, why", [
    ("127.0.0.1", "this browser has neither WebCodecs nor Media Source Extensions"),
    (INSECURE_HOST, "this browser has no Media Source Extensions"),
])
def test_a_browser_with_neither_plays_mpeg1_with_jsmpeg(browser, server, host, why):
    """It asks for MPEG-1 from the start: no round trip for an H.264 stream
    it cannot play."""
    before = server.control("state")
    ctx, page = open_page(browser, server.url(host=host) + "#stats", init=NO_WEBCODECS_NO_MSE)
    try:
        wait_for_pictures(page, 10)
        wait_for_drawn(page, 10)
        assert state(page, "codec", "path", "pathWhy", "connects", "state") == \
            ["mpeg1", "mpeg1", why, 1, "playing"]
        assert page.evaluate("window.pistream.url").endswith("/stream?codec=mpeg1")
        assert page.locator("#video").is_visible()
        lines = overlay_lines(page, "JSMpeg")
        after = server.control("state")
    finally:
        ctx.close()
    assert after["h264_connects"] == before["h264_connects"]
    assert after["mpeg1_connects"] == before["mpeg1_connects"] + 1
    assert lines[4] == "MPEG-1: " + why, lines


def test_mse_without_this_profile_connects_again_for_mpeg1(browser, server):
    ctx, page = open_page(browser, insecure(server),
                          init="MediaSource.isTypeSupported = () => false;")
    try:
        wait_for_drawn(page, 10)
        assert state(page, "codec", "path", "pathWhy", "connects") == \
            ["mpeg1", "mpeg1", "MSE cannot play Constrained Baseline, level 1.3, avc1.42c00d", 2]
        assert page.evaluate("window.pistream.url").endswith("/stream?codec=mpeg1")
    finally:
        ctx.close()


def test_webcodecs_without_this_profile_hands_over_to_mse(browser, server):
    ctx, page = open_page(browser, server.url(), init="""
VideoDecoder.isConfigSupported = (config) => Promise.resolve({supported: false, config});
""")
    try:
        wait_for_drawn(page, 10)
        assert page.evaluate("window.isSecureContext")
        assert state(page, "codec", "decoder", "path", "pathWhy", "connects") == \
            ["h264", "MSE", "mse",
             "WebCodecs cannot decode Constrained Baseline, level 1.3, avc1.42c00d", 1]
    finally:
        ctx.close()


def test_the_safari_shape_plays_through_managed_media_source(browser, server):
    ctx, page = open_page(browser, insecure(server) + "#stats", init=SAFARI)
    try:
        wait_for_drawn(page, 10)
        assert state(page, "codec", "decoder", "path", "pathWhy", "state") == \
            ["h264", "ManagedMediaSource", "mse", "not a secure context", "playing"]
        assert page.evaluate("document.getElementById('live').disableRemotePlayback") is True
        lines = overlay_lines(page, "ManagedMediaSource")
    finally:
        ctx.close()
    assert "ManagedMediaSource: not a secure context" in lines, lines


def test_a_camera_with_no_mpeg1_for_this_browser_says_why_and_what_to_do(browser, server):
    """The one dead end: the page asks for MPEG-1 and the camera sends H.264
    all the same (it makes no MPEG-1 for such viewers)."""
    server.control("mpeg1", serve=0)
    try:
        ctx, page = open_page(browser, insecure(server), init=NO_WEBCODECS_NO_MSE)
        try:
            page.wait_for_function("() => window.pistream.state === 'no picture'",
                                   timeout=10_000)
            text = page.locator("#status").inner_text()
            # It lets go of the stream it cannot show (the server has no viewer).
            page.wait_for_function(VIEWERS_GONE, polling=100, timeout=5_000)
            assert state(page, "frames", "codec", "connects") == [0, "h264", 1]
            assert page.locator("#status").is_visible()
        finally:
            ctx.close()
    finally:
        server.control("mpeg1", serve=1)
    assert text.startswith("No picture: this camera sends H.264, which this browser cannot "
                           "play here (this browser has no Media Source Extensions)"), text
    assert "https" in text and "http://localhost" in text and "--codec mpeg1" in text, text


def test_the_daemon_with_codec_h264_plays_through_mse_and_mpeg1_made_on_demand(browser):
    """End to end, at a name that is no secure context: the daemon's H.264
    through MSE; and, for a browser with neither WebCodecs nor MSE, the
    MPEG-1 the daemon makes while such a viewer watches."""
    from tests.daemon import Daemon
    with Daemon("--codec", "h264", "--framerate", "30", "--keyframe-interval", "2",
                "--ws-port", "off", "--allow-host", INSECURE_HOST) as daemon:
        url = f"http://{INSECURE_HOST}:{daemon.http_port}/"
        ctx, page = open_page(browser, url, init=SHOWN_AT)
        try:
            wait_for_drawn(page, 30)
            assert state(page, "codec", "path", "pathWhy", "decoder", "width", "height",
                         "state", "resets") == \
                ["h264", "mse", "not a secure context", "MSE", 640, 480, "playing", 0]
            shown = page.evaluate("window.shownAt")
            complaints = list(page.complaints)
        finally:
            ctx.close()
        ctx, page = open_page(browser, url, init=NO_WEBCODECS_NO_MSE)
        try:
            wait_for_pictures(page, 10, timeout=20_000)
            assert state(page, "codec", "path", "connects", "state") == \
                ["mpeg1", "mpeg1", 1, "playing"]
            assert page.evaluate("window.pistream.url").endswith("/stream?codec=mpeg1")
        finally:
            ctx.close()
    assert complaints == []
    ages = sorted(age for _, age, _, _ in shown if age is not None)
    assert ages and ages[len(ages) // 2] < 200, ages
