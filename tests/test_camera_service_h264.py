"""The camera service in H.264 mode: the camera's encoder hands access units
over from its thread; a reactor that falls behind loses pictures only up to
the next keyframe (and asks the camera for one), keyframe requests are
coalesced, and a camera that stalls is given up and retried as in raw mode.

Driven on a Clock, without threads: the service's thread pool only records
what it is asked to run, and the test plays the camera's encoder thread.
Calls from that "thread" to the reactor wait until the test lets the
reactor take them.  The last test runs the real thing (threads, the fake
picamera2 and its ffmpeg encoder) on the real reactor.
"""

import threading
import types

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from pistreaming.camera import service as camera_service
from pistreaming.camera.output import AccessUnitOutput
from pistreaming.camera.picamera2_source import Picamera2Source
from pistreaming.camera.picture import Picture
from pistreaming.camera.service import CameraService, Encoding
from pistreaming.options import Config
from tests.fake_picamera2 import Rig
from tests.helpers import Arrivals, with_timeout

ENCODING = types.SimpleNamespace(bitrate=500_000, keyframe_interval=2.0, framerate=30,
                                 profile="baseline")
KEY, PICTURE = b"\0\0\0\1\x65key", b"\0\0\0\1\x41p"


class ThreadReactor(task.Clock):
    """A Clock whose callFromThread queues until L{take}."""

    def __init__(self):
        super().__init__()
        self.from_threads = []

    def callFromThread(self, f, *args, **kwargs):
        self.from_threads.append((f, args, kwargs))

    def take(self):
        while self.from_threads:
            f, args, kwargs = self.from_threads.pop(0)
            f(*args, **kwargs)


class Run:
    """One call of the source's capture loop the pool was asked to run."""

    def __init__(self, on_result, function, args):
        self.on_result = on_result
        self.function = function
        self.args = args
        self.output, self.stop, self.encoding = args

    def units(self, *kinds, at=1000.0):
        """The encoder hands over one access unit of each kind ("K" or "P")."""
        for kind in kinds:
            self.output.access_unit(KEY if kind == "K" else PICTURE, kind == "K", at)

    def returns(self):
        self.on_result(True, None)

    def fails(self, error):
        self.on_result(False, Failure(error))


class Pool:
    pools = []

    def __init__(self, minthreads=0, maxthreads=0, name=None):
        self.threadFactory = None
        self.runs = []
        self.stopped = False
        Pool.pools.append(self)

    def start(self):
        pass

    def stop(self):
        self.stopped = True

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs):
        self.runs.append(Run(on_result, function, args))


class Source:
    name = "scripted"
    framerate = 30
    encodes_h264 = True

    def __init__(self, can=True):
        self.can = can
        self.asked = []  # reactor times at which a keyframe was asked for

    def describe(self):
        return "a scripted camera"

    def run(self, output, stopping):
        raise AssertionError("not in H.264 mode")

    def run_h264(self, output, stopping, encoding):
        raise AssertionError("runs on the test's say-so only")

    def request_keyframe(self):
        self.asked.append(self.clock.seconds())
        return self.can


