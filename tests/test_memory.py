"""The collector that keeps the daemon's memory flat (pistreaming.memory)."""

import gc
import weakref

from twisted.internet.task import Clock

from pistreaming.memory import Collector


class Node:
    pass


def test_what_the_daemon_is_made_of_is_frozen_while_it_runs():
    collector = Collector(Clock())
    collector.startService()
    try:
        assert gc.get_freeze_count() > 0
    finally:
        collector.stopService()
    assert gc.get_freeze_count() == 0


def test_a_cycle_left_behind_is_freed_at_the_next_pass():
    # What a departed viewer leaves: objects that only hold each other.
    # (The automatic collector is off here, so only the daemon's own pass
    # can free them.)
    clock = Clock()
    collector = Collector(clock)
    collector.startService()
    enabled = gc.isenabled()
    gc.disable()
    try:
        left = Node()
        left.me = left
        gone = weakref.ref(left)
        del left
        clock.advance(Collector.interval - 1)
        assert gone() is not None
        clock.advance(1)
        assert gone() is None
        assert collector.passes == 1 and collector.freed >= 1
    finally:
        if enabled:
            gc.enable()
        collector.stopService()


def test_no_pass_after_the_daemon_stops():
    clock = Clock()
    collector = Collector(clock)
    collector.startService()
    collector.stopService()
    clock.advance(10 * Collector.interval)
    assert collector.passes == 0
    assert not clock.getDelayedCalls()
