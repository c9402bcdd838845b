"""The hand-off from a camera's thread to the reactor (raw frames, or the
H.264 access units of a camera that encodes: L{AccessUnitOutput}, and the
raw frames of its second, smaller stream: L{LoresOutput}).

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


class AccessUnitOutput:
    """The hand-off of H.264 access units from a camera's encoder thread to
    the reactor, as L{FrameOutput} is for raw frames.

    C{access_unit} must return at once, so it only schedules the access unit
    on the reactor with C{callFromThread}.  When the reactor has not taken
    the ones already handed over (more than L{max_pending}), the new one is
    dropped and counted.  A decoder cannot show a picture whose reference
    was dropped, so after a drop nothing more is handed over until the next
    keyframe (an IDR, which needs nothing before it), and C{on_gap} is called
    in the reactor thread (to ask the camera for that keyframe soon).
    """

    #: Access units (and bytes of them) handed to the reactor but not yet
    #: taken; more are dropped.  Unlike raw frames (megabytes each, held to
    #: two), access units are small, and a drop costs every picture up to
    #: the next keyframe: a reactor a few frames late (a busy moment, a
    #: garbage collection) must not freeze the picture for seconds, so about
    #: a second of them may wait.
    max_pending = 32
    max_pending_bytes = 4 * 1024 * 1024

    def __init__(self, deliver, call_from_thread, on_gap=None, clock=time.time):
        """
        @param deliver: called in the reactor thread with each access unit
            (bytes, Annex B), whether it is a keyframe, and its capture time
            (seconds since the epoch).
        @param call_from_thread: the reactor's C{callFromThread}.
        @param on_gap: called in the reactor thread, without arguments, when
            access units start being dropped.
        @param clock: the capture time of access units whose source does not say.
        """
        self._deliver = deliver
        self._call_from_thread = call_from_thread
        self._on_gap = on_gap
        self._clock = clock
        self._lock = threading.Lock()
        self._pending = 0
        self._pending_bytes = 0
        #: After a drop: nothing is handed over until a keyframe.
        self.waiting_for_keyframe = False
        self.frames_captured = 0
        self.frames_dropped = 0
        #: How many times dropping began (each a gap until the next keyframe).
        self.gaps = 0
        #: The raw frames of the camera's second, smaller stream, for a
        #: source that has one (a L{LoresOutput}, set by the camera
        #: service), else None.
        self.lores = None

    def access_unit(self, data, keyframe, captured_at=None):
        """Take one access unit from the camera's encoder (any thread)."""
        if captured_at is None:
            captured_at = self._clock()
        hand_over = gap = False
        with self._lock:
            self.frames_captured += 1
            full = (self._pending >= self.max_pending
                    or self._pending_bytes + len(data) > self.max_pending_bytes)
            if full or (self.waiting_for_keyframe and not keyframe):
                self.frames_dropped += 1
                if not self.waiting_for_keyframe:
                    self.waiting_for_keyframe = gap = True
                    self.gaps += 1
            else:
                self.waiting_for_keyframe = False
                self._pending += 1
                self._pending_bytes += len(data)
                hand_over = True
        if hand_over:
            self._call_from_thread(self._take, data, keyframe, captured_at)
        elif gap and self._on_gap is not None:
            self._call_from_thread(self._on_gap)

    def _take(self, data, keyframe, captured_at):
        with self._lock:
            self._pending -= 1
            self._pending_bytes -= len(data)
        self._deliver(data, keyframe, captured_at)


class LoresOutput:
    """The hand-off of raw frames of a camera's second, smaller stream
    (picamera2's C{lores}) from the camera's thread to the reactor, for the
    MPEG-1 made on demand in H.264 mode (L{pistreaming.ondemand}).

    Frames are copied out of the camera only while C{wanted} is set (by the
    reactor, while the on-demand encoder runs): otherwise the camera is not
    even asked for them.  As with L{FrameOutput}, when the reactor has not
    taken the frames already handed over (L{max_pending}), a new one is
    dropped and counted, before it is copied.
    """

    max_pending = 2

    def __init__(self, on_stream, deliver, call_from_thread, clock=time.time):
        """
        @param on_stream: called in the reactor thread with the stream the
            camera gives, C{(width, height)} and the bytes of a row of its Y
            plane (U and V rows are half that), or C{(None, None)} if it
            gives none.
        @param deliver: called in the reactor thread with each frame (its
            Y, U and V planes, with no padding rows) and its capture time.
        @param call_from_thread: the reactor's C{callFromThread}.
        @param clock: the capture time of frames whose source does not say.
        """
        self._on_stream = on_stream
        self._deliver = deliver
        self._call_from_thread = call_from_thread
        self._clock = clock
        self._lock = threading.Lock()
        self._pending = 0
        #: Set by the reactor: frames are wanted.
        self.wanted = threading.Event()
        self.size = self.stride = self.frame_size = None
        #: Frames copied out of the camera, and those dropped (not copied)
        #: because the reactor had not taken the ones before.
        self.frames_captured = 0
        self.frames_dropped = 0

    def stream(self, size, stride):
        """The camera says what its stream is (after it is configured):
        C{size} (width, height) and C{stride}, or None and None."""
        if size is not None:
            width, height = size
            self.size, self.stride = (width, height), stride
            self.frame_size = stride * height + 2 * (stride // 2) * (height // 2)
        else:
            self.size = self.stride = self.frame_size = None
        self._call_from_thread(self._on_stream, self.size, self.stride)

    def frame(self, buffer, captured_at=None):
        """One frame of the stream, from the camera's thread: C{buffer} is
        any bytes-like object, valid only during the call (it is the
        camera's own memory): what is handed over is a copy."""
        size = self.frame_size
        if size is None or not self.wanted.is_set():
            return
        if captured_at is None:
            captured_at = self._clock()
        with self._lock:
            if self._pending >= self.max_pending:
                self.frames_dropped += 1
                return
            self._pending += 1
        try:
            view = memoryview(buffer).cast("B")
            if len(view) < size:
                raise ValueError(
                    f"the camera gave {len(view)} bytes for a {self.size[0]}x{self.size[1]} "
                    f"YUV420 frame with stride {self.stride}; it needs {size}")
            data = bytes(view[:size])
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        with self._lock:
            self.frames_captured += 1
        self._call_from_thread(self._take, data, captured_at)

    def _take(self, frame, captured_at):
        with self._lock:
            self._pending -= 1
        self._deliver(frame, captured_at)
