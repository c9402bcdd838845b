"""A stand-in for the legacy ``picamera`` library (1.13), for machines without
the camera.

It mirrors what pistreaming relies on, with picamera's own quirks:

- ``PiCamera(resolution=, framerate=)`` opens the one camera; opening it again
  while it is open fails as on a Pi ("Failed to enable connection: Out of
  resources"), and with no camera it fails with picamera's "Camera is not
  enabled" error.
- ``start_recording(output, format='yuv')`` calls ``output.write(data)`` on a
  thread of its own, once per frame, with the frame padded as picamera pads
  it (width up to a multiple of 32, height up to 16, with a
  ``PiCameraResolutionRounded`` warning).  The padding holds junk, as the
  camera's does.  A ``write`` that raises, or returns a count other than the
  buffer's length, stops the recording; the error comes back from the next
  ``wait_recording`` or ``stop_recording``.
- ``wait_recording``/``stop_recording`` raise ``PiCameraNotRecording`` when
  nothing records; ``stop_recording`` flushes the output; ``close`` stops
  recording and releases the camera; a closed camera raises ``PiCameraClosed``.

The picture: the left half of the frame dark, the right half bright (a
vertical edge that a wrongly cropped encode would shear), neutral chroma, and
a bright band moving down one line per frame; junk (white luma, extreme
chroma) in the padding.

The simulated hardware is ``hardware``; a daemon in another process reads its
state from the environment variable ``FAKE_PICAMERA``: ``absent`` (no camera),
``busy`` (held by another program), ``present`` (the default), or
``stall-after:N`` (each recording delivers N frames, then none, as a camera
whose sensor stopped answering: picamera then just waits).
"""

import os
import threading
import time
import warnings
from fractions import Fraction

__version__ = "1.13"

MMAL_ENOSPC = 2
MMAL_EIO = 7
_MMAL_MESSAGES = {MMAL_ENOSPC: "Out of resources", MMAL_EIO: "I/O error"}

PICTURE_DARK, PICTURE_BRIGHT, BAND = 40, 200, 128
JUNK_LUMA, JUNK_U, JUNK_V = 255, 255, 0


class PiCameraWarning(Warning):
    pass


class PiCameraResolutionRounded(PiCameraWarning, RuntimeWarning):
    pass


class PiCameraError(Exception):
    pass


class PiCameraRuntimeError(PiCameraError, RuntimeError):
    pass


class PiCameraClosed(PiCameraRuntimeError):
    pass


class PiCameraNotRecording(PiCameraRuntimeError):
    pass


class PiCameraAlreadyRecording(PiCameraRuntimeError):
    pass


class PiCameraValueError(PiCameraError, ValueError):
    pass


class PiCameraIOError(PiCameraError, IOError):
    pass


class PiCameraMMALError(PiCameraError):
    def __init__(self, status, prefix=""):
        self.status = status
        message = _MMAL_MESSAGES.get(status, "Unknown status error")
        PiCameraError.__init__(self, f"{prefix}{': ' if prefix else ''}{message}")


class Hardware:
    """The simulated camera module, and what the tests can observe of it."""

    def __init__(self, state=None):
        self.present = state != "absent"
        self.busy = state == "busy"
        self.stall_after = None
        if state and state.startswith("stall-after:"):
            self.stall_after = int(state.split(":", 1)[1])
        self.lock = threading.Lock()
        self.open_camera = None
        self.opened = 0          # PiCamera() calls that succeeded
        self.recordings = []     # one dict per start_recording: flips, size, rate

    def reset(self, present=True, busy=False):
        with self.lock:
            self.present, self.busy = present, busy
            self.open_camera = None
            self.opened = 0
            self.recordings = []


hardware = Hardware(os.environ.get("FAKE_PICAMERA", "present"))


def _align(value, multiple):
    return (value + multiple - 1) // multiple * multiple


