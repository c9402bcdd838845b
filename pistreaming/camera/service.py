"""The camera service: runs a frame source's capture loop on a thread."""

import threading

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from pistreaming.camera.output import FrameOutput


class CameraService(service.Service):
    """Runs C{source.run} on a reactor pool thread and hands frames to C{sink}.

    If the source fails it is retried with backoff; a stop sets a flag the
    loop polls, so stopping never waits on the camera for long.
    """

    name = "camera"
    log = Logger()

    retry_delays = (1.0, 2.0, 5.0, 10.0, 30.0)
    #: How long stopService waits for the capture thread before giving up.
    stop_timeout = 1.5

    def __init__(self, source, frame_size, sink, reactor):
        self.source = source
        self.sink = sink
        self.reactor = reactor
        self.output = FrameOutput(frame_size, self._deliver, reactor.callFromThread)
        self.failures = 0
        self.state = "starting"
        self._stopping = threading.Event()
        self._running = None
        self._retry = None

    @property
    def frames_captured(self):
        return self.output.frames_captured

    @property
    def frames_dropped(self):
        return self.output.frames_dropped

    def _deliver(self, frame, captured_at):
        if not self._stopping.is_set():
            self.state = "ok"
            self.sink(frame, captured_at)

    def startService(self):
        super().startService()
        self._stopping.clear()
        self.log.info("camera: {camera}", camera=self.source.describe())
        self._start_thread()

    def _start_thread(self):
        self._retry = None
        self.output.flush()
        d = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(),
            self.source.run, self.output, self._stopping,
        )
        d.addCallbacks(self._thread_returned, self._thread_failed)
        self._running = d

    def _thread_returned(self, _):
        if not self._stopping.is_set():
            self._schedule_retry("the capture loop ended by itself")

    def _thread_failed(self, failure):
        if self._stopping.is_set():
            self.log.failure("camera {camera} failed while stopping", failure,
                             camera=self.source.name)
            return
        self._schedule_retry(failure.getErrorMessage() or failure.type.__name__,
                             failure)

    def _schedule_retry(self, why, failure=None):
        delay = self.retry_delays[min(self.failures, len(self.retry_delays) - 1)]
        self.failures += 1
        if failure is not None:
            self.log.failure("camera {camera} failed ({why}); retrying in {delay}s",
                             failure, camera=self.source.name, why=why, delay=delay)
        else:
            self.log.error("camera {camera}: {why}; retrying in {delay}s",
                           camera=self.source.name, why=why, delay=delay)
        self._retry = self.reactor.callLater(delay, self._start_thread)

    def stopService(self):
        super().stopService()
        self._stopping.set()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        running, self._running = self._running, None
        if running is None or running.called:
            return defer.succeed(None)
        done = defer.Deferred()

        def finished(_=None):
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        def too_late():
            self.log.warn("camera {camera} did not stop within {timeout}s; not waiting",
                          camera=self.source.name, timeout=self.stop_timeout)
            done.callback(None)

        timer = self.reactor.callLater(self.stop_timeout, too_late)
        running.addBoth(finished)
        return done
