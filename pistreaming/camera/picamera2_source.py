"""Frames from the Raspberry Pi camera through ``picamera2`` (libcamera).

Current Raspberry Pi OS (Bullseye, Bookworm and later) drives the camera with
libcamera, and picamera2 is its Python library.  We ask for a video
configuration of the main stream in ``YUV420`` (planar Y, then U, then V) at
the configured size, with the frame rate fixed through ``FrameDurationLimits``
and the flips through a ``libcamera.Transform``.

libcamera lays each row out with a stride of its own (the width aligned, often
to 64 bytes: 1296 pixels take 1344 bytes a row) and pads no rows, while the
encoder takes picamera's layout (width padded to 32, height to 16; see
L{pistreaming.frames}).  Each frame is re-laid into that layout as it is
copied out of picamera2's buffer, so every camera has one frame geometry and
the encoder's command is known before the camera is opened.  Where the rows
already line up (640, 1280, 1920 pixels wide) that is one plain copy; where
they do not it is a strided copy (bench/picamera2 prints what each costs).

With H.264 (L{Picamera2Source.run_h264}) no frame crosses Python: picamera2's
C{H264Encoder} (the hardware encoder of a Pi up to the 4; libx264 through
libav, under the same name, on a Pi 5) encodes the main stream, and an
C{Output} of ours takes each access unit from C{outputframe}.
"""

import importlib
import threading
import time

from twisted.logger import Logger


#: What padding bytes hold: black, in video range.
_Y_PAD, _UV_PAD = 16, 128


