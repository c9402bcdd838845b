"""Session-wide set-up: the daemons the tests start hear Ctrl+C, and none of
them outlives the test run; fixtures for a module's shared daemon and browser."""

import signal

import pytest

from tests.daemon import Daemon

# A shell that starts a command in the background (``./dev test &``, nohup,
# some CI runners) has it ignore SIGINT, and an ignored signal stays ignored
# in every program it starts: twistd would then leave Ctrl+C alone, as
# Twisted does when SIGINT is ignored, and the Ctrl+C tests would fail for
# reasons of the shell's, not the daemon's.  With a handler here, the
# daemons get SIGINT's default, as they do under a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def no_daemon_left_behind():
    yield
    for daemon in Daemon.started:
        daemon.kill()


@pytest.fixture(scope="module")
def default_daemon():
    """One daemon of the default configuration (640x480 at 24 fps, the test
    pattern) for a module's tests that only watch it; a test that changes
    or stops its daemon starts its own."""
    with Daemon() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (tests/browser.py) for a module's tests; each test
    opens its own context and pages in it."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.browser import launch
    with sync_api.sync_playwright() as playwright:
        chromium = launch(playwright)
        try:
            yield chromium
        finally:
            chromium.close()