def render(number, width, height):
    """Frame C{number} as picamera delivers it: padded YUV420, junk in the padding."""
    pw, ph = _align(width, 32), _align(height, 16)
    row = bytes([PICTURE_DARK]) * (width // 2) + bytes([PICTURE_BRIGHT]) * (width - width // 2)
    band_row = bytes([BAND]) * width
    junk = bytes([JUNK_LUMA]) * (pw - width)
    band = number % height
    luma = b"".join((band_row if abs(y - band) < 4 else row) + junk for y in range(height))
    luma += bytes([JUNK_LUMA]) * (pw * (ph - height))
    cw, ch, cpw, cph = width // 2, height // 2, pw // 2, ph // 2

    def chroma(junk_value):
        picture_row = bytes([128]) * cw + bytes([junk_value]) * (cpw - cw)
        return picture_row * ch + bytes([junk_value]) * (cpw * (cph - ch))

    return luma + chroma(JUNK_U) + chroma(JUNK_V)


class _Recording:
    """What picamera's encoder thread does for an unencoded ('yuv') recording."""

    def __init__(self, camera, output):
        self.camera = camera
        self.output = output
        self.event = threading.Event()   # set when the recording has ended
        self.exception = None
        self.stop_flag = threading.Event()
        self.frames = 0
        self.thread = threading.Thread(target=self._run, name="fake picamera encoder",
                                       daemon=True)

    def _run(self):
        width, height = self.camera.resolution
        interval = 1.0 / float(self.camera.framerate)
        due = time.monotonic()
        for number in range(10**9):
            if self.stop_flag.wait(max(0.0, due - time.monotonic())):
                break
            if hardware.stall_after is not None and number >= hardware.stall_after:
                self.stop_flag.wait(3600)  # the sensor went quiet
                break
            due += interval
            data = render(number, width, height)
            try:
                written = self.output.write(data)
                if written is not None and written != len(data):
                    raise PiCameraIOError(
                        f"Failed to write {len(data)} bytes from buffer to output "
                        f"{self.output!r}")
            except Exception as e:
                self.exception = e
                break
            self.frames += 1
        self.event.set()

    def wait(self, timeout):
        if self.event.wait(timeout):
            self.stop()
            if self.exception is not None:
                raise self.exception
            return True
        return False

    def stop(self):
        self.stop_flag.set()
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        self.event.set()


class PiCamera:
    def __init__(self, camera_num=0, stereo_mode="none", stereo_decimate=False,
                 resolution=None, framerate=None, sensor_mode=0, led_pin=None,
                 clock_mode="reset", framerate_range=None):
        with hardware.lock:
            if not hardware.present:
                raise PiCameraError(
                    "Camera is not enabled. Try running 'sudo raspi-config' and "
                    "ensure that the camera has been enabled.")
            if hardware.busy or hardware.open_camera is not None:
                raise PiCameraMMALError(MMAL_ENOSPC, "Failed to enable connection")
            hardware.open_camera = self
            hardware.opened += 1
        self.resolution = tuple(resolution) if resolution else (1280, 720)
        self.framerate = Fraction(framerate if framerate is not None else 30)
        self.vflip = False
        self.hflip = False
        self.annotate_text = ""
        self.closed = False
        self._recording = None

    def _check_camera_open(self):
        if self.closed:
            raise PiCameraClosed("Camera is closed")

    @property
    def recording(self):
        return self._recording is not None

    def start_recording(self, output, format=None, resize=None, splitter_port=1,
                        **options):
        self._check_camera_open()
        if self._recording is not None:
            raise PiCameraAlreadyRecording(
                f"The camera is already using port {splitter_port}")
        if format != "yuv":
            raise PiCameraValueError(f"this fake only records unencoded 'yuv', not {format!r}")
        width, height = self.resolution
        if (_align(width, 32), _align(height, 16)) != (width, height):
            warnings.warn(PiCameraResolutionRounded(
                f"frame size rounded up from {width}x{height} to "
                f"{_align(width, 32)}x{_align(height, 16)}"))
        hardware.recordings.append({
            "resolution": self.resolution, "framerate": self.framerate,
            "vflip": self.vflip, "hflip": self.hflip, "format": format})
        self._recording = _Recording(self, output)
        self._recording.thread.start()

    def wait_recording(self, timeout=0, splitter_port=1):
        self._check_camera_open()
        if self._recording is None:
            raise PiCameraNotRecording(
                f"There is no recording in progress on port {splitter_port}")
        self._recording.wait(timeout)

    def stop_recording(self, splitter_port=1):
        self._check_camera_open()
        recording = self._recording
        if recording is None:
            raise PiCameraNotRecording(
                f"There is no recording in progress on port {splitter_port}")
        try:
            self.wait_recording(0, splitter_port)
        finally:
            recording.stop()
            self._recording = None
            flush = getattr(recording.output, "flush", None)
            if flush is not None:
                flush()

    def close(self):
        if self.closed:
            return
        if self._recording is not None:
            self._recording.stop()
            self._recording = None
        self.closed = True
        with hardware.lock:
            if hardware.open_camera is self:
                hardware.open_camera = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
