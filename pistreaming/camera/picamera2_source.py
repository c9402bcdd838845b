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
"""

import threading

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


class Picamera2Source:
    name = "picamera2"
    log = Logger()

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
