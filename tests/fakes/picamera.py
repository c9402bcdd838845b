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
- ``start_recording(output, format='h264', bitrate=17000000,
  intra_period=None, profile='high', level='4', inline_headers=True, ...)``
  checks its options as picamera does (profile, level, the level's bit rate
  and macroblock limits: ``PiCameraValueError``; an unknown option: TypeError)
  and encodes with the camera's H.264 encoder, which here is an ffmpeg child
  (libx264; see tests/fake_picamera2.py) outside this process.  As MMAL does,
  it hands ``output.write`` one buffer at a time on its callback thread: with
  ``inline_headers`` the SPS and PPS in a buffer of their own before each
  I-frame (only before the first without), then the picture, cut into buffers
  of at most 64 KiB.  While ``write`` runs, ``camera.frame`` (a
  ``PiVideoFrame``) describes that buffer: ``frame_type``
  (``PiVideoFrameType.sps_header``, ``key_frame`` or ``frame``), ``complete``
  (the last buffer of the picture), ``timestamp`` (us, since the recording
  started, or since boot with ``clock_mode='raw'``, as ``camera.timestamp``;
  the SPS buffer repeats the last one).  ``request_key_frame()`` makes the
  next picture an IDR.  An encoder that dies goes quiet, as MMAL's would.

The picture: the left half of the frame dark, the right half bright (a
vertical edge that a wrongly cropped encode would shear), neutral chroma, and
a bright band moving down one line per frame; junk (white luma, extreme
chroma) in the padding.

The simulated hardware is ``hardware``; a daemon in another process reads its
state from the environment variable ``FAKE_PICAMERA``: ``absent`` (no camera),
``busy`` (held by another program), ``present`` (the default), or
``stall-after:N`` (each recording delivers N frames, then none, as a camera
whose sensor stopped answering: picamera then just waits).  With
``FAKE_PICAMERA_PICTURE=lavfi`` the H.264 encoder encodes a moving picture
ffmpeg makes itself (no raw frame crosses Python: for CPU benchmarks).
"""

import os
import threading
import time
import warnings
from collections import deque, namedtuple
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


class PiVideoFrameType:
    frame = 0
    key_frame = 1
    sps_header = 2
    motion_data = 3


PiVideoFrame = namedtuple("PiVideoFrame", (
    "index", "frame_type", "frame_size", "video_size", "split_size", "timestamp", "complete"))


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
        #: What the H.264 encoder encodes: "scene" (the camera's frames) or
        #: "lavfi" (a moving picture ffmpeg makes itself).
        self.picture = os.environ.get("FAKE_PICAMERA_PICTURE", "scene")
        self.ffmpeg = "ffmpeg"
        #: The H.264 recordings' encoders (tests.fake_picamera2.ExternalEncoder).
        self.encoders = []
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
            self.encoders = []


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


def _boottime_us():
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None:
        return time.monotonic_ns() // 1000
    return time.clock_gettime_ns(clock) // 1000


#: MMAL's H.264 levels, and for each (bits/s limit: (not high, high profile),
#: macroblocks/s limit, macroblocks limit), as picamera checks them.
_H264_LEVELS = {
    "1": ((64000, 80000), 1485, 99), "1.0": ((64000, 80000), 1485, 99),
    "1b": ((128000, 160000), 1485, 99), "1.1": ((192000, 240000), 3000, 396),
    "1.2": ((384000, 480000), 6000, 396), "1.3": ((768000, 960000), 11880, 396),
    "2": ((2000000, 2500000), 11880, 396), "2.0": ((2000000, 2500000), 11880, 396),
    "2.1": ((4000000, 5000000), 19800, 792), "2.2": ((4000000, 5000000), 20250, 1620),
    "3": ((10000000, 12500000), 40500, 1620), "3.0": ((10000000, 12500000), 40500, 1620),
    "3.1": ((14000000, 17500000), 108000, 3600), "3.2": ((20000000, 25000000), 216000, 5120),
    "4": ((20000000, 25000000), 245760, 8192), "4.0": ((20000000, 25000000), 245760, 8192),
    "4.1": ((50000000, 62500000), 245760, 8192), "4.2": ((50000000, 62500000), 522240, 8704),
}
#: picamera's profile names, and what libx264 calls each.
_H264_PROFILES = {"baseline": "baseline", "main": "main", "high": "high",
                  "constrained": "baseline"}
#: The I-frame period when none is given (picamera asks the firmware; 60 is
#: what the bcm2835 V4L2 drivers default MMAL_PARAMETER_INTRAPERIOD to).
DEFAULT_INTRA_PERIOD = 60
#: The size of the encoder's output buffers: a larger picture comes in pieces.
BUFFER_SIZE = 65536


def _h264_options(camera, bitrate=17000000, intra_period=None, profile="high", level="4",
                  quantization=0, quality=0, inline_headers=True, sei=False,
                  sps_timing=False, motion_output=None, intra_refresh=None):
    """picamera's PiVideoEncoder._create_encoder checks, for format 'h264'."""
    quality = quality or quantization
    if profile not in _H264_PROFILES:
        raise PiCameraValueError(f"Invalid H.264 profile {profile}")
    if level not in _H264_LEVELS:
        raise PiCameraValueError(f"Invalid H.264 level {level}")
    (normal, high), mbps_limit, mb_limit = _H264_LEVELS[level]
    limit = high if profile == "high" else normal
    if bitrate > limit:
        raise PiCameraValueError(
            f"bitrate {bitrate} exceeds {limit} which is the limit for the selected "
            f"H.264 level and profile")
    width, height = camera.resolution
    macroblocks = _align(width, 16) // 16 * (_align(height, 16) // 16)
    if macroblocks > mb_limit:
        raise PiCameraValueError(
            f"output resolution {camera.resolution} exceeds macroblock limit ({mb_limit}) "
            f"for the selected H.264 profile and level")
    if macroblocks * camera.framerate > mbps_limit:
        raise PiCameraValueError(
            f"output resolution and framerate exceeds macroblocks/s limit ({mbps_limit}) "
            f"for the selected H.264 profile and level")
    return {"bitrate": bitrate, "intra_period": intra_period, "profile": profile,
            "level": level, "quality": quality, "inline_headers": inline_headers, "sei": sei}


