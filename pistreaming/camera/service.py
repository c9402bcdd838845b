"""The camera service: runs a frame source's capture loop on a thread.

Each start of the capture loop is a *run*, with its own stop flag and its own
frame hand-off (pistreaming.camera.output).  A run that fails, ends, or
delivers no frame for ``stall_timeout`` seconds is given up and a new one is
started after a pause that grows while the camera keeps failing (1 s up to
30 s).  A given-up run is told to stop but never waited for, and whatever it
still delivers is ignored: a camera stuck in its driver cannot hold up the
daemon, a retry, or shutdown.  The capture threads are daemon threads of the
service's own pool (deferToThreadPool), for the same reason.

The service says how the camera is doing ("starting", "ok", "unavailable")
through C{on_state}, so that viewers can be told.

In H.264 mode (C{h264} given: the encoding) the source's own encoder records
(C{source.run_h264}), and the sink gets access units instead of frames
(pistreaming.camera.output.AccessUnitOutput); everything else is the same,
each access unit counting as a frame.  C{request_keyframe} asks the camera
for an IDR, at most once a second.

A source whose camera also gives a second, smaller stream of raw frames
(picamera2's C{lores}) is given a L{LoresOutput} with each run (as the
C{lores} of its access-unit output), when the service has a C{lores}
consumer: the run says what the stream is, and copies its frames out only
while L{CameraService.want_lores} says so (the MPEG-1 encoder that runs on
demand wants them only while someone watches it).
"""

import threading

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from pistreaming.camera.output import AccessUnitOutput, FrameOutput, LoresOutput


def _daemon_thread(*args, **kwargs):
    thread = threading.Thread(*args, **kwargs)
    thread.daemon = True
    return thread


class Encoding:
    """What a camera's own H.264 encoder is asked for (CameraService's
    C{h264}, a source's C{run_h264}'s C{encoding}): bits per second, seconds from one
    keyframe to the next, frames per second, and a profile without B-frames
    that every browser decodes."""

    def __init__(self, bitrate, keyframe_interval, framerate, profile="baseline"):
        self.bitrate = bitrate
        self.keyframe_interval = keyframe_interval
        self.framerate = framerate
        self.profile = profile

    @classmethod
    def of(cls, config):
        """From the options (C{--bitrate}, C{--keyframe-interval}, C{--framerate})."""
        return cls(config.bitrate, config.keyframe_interval, config.framerate)

    def __repr__(self):
        return (f"Encoding(bitrate={self.bitrate}, keyframe_interval={self.keyframe_interval}, "
                f"framerate={self.framerate}, profile={self.profile!r})")


class _Run:
    """One start of the source's capture loop."""

    def __init__(self, number, output):
        self.number = number
        self.output = output
        self.stop = threading.Event()
        self.started_at = None
        self.last_frame_at = None
        self.given_up = False