class FrameLayout:
    """How frames of one picamera2 stream become the encoder's padded frames.

    picamera2 gives YUV420 as a Y plane of C{stride} bytes a row, then U and V
    planes of C{stride // 2} bytes a row, with no rows of padding.  A picture
    larger than C{geometry} is cut to it; a smaller one is bordered with black.
    """

    def __init__(self, size, stride, geometry):
        """
        @param size: (width, height) of the picture in the camera's buffers.
        @param stride: bytes per row of their Y plane.
        @param geometry: the L{FrameGeometry} the encoder expects.
        """
        width, height = size
        g = geometry
        self.size = size
        self.stride = stride
        self.geometry = g
        self.needed = stride * height + 2 * (stride // 2) * (height // 2)
        luma = (width, height, stride, g.width, g.padded_width, g.padded_height, _Y_PAD)
        chroma = (width // 2, height // 2, stride // 2, g.width // 2,
                  g.padded_width // 2, g.padded_height // 2, _UV_PAD)
        self._planes = (luma, chroma, chroma)
        #: Rows already line up (stride == padded width): each plane is copied
        #: in one piece.  Otherwise rows are copied into a scratch array.
        self.aligned = stride == g.padded_width and width >= g.width
        self._scratch = None

    def padded(self, buffer):
        """C{buffer} (a 1-D array from C{capture_buffer}, a 2-D one from
        C{capture_array}, or any bytes-like object) as C{geometry.frame_size}
        bytes in the encoder's layout."""
        src = memoryview(buffer).cast("B")
        if len(src) < self.needed:
            raise ValueError(
                f"picamera2 gave {len(src)} bytes for a {self.size[0]}x{self.size[1]} "
                f"YUV420 frame with stride {self.stride}; it needs {self.needed}"
            )
        if self.aligned:
            return self._joined(src)
        return self._relaid(src)

    def _joined(self, src):
        pieces = []
        offset = 0
        for _w, src_h, src_stride, _dw, dst_stride, dst_rows, pad in self._planes:
            rows = min(src_h, dst_rows)
            pieces.append(src[offset:offset + rows * src_stride])
            if dst_rows > rows:
                pieces.append(bytes([pad]) * ((dst_rows - rows) * dst_stride))
            offset += src_stride * src_h
        return b"".join(pieces)

    def _relaid(self, src):
        # numpy comes with picamera2; its strided copy is many times faster
        # than copying row by row in Python.
        import numpy

        if self._scratch is None:
            self._scratch = numpy.empty(self.geometry.frame_size, numpy.uint8)
        source = numpy.frombuffer(src, numpy.uint8)
        out = self._scratch
        src_offset = dst_offset = 0
        for src_w, src_h, src_stride, dst_w, dst_stride, dst_rows, pad in self._planes:
            plane = source[src_offset:src_offset + src_h * src_stride].reshape(src_h, src_stride)
            target = out[dst_offset:dst_offset + dst_rows * dst_stride].reshape(
                dst_rows, dst_stride)
            rows, cols = min(src_h, dst_rows), min(src_w, dst_w)
            target[:rows, :cols] = plane[:rows, :cols]
            target[:rows, cols:] = pad
            target[rows:] = pad
            src_offset += src_h * src_stride
            dst_offset += dst_rows * dst_stride
        return out.tobytes()


def boottime():
    """Seconds since boot on the clock of libcamera's SensorTimestamp
    (CLOCK_BOOTTIME; the same as CLOCK_MONOTONIC on a Pi, which never sleeps)."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


#: Capture times older than this (seconds) are not believed: the encoder's
#: clock is then not the one we think, and the time of arrival is used.
_MAX_AGE = 5.0

_output_classes = {}


def access_unit_output(base):
    """An C{Output} class (a subclass of picamera2's C{base}) whose
    C{outputframe} hands each encoded picture to C{output.access_unit}."""
    if base in _output_classes:
        return _output_classes[base]

    class AccessUnitOutput(base):
        """Takes the encoder's pictures, on the thread the encoder calls it
        from (its own, or on a Pi 5 the camera's): it never blocks and never
        raises into picamera2, whose encoder thread would die of it; an error
        is kept for the capture loop to raise."""

        def __init__(self, output, encoder, clock=time.time, boot_clock=boottime):
            super().__init__()
            self._output = output
            self._encoder = encoder
            self._clock = clock
            self._boot_clock = boot_clock
            self.error = None
            self.pictures = 0

        def outputframe(self, frame, keyframe=True, timestamp=None, packet=None, audio=False):
            if audio or frame is None or self.error is not None:
                return
            try:
                self._output.access_unit(bytes(frame), bool(keyframe), self.captured_at(timestamp))
                self.pictures += 1
            except Exception as e:
                self.error = e

        def captured_at(self, timestamp):
            """When the picture with C{timestamp} (microseconds after the
            encoder's first frame, whose sensor time in microseconds since
            boot is C{encoder.firsttimestamp}) was captured, in seconds
            since the epoch; the time of arrival if the encoder cannot say."""
            now = self._clock()
            first = getattr(self._encoder, "firsttimestamp", None)
            if timestamp is None or first is None:
                return now
            age = self._boot_clock() - (first + timestamp) / 1e6
            if -0.05 <= age <= _MAX_AGE:
                return now - max(0.0, age)
            return now

    _output_classes[base] = AccessUnitOutput
    return AccessUnitOutput


class Picamera2Source:
    name = "picamera2"
    log = Logger()
    #: The camera encodes H.264 itself (L{run_h264}).
    encodes_h264 = True

    #: How long one wait for a frame lasts; bounds how late a stop is seen.
    poll_interval = 0.1

    def __init__(self, picamera2, libcamera, picture, camera_num=0, model=None):
        """
        @param picamera2: the imported C{picamera2} module, and
        @param libcamera: the imported C{libcamera} module (passed in so that
            tests can hand over fakes with the same API).
        @param picture: the L{pistreaming.camera.picture.Picture} to capture.
        @param model: the sensor's name, for the log.
        """
        self._picamera2 = picamera2
        self._libcamera = libcamera
        self.picture = picture
        self.geometry = picture.geometry
        self.framerate = picture.framerate
        self.camera_num = camera_num
        self.model = model
        self._encoder = None

    def describe(self):
        model = f" ({self.model})" if self.model else ""
        g = self.geometry
        return f"picamera2 camera {self.camera_num}{model} {g.width}x{g.height}"

    def configuration(self, camera):
        """The video configuration asked of C{camera} (a C{Picamera2})."""
        g = self.geometry
        frame_us = round(1_000_000 / self.framerate)
        return camera.create_video_configuration(
            main={"size": (g.width, g.height), "format": "YUV420"},
            controls={"FrameDurationLimits": (frame_us, frame_us)},
            transform=self._libcamera.Transform(hflip=int(self.picture.hflip),
                                                vflip=int(self.picture.vflip)),
        )

    def run(self, output, stopping):
        """Capture into C{output} until C{stopping} is set; the camera is always closed."""
        camera = self._picamera2.Picamera2(self.camera_num)
        try:
            camera.configure(self.configuration(camera))
            stream = camera.stream_configuration("main")
            size, stride = tuple(stream["size"]), stream["stride"]
            g = self.geometry
            if size != (g.width, g.height):
                self.log.warn(
                    "picamera2 gives {actual} instead of {asked}; the picture is cut "
                    "or bordered to fit", actual="x".join(map(str, size)),
                    asked=f"{g.width}x{g.height}")
            if stream["format"] != "YUV420":
                raise RuntimeError(
                    f"picamera2 gives {stream['format']}, not YUV420, from this camera")
            layout = FrameLayout(size, stride, g)
            camera.start()
            try:
                while not stopping.is_set():
                    buffer = self._next_buffer(camera, stopping)
                    if buffer is None:
                        break
                    output.write(layout.padded(buffer))
            finally:
                camera.stop()
        finally:
            camera.close()

    def _submodule(self, name):
        """picamera2's C{encoders} or C{outputs} (loaded with the package)."""
        module = getattr(self._picamera2, name, None)
        if module is None:
            module = importlib.import_module(f"{self._picamera2.__name__}.{name}")
        return module

    def encoder(self, encoding):
        """The C{H264Encoder} for C{encoding} (C{.bitrate}, C{.keyframe_interval},
        C{.framerate}, C{.profile}): SPS and PPS before every IDR, an IDR
        every keyframe interval."""
        framerate = float(getattr(encoding, "framerate", None) or self.framerate)
        iperiod = max(1, round(encoding.keyframe_interval * framerate))
        encoders = self._submodule("encoders")
        H264Encoder = encoders.H264Encoder
        options = dict(bitrate=int(encoding.bitrate), repeat=True, iperiod=iperiod,
                       framerate=framerate)
        profile = encoding.profile
        libav = getattr(encoders, "LibavH264Encoder", None)
        if (libav is not None and isinstance(H264Encoder, type) and issubclass(H264Encoder, libav)
                and profile.lower() in ("baseline", "constrained baseline")):
            # A Pi 5: libx264's ultrafast preset, which picamera2 uses, gives
            # constrained baseline by itself; naming the profile would only
            # add a dependence on PyAV's list of codec profiles.
            profile = None
        try:
            return H264Encoder(profile=profile, **options)
        except TypeError:
            # picamera2 before 0.3.17 has no profile: the encoder's default
            # (no B-frames either way).
            self.log.warn("picamera2's H264Encoder takes no profile here; "
                          "the camera's encoder chooses one")
            return H264Encoder(**options)

    def run_h264(self, output, stopping, encoding):
        """Record H.264 until C{stopping} is set, handing each access unit to
        C{output.access_unit(data, keyframe, captured_at)} from the encoder's
        thread; the camera is always closed.  Raises if the encoder fails."""
        Output = self._submodule("outputs").Output
        camera = self._picamera2.Picamera2(self.camera_num)
        try:
            camera.configure(self.configuration(camera))
            stream = camera.stream_configuration("main")
            size = tuple(stream["size"])
            g = self.geometry
            if size != (g.width, g.height):
                self.log.warn("picamera2 gives {actual} instead of {asked}",
                              actual="x".join(map(str, size)), asked=f"{g.width}x{g.height}")
            encoder = self.encoder(encoding)
            taker = access_unit_output(Output)(output, encoder)
            try:
                camera.start_recording(encoder, taker)
            except BaseException:
                self._abandon(camera, encoder)
                raise
            self._encoder = encoder
            try:
                while not stopping.wait(self.poll_interval):
                    if taker.error is not None:
                        raise taker.error
                    thread = getattr(encoder, "thread", None)
                    if thread is not None and not thread.is_alive():
                        raise RuntimeError("picamera2's H.264 encoder stopped "
                                           "(its thread ended)")
            finally:
                self._encoder = None
                camera.stop_recording()
        finally:
            camera.close()

    def _abandon(self, camera, encoder):
        """Stops C{encoder} if it started before recording failed to."""
        if encoder not in getattr(camera, "encoders", ()):
            return  # it did not start (or failed starting): nothing to stop
        try:
            camera.stop_encoder(encoder)
        except Exception as e:
            self.log.warn("picamera2's H.264 encoder did not stop cleanly ({why})", why=e)

    def request_keyframe(self):
        """Asks the camera's encoder for an IDR as soon as it can (from any
        thread); False if it cannot (not recording, or a picamera2 before
        0.3.32, which has no force_key_frame)."""
        force = getattr(self._encoder, "force_key_frame", None)
        if force is None:
            return False
        force()
        return True

    def _next_buffer(self, camera, stopping):
        """The next frame's buffer, or None if C{stopping} was set meanwhile.

        The capture is asked for without blocking (a signal function says when
        it is done), so a camera that stops delivering never holds up a stop.
        """
        done = threading.Event()
        job = camera.capture_buffer("main", signal_function=lambda job: done.set())
        for _ in range(1_000_000):
            if done.wait(self.poll_interval):
                return camera.wait(job)
            if stopping.is_set():
                return None
        raise RuntimeError("picamera2 delivered no frame for a very long time")


def probe(import_module):
    """(picamera2 module, libcamera module, camera number, camera info, None)
    if libcamera finds a Raspberry Pi camera, else (None, ..., reason).

    Nothing is opened: a camera another program is using is still found, and
    the capture loop reports (and retries) what happens when it opens it.
    USB webcams that libcamera also lists are left to --camera v4l2.
    """
    def no(reason):
        return None, None, None, None, reason

    try:
        picamera2 = import_module("picamera2")
        libcamera = import_module("libcamera")
    except ImportError as e:
        return no(f"the picamera2 library is not installed ({e})")
    except Exception as e:
        return no(f"the picamera2 library does not load here ({e})")
    try:
        cameras = list(picamera2.Picamera2.global_camera_info())
    except Exception as e:
        return no(f"picamera2 cannot list cameras ({e})")
    if not cameras:
        return no("libcamera finds no camera")
    for number, info in enumerate(cameras):
        if "usb" not in str(info.get("Id", "")).lower():
            return picamera2, libcamera, number, info, None
    return no("libcamera finds only USB cameras (use --camera v4l2:/dev/videoN for those)")
