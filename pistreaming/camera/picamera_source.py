"""Frames from the Raspberry Pi camera through the legacy ``picamera`` library.

picamera records unencoded YUV420 with ``start_recording(output, format='yuv')``
and calls ``output.write`` on its own encoder thread, once per buffer (a whole
padded frame, or part of one).  Errors raised in that thread, including our
output's, come back to us from ``wait_recording``.
"""

import warnings


class PiCameraSource:
    name = "picamera"

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

    def describe(self):
        return f"picamera {self.picture.size}"

    def run(self, output, stopping):
        """Record into C{output} until C{stopping} is set; the camera is always closed."""
        # picamera warns that it rounds the frame size up; that padding is
        # expected (the encoder crops it), so the warning is noise in the log.
        rounded = getattr(self._picamera, "PiCameraResolutionRounded", None)
        if rounded is not None:
            warnings.filterwarnings("ignore", category=rounded)
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
