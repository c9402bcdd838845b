from twisted.application.service import ServiceMaker

pistream = ServiceMaker(
    "pistream",
    "pistreaming.tap",
    "Stream a camera (or a test pattern) to web browsers with JSMpeg.",
    "pistream",
)