class _H264Recording(_Recording):
    """The camera's H.264 encoder: frames go to it from the camera's thread;
    its output comes back to C{output.write} on MMAL's callback thread."""

    def __init__(self, camera, output, options):
        super().__init__(camera, output)
        from tests.fake_picamera2 import ExternalEncoder

        self.options = options
        self.frame = PiVideoFrame(index=0, frame_type=None, frame_size=0, video_size=0,
                                  split_size=0, timestamp=0, complete=False)
        self.key_frames_requested = 0
        self._key_frames_generated = 0
        self._timestamps = deque()
        self._stopping = False
        width, height = camera.resolution
        intra_period = options["intra_period"]
        if intra_period is None:
            intra_period = DEFAULT_INTRA_PERIOD
        level = options["level"]
        level = level + ".0" if level in ("1", "2", "3", "4") else level
        bitrate = options["bitrate"]
        self.encoder = ExternalEncoder(
            (width, height), float(camera.framerate), bitrate=bitrate or None,
            keyint=intra_period, profile=_H264_PROFILES[options["profile"]], level=level,
            qp=options["quality"] or (None if bitrate else 23),
            repeat_headers=options["inline_headers"], picture=hardware.picture,
            input_size=(_align(width, 32), _align(height, 16)), ffmpeg=hardware.ffmpeg)
        hardware.encoders.append(self.encoder)
        self.feeder = threading.Thread(target=self._feed, name="fake picamera camera",
                                       daemon=True)
        self.started_at = _boottime_us()

    def start(self):
        self.thread.start()
        if hardware.picture == "scene":
            self.feeder.start()

    def _capture_time(self):
        now = _boottime_us()
        return now if self.camera.clock_mode == "raw" else now - self.started_at

    def _feed(self):
        width, height = self.camera.resolution
        interval = 1.0 / float(self.camera.framerate)
        due = time.monotonic()
        started = None
        for number in range(10**9):
            if self.stop_flag.wait(max(0.0, due - time.monotonic())):
                break
            if hardware.stall_after is not None and number >= hardware.stall_after:
                self.stop_flag.wait(3600)  # the sensor went quiet
                break
            due += interval
            captured = self._capture_time()
            started = captured if started is None else started
            force = self.key_frames_requested > self._key_frames_generated
            if force:
                self._key_frames_generated += 1
            self._timestamps.append(captured)
            try:
                self.encoder.feed(render(number, width, height), captured - started, keyframe=force)
            except OSError:
                break  # the encoder has gone

    def _run(self):
        first = True
        for _ in range(10**12):
            au = self.encoder.read()
            if au is None:
                break  # the encoder has stopped, or gone (then it goes quiet)
            if self._timestamps:
                timestamp = self._timestamps.popleft()
            elif hardware.picture == "lavfi":
                timestamp = self._capture_time()
            else:
                timestamp = self.frame.timestamp
            if self.stop_flag.is_set() or self.exception is not None:
                continue  # MMAL's port is disabled: what is left is drained, unused
            try:
                for data, frame_type, complete in self._buffers(au, first):
                    self._write(data, frame_type, complete,
                                self.frame.timestamp
                                if frame_type == PiVideoFrameType.sps_header else timestamp)
            except Exception as e:
                self.exception = e
                self.event.set()
            first = False
            self.frames += 1

    def _buffers(self, au, first):
        """(data, frame type, frame end) of the buffers MMAL gives for C{au}."""
        drop = (7, 8) if self.options["sei"] else (6, 7, 8)
        picture = au.annex_b(lambda t: t not in drop)
        if au.keyframe and (self.options["inline_headers"] or first):
            sets = b"".join(b"\x00\x00\x00\x01" + ps for ps in self.encoder.parameter_sets)
            if self.options["inline_headers"]:
                sets = b"".join(b"\x00\x00\x00\x01" + nal for nal in au.nals
                                if nal[0] & 0x1F in (7, 8)) or sets
            yield sets, PiVideoFrameType.sps_header, True
        kind = PiVideoFrameType.key_frame if au.keyframe else PiVideoFrameType.frame
        for start in range(0, len(picture), BUFFER_SIZE):
            yield (picture[start:start + BUFFER_SIZE], kind,
                   start + BUFFER_SIZE >= len(picture))

    def _write(self, data, frame_type, complete, timestamp):
        last = self.frame
        self.frame = PiVideoFrame(
            index=last.index + 1 if last.complete else last.index,
            frame_type=frame_type,
            frame_size=len(data) if last.complete else last.frame_size + len(data),
            video_size=last.video_size + len(data),
            split_size=last.split_size + len(data),
            timestamp=timestamp,
            complete=complete)
        written = self.output.write(data)
        if written is not None and written != len(data):
            raise PiCameraIOError(
                f"Failed to write {len(data)} bytes from buffer to output {self.output!r}")

    def request_key_frame(self):
        self.key_frames_requested += 1

    def stop(self):
        self.stop_flag.set()
        self.encoder.end_input()
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        if self.feeder.is_alive():
            self.feeder.join(5)
        self.encoder.stop()
        self.event.set()