class H264ServiceTests(unittest.TestCase):
    def setUp(self):
        Pool.pools = []
        self.patch(camera_service, "ThreadPool", Pool)
        # At most 3 access units wait for the reactor here (the daemon lets
        # about a second's worth wait): the scripts below stay short.
        self.patch(AccessUnitOutput, "max_pending", 3)
        self.reactor = ThreadReactor()
        self.source = Source()
        self.source.clock = self.reactor
        self.got = []
        self.states = []
        self.service = CameraService(
            self.source, None, lambda *unit: self.got.append(unit), self.reactor,
            on_state=lambda state, why: self.states.append((state, why)), h264=ENCODING)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self):
        self.service.startService()
        (self.pool,) = Pool.pools
        return self.pool.runs

    def kinds(self):
        return "".join("K" if keyframe else "P" for _, keyframe, _ in self.got)

    def advance(self, seconds, step=0.25):
        while seconds > 1e-9:
            self.reactor.advance(min(step, seconds))
            seconds -= step
            self.reactor.take()

    def test_access_units_reach_the_sink_in_the_reactor_thread(self):
        (run,) = self.start()
        assert run.function == self.source.run_h264 and run.encoding is ENCODING
        assert isinstance(run.output, AccessUnitOutput) and run.output is self.service.output
        run.units("K", "P")
        assert self.got == []  # not until the reactor takes them
        self.reactor.take()
        assert self.got == [(KEY, True, 1000.0), (PICTURE, False, 1000.0)]
        assert self.states == [("ok", "")]
        assert (self.service.frames_captured, self.service.frames_dropped) == (2, 0)

    def test_a_reactor_behind_drops_up_to_the_next_keyframe_and_asks_for_one(self):
        (run,) = self.start()
        # Three wait for the reactor; the fourth is dropped, and with it
        # every picture up to the next keyframe, which is asked for.
        run.units("K", "P", "P", "P", "P", "P")
        assert run.output.waiting_for_keyframe
        self.reactor.take()
        assert self.kinds() == "KPP" and self.source.asked == [0.0]
        run.units("P", "P")  # the reactor keeps up again, but these need what was lost
        self.reactor.take()
        assert self.kinds() == "KPP"
        run.units("K", "P")
        self.reactor.take()
        assert self.kinds() == "KPPKP"
        assert (self.service.frames_captured, self.service.frames_dropped) == (10, 5)
        assert self.service.output.gaps == 1 and self.service.keyframes_requested == 1

    def test_a_keyframe_that_finds_the_reactor_still_behind_is_dropped_too(self):
        (run,) = self.start()
        run.units("K", "P", "P", "P", "K", "P")
        self.reactor.take()
        assert self.kinds() == "KPP"
        run.units("K")
        self.reactor.take()
        assert self.kinds() == "KPPK" and self.source.asked == [0.0]

    def test_keyframe_requests_are_coalesced_to_one_a_second(self):
        (run,) = self.start()
        assert self.service.request_keyframe() is True
        assert self.source.asked == [0.0]
        # A burst of newcomers: one more keyframe, when the second is up.
        self.advance(0.25)
        assert self.service.request_keyframe() is True
        self.advance(0.25)
        assert self.service.request_keyframe() is True
        assert self.source.asked == [0.0]
        self.advance(0.5)
        assert self.source.asked == [0.0, 1.0]
        # A gap in the meantime asks through the same door.
        run.units("K", "P", "P", "P", "P")
        self.reactor.take()
        assert self.source.asked == [0.0, 1.0]
        self.advance(1.0)
        assert self.source.asked == [0.0, 1.0, 2.0]
        self.advance(5.0)
        assert self.source.asked == [0.0, 1.0, 2.0]
        self.advance(0.1)
        assert self.service.request_keyframe() is True
        assert self.source.asked == [0.0, 1.0, 2.0, 7.1] and self.service.keyframes_requested == 4

    def test_a_camera_that_cannot_make_keyframes_says_so(self):
        self.source.can = False
        self.start()
        assert self.service.request_keyframe() is False
        assert self.service.keyframes_requested == 0
        raw = CameraService(Source(), 64, lambda *frame: None, self.reactor)
        assert raw.request_keyframe() is False

    def test_a_stalled_encoder_is_given_up_and_retried(self):
        runs = self.start()
        first = runs[0]
        first.units("K", "P")
        self.reactor.take()
        self.advance(4.5)
        assert self.states[-1] == ("unavailable", "no frame for 4.5s")
        assert first.stop.is_set()
        self.advance(1.0)
        assert len(runs) == 2
        second = runs[1]
        assert second.output is not first.output and second.encoding is ENCODING
        first.units("P")  # a late picture of the given-up run: ignored
        second.units("K")
        self.reactor.take()
        assert self.kinds() == "KPK" and self.states[-1] == ("ok", "")
        assert self.service.frames_captured == 3  # the late one is not the camera's now

    def test_an_encoder_failure_is_retried(self):
        runs = self.start()
        runs[0].fails(RuntimeError("picamera2's H.264 encoder stopped (its thread ended)"))
        self.reactor.take()
        assert self.states == [("unavailable",
                                "picamera2's H.264 encoder stopped (its thread ended)")]
        assert self.service.request_keyframe() is False  # no run under way
        self.advance(1.0)
        assert len(runs) == 2
        self.flushLoggedErrors(RuntimeError)

    def test_stop_cancels_a_keyframe_still_to_be_asked_for(self):
        runs = self.start()
        self.service.request_keyframe()
        self.service.request_keyframe()
        d = self.service.stopService()
        runs[0].returns()
        self.reactor.take()
        assert self.successResultOf(d) is None
        assert not self.reactor.getDelayedCalls()
        assert self.source.asked == [0.0]


def test_the_encoding_comes_from_the_options():
    encoding = Encoding.of(Config(bitrate=2_000_000, keyframe_interval=1.5, framerate=25))
    assert (encoding.bitrate, encoding.keyframe_interval, encoding.framerate,
            encoding.profile) == (2_000_000, 1.5, 25, "baseline")


class RealThreadsTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_the_fake_picamera2s_access_units_reach_the_reactor(self):
        rig = Rig()
        source = Picamera2Source(rig.picamera2, rig.libcamera, Picture(320, 240, 30))
        got = Arrivals()
        service = CameraService(source, None, lambda *unit: got.append(
            unit + (threading.current_thread() is threading.main_thread(),)), reactor,
            h264=ENCODING)
        service.startService()
        try:
            yield got.until(lambda: len(got) >= 5, 10, what="five access units")
            assert service.request_keyframe() is True
            yield got.until(lambda: sum(1 for u in got if u[1]) >= 2, 5, what="an asked IDR")
        finally:
            yield with_timeout(service.stopService(), 5, "camera service stop")
        assert got[0][1] and all(u[3] for u in got)  # delivered in the reactor's thread
        assert rig.open == set()


def test_what_waits_for_the_reactor_is_bounded_in_bytes_too():
    handed = []
    output = AccessUnitOutput(lambda *unit: None, lambda f, *a: handed.append((f, a)))
    big = b"\0\0\0\1\x65" + bytes(output.max_pending_bytes // 2)
    output.access_unit(big, True, 1.0)
    output.access_unit(big, False, 1.0)  # would pass the byte bound: dropped
    assert (output.frames_captured, output.frames_dropped, output.gaps) == (2, 1, 1)
    assert output.waiting_for_keyframe
    for f, args in handed:  # the reactor takes what waited
        f(*args)
    output.access_unit(big, True, 2.0)  # a keyframe, with room again
    assert not output.waiting_for_keyframe and output.frames_dropped == 1


def test_about_a_second_of_access_units_may_wait_for_the_reactor():
    # A reactor a few frames late (a busy moment) must not cost every picture
    # up to the next keyframe.
    output = AccessUnitOutput(lambda *unit: None, lambda f, *a: None)
    output.access_unit(KEY, True, 1.0)
    for _ in range(29):
        output.access_unit(PICTURE, False, 1.0)
    assert output.frames_dropped == 0 and output.max_pending >= 30
