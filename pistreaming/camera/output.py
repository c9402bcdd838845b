"""The hand-off from a camera's thread to the reactor.

A camera library calls ``FrameOutput.write(buf)`` on its own thread, as
picamera does with custom outputs.  ``write`` must return at once or the
camera drops frames, so it only cuts the bytes into whole frames and schedules
each one on the reactor with ``callFromThread``.  If the reactor has not yet
taken the frames already handed over (it is busy or stalled), the new frame is
dropped and counted rather than queued: latency must not grow.
"""

import threading
import time


class FrameOutput:
    #: Frames handed to the reactor but not yet taken; more than this are dropped.
    max_pending = 2

    def __init__(self, frame_size, deliver, call_from_thread, clock=time.time):
        """
        @param frame_size: bytes in one raw frame.
        @param deliver: called in the reactor thread with each whole frame and
            the time it was captured.
        @param call_from_thread: the reactor's C{callFromThread}.
        @param clock: the capture time of frames whose source does not say.
        """
        self._clock = clock
        self.frame_size = frame_size
        self._deliver = deliver
        self._call_from_thread = call_from_thread
        self._partial = bytearray()
        self._lock = threading.Lock()
        self._pending = 0
        self.frames_captured = 0
        self.frames_dropped = 0

    def write(self, buf, captured_at=None):
        """Take raw bytes from the camera: whole frames, or pieces of them.

        @param captured_at: when the frame was captured (seconds since the
            epoch), for sources that know; else the time of this call.
        """
        if captured_at is None:
            captured_at = self._clock()
        data = memoryview(buf).cast("B")
        size = self.frame_size
        if not self._partial and len(data) == size:
            # A whole frame: bytes are handed over as they are, without a copy.
            self._hand_over(buf if type(buf) is bytes else bytes(data), captured_at)
            return len(data)
        self._partial += data
        while len(self._partial) >= size:
            frame = bytes(self._partial[:size])
            del self._partial[:size]
            self._hand_over(frame, captured_at)
        return len(data)

    def flush(self):
        """Called by picamera when recording stops; a partial frame is discarded."""
        self._partial.clear()

    def _hand_over(self, frame, captured_at):
        with self._lock:
            self.frames_captured += 1
            if self._pending >= self.max_pending:
                self.frames_dropped += 1
                return
            self._pending += 1
        self._call_from_thread(self._take, frame, captured_at)

    def _take(self, frame, captured_at):
        with self._lock:
            self._pending -= 1
        self._deliver(frame, captured_at)
