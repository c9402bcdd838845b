"""Frames from the Raspberry Pi camera through the legacy ``picamera`` library.

picamera records unencoded YUV420 with ``start_recording(output, format='yuv')``
and calls ``output.write`` on its own encoder thread, once per buffer (a whole
padded frame, or part of one).  Errors raised in that thread, including our
output's, come back to us from ``wait_recording``.

For H.264 (L{PiCameraSource.run_h264}) the camera's own encoder records
(``format='h264'``): picamera then writes the encoded stream, one MMAL buffer
at a time, and ``camera.frame`` says what each buffer is (SPS and PPS, part of
a key frame or of another frame) and whether it ends its picture; the pieces
of each picture are joined into one access unit.
"""

import time
import warnings

#: picamera.PiVideoFrameType's values (frame, key_frame, sps_header, motion_data).
_FRAME, _KEY_FRAME, _SPS_HEADER, _MOTION_DATA = 0, 1, 2, 3
#: Capture times older than this (seconds) are not believed.
_MAX_AGE = 5.0


class AccessUnits:
    """The file-like output picamera records H.264 into: joins the buffers
    of each picture (with the SPS and PPS before a key frame) and hands the
    whole access unit to C{output.access_unit(data, keyframe, captured_at)},
    on picamera's encoder thread.  Errors are picamera's to report: they
    stop the recording, and C{wait_recording} raises them."""

    def __init__(self, camera, output, clock=time.time):
        self._camera = camera
        self._output = output
        self._clock = clock
        self._parts = []
        self._keyframe = False
        #: Seconds to add to the camera's clock (clock_mode 'raw': us since
        #: boot) to get seconds since the epoch; kept up to date by the
        #: capture loop (picamera's encoder thread must not query the camera).
        self.offset = None
        self.pictures = 0

    def write(self, buf):
        frame = self._camera.frame
        kind = frame.frame_type
        if kind == _MOTION_DATA:
            return len(buf)
        self._parts.append(bytes(buf))
        if kind == _KEY_FRAME:
            self._keyframe = True
        if frame.complete and kind != _SPS_HEADER:
            data = b"".join(self._parts)
            keyframe = self._keyframe
            self._parts = []
            self._keyframe = False
            self._output.access_unit(data, keyframe, self.captured_at(frame.timestamp))
            self.pictures += 1
        return len(buf)

    def flush(self):
        """Called by picamera when recording stops: a partial picture is dropped."""
        self._parts = []
        self._keyframe = False

    def captured_at(self, timestamp):
        """Seconds since the epoch for the camera's C{timestamp} (us); the
        time of arrival if it cannot be trusted."""
        now = self._clock()
        if not timestamp or self.offset is None:
            return now
        captured = self.offset + timestamp / 1e6
        if -0.05 <= now - captured <= _MAX_AGE:
            return min(now, captured)
        return now


def h264_level(width, height, framerate):
    """The lowest of picamera's levels '4' and '4.2' that fits the picture
    and rate (the camera's encoder reaches 1080p30 at '4')."""
    macroblocks = -(-width // 16) * -(-height // 16)
    return "4" if macroblocks * framerate <= 245760 else "4.2"


class PiCameraSource:
    name = "picamera"
    #: The camera encodes H.264 itself (L{run_h264}).
    encodes_h264 = True

    #: How long one wait_recording call blocks; bounds how late a stop is seen.
    poll_interval = 0.1

    def __init__(self, picamera, picture):
        """
        @param picamera: the imported C{picamera} module (passed in so that
            tests can hand over a fake with the same API).
        @param picture: the L{pistreaming.camera.picture.Picture} to record.
        """
        self._picamera = picamera
        self.picture = picture
        self.framerate = picture.framerate
        self._recording = None

    def describe(self):
        return f"picamera {self.picture.size}"

    def _quiet_rounding(self):
        # picamera warns that it rounds the frame size up; that padding is
        # expected (the encoder crops it), so the warning is noise in the log.
        rounded = getattr(self._picamera, "PiCameraResolutionRounded", None)
        if rounded is not None:
            warnings.filterwarnings("ignore", category=rounded)

    def run(self, output, stopping):
        """Record into C{output} until C{stopping} is set; the camera is always closed."""
        self._quiet_rounding()
        picture = self.picture
        camera = self._picamera.PiCamera(
            resolution=(picture.width, picture.height), framerate=picture.framerate
        )
        try:
            camera.vflip = picture.vflip
            camera.hflip = picture.hflip
            camera.start_recording(output, format="yuv")
            try:
                while not stopping.is_set():
                    camera.wait_recording(self.poll_interval)
            finally:
                camera.stop_recording()
        finally:
            camera.close()


    def run_h264(self, output, stopping, encoding):
        """Record H.264 with the camera's encoder until C{stopping} is set,
        handing each access unit to C{output.access_unit(data, keyframe,
        captured_at)} from picamera's encoder thread; the camera is always
        closed.  Raises what the recording raised."""
        self._quiet_rounding()
        picture = self.picture
        framerate = float(getattr(encoding, "framerate", None) or picture.framerate)
        camera = self._picamera.PiCamera(
            resolution=(picture.width, picture.height), framerate=picture.framerate,
            clock_mode="raw")
        try:
            camera.vflip = picture.vflip
            camera.hflip = picture.hflip
            units = AccessUnits(camera, output)
            units.offset = time.time() - camera.timestamp / 1e6
            profile = {"constrained baseline": "constrained"}.get(
                encoding.profile.lower(), encoding.profile.lower())
            camera.start_recording(
                units, format="h264", inline_headers=True, profile=profile,
                bitrate=int(encoding.bitrate),
                intra_period=max(1, round(encoding.keyframe_interval * framerate)),
                level=h264_level(picture.width, picture.height, framerate))
            self._recording = camera
            try:
                while not stopping.is_set():
                    camera.wait_recording(self.poll_interval)
                    units.offset = time.time() - camera.timestamp / 1e6
            finally:
                self._recording = None
                camera.stop_recording()
        finally:
            camera.close()

    def request_keyframe(self):
        """Asks the camera's encoder for an I-frame soon (from any thread);
        False if it is not recording."""
        camera = self._recording
        if camera is None:
            return False
        try:
            camera.request_key_frame()
        except Exception:
            return False  # the recording ended meanwhile
        return True


def probe(import_module):
    """Return (picamera module, None) if a camera answers, else (None, reason)."""
    try:
        picamera = import_module("picamera")
    except ImportError as e:
        return None, f"the picamera library is not installed ({e})"
    except Exception as e:  # picamera raises OSError etc. off a Raspberry Pi
        return None, f"the picamera library does not load here ({e})"
    try:
        camera = picamera.PiCamera()
    except Exception as e:
        return None, f"no camera answered ({e})"
    camera.close()
    return picamera, None
