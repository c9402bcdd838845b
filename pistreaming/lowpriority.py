"""Threads for work that must not take the CPU from the stream.

Checking a password is a hash of 200,000 rounds (pistreaming.auth): about
50 ms of a core on a PC, several hundred on a Pi, on as many threads at
once as the authenticator lets hash (``CHECKS`` + ``RESERVED_CHECKS``).  At
the usual priority those threads share the cores evenly with the reactor
and ffmpeg, so a stranger sending wrong passwords (answered, as they must
be, each with a hash) slows every viewer's pictures: on two cores, four
hashes at once held a viewer's next picture up for half a second.

:class:`LowPriorityThreads` is a thread pool whose threads each lower their
own priority before their first job: nice +10 (Linux gives each thread a
niceness of its own), a tenth of the weight of a thread at 0 when both want
a core.  The hashing then takes what the stream leaves, and still goes on
on a machine whose cores the stream keeps busy.  Where a thread cannot
lower its priority (no per-thread niceness, or a system call filter that
refuses ``setpriority``: the Debian unit allows it) it runs as it is, and
the daemon says so once.
"""

import os
import sys
import threading

from twisted.application import service
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

#: How much nicer than the daemon the pool's threads are.
NICENESS = 10


def lower_thread_priority(by=NICENESS):
    """Make the calling thread C{by} nicer than it is (19 at most).  Returns
    None when done, else why not."""
    if not sys.platform.startswith("linux") or not hasattr(threading, "get_native_id"):
        return "no per-thread niceness on this system"
    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + by))
    except OSError as e:
        return f"setpriority: {e.strerror or e}"
    return None


class LowPriorityThreads(service.Service):
    """Up to C{maxthreads} threads at a lower priority, started and stopped
    with the service; C{run(f, *args)} calls C{f(*args)} on one of them and
    returns a Deferred of its result, fired in the reactor's thread."""

    def __init__(self, reactor, maxthreads, name, niceness=NICENESS):
        self.reactor = reactor
        self.name = name
        self.niceness = niceness
        self.pool = ThreadPool(0, maxthreads, name)
        self._local = threading.local()
        self._refused = False

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()

    def run(self, f, *args):
        return deferToThreadPool(self.reactor, self.pool, self._lowered, f, *args)

    def _lowered(self, f, *args):
        if not getattr(self._local, "lowered", False):
            self._local.lowered = True
            why = lower_thread_priority(self.niceness)
            if why is not None and not self._refused:
                self._refused = True
                self.reactor.callFromThread(
                    log.warn, "{pool} threads run at the daemon's own priority: {why}",
                    pool=self.name, why=why)
        return f(*args)
