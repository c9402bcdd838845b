"""The camera service: a camera that stalls or hangs is given up, retried,
reported to viewers, and never holds up a stop.

Driven on a Clock, without threads: the service's thread pool is replaced
by one that only records what it is asked to run, and the test plays the
capture thread (it writes frames to the run's output, and says when the
run returns).  Calls from that "thread" to the reactor wait, as they do in
the daemon, until the test lets the reactor take them.
"""

from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pistreaming.camera import service as camera_service
from pistreaming.camera.service import CameraService
from tests.fakes.inmemory import RecordingPool, Source

FRAME = 64
#: A moment, exact in binary (so that times add up to the delays exactly).
TICK = 1 / 1024


class ThreadReactor(task.Clock):
    """A Clock whose callFromThread queues, as the reactor's does, until
    L{take} runs what threads handed over."""

    def __init__(self):
        super().__init__()
        self.from_threads = []

    def callFromThread(self, f, *args, **kwargs):
        self.from_threads.append((f, args, kwargs))

    def take(self):
        while self.from_threads:
            f, args, kwargs = self.from_threads.pop(0)
            f(*args, **kwargs)


class CameraServiceTests(unittest.TestCase):
    def setUp(self):
        RecordingPool.pools = []
        self.patch(camera_service, "ThreadPool", RecordingPool)
        self.reactor = ThreadReactor()
        self.frames = []
        self.states = []
        self.service = CameraService(
            Source(), FRAME, lambda frame, at: self.frames.append(frame), self.reactor,
            on_state=lambda s, why: self.states.append((s, why)))
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self):
        self.service.startService()
        (self.pool,) = RecordingPool.pools
        return self.pool.threads

    def logged_why(self):
        return [e["why"] for e in self.events if "why" in e][-1]

    def deliver(self, thread, count, number):
        """The camera delivers C{count} frames, each taken by the reactor
        before the next comes."""
        for _ in range(count):
            thread.frames(1, number)
            self.reactor.take()

    def advance(self, seconds, step=0.5):
        """Time passes; the reactor takes what threads handed over."""
        while seconds > 1e-9:
            now = min(step, seconds)
            self.reactor.advance(now)
            seconds -= now
            self.reactor.take()

    def test_a_stalled_camera_is_reported_given_up_and_retried(self):
        threads = self.start()
        first = threads[0]
        assert self.pool.started and first.output is self.service.output
        first.frames(1, 1)
        self.reactor.take()
        assert self.frames == [bytes([1]) * FRAME]
        assert self.states == [("ok", "")]
        # Frames for a second; then run 1 hangs: no frame for longer than the
        # stall timeout (4 s; the watch looks every half second).
        for _ in range(10):
            self.advance(0.1, 0.1)
            first.frames(1, 1)
            self.reactor.take()
        self.advance(4.0)
        assert self.states == [("ok", "")] and len(threads) == 1
        self.advance(0.5)
        # Viewers are told; the run is told to stop ...
        assert self.states[1] == ("unavailable", "no frame for 4.5s")
        assert first.stop.is_set() and not first.returned
        # ... and a second run starts a second later (the first retry delay),
        # though the first never returned.
        self.advance(0.5)
        assert len(threads) == 1
        self.advance(0.5)
        assert len(threads) == 2
        second = threads[1]
        assert second.output is not first.output and not second.stop.is_set()
        second.frames(1, 2)
        self.reactor.take()
        assert self.frames[-1] == bytes([2]) * FRAME
        assert self.states[-1] == ("ok", "")
        # Woken at last, the first run's late frames are ignored, and its end
        # changes nothing.
        count = len(self.frames)
        self.deliver(first, 3, 1)
        first.returns()
        self.reactor.take()
        for _ in range(20):  # the second run goes on
            self.advance(0.5)
            self.deliver(second, 1, 2)
        assert self.frames[count:] == [bytes([2]) * FRAME] * 20
        assert len(threads) == 2 and self.states[-1] == ("ok", "")
        assert self.service.failures == 0  # the camera works again: the backoff starts over

    def test_a_failing_camera_is_retried_later_and_later(self):
        threads = self.start()
        waits = []
        for attempt in range(7):
            threads[-1].fails(RuntimeError(f"Failed to start camera ({attempt})"))
            self.reactor.take()
            assert self.service.state == "unavailable"
            assert self.logged_why() == f"Failed to start camera ({attempt})"
            calls = self.reactor.getDelayedCalls()
            waits.append(min(c.getTime() for c in calls
                             if c.func == self.service._start_run) - self.reactor.seconds())
            started = len(threads)
            self.reactor.advance(waits[-1] - TICK)
            assert len(threads) == started
            self.reactor.advance(TICK)
            assert len(threads) == started + 1
        assert waits == [1.0, 2.0, 5.0, 10.0, 30.0, 30.0, 30.0]
        # viewers were told once (what changes is said, not each attempt)
        assert self.states == [("unavailable", "Failed to start camera (0)")]
        self.flushLoggedErrors(RuntimeError)
        # A run that ends by itself is given up too.
        threads[-1].frames(1, 9)
        self.reactor.take()
        assert self.states[-1] == ("ok", "") and self.service.failures == 0
        threads[-1].returns()
        self.reactor.take()
        assert self.states[-1] == ("unavailable", "the capture loop ended by itself")
        self.advance(1.0)
        assert len(threads) == 9

    def test_stop_does_not_wait_for_a_camera_stuck_in_its_driver(self):
        threads = self.start()
        self.deliver(threads[0], 3, 1)
        stopped = []
        self.service.stopService().addCallback(stopped.append)
        assert threads[0].stop.is_set()
        # The run does not return: the stop waits 1.5 s (stop_timeout), no more ...
        self.reactor.advance(1.5 - TICK)
        assert stopped == []
        self.reactor.advance(TICK)
        assert stopped == [None]
        # ... and the pool is not stopped (that would join the stuck thread),
        # whose threads are daemon threads: they cannot keep the process alive.
        assert not self.pool.stopped
        assert self.pool.threadFactory(target=lambda: None).daemon
        assert not self.reactor.getDelayedCalls()
        # Frames it still delivers go nowhere.
        self.deliver(threads[0], 2, 1)
        assert len(self.frames) == 3

    def test_stop_waits_for_a_camera_that_returns(self):
        threads = self.start()
        stopped = []
        self.service.stopService().addCallback(stopped.append)
        self.advance(0.5)
        assert stopped == []
        threads[0].returns()
        self.reactor.take()
        assert stopped == [None] and self.pool.stopped
        assert not self.reactor.getDelayedCalls()

    def test_frames_captured_and_dropped_count_across_runs(self):
        threads = self.start()
        # The reactor takes nothing while the camera delivers five frames:
        # two wait for it, three are dropped, not queued.
        threads[0].frames(5, 1)
        self.reactor.take()
        assert len(self.frames) == 2
        assert (self.service.frames_captured, self.service.frames_dropped) == (5, 3)
        self.advance(5.5)  # stalled (4.5 s without a frame): given up, and retried 1 s later
        assert len(threads) == 2
        threads[1].frames(4, 2)
        self.reactor.take()
        assert len(self.frames) == 4
        assert (self.service.frames_captured, self.service.frames_dropped) == (9, 5)
        assert self.service.frames_captured == len(self.frames) + self.service.frames_dropped
