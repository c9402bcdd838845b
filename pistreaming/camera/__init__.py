"""Frame sources.

A frame source has ``name``, ``describe()`` and ``run(output, stopping)``:
``run`` blocks on the thread it is called from, writes padded raw YUV420
frames to ``output.write`` until the ``threading.Event`` ``stopping`` is set,
then releases the camera and returns.  It raises if the camera fails.
"""

import importlib

from pistreaming.camera.picamera_source import PiCameraSource, probe
from pistreaming.camera.testpattern import TestPattern


class CameraUnavailable(Exception):
    """The camera asked for on the command line cannot be used here."""


def choose_source(config, import_module=importlib.import_module):
    """The frame source for C{config.camera}, and why it was chosen.

    @return: (source, reason)
    @raise CameraUnavailable: if a specific camera was asked for and fails.
    """
    args = (config.width, config.height, config.framerate, config.vflip, config.hflip)
    if config.camera == "test":
        return TestPattern(*args), "asked for with --camera test"
    picamera, why_not = probe(import_module)
    if picamera is not None:
        return PiCameraSource(picamera, *args), "a camera answered through picamera"
    if config.camera == "picamera":
        raise CameraUnavailable(f"--camera picamera: {why_not}")
    return TestPattern(*args), f"no camera: {why_not}"
