"""The camera service: a camera that stalls or hangs is given up, retried,
reported to viewers, and never holds up a stop."""

import threading

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from pistreaming.camera.service import CameraService
from tests.helpers import wait_until, with_timeout

FRAME = 64


class ScriptedSource:
    """A frame source whose runs do what the test says: deliver frames, then
    (for runs listed in C{hang}) hang without looking at the stop flag until
    released, as a camera stuck in its driver would."""

    name = "scripted"
    framerate = 50

    def __init__(self, frames_per_run, hang=()):
        self.frames_per_run = frames_per_run
        self.hang = set(hang)
        self.release = threading.Event()
        self.runs = 0
        self.threads = []

    def describe(self):
        return "a scripted source"

    def run(self, output, stopping):
        self.runs += 1
        number = self.runs
        self.threads.append(threading.current_thread())
        for i in range(self.frames_per_run):
            if stopping.wait(0.02):
                return
            output.write(bytes([number]) * FRAME)
        if number in self.hang:
            self.release.wait(30)  # ignores `stopping`
            for _ in range(3):  # and, woken, still delivers a few frames
                output.write(bytes([number]) * FRAME)
            return
        stopping.wait(30)


class CameraServiceTests(unittest.TestCase):
    timeout = 30

    def start(self, source):
        self.frames = []
        self.states = []
        service = CameraService(source, FRAME, lambda frame, at: self.frames.append(frame),
                                reactor, on_state=lambda s, why: self.states.append((s, why)))
        service.stall_timeout = 0.4
        service.watch_interval = 0.05
        service.retry_delays = (0.1, 0.2)
        service.stop_timeout = 0.5
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.addCleanup(source.release.set)
        return service

    @defer.inlineCallbacks
    def test_a_stalled_camera_is_reported_given_up_and_retried(self):
        source = ScriptedSource(frames_per_run=10, hang={1})
        service = self.start(source)
        yield wait_until(lambda: self.frames, 5, what="frames")
        assert self.states == [("ok", "")]
        # Run 1 delivers its frames, then hangs: no frame for longer than the
        # stall timeout.  Viewers are told, and a second run is started even
        # though the first never returned.
        yield wait_until(lambda: any(s == "unavailable" for s, _ in self.states), 5,
                         what="the stall noticed")
        state, why = self.states[1]
        assert why.startswith("no frame for ")
        yield wait_until(lambda: source.runs == 2 and self.frames[-1] == bytes([2]) * FRAME,
                         5, what="frames of the second run")
        assert self.states[-1] == ("ok", "")
        # Woken at last, the first run's late frames are ignored.
        count = len(self.frames)
        source.release.set()
        yield task.deferLater(reactor, 0.2, lambda: None)
        assert bytes([1]) * FRAME not in self.frames[count:]
        assert service.failures == 0  # the camera works again: the backoff starts over

    @defer.inlineCallbacks
    def test_stop_does_not_wait_for_a_camera_stuck_in_its_driver(self):
        source = ScriptedSource(frames_per_run=3, hang={1, 2, 3, 4})
        service = self.start(source)
        yield wait_until(lambda: len(self.frames) >= 3, 5, what="frames")
        started = reactor.seconds()
        yield with_timeout(service.stopService(), 3, "camera stop")
        assert reactor.seconds() - started < 1.0
        # The stuck thread is a daemon thread: it cannot keep the process alive.
        assert all(thread.daemon for thread in source.threads)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_frames_captured_and_dropped_count_across_runs(self):
        source = ScriptedSource(frames_per_run=5, hang={1})
        service = self.start(source)
        yield wait_until(lambda: source.runs == 2 and len(self.frames) >= 10, 5,
                         what="two runs' frames")
        assert service.frames_captured >= 10
        assert service.frames_captured == len(self.frames) + service.frames_dropped
