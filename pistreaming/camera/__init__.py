"""Frame sources.

Most sources hand frames to the daemon: they have ``name``, ``describe()``
and ``run(output, stopping)``.  ``run`` blocks on the thread it is called
from, writes padded raw YUV420 frames to ``output.write`` until the
``threading.Event`` ``stopping`` is set, then releases the camera and
returns.  It raises if the camera fails.  (picamera, picamera2, the test
pattern.)

Every source is given the picture it is to deliver, one
L{pistreaming.camera.picture.Picture} (size, frame rate, flips) built from
the options.

Sources that ffmpeg reads itself (a V4L2 device, a video file) have
``name``, ``describe()`` and ``ffmpeg_input()`` instead, which gives ffmpeg's
input arguments and the filters that bring the picture to the configured size.
"""

import importlib

from pistreaming.camera import filesource, v4l2
from pistreaming.camera.picamera2_source import Picamera2Source
from pistreaming.camera.picamera2_source import probe as probe_picamera2
from pistreaming.camera.picamera_source import PiCameraSource, probe
from pistreaming.camera.picture import Picture
from pistreaming.camera.testpattern import TestPattern


class CameraUnavailable(Exception):
    """The camera asked for on the command line cannot be used here."""


def choose_source(config, import_module=importlib.import_module):
    """The frame source for C{config.camera}, and why it was chosen.

    C{auto} tries picamera2, then picamera, then falls back to the test
    pattern; the reason says why each camera before the chosen one was skipped.

    @return: (source, reason)
    @raise CameraUnavailable: if a specific camera was asked for and fails.
    """
    picture = Picture.of(config)
    camera = config.camera
    if camera == "test":
        return TestPattern(picture), "asked for with --camera test"
    if camera.startswith("v4l2:"):
        try:
            source = v4l2.open_source(camera[len("v4l2:"):], picture, codec=config.codec,
                                      annotate=bool(config.annotate), ffmpeg=config.ffmpeg)
            return source, "asked for with --camera"
        except v4l2.DeviceError as e:
            raise CameraUnavailable(f"--camera {camera}: {e}") from None
    if camera.startswith("file:"):
        try:
            source = filesource.open_source(camera[len("file:"):], config.ffmpeg, picture)
        except filesource.FileError as e:
            raise CameraUnavailable(f"--camera {camera}: {e}") from None
        return source, "asked for with --camera"

    skipped = []
    if camera in ("auto", "picamera2"):
        picamera2, libcamera, number, info, why_not = probe_picamera2(import_module)
        if picamera2 is not None:
            model = info.get("Model")
            source = Picamera2Source(picamera2, libcamera, picture, camera_num=number, model=model)
            return source, f"libcamera finds a camera ({model or 'unnamed'}) for picamera2"
        if camera == "picamera2":
            raise CameraUnavailable(f"--camera picamera2: {why_not}")
        skipped.append(f"picamera2: {why_not}")
    if camera in ("auto", "picamera"):
        picamera, why_not = probe(import_module)
        if picamera is not None:
            why = "a camera answered through picamera"
            if skipped:
                why += "; skipped " + "; ".join(skipped)
            return PiCameraSource(picamera, picture), why
        if camera == "picamera":
            raise CameraUnavailable(f"--camera picamera: {why_not}")
        skipped.append(f"picamera: {why_not}")
    return TestPattern(picture), "no camera: " + "; ".join(skipped)