class PiCamera:
    CLOCK_MODES = ("reset", "raw")

    def __init__(self, camera_num=0, stereo_mode="none", stereo_decimate=False,
                 resolution=None, framerate=None, sensor_mode=0, led_pin=None,
                 clock_mode="reset", framerate_range=None):
        if clock_mode not in self.CLOCK_MODES:
            raise PiCameraValueError(f"Invalid clock mode: {clock_mode}")
        with hardware.lock:
            if not hardware.present:
                raise PiCameraError(
                    "Camera is not enabled. Try running 'sudo raspi-config' and "
                    "ensure that the camera has been enabled.")
            if hardware.busy or hardware.open_camera is not None:
                raise PiCameraMMALError(MMAL_ENOSPC, "Failed to enable connection")
            hardware.open_camera = self
            hardware.opened += 1
        self.clock_mode = clock_mode
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
        if format not in ("yuv", "h264"):
            raise PiCameraValueError(f"this fake records 'yuv' or 'h264', not {format!r}")
        if format == "h264":
            h264 = _h264_options(self, **options)
        elif options:
            raise TypeError(f"_create_encoder() got an unexpected keyword argument "
                            f"{next(iter(options))!r}")
        width, height = self.resolution
        if (_align(width, 32), _align(height, 16)) != (width, height):
            warnings.warn(PiCameraResolutionRounded(
                f"frame size rounded up from {width}x{height} to "
                f"{_align(width, 32)}x{_align(height, 16)}"))
        recording = {"resolution": self.resolution, "framerate": self.framerate,
                     "vflip": self.vflip, "hflip": self.hflip, "format": format}
        if options:
            recording["options"] = options
        hardware.recordings.append(recording)
        if format == "h264":
            self._recording = _H264Recording(self, output, h264)
            self._recording.start()
        else:
            self._recording = _Recording(self, output)
            self._recording.thread.start()

    def wait_recording(self, timeout=0, splitter_port=1):
        self._check_camera_open()
        if self._recording is None:
            raise PiCameraNotRecording(
                f"There is no recording in progress on port {splitter_port}")
        self._recording.wait(timeout)

    @property
    def frame(self):
        """The PiVideoFrame of the buffer being written (H.264 recordings)."""
        self._check_camera_open()
        frame = getattr(self._recording, "frame", None)
        if self._recording is None or frame is None:
            raise PiCameraRuntimeError(
                "Cannot query frame information when camera is not recording")
        return frame

    @property
    def timestamp(self):
        """The camera's clock: microseconds since boot."""
        self._check_camera_open()
        return _boottime_us()

    def request_key_frame(self, splitter_port=1):
        self._check_camera_open()
        if self._recording is None:
            raise PiCameraNotRecording(
                f"There is no recording in progress on port {splitter_port}")
        request = getattr(self._recording, "request_key_frame", None)
        if request is not None:
            request()

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
