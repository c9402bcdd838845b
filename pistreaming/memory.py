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

from twisted.application.internet import TimerService


class Collector(TimerService):
    """Freezes what the daemon is made of when it starts, then collects
    garbage every C{interval} seconds on C{reactor}'s clock."""

    name = "collector"
    interval = 30.0

    def __init__(self, reactor, gc=gc, interval=None):
        super().__init__(self.interval if interval is None else interval, self._tick)
        self.clock = reactor
        self.gc = gc
        self._frozen = False
        self.passes = 0
        self.freed = 0

    def _tick(self):
        # The timer's first call comes as the service starts: it freezes.
        if not self._frozen:
            self.gc.collect()
            self.gc.freeze()
            self._frozen = True
        else:
            self.collect()

    def collect(self):
        freed = self.gc.collect()
        self.passes += 1
        self.freed += freed

    def stopService(self):
        stopped = super().stopService()
        if self._frozen:
            self.gc.unfreeze()
            self._frozen = False
        return stopped
