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

Then the camera is also configured with a second, smaller stream, picamera2's
C{lores} (YUV420, at most L{LORES_MOST} pixels a side, the main stream's
aspect ratio: L{lores_size}), for the MPEG-1 made on demand for viewers
that cannot play H.264 (L{pistreaming.ondemand}): its raw frames are the
encoder's input instead of decoded H.264.  They are taken by picamera2's
own null encoder (the base C{Encoder}, which hands each frame's buffer to
its outputs as it is) started on that stream, C{start_encoder(encoder,
output, name="lores")}, only while the service asks for them
(C{output.lores.wanted}): with no MPEG-1 viewer, nothing of that stream
reaches Python.  A camera that refuses the second stream (or a picamera2
that cannot encode one) records H.264 all the same, and says it has none.
"""

import importlib
import threading
import time

from twisted.logger import Logger


#: What padding bytes hold: black, in video range.
_Y_PAD, _UV_PAD = 16, 128

#: The longest side of the second, smaller stream (C{lores}).
LORES_MOST = 640


def lores_size(width, height, most=LORES_MOST):
    """The size asked of the camera's second, smaller stream for a main
    stream of C{width}x{height}: the same picture (its aspect ratio: with
    picamera2's default C{preserve_ar=False} libcamera scales the main
    stream's field of view into it, squeezed if the ratios differ), its
    longer side at most C{most}, and both sides even, as picamera2 requires
    of every stream.  A main stream no larger is taken as it is.  For
    landscape pictures the width is then 640, a multiple of 64 (and 128), the
    row alignment picamera2 calls optimal for YUV420 on a Pi 4 (and 5): its
    rows need no padding."""
    longer = max(width, height)
    if longer <= most:
        return width, height

    def side(length):
        scaled = round(length * most / longer)
        return max(2, scaled - scaled % 2)

    return side(width), side(height)


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


def capture_time(encoder, timestamp, clock=time.time, boot_clock=boottime):
    """When the frame with C{timestamp} (microseconds after C{encoder}'s
    first frame, whose sensor time in microseconds since boot is
    C{encoder.firsttimestamp}) was captured, in seconds since the epoch;
    the time of arrival if the encoder cannot say."""
    now = clock()
    first = getattr(encoder, "firsttimestamp", None)
    if timestamp is None or first is None:
        return now
    age = boot_clock() - (first + timestamp) / 1e6
    if -0.05 <= age <= _MAX_AGE:
        return now - max(0.0, age)
    return now


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
            """When the picture with C{timestamp} was captured (L{capture_time})."""
            return capture_time(self._encoder, timestamp, self._clock, self._boot_clock)

    _output_classes[base] = AccessUnitOutput
    return AccessUnitOutput


_lores_classes = {}


def lores_frame_output(base):
    """An C{Output} class (a subclass of picamera2's C{base}) whose
    C{outputframe} hands each raw frame of the null encoder on the C{lores}
    stream to a L{pistreaming.camera.output.LoresOutput}."""
    if base in _lores_classes:
        return _lores_classes[base]

    class LoresFrameOutput(base):
        """Takes the raw frames, on the camera's thread, inside picamera2's
        request processing: the buffer is the camera's own memory, valid
        only during the call, so it is copied (by the L{LoresOutput}) before
        C{outputframe} returns.  Never raises into picamera2 (its camera
        loop would end): an error is kept for the capture loop."""

        def __init__(self, lores, encoder):
            super().__init__()
            self._lores = lores
            self._encoder = encoder
            self.error = None

        def outputframe(self, frame, keyframe=True, timestamp=None, packet=None, audio=False):
            if audio or frame is None or self.error is not None:
                return
            try:
                self._lores.frame(frame, capture_time(self._encoder, timestamp))
            except Exception as e:
                self.error = e

    _lores_classes[base] = LoresFrameOutput
    return LoresFrameOutput


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

    @property
    def lores_size(self):
        """The size asked of the camera's second, smaller stream (L{lores_size})."""
        return lores_size(self.geometry.width, self.geometry.height)

    def configuration(self, camera, lores=False):
        """The video configuration asked of C{camera} (a C{Picamera2});
        with C{lores}, with the second, smaller stream too."""
        g = self.geometry
        frame_us = round(1_000_000 / self.framerate)
        return camera.create_video_configuration(
            main={"size": (g.width, g.height), "format": "YUV420"},
            lores={"size": self.lores_size, "format": "YUV420"} if lores else None,
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
        thread; the camera is always closed.  Raises if the encoder fails.

        If C{output.lores} is a L{pistreaming.camera.output.LoresOutput},
        the camera gives a second, smaller stream too: C{output.lores} is
        told what it is (or that there is none), and given its frames while
        C{output.lores.wanted} is set."""
        Output = self._submodule("outputs").Output
        lores = getattr(output, "lores", None)
        camera = self._picamera2.Picamera2(self.camera_num)
        try:
            lores_stream = self._configure(camera, lores)
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
            frames = None
            if lores_stream is not None:
                frames = _LoresFrames(self, camera, lores,
                                      lores_frame_output(Output), self._submodule("encoders"))
            try:
                while not stopping.wait(self.poll_interval):
                    if taker.error is not None:
                        raise taker.error
                    thread = getattr(encoder, "thread", None)
                    if thread is not None and not thread.is_alive():
                        raise RuntimeError("picamera2's H.264 encoder stopped "
                                           "(its thread ended)")
                    if frames is not None and not frames.step():
                        frames = None
            finally:
                self._encoder = None
                camera.stop_recording()  # (the lores stream's encoder too)
        finally:
            camera.close()

    def _configure(self, camera, lores):
        """Configures C{camera} for H.264, with the second, smaller stream if
        C{lores} (a LoresOutput) is given and the camera takes it: then that
        stream's configuration, which C{lores} is told of, else None."""
        if lores is None:
            camera.configure(self.configuration(camera))
            return None
        stream = None
        try:
            camera.configure(self.configuration(camera, lores=True))
            stream = camera.stream_configuration("lores")
            if stream is None or stream["format"] != "YUV420":
                raise RuntimeError(f"it gives {stream and stream['format']}, not YUV420")
        except Exception as e:
            self.log.warn("picamera2 gives no second, smaller stream here ({why}); MPEG-1 "
                          "is made by decoding the H.264", why=e)
            if stream is None:
                camera.configure(self.configuration(camera))
            stream = None
        if stream is None:
            lores.stream(None, None)
            return None
        size = tuple(stream["size"])
        self.log.info("picamera2: a second, smaller stream (lores), {size}, stride {stride}, "
                      "for MPEG-1 viewers", size="x".join(map(str, size)), stride=stream["stride"])
        lores.stream(size, stream["stride"])
        return stream

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


class _LoresFrames:
    """Starts and stops picamera2's null encoder on the C{lores} stream as
    the service wants its frames (from the capture loop's thread)."""

    def __init__(self, source, camera, lores, output_class, encoders):
        self.source = source
        self.camera = camera
        self.lores = lores
        self.encoder = encoders.Encoder()
        self.taker = output_class(lores, self.encoder)
        self.running = False

    def step(self):
        """Starts or stops the encoder if the service changed its mind;
        False once the stream is given up (an error: said, and the service
        told there is no such stream)."""
        error = self.taker.error
        try:
            if error is None:
                wanted = self.lores.wanted.is_set()
                if wanted and not self.running:
                    self.camera.start_encoder(self.encoder, self.taker, name="lores")
                    self.running = True
                elif self.running and not wanted:
                    self.running = False
                    self.camera.stop_encoder(self.encoder)
                return True
        except Exception as e:
            error = e
        self.source.log.warn("picamera2: the second, smaller stream is given up ({why}); "
                             "MPEG-1 is made by decoding the H.264", why=error)
        if self.running:
            self.running = False
            try:
                self.camera.stop_encoder(self.encoder)
            except Exception as e:
                self.source.log.warn("picamera2: the lores stream's encoder did not stop "
                                     "cleanly ({why})", why=e)
        self.lores.stream(None, None)
        return False


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
