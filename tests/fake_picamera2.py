"""A stand-in for picamera2 (and the piece of libcamera it needs), for machines
without a camera.

It mirrors the API the daemon uses, with the real library's behaviour where
the daemon could trip over it:

- ``Picamera2.global_camera_info()`` lists the attached cameras (an empty
  list when there is none); ``Picamera2(camera_num)`` opens one, and raises
  ``RuntimeError("Camera __init__ sequence did not complete.")`` when there is
  no such camera or it is already open.
- ``create_video_configuration(main=, controls=, transform=, ...)`` returns
  the same dict the real one does (defaults XBGR8888 1280x720, 6 buffers,
  ``FrameDurationLimits`` 33333 us, sizes trimmed to even; unknown stream
  keys are a ValueError); ``configure`` refuses a transform that is not a
  ``libcamera.Transform`` and, like libcamera, fills in the main stream's
  ``stride`` (the width aligned, to 64 bytes by default) and ``framesize``,
  and may adjust the size or the format (``Rig.adjust_size``, ``Rig.format``).
- Frames come from a camera thread at the rate ``FrameDurationLimits`` asks,
  only while a buffer is free: a request the caller does not release holds
  its buffer, and when all are held the camera stalls, as the real one does.
  The last completed frame is kept for the next capture (``queue=True``).
- ``capture_buffer`` / ``capture_array`` / ``capture_request`` (then
  ``make_buffer`` / ``make_array`` / ``release``) with ``wait`` and
  ``signal_function``, and ``Picamera2.wait(job)``, as jobs run on that
  thread.  A YUV420 buffer is ``stride * height * 3 // 2`` bytes: the Y plane
  with ``stride`` bytes a row, then U and V with ``stride // 2``; the bytes
  past the picture in each row are junk (0xEE), as they may be on a camera.
- The second, smaller stream, ``lores`` (``create_video_configuration(lores=
  {"size": ..., "format": ...})``), checked as picamera2 checks it: the keys
  it knows, sizes trimmed to even, ``preserve_ar`` False by default (the
  main stream's field of view scaled into it), not larger than the main
  stream ("lores stream dimensions may not exceed main stream"), YUV on a
  Pi up to the 4 ("lores stream must be YUV"); then, as libcamera does,
  clamped to the main stream's size if the main one was adjusted, and given
  its own ``stride`` (the width aligned as the main stream's) and
  ``framesize``.  Its pictures are the scene drawn at its size, only when
  something maps them (``Rig.lores_drawn`` counts those).  ``Rig(
  output_streams=1)`` is a camera whose libcamera gives one processed
  stream only: asking for ``lores`` too is then "Invalid camera
  configuration".
- picamera2's null encoder (``picamera2.encoders.Encoder``, the base class),
  started on any stream (``start_encoder(encoder, output, name="lores")``,
  also while the camera runs): its ``outputframe`` is given the stream's
  buffer itself, the camera's memory, valid only while the call lasts
  (here a memoryview that is released when it returns, so an output that
  keeps it without copying fails loudly instead of reading later frames).
- ``stop``, ``close``.
- The H.264 encoder (``picamera2.encoders.H264Encoder``, ``Output`` and
  ``FileOutput`` in ``picamera2.outputs``, ``start_encoder`` /
  ``start_recording`` / ``stop_encoder`` / ``stop_recording``,
  ``force_key_frame``), below at "The camera's H.264 encoder".

The picture is a known scene (four grey quadrants, chroma split left/right
and top/bottom, the frame number in the first pixels) drawn through the
configured flips, so tests can tell exactly what a consumer must make of it.
"""

import collections
import contextlib
import enum
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import Future
from fractions import Fraction
from pathlib import Path

import numpy as np

#: What a camera leaves in the bytes past the picture in each row.
JUNK = 0xEE

QUADRANTS = ((40, 100), (160, 220))  # Y: top (left, right), bottom (left, right)
U_HALVES = (90, 170)  # U: left, right
V_HALVES = (60, 200)  # V: top, bottom


class Transform:
    """libcamera.Transform: hflip, vflip, transpose."""

    def __init__(self, hflip=0, vflip=0, transpose=0):
        self.hflip = bool(hflip)
        self.vflip = bool(vflip)
        self.transpose = bool(transpose)

    def __repr__(self):
        names = [n for n in ("hflip", "vflip", "transpose") if getattr(self, n)]
        return f"<libcamera.Transform '{'|'.join(names) or 'identity'}'>"


