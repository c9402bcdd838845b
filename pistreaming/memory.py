"""Keeping the daemon's memory flat over months of viewers coming and going.

A viewer that leaves leaves its connection behind as reference cycles
(Twisted's HTTP channel and request, Autobahn's protocol, which holds itself
through its own is_closed Deferred, and the daemon's viewer state), and only
Python's cyclic garbage collector frees those.  Left to itself the collector
rarely makes a full pass here: the daemon creates few container objects, so
passes come tens of minutes apart, while hundreds of departed viewers pile up
(and then a pass walks every object the daemon has, tens of milliseconds on
a Raspberry Pi, with pictures waiting).

So once the daemon is up, what exists by then (the modules, the services:
what lives as long as the daemon) is frozen out of the collector's sight, and
a full pass runs every L{Collector.interval} seconds.  It walks only what came
since, takes a millisecond or two, and frees what departed viewers left.
"""

import gc

from twisted.application import service
from twisted.internet import task


class Collector(service.Service):
    """Freezes what the daemon is made of when it starts, then collects
    garbage every C{interval} seconds on C{reactor}'s clock."""

    name = "collector"
    interval = 30.0

    def __init__(self, reactor, gc=gc):
        self.reactor = reactor
        self.gc = gc
        self._loop = None
        self.passes = 0
        self.freed = 0

    def startService(self):
        super().startService()
        self.gc.collect()
        self.gc.freeze()
        self._loop = task.LoopingCall(self.collect)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def collect(self):
        freed = self.gc.collect()
        self.passes += 1
        self.freed += freed

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.gc.unfreeze()
