"""Threads of lower priority, for the password hashing (the daemon's own
threads: tests/test_attacks.py, a wrong password's hash)."""

import errno
import os
import queue
import threading
import time

from twisted.logger import globalLogPublisher

from pistreaming.lowpriority import NICENESS, LowPriorityThreads


class ThreadReactor:
    """What the pool asks of a reactor: the calls its threads hand over,
    queued for the test's own thread to run (as a reactor's thread would)."""

    def __init__(self):
        self.calls = queue.Queue()

    def callFromThread(self, f, *args, **kwargs):
        self.calls.put((f, args, kwargs))

    def result(self, d, timeout=10.0):
        """Run the handed-over calls until C{d} fires; its result (or failure)."""
        deadline = time.monotonic() + timeout
        got = []
        d.addBoth(got.append)
        while not got:
            f, args, kwargs = self.calls.get(timeout=max(0.01, deadline - time.monotonic()))
            f(*args, **kwargs)
        return got[0]


def niceness():
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def pool_of(threads, reactor):
    pool = LowPriorityThreads(reactor, threads, "test-pool")
    pool.startService()
    return pool


def test_jobs_run_nicer_than_the_daemon_which_stays_as_it_was():
    before = niceness()
    reactor = ThreadReactor()
    pool = pool_of(1, reactor)
    try:
        # One thread: the second job finds it lowered already, not twice.
        first = reactor.result(pool.run(niceness))
        second = reactor.result(pool.run(niceness))
        assert reactor.result(pool.run(lambda a, b: a + b, 2, 3)) == 5
    finally:
        pool.stopService()
    assert first == second == min(19, before + NICENESS)
    assert niceness() == before


def test_a_refused_priority_runs_the_jobs_anyway_and_says_so_once(monkeypatch):
    def refuse(*args):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "setpriority", refuse)
    events = []
    globalLogPublisher.addObserver(events.append)
    reactor = ThreadReactor()
    pool = pool_of(2, reactor)
    try:
        results = [reactor.result(pool.run(lambda n=n: n * n)) for n in range(4)]
        while not reactor.calls.empty():
            f, args, kwargs = reactor.calls.get_nowait()
            f(*args, **kwargs)
    finally:
        pool.stopService()
        globalLogPublisher.removeObserver(events.append)
    assert results == [0, 1, 4, 9]
    said = [e for e in events if e.get("pool") == "test-pool"]
    assert len(said) == 1, said
    assert said[0]["log_level"].name == "warn"
    assert said[0]["why"] == "setpriority: Operation not permitted"


def test_a_failing_job_fails_its_deferred():
    reactor = ThreadReactor()
    pool = pool_of(1, reactor)
    try:
        failure = reactor.result(pool.run(lambda: 1 / 0))
    finally:
        pool.stopService()
    assert failure.check(ZeroDivisionError)