def scene(width, height, number=0):
    """The picture the fake camera sees: (Y, U, V) planes as 2-D arrays."""
    y = np.empty((height, width), np.uint8)
    top, left = height // 2, width // 2
    y[:top, :left], y[:top, left:] = QUADRANTS[0]
    y[top:, :left], y[top:, left:] = QUADRANTS[1]
    y[0, :4] = np.frombuffer((number % 2**32).to_bytes(4, "little"), np.uint8)
    cw, ch = width // 2, height // 2
    u = np.empty((ch, cw), np.uint8)
    u[:, :cw // 2], u[:, cw // 2:] = U_HALVES
    v = np.empty((ch, cw), np.uint8)
    v[:ch // 2], v[ch // 2:] = V_HALVES
    return y, u, v


def flipped(planes, hflip, vflip):
    out = []
    for plane in planes:
        if hflip:
            plane = plane[:, ::-1]
        if vflip:
            plane = plane[::-1]
        out.append(np.ascontiguousarray(plane))
    return out


def frame_number(y_plane_row0):
    """The frame number the scene writes into the first pixels (unflipped)."""
    return int.from_bytes(bytes(y_plane_row0[:4]), "little")


def yuv420_buffer(planes, stride):
    """The planes laid out as libcamera does: rows of C{stride} (Y) and
    C{stride // 2} (U, V) bytes, junk past the picture, no padding rows."""
    y, u, v = planes
    height, width = y.shape
    cs = stride // 2
    buffer = np.full(stride * height + 2 * cs * (height // 2), JUNK, np.uint8)
    buffer[:stride * height].reshape(height, stride)[:, :width] = y
    u_start = stride * height
    v_start = u_start + cs * (height // 2)
    buffer[u_start:v_start].reshape(height // 2, cs)[:, :width // 2] = u
    buffer[v_start:].reshape(height // 2, cs)[:, :width // 2] = v
    return buffer


class Rig:
    """What is plugged in and how its libcamera behaves; makes the modules."""

    def __init__(self, cameras=1, stride_align=64, adjust_size=None, model="imx708", usb=0,
                 pi5=False, picture="scene", ffmpeg="ffmpeg", output_streams=2):
        """
        @param cameras: how many Raspberry Pi cameras (CSI) are attached, and
        @param usb: how many USB webcams, listed first (libcamera lists those too).
        @param pi5: a Raspberry Pi 5, which has no hardware H.264 encoder:
            picamera2's H264Encoder is then its LibavH264Encoder.
        @param picture: what the H.264 encoder encodes: "scene", the camera's
            frames; or "lavfi", a moving picture ffmpeg makes itself (so
            that no raw frame crosses Python: for CPU benchmarks).  Raw
            captures then get the same moving picture (a short loop of it,
            made once), so that a raw path has as much to encode.
        @param ffmpeg: the ffmpeg that plays the H.264 encoder.
        @param output_streams: how many processed (YUV or RGB) streams
            libcamera gives at once: 2 (main and lores) on a Raspberry Pi
            camera; 1 is a camera that cannot give a second, smaller stream.
        """
        if picture not in ("scene", "lavfi"):
            raise ValueError(f"picture must be 'scene' or 'lavfi', not {picture!r}")
        self.pi5 = pi5
        self.picture = picture
        self.output_streams = output_streams
        self._moving_pictures = {}
        self.ffmpeg = ffmpeg
        #: Every H.264 encoder started, in order.
        self.encoders = []
        self.cameras = [{"Model": "Webcam C270", "Location": 2,
                         "Id": f"/base/scb/pcie@7d500000/pci@0,0/usb@0,0-1.{i}:1.0-046d:0825"}
                        for i in range(usb)]
        self.cameras += [{"Model": model, "Location": 2, "Rotation": 0,
                          "Id": f"/base/axi/pcie@120000/rp1/i2c@88000/{model}@1a#{i}"}
                         for i in range(cameras)]
        self.stride_align = stride_align
        self.adjust_size = adjust_size or (lambda size: size)
        #: Set to a format name: what libcamera gives whatever is asked (a
        #: webcam through libcamera's UVC support gives YUYV or MJPEG).
        self.format = None
        #: Set to a number of frames: after that many, the camera delivers no more.
        self.stall_after = None
        #: Set to a number of frames: after that many, capturing raises.
        self.fail_after = None
        self.open = set()
        self.opened = 0
        self.opened_numbers = []
        self.closed = 0
        self.configurations = []
        self.frames = 0
        #: Frames whose pixels were drawn (asked for by a capture or an encoder).
        self.drawn = 0
        #: Frames of the lores stream whose pixels were drawn (mapped by a
        #: capture or an encoder).
        self.lores_drawn = 0
        #: Captures asked for (capture_buffer, _array, _request), done or not.
        self.captures_asked = 0
        self.picamera2 = types.ModuleType("picamera2")
        self.picamera2.Picamera2 = type("Picamera2", (Picamera2,), {"rig": self})
        # As after "import picamera2": its encoders and outputs are loaded too.
        encoders = self.picamera2.encoders = types.ModuleType("picamera2.encoders")
        encoders.Encoder = Encoder
        encoders.Quality = Quality
        hardware = type("H264Encoder", (H264Encoder,), {"rig": self})
        libav = type("LibavH264Encoder", (LibavH264Encoder,), {"rig": self})
        encoders.LibavH264Encoder = libav
        encoders.H264Encoder = libav if pi5 else hardware
        outputs = self.picamera2.outputs = types.ModuleType("picamera2.outputs")
        outputs.Output = Output
        outputs.FileOutput = FileOutput
        self.libcamera = types.ModuleType("libcamera")
        self.libcamera.Transform = Transform

    #: Frames in the loop of moving picture that raw captures get with
    #: picture="lavfi" (made once, by ffmpeg, then copied as a camera's buffer is).
    moving_frames = 15

    def moving_picture(self, key, frame_us):
        """With picture="lavfi": the loop of frames raw captures are copies
        of, laid out as libcamera's buffers (C{key}: width, height, hflip,
        vflip, stride), so that a raw path encodes a moving picture too."""
        if key not in self._moving_pictures:
            width, height, hflip, vflip, stride = key
            rate = 1e6 / frame_us
            raw = subprocess.run(
                [self.ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-f", "lavfi",
                 "-i", f"testsrc2=size={width}x{height}:rate={rate:g}",
                 "-frames:v", str(self.moving_frames), "-f", "rawvideo", "-pix_fmt", "yuv420p",
                 "-"], capture_output=True, check=True, timeout=60).stdout
            size = width * height * 3 // 2
            frames = []
            for i in range(len(raw) // size):
                data = np.frombuffer(raw, np.uint8, size, i * size)
                y = data[:width * height].reshape(height, width)
                u = data[width * height:width * height * 5 // 4].reshape(height // 2, width // 2)
                v = data[width * height * 5 // 4:].reshape(height // 2, width // 2)
                frames.append(yuv420_buffer(flipped((y, u, v), hflip, vflip), stride))
            self._moving_pictures[key] = frames
        return self._moving_pictures[key]

    def import_module(self, name):
        """importlib.import_module for a machine where this is installed."""
        modules = {"picamera2": self.picamera2, "libcamera": self.libcamera,
                   "picamera2.encoders": self.picamera2.encoders,
                   "picamera2.outputs": self.picamera2.outputs}
        if name in modules:
            return modules[name]
        raise ImportError(f"No module named {name!r}")


def rig_from_environment():
    """A Rig described by $FAKE_PICAMERA2 (JSON keyword arguments), for a daemon
    started with shim ``picamera2`` and ``libcamera`` packages on its path;
    e.g. ``{"pi5": true}`` or ``{"picture": "lavfi"}``."""
    return Rig(**json.loads(os.environ.get("FAKE_PICAMERA2", "{}")))


_shim_rig = []


def shim_rig():
    """The one Rig of this process (from the environment), for the shims."""
    if not _shim_rig:
        _shim_rig.append(rig_from_environment())
    return _shim_rig[0]


#: The shim packages: the names of the real ones, each from shim_rig().
_SHIMS = {
    "picamera2/__init__.py": (
        "from tests.fake_picamera2 import shim_rig\n"
        "Picamera2 = shim_rig().picamera2.Picamera2\n"
        "from picamera2 import encoders, outputs  # noqa: E402 (as the real package)\n"),
    "picamera2/encoders/__init__.py": (
        "from tests.fake_picamera2 import shim_rig\n"
        "_module = shim_rig().picamera2.encoders\n"
        "Encoder, Quality = _module.Encoder, _module.Quality\n"
        "H264Encoder, LibavH264Encoder = _module.H264Encoder, _module.LibavH264Encoder\n"),
    "picamera2/outputs/__init__.py": (
        "from tests.fake_picamera2 import shim_rig\n"
        "_module = shim_rig().picamera2.outputs\n"
        "Output, FileOutput = _module.Output, _module.FileOutput\n"),
    "libcamera/__init__.py": "from tests.fake_picamera2 import Transform  # noqa: F401\n",
}


def write_shims(directory):
    """Writes ``picamera2`` (with ``picamera2.encoders`` and
    ``picamera2.outputs``) and ``libcamera`` packages into C{directory} that
    hand out this fake, for a daemon started with C{directory} and the
    repository on its PYTHONPATH and the Rig in $FAKE_PICAMERA2."""
    directory = Path(directory)
    for name, body in _SHIMS.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)


class Job:
    """picamera2.job.Job: functions run on the camera thread, a Future for the result."""

    def __init__(self, functions, signal_function=None):
        self._functions = list(functions)
        self._future = Future()
        self._future.set_running_or_notify_cancel()
        self._signal_function = signal_function
        self._result = None

    def execute(self):
        try:
            while self._functions:
                done, result = self._functions[0]()
                if not done:
                    break
                self._functions.pop(0)
            if not self._functions:
                self._result = result
        except Exception as e:
            self._future.set_exception(e)
            self._functions = []
        return not self._functions

    def signal(self):
        if not self._future.done():
            self._future.set_result(self._result)
        if self._signal_function:
            self._signal_function(self)

    def get_result(self, timeout=None):
        return self._future.result(timeout=timeout)


class CompletedRequest:
    """picamera2.request.CompletedRequest: holds its buffer until released."""

    def __init__(self, camera, buffer, config, sensor_timestamp_ns=0, frame_duration_us=0,
                 lores=None):
        self.picam2 = camera
        self._buffer = buffer  # an array, a function that draws it, or None once released
        self._lores = lores  # the same, of the lores stream (None: no such stream)
        self.config = config
        self.ref_count = 1
        self._metadata = {"SensorTimestamp": sensor_timestamp_ns,
                          "FrameDuration": frame_duration_us}

    def get_metadata(self):
        return dict(self._metadata)

    def _pixels(self):
        """The buffer's contents (drawn when first asked for), or None once released."""
        if callable(self._buffer):
            self._buffer = self._buffer()
        return self._buffer

    def _stream_pixels(self, name):
        """The named stream's buffer (drawn when first asked for), or None
        once released (or when the camera failed to fill it)."""
        if self.config.get(name) is None:
            raise RuntimeError(f"Stream {name!r} is not defined")
        if name == "main":
            return self._pixels()
        if name != "lores":
            raise RuntimeError(f"the fake has no {name!r} stream")
        if self._buffer is None:
            return None
        if callable(self._lores):
            self._lores = self._lores()
        return self._lores

    @contextlib.contextmanager
    def _mapped(self, name):
        """The named stream's buffer as picamera2's _MappedBuffer gives it:
        the camera's memory itself, for the length of the block."""
        pixels = self._stream_pixels(name)
        if pixels is None:
            raise RuntimeError("failed to find buffer")
        view = memoryview(pixels)
        try:
            yield view
        finally:
            view.release()

    def acquire(self):
        with self.picam2._lock:
            if self.ref_count == 0:
                raise RuntimeError("CompletedRequest: acquiring lock with ref_count 0")
            self.ref_count += 1

    def release(self):
        with self.picam2._lock:
            self.ref_count -= 1
            if self.ref_count < 0:
                raise RuntimeError("CompletedRequest: lock now has negative ref_count")
            if self.ref_count == 0:
                self.picam2._free_buffers += 1
                self._buffer = self._lores = None
                self.picam2._lock.notify_all()

    def make_buffer(self, name):
        pixels = self._stream_pixels(name)
        if pixels is None:
            raise RuntimeError("Camera frontend has timed out!")
        return np.array(pixels, dtype=np.uint8)  # a copy, as the real one

    def make_array(self, name):
        stream = self.config[name]
        width, height = stream["size"]
        return self.make_buffer(name).reshape((height * 3 // 2, stream["stride"]))


#: picamera2.formats: the YUV formats, and the RGB ones.
_YUV_FORMATS = ("NV21", "NV12", "YUV420", "YVU420", "YVYU", "YUYV", "UYVY", "VYUY")
_RGB_FORMATS = ("BGR888", "RGB888", "XBGR8888", "XRGB8888", "RGB161616", "BGR161616")


class Picamera2:
    rig = None  # set by Rig, per subclass

    @classmethod
    def global_camera_info(cls):
        return [dict(c) for c in cls.rig.cameras]

    def __init__(self, camera_num=0, verbose_console=None, tuning=None):
        rig = self.rig
        if not 0 <= camera_num < len(rig.cameras) or camera_num in rig.open:
            raise RuntimeError("Camera __init__ sequence did not complete.")
        rig.open.add(camera_num)
        rig.opened += 1
        rig.opened_numbers.append(camera_num)
        self.camera_idx = camera_num
        self.is_open = True
        self.started = False
        self.camera_config = None
        self._lock = threading.Condition()
        self._completed = []
        self._jobs = []
        self._free_buffers = 0
        self._thread = None
        self._running = False
        self._encoders = set()
        self._drawn_scenes = {}
        self.encode_stream_name = None
        # The sensor's limits (FrameDurationLimits: min, max, default in us).
        self.camera_ctrl_info = {"FrameDurationLimits": (
            None, types.SimpleNamespace(min=8333, max=10_000_000, default=33333))}

    # -- configuration ---------------------------------------------------

    @staticmethod
    def _stream_config(stream, updates):
        """picamera2's _make_initial_stream_config, then align_stream(optimal=False)."""
        if updates is None:
            return None
        valid = ("format", "size", "stride", "preserve_ar")
        for key, value in updates.items():
            if key not in valid:
                raise ValueError(f"Bad key {key!r}: valid stream configuration keys are {valid}")
            stream[key] = value
        width, height = stream["size"]
        stream["size"] = (width - width % 2, height - height % 2)
        return stream

    def create_video_configuration(self, main={}, lores=None, raw={}, transform=Transform(),
                                   colour_space=None, buffer_count=6, controls={},
                                   display="main", encode="main", queue=True):
        if not self.is_open:
            raise RuntimeError("Camera not opened")
        stream = self._stream_config(
            {"format": "XBGR8888", "size": (1280, 720), "preserve_ar": True}, main)
        lores = self._stream_config(
            {"format": "YUV420", "size": stream["size"], "preserve_ar": False}, lores)
        controls = {"NoiseReductionMode": 1, "FrameDurationLimits": (33333, 33333)} | controls
        config = {"use_case": "video", "transform": transform, "colour_space": colour_space,
                  "buffer_count": buffer_count, "queue": queue, "main": stream,
                  "lores": lores, "raw": None, "controls": controls}
        for role, name in (("Display", display), ("Encode", encode)):
            if name is not None and config.get(name) is None:
                raise RuntimeError(f"{role} stream {name} was not defined")
        config.update(display=display, encode=encode)
        return config

    def configure(self, camera_config="preview"):
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        if not isinstance(camera_config, dict):
            raise NotImplementedError("the fake takes configuration dicts only")
        if not isinstance(camera_config["transform"], Transform):
            raise RuntimeError("Transform has incorrect type")
        config = dict(camera_config)
        stream = dict(config["main"])
        self._check_stream(stream, "main")
        lores = config.get("lores")
        if lores is not None:
            # picamera2's check_camera_config
            lores = dict(lores)
            self._check_stream(lores, "lores")
            (main_w, main_h), (lores_w, lores_h) = stream["size"], lores["size"]
            if lores_w > main_w or lores_h > main_h:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
            if not self.rig.pi5 and lores["format"] not in _YUV_FORMATS:
                raise RuntimeError("lores stream must be YUV")
            if self.rig.output_streams < 2:
                # libcamera: CameraConfiguration::validate() says Invalid
                raise RuntimeError(f"Invalid camera configuration: {camera_config}")
        width, height = self.rig.adjust_size(stream["size"])
        stream["format"] = self.rig.format or stream["format"]
        self._fill_in(stream, width, height)
        config["main"] = stream
        if lores is not None:
            # libcamera (the Pi's pipeline handlers): the second stream is
            # no larger than the first in either dimension.
            lores_w, lores_h = lores["size"]
            self._fill_in(lores, min(lores_w, width), min(lores_h, height))
            config["lores"] = lores
        self.camera_config = config
        self.encode_stream_name = config["encode"]
        self.rig.configurations.append(config)

    @staticmethod
    def _check_stream(stream, name):
        """picamera2's check_stream_config."""
        if not isinstance(stream, dict):
            raise RuntimeError(name + " stream should be a dictionary")
        for key in ("format", "size"):
            if key not in stream:
                raise RuntimeError(f"{key} not found in {name} stream")
        if not isinstance(stream["format"], str):
            raise RuntimeError("format in " + name + " stream should be a string")
        if stream["format"] not in _YUV_FORMATS + _RGB_FORMATS + ("MJPEG",):
            raise RuntimeError(f"Bad format {stream['format']} in stream {name}")
        size = stream["size"]
        if not isinstance(size, tuple) or len(size) != 2:
            raise RuntimeError(f"size in {name} stream should be (width, height)")
        if size[0] % 2 or size[1] % 2:
            raise RuntimeError("width and height should be even")

    def _fill_in(self, stream, width, height):
        """What libcamera fills in: the size it gives, the stride, the frame size."""
        align = self.rig.stride_align
        if stream["format"] in ("YUV420", "YVU420"):
            stride = -(-width // align) * align
            framesize = stride * height * 3 // 2
        else:
            bpp = {"XBGR8888": 4, "XRGB8888": 4, "BGR888": 3, "RGB888": 3}.get(stream["format"], 2)
            stride = -(-width * bpp // align) * align
            framesize = stride * height
        stream.update(size=(width, height), stride=stride, framesize=framesize)

    def camera_configuration(self):
        return self.camera_config

    def stream_configuration(self, name="main"):
        return self.camera_config[name]

    # -- running ---------------------------------------------------------

    def start(self, config=None, show_preview=False):
        if config is not None:
            self.configure(config)
        if self.camera_config is None:
            raise RuntimeError("Camera has not been configured")
        if self.started:
            return
        self._free_buffers = self.camera_config["buffer_count"]
        self._running = True
        self.started = True
        self._thread = threading.Thread(target=self._event_loop, daemon=True,
                                        name="fake picamera2")
        self._thread.start()

    def stop(self):
        if not self.started:
            return
        with self._lock:
            self._running = False
            self._lock.notify_all()
        self._thread.join(5)
        with self._lock:
            for request in self._completed:
                self._release_locked(request)  # the camera's own hold on it
            self._completed = []
        self.started = False

    def close(self):
        if not self.is_open:
            return
        self.stop()
        self.rig.open.discard(self.camera_idx)
        self.rig.closed += 1
        self.is_open = False
        self.camera_config = None

    def _event_loop(self):
        config = self.camera_config
        stream = config["main"]
        width, height = stream["size"]
        transform = config["transform"]
        interval = config["controls"]["FrameDurationLimits"][0] / 1_000_000
        max_queue = 1 if config["queue"] and config["buffer_count"] > 1 else 0
        due = time.monotonic() + interval
        for _ in range(10_000_000):
            to_encode = None
            with self._lock:
                while self._running:
                    now = time.monotonic()
                    if self._jobs and self._completed:
                        break
                    if now >= due and self._free_buffers > 0:
                        break
                    wait = max(0.0, due - now) if self._free_buffers > 0 else 0.05
                    self._lock.wait(wait)
                if not self._running:
                    return
                if time.monotonic() >= due and self._free_buffers > 0:
                    due += interval
                    if due < time.monotonic():  # fell behind: no burst to catch up
                        due = time.monotonic() + interval
                    if self.rig.stall_after is None or self.rig.frames < self.rig.stall_after:
                        self._free_buffers -= 1
                        request = self._capture(width, height, transform, config)
                        self._completed.append(request)
                        self.rig.frames += 1
                        if self._encoders:
                            request.ref_count += 1  # the encoders' use of it
                            to_encode = (request, list(self._encoders))
                finished = []
                while self._jobs and self._completed:
                    if self._jobs[0].execute():
                        finished.append(self._jobs.pop(0))
                    else:
                        break
                while len(self._completed) > max_queue:
                    request = self._completed.pop(0)
                    request.ref_count -= 1
                    if request.ref_count == 0:
                        self._free_buffers += 1
            if to_encode is not None:
                request, encoders = to_encode
                try:
                    for encoder in encoders:
                        if encoder.name in self.camera_config:
                            encoder.encode(encoder.name, request)
                except Exception as e:
                    # As picamera2's event loop (its preview thread): the
                    # exception is logged, and the loop is over.
                    print(f"Exception during process_requests(): {type(e).__name__}: {e}",
                          file=sys.stderr)
                    request.release()
                    return
                request.release()
            for job in finished:
                job.signal()

    def _capture(self, width, height, transform, config):
        number = self.rig.frames

        def drawer(name):
            stream = config[name]
            (width, height), stride = stream["size"], stream["stride"]

            def draw():
                if name == "main":
                    self.rig.drawn += 1
                else:
                    self.rig.lores_drawn += 1
                key = (width, height, transform.hflip, transform.vflip, stride)
                if self.rig.picture == "lavfi":
                    # The moving picture the encoder makes itself, for raw captures too.
                    loop = self.rig.moving_picture(
                        key, config["controls"]["FrameDurationLimits"][0])
                    return loop[number % len(loop)].copy()
                # The scene of frame 0 (the whole field of view, at this
                # stream's size), drawn once, with this frame's number written in.
                if key not in self._drawn_scenes:
                    planes = flipped(scene(width, height, 0), transform.hflip, transform.vflip)
                    self._drawn_scenes[key] = yuv420_buffer(planes, stride)
                buffer = self._drawn_scenes[key].copy()
                luma = buffer[:stride * height].reshape(height, stride)
                digits = np.frombuffer((number % 2**32).to_bytes(4, "little"), np.uint8)
                row = height - 1 if transform.vflip else 0
                if transform.hflip:
                    luma[row, width - 4:width] = digits[::-1]
                else:
                    luma[row, :4] = digits
                return buffer
            return draw

        request = CompletedRequest(self, drawer("main"), config, boottime_us() * 1000,
                                   config["controls"]["FrameDurationLimits"][0],
                                   lores=drawer("lores") if config.get("lores") else None)
        if self.rig.fail_after is not None and self.rig.frames >= self.rig.fail_after:
            request._buffer = None  # make_buffer will fail, as on a camera error
        return request

    # -- encoders ----------------------------------------------------------

    def start_encoder(self, encoder=None, output=None, pts=None, quality=None, name=None):
        _encoder = None
        if encoder is not None:
            _encoder = encoder
        elif len(self._encoders) > 1:
            raise RuntimeError("Multiple possible encoders, need to pass encoder")
        elif len(self._encoders) == 1:
            _encoder = list(self._encoders)[0]
        if _encoder is None:
            raise RuntimeError("No encoder specified")
        if output is not None:
            if isinstance(output, str):
                output = FileOutput(output, pts=pts)
            _encoder.output = output
        streams = self.camera_configuration()
        if not streams:
            raise RuntimeError("Camera has not been configured")
        if name is None:
            name = self.encode_stream_name
        if streams.get(name, None) is None:
            raise RuntimeError(f"Encode stream {name} was not defined")
        _encoder.name = name
        _encoder.width, _encoder.height = streams[name]["size"]
        _encoder.format = streams[name]["format"]
        _encoder.stride = streams[name]["stride"]
        min_frame_duration = max(self.camera_ctrl_info["FrameDurationLimits"][1].min, 33333)
        try:
            if _encoder.framerate is None:
                _encoder.framerate = 1000000 / min_frame_duration
        except AttributeError:
            pass
        _encoder.start(quality=quality)
        with self._lock:
            self._encoders.add(_encoder)

    def stop_encoder(self, encoders=None):
        remove = []
        if encoders is None:
            for encoder in self._encoders:
                encoder.stop()
                remove += [encoder]
        elif isinstance(encoders, Encoder):
            encoders.stop()
            remove += [encoders]
        elif isinstance(encoders, (list, set)):
            for encoder in encoders:
                encoder.stop()
                remove += [encoder]
        with self._lock:
            for encoder in remove:
                self._encoders.remove(encoder)

    @property
    def encoders(self):
        return self._encoders

    @encoders.setter
    def encoders(self, value):
        if isinstance(value, Encoder):
            self._encoders.add(value)
        elif isinstance(value, set):
            self._encoders.update(value)
        else:
            raise RuntimeError("Must pass Encoder or set of")

    def start_recording(self, encoder, output, pts=None, config=None, quality=None, name=None):
        if not self.camera_config and config is None:
            config = "video"
        if config is not None:
            self.configure(config)
        self.start_encoder(encoder, output, pts=pts, quality=quality, name=name)
        self.start()

    def stop_recording(self):
        self.stop()
        self.stop_encoder()

    # -- jobs --------------------------------------------------------------

    def dispatch_functions(self, functions, wait, signal_function=None, immediate=False):
        if wait is None:
            wait = signal_function is None
        job = Job(functions, signal_function)
        with self._lock:
            self._jobs.append(job)
            self._lock.notify_all()
        return job.get_result() if wait else job

    def wait(self, job, timeout=None):
        return job.get_result(timeout)

    def _take(self):
        """The oldest completed request, now the caller's (under the lock)."""
        if not self._completed:
            return None
        return self._completed.pop(0)

    def _make(self, name, what):
        def function():
            request = self._take()
            if request is None:
                return False, None
            if what == "request":
                return True, request
            try:
                result = request.make_buffer(name) if what == "buffer" else request.make_array(name)
            finally:
                self._release_locked(request)
            return True, result
        return function

    def _release_locked(self, request):
        request.ref_count -= 1
        if request.ref_count == 0:
            self._free_buffers += 1
            request._buffer = request._lores = None

    def capture_buffer(self, name="main", wait=None, signal_function=None):
        self.rig.captures_asked += 1
        return self.dispatch_functions([self._make(name, "buffer")], wait, signal_function)

    def capture_array(self, name="main", wait=None, signal_function=None):
        return self.dispatch_functions([self._make(name, "array")], wait, signal_function)

    def capture_request(self, wait=None, signal_function=None):
        return self.dispatch_functions([self._make("main", "request")], wait, signal_function)


# -- The camera's H.264 encoder -----------------------------------------------------
#
# picamera2 (picamera2/encoders/, picamera2/outputs/ upstream) encodes with
# H264Encoder, which on a Pi up to the 4 is the V4L2 hardware encoder
# (/dev/video11) and on a Pi 5, which has none, is LibavH264Encoder (libx264
# through PyAV) under the same name.  Both call ``outputframe(frame, keyframe,
# timestamp, packet, audio)`` on their outputs once per encoded picture (one
# access unit, Annex B), with ``timestamp`` in microseconds since the first
# frame the encoder saw; the V4L2 one from its own thread (``thread``, which
# polls the device), the libav one from the camera's thread, inside
# ``encode``.  ``force_key_frame()`` (picamera2 0.3.32 and later) asks for an
# IDR on the next frame encoded.
#
# Here the encoding itself happens outside this process, as it does on the
# Pi: an ffmpeg child (libx264) plays the encoder.  The camera's frames go to
# it as Matroska (raw I420 with timestamps: a frame whose keyframe was asked
# for is marked by an odd microsecond, which ffmpeg's -force_key_frames
# expression turns into an IDR), and the pictures come back as FLV, whose
# tags carry their own length, so each access unit is taken whole the moment
# ffmpeg has written it, without waiting for the next one.  Or, with
# ``Rig(picture="lavfi")`` (for CPU benchmarks), ffmpeg makes its own moving
# picture (testsrc2, at the camera's size and rate) and no raw frame crosses
# Python at all; the camera's frames then go nowhere, forced keyframes are
# not honoured, and timestamps are ffmpeg's.
#
# The ffmpeg child's argv[0] is ENCODER_PROCESS_NAME, so that a benchmark can
# tell the "hardware" encoder apart from the daemon's own children.
#
# Where the fake parts from picamera2: when the V4L2 encoder's thread dies,
# picamera2's camera loop soon blocks for good (no output buffer comes back),
# and stopping it hangs; here the camera goes on and frames are no longer
# encoded.  The libav encoder, here too, raises out of the camera's loop,
# which then ends (said on stderr, as picamera2 logs it).

#: argv[0] of the ffmpeg child that plays a camera's hardware H.264 encoder.
ENCODER_PROCESS_NAME = "fake-camera-h264-encoder"

#: The I-frame period of a V4L2 H264Encoder whose iperiod is not set: the
#: bcm2835 codec driver's default for V4L2_CID_MPEG_VIDEO_H264_I_PERIOD.
V4L2_DEFAULT_IPERIOD = 60


def boottime_us():
    """Microseconds since boot (CLOCK_BOOTTIME), the clock of libcamera's
    SensorTimestamp and of picamera's raw timestamps."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None:
        return time.monotonic_ns() // 1000
    return time.clock_gettime_ns(clock) // 1000


# Matroska, just enough to carry raw I420 frames with microsecond timestamps.

def _vint(n):
    for length in range(1, 9):
        if n < (1 << (7 * length)) - 1:
            return ((1 << (7 * length)) | n).to_bytes(length, "big")
    raise ValueError(f"{n} does not fit an EBML size")


def _element(element_id, payload):
    return element_id + _vint(len(payload)) + payload


def _uint(element_id, value):
    return _element(element_id, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def matroska_header(width, height, framerate):
    """The start of a live Matroska stream of one raw I420 track of
    C{width}x{height}, timestamps in microseconds."""
    ebml = _element(b"\x1a\x45\xdf\xa3", b"".join([
        _uint(b"\x42\x86", 1), _uint(b"\x42\xf7", 1), _uint(b"\x42\xf2", 4),
        _uint(b"\x42\xf3", 8), _element(b"\x42\x82", b"matroska"),
        _uint(b"\x42\x87", 4), _uint(b"\x42\x85", 2)]))
    info = _element(b"\x15\x49\xa9\x66", _uint(b"\x2a\xd7\xb1", 1000)
                    + _element(b"\x4d\x80", b"fake camera") + _element(b"\x57\x41", b"fake camera"))
    video = _element(b"\xe0", _uint(b"\xb0", width) + _uint(b"\xba", height)
                     + _element(b"\x2e\xb5\x24", b"I420"))
    track = _element(b"\xae", b"".join([
        _uint(b"\xd7", 1), _uint(b"\x73\xc5", 1), _uint(b"\x83", 1),
        _element(b"\x86", b"V_UNCOMPRESSED"),
        _uint(b"\x23\xe3\x83", round(1e9 / framerate)), video]))
    segment_of_unknown_size = b"\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff"
    return ebml + segment_of_unknown_size + info + _element(b"\x16\x54\xae\x6b", track)


def matroska_frame(timestamp_us, frame):
    """One frame as a cluster of its own (at C{timestamp_us}) holding one key block."""
    return _element(b"\x1f\x43\xb6\x75", _uint(b"\xe7", timestamp_us)
                    + _element(b"\xa3", b"\x81\x00\x00\x80" + bytes(frame)))


class AccessUnit:
    """One encoded picture as the encoder gave it: its NAL units (without
    start codes), whether it is an IDR, and ffmpeg's timestamp (ms)."""

    def __init__(self, nals, milliseconds):
        self.nals = nals
        self.milliseconds = milliseconds
        self.keyframe = any(nal[0] & 0x1F == 5 for nal in nals)

    def annex_b(self, keep=lambda nal_type: True):
        return b"".join(b"\x00\x00\x00\x01" + nal for nal in self.nals if keep(nal[0] & 0x1F))


def _ffmpeg_version(ffmpeg, _known={}):
    if ffmpeg not in _known:
        try:
            out = subprocess.run([ffmpeg, "-hide_banner", "-version"], capture_output=True,
                                 text=True, timeout=10).stdout
            numbers = out.split()[2].split("-")[0].split(".")
            _known[ffmpeg] = tuple(int(n) for n in numbers[:2])
        except (OSError, IndexError, ValueError, subprocess.SubprocessError):
            _known[ffmpeg] = (0, 0)
    return _known[ffmpeg]


class ExternalEncoder:
    """An ffmpeg child encoding H.264 with libx264, playing a camera's encoder."""

    def __init__(self, size, framerate, bitrate=None, keyint=None, profile=None, level=None,
                 qp=None, preset="ultrafast", repeat_headers=True, picture="scene",
                 input_size=None, ffmpeg="ffmpeg"):
        """
        @param size: (width, height) of the picture encoded.
        @param keyint: frames from one IDR to the next (0: only the first).
        @param input_size: (width, height) of the frames fed, when larger
            than C{size} (a stride wider than the picture, padding): cropped.
        @param picture: "scene" (frames are fed) or "lavfi" (ffmpeg makes its own).
        """
        self.size = size
        self.framerate = float(framerate)
        self.picture = picture
        self.input_size = input_size or size
        self.parameter_sets = []
        self.process = None
        self._last_fed = None
        self._stderr = tempfile.TemporaryFile()
        ffmpeg_path = shutil.which(ffmpeg) or ffmpeg
        width, height = size
        args = [ENCODER_PROCESS_NAME, "-hide_banner", "-nostats", "-loglevel", "error"]
        if picture == "lavfi":
            args += ["-nostdin", "-re", "-f", "lavfi",
                     "-i", f"testsrc2=size={width}x{height}:rate={self.framerate:g}"]
        elif picture == "scene":
            sync = ["-fps_mode", "passthrough"] if _ffmpeg_version(ffmpeg) >= (5, 1) \
                else ["-vsync", "passthrough"]
            args += ["-probesize", "32", "-analyzeduration", "0", "-f", "matroska", "-i", "pipe:0"]
            args += sync + ["-enc_time_base", "-1",
                            "-force_key_frames", "expr:eq(mod(round(t*1000000),2),1)"]
            if self.input_size != size:
                args += ["-vf", f"crop={width}:{height}:0:0"]
        else:
            raise ValueError(f"picture must be 'scene' or 'lavfi', not {picture!r}")
        never = 2**31 - 1
        args += ["-an", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", preset,
                 "-tune", "zerolatency", "-g", str(keyint or never)]
        if profile:
            args += ["-profile:v", profile]
        if level:
            args += ["-level", level]
        if bitrate:
            args += ["-b:v", str(int(bitrate))]
        if qp is not None:
            args += ["-qmin", str(qp), "-qmax", str(qp)]
        args += ["-x264-params", f"repeat-headers={1 if repeat_headers else 0}",
                 "-flush_packets", "1", "-f", "flv", "pipe:1"]
        self.args = args
        self.process = subprocess.Popen(
            args, executable=ffmpeg_path,
            stdin=subprocess.PIPE if picture == "scene" else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=self._stderr)
        if picture == "scene":
            self.process.stdin.write(matroska_header(*self.input_size, self.framerate))
            self.process.stdin.flush()
        self._started_reading = False

    @property
    def pid(self):
        return self.process.pid

    def feed(self, frame, timestamp_us, keyframe=False):
        """One frame (I420 at C{input_size}), C{timestamp_us} after the first;
        C{keyframe}: encode it as an IDR.  Raises BrokenPipeError (an OSError)
        if ffmpeg has gone."""
        # An even microsecond for each frame, odd where an IDR is wanted.
        even = int(timestamp_us) - int(timestamp_us) % 2
        if self._last_fed is not None and even <= self._last_fed:
            even = self._last_fed - self._last_fed % 2 + 2
        value = even + (1 if keyframe else 0)
        self._last_fed = value
        try:
            self.process.stdin.write(matroska_frame(value, frame))
            self.process.stdin.flush()
        except ValueError:  # end_input() closed it meanwhile: gone, as a broken pipe
            raise BrokenPipeError(errno.EPIPE, "the encoder's input is closed") from None

    def end_input(self):
        """No more frames: ffmpeg encodes what it has and exits."""
        if self.picture == "scene":
            try:
                self.process.stdin.close()
            except OSError:
                pass
        elif self.process.poll() is None:
            self.process.terminate()

    def read(self):
        """The next access unit (an L{AccessUnit}), or None once ffmpeg's
        output has ended."""
        out = self.process.stdout
        if not self._started_reading:
            self._started_reading = True
            header = out.read(9)
            if len(header) < 9 or header[:3] != b"FLV":
                return None
            out.read(int.from_bytes(header[5:9], "big") - 9 + 4)
        for _ in range(10**9):
            tag = out.read(11)
            if len(tag) < 11:
                return None
            size = int.from_bytes(tag[1:4], "big")
            milliseconds = int.from_bytes(tag[4:7], "big") | (tag[7] << 24)
            body = out.read(size)
            out.read(4)
            if len(body) < size:
                return None
            if tag[0] != 9 or len(body) < 5 or body[0] & 0x0F != 7:
                continue  # script data (metadata), or not H.264
            if body[1] == 0:
                self._configuration(body[5:])
            elif body[1] == 1:
                nals = []
                data, offset = body, 5
                length_size = self._length_size
                while offset + length_size <= len(data):
                    length = int.from_bytes(data[offset:offset + length_size], "big")
                    offset += length_size
                    nals.append(data[offset:offset + length])
                    offset += length
                if nals:
                    return AccessUnit(nals, milliseconds)
        return None

    _length_size = 4

    def _configuration(self, record):
        """The AVCDecoderConfigurationRecord: the SPS and PPS, and NAL length size."""
        self._length_size = (record[4] & 3) + 1
        sets, offset = [], 5
        for _kind in range(2):
            count = record[offset] & 0x1F
            offset += 1
            for _ in range(count):
                length = int.from_bytes(record[offset:offset + 2], "big")
                sets.append(record[offset + 2:offset + 2 + length])
                offset += 2 + length
        self.parameter_sets = sets

    def error(self):
        """What ffmpeg said on stderr, in one line."""
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            text = ""
        return " / ".join(text.splitlines()[-3:])

    def stop(self, timeout=3.0):
        """Ends the child (if it has not ended) and reaps it."""
        self.end_input()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stdin):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._stderr.close()


class Quality(enum.Enum):
    """picamera2.encoders.Quality."""
    VERY_LOW = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    VERY_HIGH = 4


#: picamera2.formats.ALL_FORMATS but the Bayer ones: what an encoder's format may be.
_ENCODER_FORMATS = {"NV21", "NV12", "YUV420", "YVU420", "YVYU", "YUYV", "UYVY", "VYUY",
                    "BGR888", "RGB888", "XBGR8888", "XRGB8888", "RGB161616", "BGR161616",
                    "R8", "R10", "R12", "R16", "R8_CSI2P", "R10_CSI2P", "R12_CSI2P"}


class Output:
    """picamera2.outputs.Output: what encoders write their frames to."""

    def __init__(self, pts=None):
        self.recording = False
        self.ptsoutput = pts
        self.needs_pacing = False
        self.needs_add_stream = False

    def start(self):
        self.recording = True

    def stop(self):
        self.recording = False

    def outputframe(self, frame, keyframe=True, timestamp=None, packet=None, audio=False):
        """Outputs one frame from the encoder (does nothing here)."""

    def outputtimestamp(self, timestamp):
        if self.ptsoutput is not None and timestamp is not None:
            print(f"{timestamp // 1000}.{timestamp % 1000:03}", file=self.ptsoutput, flush=True)

    @property
    def ptsoutput(self):
        return self._ptsoutput

    @ptsoutput.setter
    def ptsoutput(self, file):
        if file is None:
            self._ptsoutput = None
        elif isinstance(file, str):
            self._ptsoutput = open(file, "w")
        else:
            self._ptsoutput = file

    def _add_stream(self, encoder_stream, *args, **kwargs):
        pass


class FileOutput(Output):
    """picamera2.outputs.FileOutput: the frames written to a file, from the first keyframe."""

    def __init__(self, file=None, pts=None, split=None):
        super().__init__(pts=pts)
        self.dead = False
        self._needs_close = False
        if file is None:
            self.fileoutput = None
        elif isinstance(file, (str, Path)):
            self.fileoutput = open(file, "wb")
            self._needs_close = True
        elif isinstance(file, io.BufferedIOBase):
            self.fileoutput = file
        else:
            raise RuntimeError("Must pass io.BufferedIOBase")
        self._firstframe = True

    def outputframe(self, frame, keyframe=True, timestamp=None, packet=None, audio=False):
        if audio:
            raise RuntimeError("Fileoutput does not support audio")
        if self.fileoutput is not None and self.recording:
            if self._firstframe:
                if not keyframe:
                    return
                self._firstframe = False
            self.fileoutput.write(frame)
            self.fileoutput.flush()
            self.outputtimestamp(timestamp)

    def stop(self):
        super().stop()
        if self._needs_close:
            self.fileoutput.close()


class Encoder:
    """picamera2.encoders.Encoder: the base of the encoders, as upstream."""

    rig = None  # set by Rig, per subclass

    def __init__(self, framerate=30):
        self._width = 0
        self._height = 0
        self._stride = 0
        self._format = None
        self._output = []
        self._running = False
        self._name = None
        self._framerate = framerate
        self._lock = threading.Lock()
        self.firsttimestamp = None
        self.frame_skip_count = 1
        self._skip_count = 0
        self._output_lock = threading.Lock()
        self.audio = False
        self.frames_encoded = 0
        self.sync_enable = False

    @property
    def running(self):
        return self._running

    @property
    def width(self):
        return self._width

    @width.setter
    def width(self, value):
        if not isinstance(value, int):
            raise RuntimeError("Width must be integer")
        self._width = value

    @property
    def height(self):
        return self._height

    @height.setter
    def height(self, value):
        if not isinstance(value, int):
            raise RuntimeError("Height must be integer")
        self._height = value

    @property
    def size(self):
        return (self._width, self._height)

    @size.setter
    def size(self, value):
        if not isinstance(value, tuple) or len(value) != 2:
            raise RuntimeError("Size must be a tuple of two integers")
        self.width, self.height = value

    @property
    def stride(self):
        return self._stride

    @stride.setter
    def stride(self, value):
        if not isinstance(value, int):
            raise RuntimeError("Stride must be integer")
        self._stride = value

    @property
    def format(self):
        return self._format

    @format.setter
    def format(self, value):
        if value not in _ENCODER_FORMATS:
            raise ValueError(f"Invalid format: {value}. Valid formats are: {_ENCODER_FORMATS}")
        self._format = value

    @property
    def output(self):
        return self._output[0] if len(self._output) == 1 else self._output

    @output.setter
    def output(self, value):
        if isinstance(value, list):
            for out in value:
                if not isinstance(out, Output):
                    raise RuntimeError("Must pass Output")
        elif isinstance(value, Output):
            value = [value]
        else:
            raise RuntimeError("Must pass Output")
        self._output = value

    @property
    def name(self):
        return self._name

    @name.setter
    def name(self, value):
        if not isinstance(value, str):
            raise RuntimeError("Name must be string")
        self._name = value

    def encode(self, stream, request):
        if self._skip_count == 0:
            with self._lock:
                if not self._running:
                    return
                self._encode(stream, request)
        self._skip_count = (self._skip_count + 1) % self.frame_skip_count
        self.frames_encoded += 1

    def _encode(self, stream, request):
        # The buffer itself, as upstream (_MappedBuffer): only for the call.
        timestamp_us = self._timestamp(request)
        with request._mapped(stream) as buffer:
            self.outputframe(buffer, keyframe=True, timestamp=timestamp_us)

    def start(self, quality=None):
        with self._lock:
            if self._running:
                raise RuntimeError("Encoder already running")
            self.frames_encoded = 0
            self._setup(quality)
            self._running = True
            self.firsttimestamp = None
            for out in self._output:
                out.start()
            self._start()

    def _start(self):
        for out in self._output:
            self._send_streams(out)

    def _send_streams(self, output):
        table = {"YUV420": "yuv420p", "BGR888": "rgb24", "RGB888": "bgr24", "XBGR8888": "rgba",
                 "XRGB8888": "bgra"}
        pix_fmt = table.get(self._format)
        rate = Fraction(1000000, self._framerate)
        if pix_fmt is None and output.needs_add_stream:
            raise RuntimeError(f"Output does not support {self._format}")
        output._add_stream("video", "rawvideo", pix_fmt=pix_fmt, rate=rate, width=self.width,
                           height=self.height)

    def stop(self):
        with self._lock:
            if not self._running:
                raise RuntimeError("Encoder already stopped")
            self._running = False
            self._stop()
            for out in self._output:
                out.stop()

    def _stop(self):
        pass

    def outputframe(self, frame, keyframe=True, timestamp=None, packet=None, audio=False):
        with self._output_lock:
            for out in self._output:
                out.outputframe(frame, keyframe, timestamp, packet, audio)

    def _setup(self, quality):
        pass

    def _timestamp(self, request):
        ts = request.get_metadata()["SensorTimestamp"] // 1000  # ns to us
        if self.firsttimestamp is None:
            self.firsttimestamp = ts
            return 0
        return ts - self.firsttimestamp


def _complexity(encoder):
    return encoder.width * encoder.height * (getattr(encoder, "framerate", None) or 30)


class _ExternalH264(Encoder):
    """What the two H.264 encoders share here: the ffmpeg child, fed on the
    camera's thread, read on a thread of its own."""

    def _external(self, **options):
        rig = self.rig
        stride_width = self.stride if self.stride > self.width else self.width
        self._ffmpeg = ExternalEncoder(
            (self.width, self.height), self.framerate or 30, picture=rig.picture,
            input_size=(stride_width, self.height), ffmpeg=rig.ffmpeg, **options)
        rig.encoders.append(self)
        self._timestamps = collections.deque()
        self._picture_started = None
        self._stopping = False

    def _feed(self, request):
        """Sends C{request}'s frame to the child (its timestamp is queued for
        the reader); False if the child has gone."""
        timestamp_us = self._timestamp(request)
        if self.rig.picture == "lavfi":
            return True
        if self._format != "YUV420":
            raise RuntimeError(f"the fake H.264 encoder takes YUV420, not {self._format}")
        force = self._key_frames_requested > self._key_frames_generated
        if force:
            self._key_frames_generated += 1
        request.acquire()
        try:
            frame = request._pixels()
            if frame is None:
                return True  # a frame the camera failed to fill is not encoded
            self._timestamps.append(timestamp_us)
            self._ffmpeg.feed(frame, timestamp_us, keyframe=force)
        except OSError:
            return False  # the encoder has gone
        finally:
            request.release()
        return True

    def _next(self):
        """The next access unit and its timestamp (us after the first frame),
        or None when the child's output has ended."""
        au = self._ffmpeg.read()
        if au is None:
            return None
        if self.rig.picture == "lavfi":
            if self._picture_started is None:
                self._picture_started = au.milliseconds
                self.firsttimestamp = boottime_us()
            return au, (au.milliseconds - self._picture_started) * 1000
        timestamp = self._timestamps.popleft() if self._timestamps else au.milliseconds * 1000
        return au, timestamp

    def _failed(self):
        """The child ended by itself: as when the V4L2 device fails."""
        return RuntimeError(
            f"H.264 encoder (ffmpeg) ended with {self._ffmpeg.process.poll()}: "
            f"{self._ffmpeg.error() or 'no message'}")

    def force_key_frame(self):
        """Force a key frame to be encoded in the video stream as soon as possible."""
        self._key_frames_requested += 1


class H264Encoder(_ExternalH264):
    """picamera2.encoders.H264Encoder on a Pi up to the 4: the V4L2 hardware
    encoder, which delivers from a thread of its own (C{thread})."""

    def __init__(self, bitrate=None, repeat=True, iperiod=None, framerate=None,
                 enable_sps_framerate=False, qp=None, profile=None):
        super().__init__()
        self.bufs = {}
        self.bitrate = bitrate
        self._controls = []
        self.vd = None
        self._key_frames_requested = 0
        self._key_frames_generated = 0
        self.iperiod = iperiod
        self.repeat = repeat
        self.qp = qp
        self.profile = profile
        self.framerate = framerate
        self._enable_framerate = enable_sps_framerate
        self.thread = None

    def _setup(self, quality):
        if quality is not None or (getattr(self, "bitrate", None) is None
                                   and getattr(self, "qp", None) is None):
            quality = Quality.MEDIUM if quality is None else quality
            table = {Quality.VERY_LOW: 2, Quality.LOW: 4, Quality.MEDIUM: 6,
                     Quality.HIGH: 9, Quality.VERY_HIGH: 15}
            self.bitrate = int(table[quality] * 1000000 * _complexity(self) / (1920 * 1080 * 30))

    def _start(self):
        profiles = {"baseline": "baseline", "constrained baseline": "baseline",
                    "main": "main", "high": "high"}
        profile = None
        if self.profile:
            if not isinstance(self.profile, str):
                raise RuntimeError("Profile should be a string value")
            profile = profiles.get(self.profile.lower())
            if profile is None:
                raise RuntimeError("Profile " + self.profile + " not recognised")
        level = "4.0"
        if self.framerate is not None:
            mbs_per_sec = ((self._width + 15) // 16) * ((self._height + 15) // 16) * self.framerate
            if mbs_per_sec > 245760:
                level = "4.2"
        if self.bitrate is not None and self.bitrate > 10000000 and level == "4.0":
            level = "4.1"
        keyint = V4L2_DEFAULT_IPERIOD if self.iperiod is None else self.iperiod
        self._external(bitrate=self.bitrate, keyint=keyint, profile=profile, level=level,
                       qp=self.qp, repeat_headers=bool(self.repeat))
        self.vd = self._ffmpeg
        self.thread = threading.Thread(target=self.thread_poll, name="fake H264Encoder",
                                       daemon=True)
        self.thread.start()

    def _encode(self, stream, request):
        if self._output is None or self.vd is None:
            return
        self._feed(request)

    def thread_poll(self):
        """Outputs encoded frames, as they come, until the encoder stops."""
        first = True
        try:
            while True:
                got = self._next()
                if got is None:
                    break
                au, timestamp = got
                # The hardware adds no SEI (x264 says who it is in one), and
                # without repeat gives SPS and PPS once, with the first picture.
                drop = (6,) if self.repeat else (6, 7, 8)
                data = au.annex_b(lambda t: t not in drop)
                if first and not self.repeat:
                    data = b"".join(b"\x00\x00\x00\x01" + ps
                                    for ps in self._ffmpeg.parameter_sets) + data
                first = False
                self.outputframe(data, au.keyframe, timestamp)
            if not self._stopping:
                raise self._failed()
        except Exception as e:
            # As an exception out of the real encoder's thread: said on
            # stderr, and the thread is gone; nothing takes the device's
            # output any more (here: the child is ended, so that the camera's
            # thread is not held up writing to it).
            print(f"Exception in thread {threading.current_thread().name}: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
            self._ffmpeg.process.kill()

    def _stop(self):
        self._stopping = True
        self._ffmpeg.end_input()
        self.thread.join()
        self._ffmpeg.stop()
        self.vd = None


class LibavH264Encoder(_ExternalH264):
    """picamera2.encoders.LibavH264Encoder: libx264 through libav, which on a
    Pi 5 is H264Encoder.  It encodes on the camera's thread, inside
    C{encode}, and calls C{outputframe} there."""

    #: The profiles libav lists for H.264 (what upstream matches, ignoring case).
    profiles = ("Baseline", "Constrained Baseline", "Main", "Extended", "High", "High 10",
                "High 10 Intra", "High 4:2:2", "High 4:2:2 Intra", "High 4:4:4",
                "High 4:4:4 Predictive", "High 4:4:4 Intra", "CAVLC 4:4:4",
                "Multiview High", "Stereo High")
    #: What libavcodec's libx264 wrapper makes of each profile (the others set none).
    _x264_profiles = {"Baseline": "baseline", "Main": "main", "High": "high",
                      "High 10": "high10", "High 4:2:2": "high422",
                      "High 4:4:4 Predictive": "high444"}

    def __init__(self, bitrate=None, repeat=True, iperiod=30, framerate=30, qp=None, profile=None):
        super().__init__()
        self._codec = "h264"
        self.repeat = repeat
        self.bitrate = bitrate
        self.iperiod = iperiod
        self.framerate = framerate
        self.qp = qp
        self.profile = profile
        self.preset = None
        self.drop_final_frames = False
        self.threads = 0
        self._use_hw = False
        self._request_release_delay = 1
        self._request_release_queue = None
        self._key_frames_requested = 0
        self._key_frames_generated = 0

    @property
    def use_hw(self):
        return self._use_hw

    @use_hw.setter
    def use_hw(self, value):
        if value:
            print("Warning: use_hw has no effect on non-VC4 platforms")

    def _setup(self, quality):
        if quality is not None or (getattr(self, "bitrate", None) is None
                                   and getattr(self, "qp", None) is None):
            quality = Quality.MEDIUM if quality is None else quality
            table = {Quality.VERY_LOW: 3, Quality.LOW: 4, Quality.MEDIUM: 7,
                     Quality.HIGH: 10, Quality.VERY_HIGH: 14}
            ratio = _complexity(self) / (1920 * 1080 * 30)
            self.bitrate = int(table[quality] * 1000000 * ratio ** 0.5)

    def _start(self):
        preset = "ultrafast"
        x264_profile = None
        if self.profile is not None:
            if not isinstance(self.profile, str):
                raise RuntimeError("Profile should be a string value")
            profile = next((p for p in self.profiles if p.lower() == self.profile.lower()), None)
            if not profile:
                raise RuntimeError("Profile " + self.profile + " not recognised")
            x264_profile = self._x264_profiles.get(profile)
            if "baseline" not in profile.lower():
                preset = "superfast"
        if self.preset:
            preset = self.preset
        self._external(bitrate=self.bitrate, keyint=self.iperiod or 0, profile=x264_profile,
                       qp=self.qp, preset=preset, repeat_headers=bool(self.repeat))
        self._request_release_queue = collections.deque()
        self._ready = collections.deque()
        self._ended = threading.Event()
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="fake libav reader", daemon=True)
        self._reader.start()

    def _read(self):
        """Takes what the child writes, for the camera's thread to hand on."""
        try:
            while True:
                got = self._next()
                if got is None:
                    break
                with self._arrived:
                    self._ready.append(got)
                    while len(self._ready) > 64:  # nobody takes them (lavfi, camera stalled)
                        self._ready.popleft()
                    self._arrived.notify_all()
        finally:
            with self._arrived:
                self._ended.set()
                self._arrived.notify_all()

    def _deliver(self, au, timestamp):
        data = au.annex_b() if self.repeat else au.annex_b(lambda t: t not in (7, 8))
        self.outputframe(data, au.keyframe, timestamp=timestamp)

    def _encode(self, stream, request):
        request.acquire()
        self._request_release_queue.append(request)
        if not self._feed(request):
            raise self._failed()
        if self.rig.picture == "scene":
            # libav encodes the frame then and there: wait for its picture.
            with self._arrived:
                deadline = time.monotonic() + 5.0
                while not self._ready and not self._ended.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._arrived.wait(left)
                got = self._ready.popleft() if self._ready else None
            if got is None:
                raise self._failed()
            self._deliver(*got)
        else:
            while True:
                with self._arrived:
                    got = self._ready.popleft() if self._ready else None
                if got is None:
                    break
                self._deliver(*got)
        while len(self._request_release_queue) > self._request_release_delay:
            self._request_release_queue.popleft().release()

    def _stop(self):
        self._stopping = True
        self._ffmpeg.end_input()
        self._reader.join(5)
        if not self.drop_final_frames:
            while self._ready:
                self._deliver(*self._ready.popleft())
        while self._request_release_queue:
            self._request_release_queue.popleft().release()
        self._ffmpeg.stop()
