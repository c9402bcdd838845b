"""Session-wide safety: no daemon started by a test outlives the test run."""

import pytest

from tests.daemon import Daemon


@pytest.fixture(autouse=True, scope="session")
def no_daemon_left_behind():
    yield
    for daemon in Daemon.started:
        daemon.kill()