class CameraService(TimerService):
    """Runs C{source.run} on a thread and hands frames to C{sink}; checks
    every C{watch_interval} seconds (its timer) whether the run stalled."""

    name = "camera"
    log = Logger()

    retry_delays = (1.0, 2.0, 5.0, 10.0, 30.0)
    #: How long stopService waits for the capture thread before giving up.
    stop_timeout = 1.5
    #: A run that delivers no frame for this long (seconds; at least 5 frame
    #: intervals) has stalled.
    stall_timeout = 4.0

    #: Seconds from one keyframe asked of the camera to the next, at least.
    keyframe_request_interval = 1.0

    def __init__(self, source, frame_size, sink, reactor, on_state=None, watch_interval=0.5,
                 h264=None, lores=None):
        """
        @param frame_size: bytes in a raw frame (unused in H.264 mode).
        @param sink: called in the reactor thread with each frame and its
            capture time; in H.264 mode with each access unit (bytes, Annex
            B), whether it is a keyframe, and its capture time.
        @param on_state: called with (state, why) when the camera's state changes.
        @param watch_interval: seconds between checks for a stalled run.
        @param h264: for H.264 mode, what the camera's encoder is asked for
            (an L{Encoding}, or anything with C{.bitrate}, C{.keyframe_interval},
            C{.framerate}, C{.profile}); the source must have C{run_h264}.
            None: raw frames.
        @param lores: in H.264 mode, the consumer of the camera's second,
            smaller stream of raw frames, if the source has one: told in
            the reactor thread, by C{lores_stream(size, stride)}, what each
            run's camera gives (C{(None, None)}: no such stream), and given
            by C{lores_frame(frame, captured_at)} each frame copied out
            while L{want_lores} is on (see L{LoresOutput}).
        """
        super().__init__(watch_interval, self._check_stall)
        self.clock = reactor
        self.source = source
        self.frame_size = frame_size
        self.sink = sink
        self.reactor = reactor
        self.on_state = on_state
        #: What the camera's encoder is asked for (None: raw frames).
        self.encoding = h264
        self.failures = 0
        self.state = "starting"
        framerate = float(getattr(source, "framerate", 0) or 0)
        if framerate > 0:
            self.stall_timeout = max(self.stall_timeout, 5 / framerate)
        self._runs = 0
        self._run = None
        self._running = None
        self._retry = None
        self._retired_captured = 0
        self._retired_dropped = 0
        self._pool = None
        self._active = set()  # runs whose threads have not returned
        self._keyframe_asked_at = None
        self._keyframe_later = None
        #: Keyframes asked of the camera (after coalescing).
        self.keyframes_requested = 0
        self.lores = lores if h264 is not None else None
        self._lores_wanted = False
        self._retired_lores = [0, 0]  # frames captured, dropped, by runs before

    @property
    def h264(self):
        """Whether the camera's own H.264 encoder records."""
        return self.encoding is not None

    @property
    def watch_interval(self):
        """Seconds between checks for a stalled run (the timer's step)."""
        return self.step

    @watch_interval.setter
    def watch_interval(self, seconds):
        self.step = seconds

    # figures
    @property
    def output(self):
        """The current run's frame hand-off."""
        return self._run.output if self._run is not None else None

    @property
    def frames_captured(self):
        current = self._run.output.frames_captured if self._run is not None else 0
        return self._retired_captured + current

    @property
    def frames_dropped(self):
        current = self._run.output.frames_dropped if self._run is not None else 0
        return self._retired_dropped + current

    # the second, smaller stream
    def want_lores(self, wanted):
        """Whether the frames of the camera's second, smaller stream are to
        be copied out and handed over (in the reactor thread); it holds for
        the runs that follow too."""
        self._lores_wanted = bool(wanted)
        output = self._run.output if self._run is not None else None
        lores = getattr(output, "lores", None)
        if lores is not None:
            if self._lores_wanted:
                lores.wanted.set()
            else:
                lores.wanted.clear()

    @property
    def lores_wanted(self):
        return self._lores_wanted

    def lores_figures(self):
        """The second, smaller stream's figures (None without a consumer
        for it): its size, whether its frames are copied out, how many were
        and how many were dropped before the reactor took them."""
        if self.lores is None:
            return None
        output = self._run.output if self._run is not None else None
        lores = getattr(output, "lores", None)
        captured, dropped = self._retired_lores
        if lores is not None:
            captured += lores.frames_captured
            dropped += lores.frames_dropped
        size = lores.size if lores is not None else None
        return {"width": size[0] if size else None, "height": size[1] if size else None,
                "copying": self._lores_wanted and size is not None,
                "frames": captured, "frames_dropped": dropped}

    def _set_state(self, state, why=""):
        if state != self.state:
            self.state = state
            if self.on_state is not None:
                self.on_state(state, why)

    # frames
    def _deliverer(self, run):
        def deliver(*unit):
            if run is not self._run or run.given_up or not self.running:
                return  # a run that was given up, still delivering
            run.last_frame_at = self.reactor.seconds()
            if self.state != "ok":
                if self.state == "unavailable":
                    self.log.info("camera {camera} delivers frames again",
                                  camera=self.source.name)
                self.failures = 0
                self._set_state("ok")
            self.sink(*unit)
        return deliver

    def _lores_deliverers(self, run):
        """What a run's L{LoresOutput} calls in the reactor thread (nothing
        of a run given up is passed on)."""
        def current():
            return run is self._run and not run.given_up and self.running

        def stream(size, stride):
            if current():
                self.lores.lores_stream(size, stride)

        def frame(data, captured_at):
            if current():
                self.lores.lores_frame(data, captured_at)
        return stream, frame

    def _gap(self, run):
        """Access units were dropped: ask the camera for a keyframe."""
        def gap():
            if run is self._run and not run.given_up and self.running:
                self.request_keyframe()
        return gap

    def request_keyframe(self):
        """Asks the camera's encoder for an IDR soon (in the reactor thread),
        at most once every L{keyframe_request_interval} seconds: asked
        within that time of the last, it is asked once when that time is up.

        @return: False if the camera cannot (raw frames, a source without
            keyframes on request, no run under way), else True.
        """
        run = self._run
        if (not self.h264 or run is None or run.given_up or not self.running
                or not hasattr(self.source, "request_keyframe")):
            return False
        if self._keyframe_later is not None:
            return True  # already to be asked
        now = self.reactor.seconds()
        last = self._keyframe_asked_at
        if last is not None and now - last < self.keyframe_request_interval:
            self._keyframe_later = self.reactor.callLater(
                last + self.keyframe_request_interval - now, self._ask_keyframe_later)
            return True
        return self._ask_keyframe()

    def _ask_keyframe_later(self):
        self._keyframe_later = None
        run = self._run
        if run is not None and not run.given_up and self.running:
            self._ask_keyframe()

    def _ask_keyframe(self):
        self._keyframe_asked_at = self.reactor.seconds()
        try:
            asked = bool(self.source.request_keyframe())
        except Exception as e:
            self.log.warn("camera {camera}: a keyframe could not be asked for ({why})",
                          camera=self.source.name, why=e)
            return False
        if asked:
            self.keyframes_requested += 1
        return asked

    # lifecycle
    def startService(self):
        super().startService()
        self._pool = ThreadPool(minthreads=0, maxthreads=8, name="camera")
        self._pool.threadFactory = _daemon_thread
        self._pool.start()
        self.log.info("camera: {camera}", camera=self.source.describe())
        self._start_run()

    def _start_run(self):
        self._retry = None
        if self._run is not None:
            self._retired_captured += self._run.output.frames_captured
            self._retired_dropped += self._run.output.frames_dropped
            lores = getattr(self._run.output, "lores", None)
            if lores is not None:
                self._retired_lores[0] += lores.frames_captured
                self._retired_lores[1] += lores.frames_dropped
        self._runs += 1
        run = _Run(self._runs, None)
        if self.h264:
            run.output = AccessUnitOutput(self._deliverer(run), self.reactor.callFromThread,
                                          on_gap=self._gap(run))
            if self.lores is not None:
                on_stream, deliver = self._lores_deliverers(run)
                run.output.lores = LoresOutput(on_stream, deliver, self.reactor.callFromThread)
                if self._lores_wanted:
                    run.output.lores.wanted.set()
            capture, args = self.source.run_h264, (run.output, run.stop, self.encoding)
        else:
            run.output = FrameOutput(self.frame_size, self._deliverer(run),
                                     self.reactor.callFromThread)
            capture, args = self.source.run, (run.output, run.stop)
        run.started_at = self.reactor.seconds()
        self._run = run
        self._active.add(run)
        d = deferToThreadPool(self.reactor, self._pool, capture, *args)

        def ended(result):
            self._active.discard(run)
            return result

        d.addBoth(ended)
        d.addCallbacks(self._run_returned, self._run_failed,
                       callbackArgs=(run,), errbackArgs=(run,))
        self._running = d

    def _run_returned(self, _, run):
        if run is self._run and not run.given_up and self.running:
            self._give_up(run, "the capture loop ended by itself")

    def _run_failed(self, failure, run):
        if not self.running:
            self.log.failure("camera {camera} failed while stopping", failure,
                             camera=self.source.name)
        elif run is self._run and not run.given_up:
            self._give_up(run, failure.getErrorMessage() or failure.type.__name__, failure)
        else:
            self.log.info("camera {camera}: a run given up earlier ended ({why})",
                          camera=self.source.name,
                          why=failure.getErrorMessage() or failure.type.__name__)

    def _check_stall(self):
        run = self._run
        if run is None or run.given_up or self._retry is not None:
            return
        since = run.last_frame_at if run.last_frame_at is not None else run.started_at
        quiet = self.reactor.seconds() - since
        if quiet > self.stall_timeout:
            self._give_up(run, f"no frame for {quiet:.1f}s")

    def _give_up(self, run, why, failure=None):
        run.given_up = True
        run.stop.set()
        delay = self.retry_delays[min(self.failures, len(self.retry_delays) - 1)]
        self.failures += 1
        if failure is not None:
            self.log.failure("camera {camera} failed ({why}); retrying in {delay}s",
                             failure, camera=self.source.name, why=why, delay=delay)
        else:
            self.log.error("camera {camera}: {why}; retrying in {delay}s",
                           camera=self.source.name, why=why, delay=delay)
        self._set_state("unavailable", why)
        self._retry = self.reactor.callLater(delay, self._start_run)

    def stopService(self):
        super().stopService()  # the timer stops, and so does the service
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._keyframe_later is not None and self._keyframe_later.active():
            self._keyframe_later.cancel()
        self._keyframe_later = None
        run, running, self._running = self._run, self._running, None
        if run is not None:
            run.stop.set()
        pool = self._pool

        def release_pool():
            # Joining a thread stuck in a camera driver would hang: the pool
            # is only stopped when all its runs have returned.
            if not self._active:
                pool.stop()

        if running is None or running.called:
            release_pool()
            return defer.succeed(None)
        done = defer.Deferred()

        def finished(_=None):
            if timer.active():
                timer.cancel()
            if not done.called:
                release_pool()
                done.callback(None)

        def too_late():
            # The thread is a daemon thread: it will not keep the process alive.
            self.log.warn("camera {camera} did not stop within {timeout}s; not waiting",
                          camera=self.source.name, timeout=self.stop_timeout)
            done.callback(None)

        timer = self.reactor.callLater(self.stop_timeout, too_late)
        running.addBoth(finished)
        return done
