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
- ``stop``, ``close``.

The picture is a known scene (four grey quadrants, chroma split left/right
and top/bottom, the frame number in the first pixels) drawn through the
configured flips, so tests can tell exactly what a consumer must make of it.
"""

import json
import os
import threading
import time
import types
from concurrent.futures import Future

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

    def __init__(self, cameras=1, stride_align=64, adjust_size=None, model="imx708", usb=0):
        """
        @param cameras: how many Raspberry Pi cameras (CSI) are attached, and
        @param usb: how many USB webcams, listed first (libcamera lists those too).
        """
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
        #: Captures asked for (capture_buffer, _array, _request), done or not.
        self.captures_asked = 0
        self.picamera2 = types.ModuleType("picamera2")
        self.picamera2.Picamera2 = type("Picamera2", (Picamera2,), {"rig": self})
        self.libcamera = types.ModuleType("libcamera")
        self.libcamera.Transform = Transform

    def import_module(self, name):
        """importlib.import_module for a machine where this is installed."""
        if name == "picamera2":
            return self.picamera2
        if name == "libcamera":
            return self.libcamera
        raise ImportError(f"No module named {name!r}")


def rig_from_environment():
    """A Rig described by $FAKE_PICAMERA2 (JSON keyword arguments), for a daemon
    started with shim ``picamera2`` and ``libcamera`` packages on its path."""
    return Rig(**json.loads(os.environ.get("FAKE_PICAMERA2", "{}")))


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

    def __init__(self, camera, buffer, config):
        self.picam2 = camera
        self._buffer = buffer
        self.config = config
        self.ref_count = 1

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
                self._buffer = None
                self.picam2._lock.notify_all()

    def make_buffer(self, name):
        if name != "main":
            raise RuntimeError(f"Stream {name!r} is not defined")
        if self._buffer is None:
            raise RuntimeError("Camera frontend has timed out!")
        return np.array(self._buffer, dtype=np.uint8)  # a copy, as the real one

    def make_array(self, name):
        stream = self.config[name]
        width, height = stream["size"]
        return self.make_buffer(name).reshape((height * 3 // 2, stream["stride"]))


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

    # -- configuration ---------------------------------------------------

    def create_video_configuration(self, main={}, lores=None, raw={}, transform=Transform(),
                                   colour_space=None, buffer_count=6, controls={},
                                   display="main", encode="main", queue=True):
        if not self.is_open:
            raise RuntimeError("Camera not opened")
        stream = {"format": "XBGR8888", "size": (1280, 720)}
        for key, value in main.items():
            if key not in ("format", "size"):
                raise ValueError(
                    f"Bad key {key!r}: valid stream configuration keys are ('format', 'size')")
            stream[key] = value
        width, height = stream["size"]
        stream["size"] = (width - width % 2, height - height % 2)
        controls = {"NoiseReductionMode": 1, "FrameDurationLimits": (33333, 33333)} | controls
        return {"use_case": "video", "transform": transform, "colour_space": colour_space,
                "buffer_count": buffer_count, "queue": queue, "main": stream,
                "lores": lores, "raw": None, "controls": controls,
                "display": display, "encode": encode}

    def configure(self, camera_config="preview"):
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        if not isinstance(camera_config, dict):
            raise NotImplementedError("the fake takes configuration dicts only")
        if not isinstance(camera_config["transform"], Transform):
            raise RuntimeError("Transform has incorrect type")
        config = dict(camera_config)
        stream = dict(config["main"])
        if stream["format"] not in ("YUV420", "YVU420", "XBGR8888", "XRGB8888",
                                    "BGR888", "RGB888"):
            raise RuntimeError(f"Bad format {stream['format']} in stream main")
        size = stream["size"]
        if not isinstance(size, tuple) or len(size) != 2:
            raise RuntimeError("size in main stream should be (width, height)")
        if size[0] % 2 or size[1] % 2:
            raise RuntimeError("width and height should be even")
        width, height = self.rig.adjust_size(size)
        stream["format"] = self.rig.format or stream["format"]
        if stream["format"] in ("YUV420", "YVU420"):
            stride = -(-width // self.rig.stride_align) * self.rig.stride_align
            framesize = stride * height * 3 // 2
        else:
            bpp = {"XBGR8888": 4, "XRGB8888": 4, "BGR888": 3, "RGB888": 3}.get(stream["format"], 2)
            stride = -(-width * bpp // self.rig.stride_align) * self.rig.stride_align
            framesize = stride * height
        stream.update(size=(width, height), stride=stride, framesize=framesize)
        config["main"] = stream
        self.camera_config = config
        self.rig.configurations.append(config)

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
                request.ref_count = 0
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
                        self._completed.append(self._capture(width, height, transform, config))
                        self.rig.frames += 1
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
            for job in finished:
                job.signal()

    def _capture(self, width, height, transform, config):
        planes = flipped(scene(width, height, self.rig.frames), transform.hflip, transform.vflip)
        buffer = yuv420_buffer(planes, config["main"]["stride"])
        request = CompletedRequest(self, buffer, config)
        if self.rig.fail_after is not None and self.rig.frames >= self.rig.fail_after:
            request._buffer = None  # make_buffer will fail, as on a camera error
        return request

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
            request._buffer = None

    def capture_buffer(self, name="main", wait=None, signal_function=None):
        self.rig.captures_asked += 1
        return self.dispatch_functions([self._make(name, "buffer")], wait, signal_function)

    def capture_array(self, name="main", wait=None, signal_function=None):
        return self.dispatch_functions([self._make(name, "array")], wait, signal_function)

    def capture_request(self, wait=None, signal_function=None):
        return self.dispatch_functions([self._make("main", "request")], wait, signal_function)
