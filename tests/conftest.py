"""Session-wide set-up: the daemons the tests start hear Ctrl+C, and none of
them outlives the test run."""

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
