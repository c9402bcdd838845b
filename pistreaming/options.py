"""Command-line options of ``twistd pistream``, validated into one Config."""

import os
import re
import shutil
from dataclasses import dataclass
from fractions import Fraction

from twisted.python import usage

from pistreaming.frames import FrameGeometry

#: Frame rates an MPEG-1 stream can carry (ffmpeg's mpeg1video with
#: ``-strict unofficial``).  ffmpeg silently drops frames to reach the nearest
#: of these for any other rate, so any other rate is refused instead.
MPEG1_FRAME_RATES = {
    "5": Fraction(5),
    "10": Fraction(10),
    "12": Fraction(12),
    "15": Fraction(15),
    "23.976": Fraction(24000, 1001),
    "24": Fraction(24),
    "25": Fraction(25),
    "29.97": Fraction(30000, 1001),
    "30": Fraction(30),
    "50": Fraction(50),
    "59.94": Fraction(60000, 1001),
    "60": Fraction(60),
}

#: Cameras by name; a USB webcam is "v4l2:/dev/videoN", a video file "file:PATH".
CAMERAS = ("auto", "picamera2", "picamera", "test")
CAMERA_FORMS = CAMERAS + ("v4l2:DEVICE", "file:PATH")
#: What the stream to viewers is: H.264 (from the camera's own encoder where
#: it has one, else libx264 in the ffmpeg child) or MPEG-1 (ffmpeg, JSMpeg).
CODECS = ("mpeg1", "h264")
#: x264's presets (pistreaming.encoder.X264_PRESETS), fastest first.
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")
ROTATIONS = ("0", "180")

MIN_SIDE, MAX_SIDE = 32, 4095  # MPEG-1 allows at most 4095 pixels a side
MIN_BITRATE, MAX_BITRATE = 32_000, 50_000_000

#: What the size suffixes of --bitrate and --backlog multiply by.
SCALE = {"": 1, "k": 1_000, "m": 1_000_000}

_COLOUR = re.compile(r"^(#[0-9a-fA-F]{3}|#[0-9a-fA-F]{6}|[a-zA-Z]{3,20})$")


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs to know, checked and in its final types."""

    http: str = "tcp:8082"
    ws: "str | None" = "tcp:8084"
    width: int = 640
    height: int = 480
    framerate: Fraction = Fraction(24)
    bitrate: int = 800_000
    #: "mpeg1" or "h264" (CODECS).
    codec: str = "h264"
    #: Seconds between pictures a decoder can start at (H.264 IDR pictures).
    keyframe_interval: float = 2.0
    #: x264's preset where the daemon makes the H.264 itself (X264_PRESETS).
    x264_preset: str = "superfast"
    vflip: bool = False
    hflip: bool = False
    camera: str = "auto"
    ffmpeg: str = "ffmpeg"
    #: Text drawn on the picture (strftime codes expanded), and its font.
    annotate: "str | None" = None
    font: "str | None" = None
    color: str = "#444"
    bgcolor: str = "#333"
    #: A viewer's backlog limit: ("seconds", s) of video or ("bytes", n).
    backlog: tuple = ("seconds", 1.0)
    #: Seconds a viewer may take nothing before it is closed.
    viewer_timeout: float = 10.0
    #: The password file (HTTP Basic for the page, the stream, everything), or None.
    passwd: "str | None" = None
    #: Origins, besides the page's own, whose pages may open the stream ("*": any).
    allow_origins: tuple = ()
    #: At most this many viewers at once (0: no limit).
    max_viewers: int = 0
    #: Host names (besides IP literals, localhost and this machine's names)
    #: that requests may name in their Host header; "*": any.
    allow_hosts: tuple = ()
    #: Where recordings go (--record), or None: no recording.
    record: "str | None" = None
    #: Seconds of video per recorded segment (cut at the next keyframe).
    record_segment: float = 600.0
    #: How much the recordings may take: ("percent", p) of the free space
    #: at start (with what earlier recordings take), or ("bytes", n).
    record_keep: tuple = ("percent", 80.0)
    #: Media servers the stream is pushed to (pistreaming.push.Target, each
    #: --push URL), and the push's audio: "none" or "silent" (AAC).
    push: tuple = ()
    push_audio: str = "none"

    @property
    def geometry(self):
        return FrameGeometry(self.width, self.height)

    @property
    def backlog_bytes(self):
        """The backlog limit in bytes (a time is turned into bytes at the bit rate)."""
        kind, value = self.backlog
        if kind == "bytes":
            return int(value)
        return max(MIN_BACKLOG, int(value * self.bitrate / 8))


def parse_resolution(text):
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise usage.UsageError(
            f"--resolution: {text!r} is not WIDTHxHEIGHT (for example 640x480)"
        )
    width, height = int(match.group(1)), int(match.group(2))
    for name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise usage.UsageError(
                f"--resolution: {name} {side} is outside {MIN_SIDE}..{MAX_SIDE}"
            )
        if side % 2:
            raise usage.UsageError(
                f"--resolution: {name} {side} must be even (YUV 4:2:0 needs it)"
            )
    return width, height


def parse_framerate(text):
    key = text.strip()
    if key.endswith(".0"):
        key = key[:-2]
    if key not in MPEG1_FRAME_RATES:
        allowed = ", ".join(MPEG1_FRAME_RATES)
        raise usage.UsageError(
            f"--framerate: {text!r} is not a rate MPEG-1 can carry; use one of {allowed}"
        )
    return MPEG1_FRAME_RATES[key]


def parse_bitrate(text):
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise usage.UsageError(
            f"--bitrate: {text!r} is not a bit rate (for example 800k or 2M)"
        )
    bits = int(float(match.group(1)) * SCALE[match.group(2).lower()])
    if not MIN_BITRATE <= bits <= MAX_BITRATE:
        raise usage.UsageError(
            f"--bitrate: {text} is outside {MIN_BITRATE // 1000}k..{MAX_BITRATE // 1_000_000}M"
        )
    return bits


MIN_BACKLOG, MAX_BACKLOG = 16_000, 64_000_000


def parse_backlog(text):
    """A time (0.5s, 2s) or a size in bytes (256k, 4M): ("seconds", s) or ("bytes", n)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|[kKmM]?)\s*", text)
    if not match:
        raise usage.UsageError(
            f"--backlog: {text!r} is neither a time (for example 1s) nor a size "
            "(for example 256k)")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "s":
        if not 0.1 <= number <= 30:
            raise usage.UsageError(f"--backlog: {text} is outside 0.1s..30s")
        return ("seconds", number)
    size = int(number * SCALE[unit.lower()])
    if not MIN_BACKLOG <= size <= MAX_BACKLOG:
        raise usage.UsageError(f"--backlog: {text} is outside 16k..64M bytes")
    return ("bytes", size)


def parse_codec(text):
    codec = text.strip().lower().replace("-", "").replace(".", "")
    codec = {"avc": "h264", "mpeg1video": "mpeg1"}.get(codec, codec)
    if codec not in CODECS:
        raise usage.UsageError(
            f"--codec: {text!r} is not a codec this daemon streams; use one of "
            + ", ".join(CODECS))
    return codec


def parse_x264_preset(text):
    preset = text.strip().lower()
    if preset not in X264_PRESETS:
        raise usage.UsageError(
            f"--x264-preset: {text!r} is not one of " + ", ".join(X264_PRESETS))
    return preset


def parse_seconds(option, text, low, high):
    try:
        value = float(text.strip().rstrip("s"))
    except ValueError:
        raise usage.UsageError(f"--{option}: {text!r} is not a number of seconds") from None
    if not low <= value <= high:
        raise usage.UsageError(f"--{option}: {text} is outside {low:g}..{high:g} seconds")
    return value


def parse_interface(text):
    """An IP address to listen on, or None for every interface."""
    import ipaddress
    text = text.strip()
    if not text:
        return None
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise usage.UsageError(
            f"--interface: {text!r} is not an IP address (for example 127.0.0.1 or ::1)"
        ) from None


def with_interface(endpoint, address):
    """C{endpoint} (tcp: or ssl:) bound to C{address}, unless it names one already."""
    if address is None or endpoint is None:
        return endpoint
    kind = endpoint.split(":", 1)[0]
    if kind not in ("tcp", "ssl") or re.search(r"(^|:)interface=", endpoint):
        return endpoint
    return f"{endpoint}:interface={address.replace(':', chr(92) + ':')}"


def parse_origins(text):
    """Comma-separated origins (scheme://host[:port]) or *, as a tuple."""
    origins = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "*":
            origins.append(item)
            continue
        match = re.fullmatch(r"(https?)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?", item)
        if not match:
            raise usage.UsageError(
                f"--allow-origin: {item!r} is not an origin (for example "
                "https://example.com or http://192.168.1.5:8080)")
        origins.append(item.lower())
    return tuple(origins)


def parse_hosts(values):
    """--allow-host values (each may be comma-separated) as a tuple of names."""
    from pistreaming.hosts import parse_allowed_host

    hosts = []
    for value in values:
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            try:
                name = parse_allowed_host(item)
            except ValueError as e:
                raise usage.UsageError(f"--allow-host: {e}") from None
            if name not in hosts:
                hosts.append(name)
    return tuple(hosts)


def parse_pushes(values):
    """--push URLs (each checked: scheme, host, port, path) as a tuple of
    pistreaming.push.Target; what is wrong is said with the key masked."""
    from pistreaming.push import PushURLError, parse_target

    targets = []
    for value in values:
        try:
            target = parse_target(value)
        except PushURLError as e:
            raise usage.UsageError(f"--push: {e}") from None
        if any(target.url == other.url for other in targets):
            raise usage.UsageError(f"--push: {target.shown} is given twice")
        targets.append(target)
    return tuple(targets)


def parse_push_audio(text):
    from pistreaming.push import AUDIO

    audio = text.strip().lower()
    if audio not in AUDIO:
        raise usage.UsageError(
            f"--push-audio: {text!r} is not one of " + ", ".join(AUDIO))
    return audio


def check_origins_with_password(origins, passwd):
    """A password with any origin allowed would let every web site open the
    stream with the credentials a visitor's browser remembers."""
    if passwd and "*" in origins:
        raise usage.UsageError(
            "--allow-origin '*' cannot go with --passwd: any web site could then open "
            "the stream with the password a visitor's browser remembers; name the "
            "origins instead")
    return origins


def parse_count(option, text, low, high):
    try:
        value = int(text.strip())
    except ValueError:
        raise usage.UsageError(f"--{option}: {text!r} is not a whole number") from None
    if not low <= value <= high:
        raise usage.UsageError(f"--{option}: {value} is outside {low}..{high}")
    return value


def check_password_file(text):
    """The password file's absolute path, read once now: a missing or malformed
    file stops the daemon at start."""
    from pistreaming.auth import PasswordFile, PasswordFileError
    try:
        users = PasswordFile(text).users()
    except PasswordFileError as e:
        raise usage.UsageError(f"--passwd: {e}") from None
    if not users:
        raise usage.UsageError(
            f"--passwd: {text} has no users; add one with: pistream-passwd {text} NAME")
    return os.path.abspath(text)


def parse_endpoint(option, text):
    """A server endpoint string, checked for form (binding is tried at start-up)."""
    from twisted.internet.endpoints import serverFromString

    class _NoReactor:
        pass

    try:
        serverFromString(_NoReactor(), text)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise usage.UsageError(
            f"--{option}: {text!r} is not a server endpoint (for example tcp:8082): {e}"
        ) from None
    except OSError as e:  # ssl: a certificate or key file that cannot be read
        raise usage.UsageError(
            f"--{option}: {text!r}: {e.filename or 'a file'}: {e.strerror.lower()}"
        ) from None
    except Exception as e:  # ssl: a file that is no certificate or key (OpenSSL says)
        raise usage.UsageError(
            f"--{option}: {text!r}: the certificate or key cannot be used ({e})"
        ) from None
    return text


def parse_ws_port(text):
    """A port number, a server endpoint, or 'off'; returns an endpoint or None."""
    text = text.strip()
    if text.lower() in ("off", "none"):
        return None
    if text.isdigit():
        port = int(text)
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"--ws-port: {port} is outside 0..65535")
        return f"tcp:{port}"
    if ":" not in text:
        raise usage.UsageError(
            f"--ws-port: {text!r} is not a port number, an endpoint or 'off'"
        )
    return parse_endpoint("ws-port", text)


def parse_camera(text):
    """'auto', 'picamera2', 'picamera', 'test', 'v4l2:DEVICE' or 'file:PATH'
    (made absolute); whether the camera is there is found out at start-up."""
    kind, colon, rest = text.strip().partition(":")
    kind = kind.lower()
    if kind in CAMERAS and not colon:
        return kind
    if kind == "v4l2":
        return "v4l2:" + (rest.strip() or "/dev/video0")
    if kind == "file":
        if not rest:
            raise usage.UsageError("--camera file: needs a path (for example file:demo.mp4)")
        return "file:" + os.path.abspath(rest)
    raise usage.UsageError(
        f"--camera: {text!r} is not one of {', '.join(CAMERA_FORMS)}"
    )


def parse_flips(rotation, vflip, hflip):
    """(vflip, hflip) from --rotation and the flip flags."""
    rotation = rotation.strip()
    if rotation not in ROTATIONS:
        raise usage.UsageError(
            f"--rotation: {rotation!r} is not 0 or 180 (turning by 90 degrees is not supported)"
        )
    if rotation == "180":
        if vflip or hflip:
            raise usage.UsageError(
                "--rotation 180 already flips both ways; give it without --vflip or --hflip"
            )
        return True, True
    return vflip, hflip


def parse_annotation(text, ffmpeg):
    """(text, font file) for --annotate, checking that ffmpeg can draw it."""
    from pistreaming.annotate import AnnotationUnavailable, check_drawtext, find_font

    if text is None:
        return None, None
    if not text.strip():
        raise usage.UsageError("--annotate: the text is empty")
    try:
        font = find_font()
        check_drawtext(ffmpeg)
    except AnnotationUnavailable as e:
        raise usage.UsageError(f"--annotate: {e}") from None
    return text, font


def parse_colour(option, text):
    if not _COLOUR.match(text):
        raise usage.UsageError(
            f"--{option}: {text!r} is not a colour (#rgb, #rrggbb or a CSS colour name)"
        )
    return text


def find_ffmpeg(text):
    """The ffmpeg executable, as an absolute path, or a UsageError saying what to do."""
    path = shutil.which(text)
    if path is None:
        if os.sep in text:
            raise usage.UsageError(
                f"--ffmpeg: {text} is not an executable file; "
                "install ffmpeg (apt install ffmpeg) or give its path with --ffmpeg"
            )
        raise usage.UsageError(
            f"ffmpeg ({text}) was not found on PATH; "
            "install it (apt install ffmpeg) or give its path with --ffmpeg"
        )
    return os.path.abspath(path)


#: Units of --record-segment, in seconds.
TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
MIN_SEGMENT, MAX_SEGMENT = 1.0, 24 * 3600.0
#: Units of --record-keep (decimal, as disks are sold).
SIZE_UNITS = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12}
MIN_KEEP = 10 ** 6
MIN_KEEP_PERCENT, MAX_KEEP_PERCENT = 1.0, 95.0


def parse_record_dir(text):
    """The recordings' directory, made absolute, and made if missing: one
    that cannot be made or written to stops the daemon at start."""
    if not text.strip():
        raise usage.UsageError("--record: needs a directory (for example "
                               "/var/lib/pistreaming/recordings)")
    path = os.path.abspath(os.path.expanduser(text.strip()))
    if os.path.exists(path) and not os.path.isdir(path):
        raise usage.UsageError(f"--record: {path} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise usage.UsageError(
            f"--record: cannot make {path}: {(e.strerror or str(e)).lower()}") from None
    if not os.path.isdir(path):
        raise usage.UsageError(f"--record: {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise usage.UsageError(f"--record: {path}: permission denied (the daemon cannot "
                               "write there)")
    return path


def parse_record_segment(text):
    """A time (30s, 10m, 1h; a bare number is seconds) in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhSMH]?)\s*", text)
    if not match:
        raise usage.UsageError(
            f"--record-segment: {text!r} is not a time (for example 30s, 10m or 1h)")
    seconds = float(match.group(1)) * TIME_UNITS[match.group(2).lower()]
    if not MIN_SEGMENT <= seconds <= MAX_SEGMENT:
        raise usage.UsageError(f"--record-segment: {text.strip()} is outside 1s..24h")
    return seconds


def parse_record_keep(text):
    """A size (500M, 20G, 1.5T: decimal units, an optional B) or a share
    of the free space at start (80%): ("bytes", n) or ("percent", p)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|[kKmMgGtT]?[bB]?)\s*", text)
    if not match:
        raise usage.UsageError(
            f"--record-keep: {text!r} is neither a size (for example 500M or 20G) nor a "
            "share of the free space (for example 50%)")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        if not MIN_KEEP_PERCENT <= number <= MAX_KEEP_PERCENT:
            raise usage.UsageError(f"--record-keep: {text.strip()} is outside 1%..95%")
        return ("percent", number)
    size = int(number * SIZE_UNITS[unit.lower().rstrip("b")])
    if size < MIN_KEEP:
        raise usage.UsageError(f"--record-keep: {text.strip()} is less than 1M")
    return ("bytes", size)


def _as_text(value):
    """A Config default as the option's text (what --help and
    /etc/default/pistreaming show): 24, 800k, 1s, 10, 8084."""
    if isinstance(value, Fraction):
        return f"{float(value):g}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _bitrate_text(bits):
    for suffix, scale in (("M", 1_000_000), ("k", 1_000)):
        if bits % scale == 0:
            return f"{bits // scale}{suffix}"
    return str(bits)


def _backlog_text(backlog):
    kind, value = backlog
    return f"{value:g}s" if kind == "seconds" else str(value)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Stream a camera (or a test pattern) to web browsers as MPEG-1 video "
        "over WebSockets, played by JSMpeg.  Open http://HOST:8082/ to watch."
    )

    optFlags = [
        ["vflip", None, "Flip the picture vertically."],
        ["hflip", None, "Flip the picture horizontally."],
    ]

    optParameters = [
        ["http", None, Config.http,
         "Endpoint of the HTTP server (page, player, and the stream at /stream)."],
        ["ws-port", None, Config.ws.rsplit(":", 1)[1],
         "Extra port that serves only the WebSocket stream: a port number, "
         "an endpoint (tcp:8084:interface=127.0.0.1), or off."],
        ["resolution", "r", f"{Config.width}x{Config.height}", "Picture size, WIDTHxHEIGHT."],
        ["framerate", "f", _as_text(Config.framerate),
         "Frames per second: " + ", ".join(MPEG1_FRAME_RATES) + "."],
        ["bitrate", "b", _bitrate_text(Config.bitrate), "Video bit rate, e.g. 800k or 2M."],
        ["codec", None, Config.codec,
         "The stream's video: h264 (the camera's own encoder, no re-encode; the "
         "browser plays it with WebCodecs on https and http://localhost, with Media "
         "Source Extensions on plain http, and gets MPEG-1 made while it watches where "
         "it has neither) or mpeg1 (ffmpeg encodes, JSMpeg plays it in any browser)."],
        ["keyframe-interval", None, _as_text(Config.keyframe_interval),
         "Seconds between H.264 keyframes (where a new viewer's decoder starts)."],
        ["x264-preset", None, Config.x264_preset,
         "Where the daemon encodes H.264 itself (test pattern, files, webcams without "
         "H.264 and without a hardware encoder): x264's preset, " + ", ".join(X264_PRESETS)
         + "; each later one costs more CPU and gives a better picture at the same "
         "bit rate."],
        ["camera", "c", Config.camera,
         "Frame source: auto (picamera2, else picamera, else test), picamera2, "
         "picamera, test, v4l2:/dev/videoN (a USB webcam), file:PATH (a video file, looped)."],
        ["rotation", None, "0", "Turn the picture: 0 or 180 (the same as --vflip --hflip)."],
        ["annotate", None, None,
         "Text drawn at the top of the picture; strftime codes such as %H:%M:%S "
         "show the time."],
        ["ffmpeg", None, Config.ffmpeg, "The ffmpeg executable."],
        ["color", None, Config.color, "Page text and frame colour."],
        ["bgcolor", None, Config.bgcolor, "Page background colour."],
        ["backlog", None, _backlog_text(Config.backlog),
         "What a viewer may have waiting before it skips ahead: a time of video "
         "(1s) or bytes (256k)."],
        ["viewer-timeout", None, _as_text(Config.viewer_timeout),
         "Seconds a viewer may take nothing before it is closed."],
        ["interface", None, "",
         "Listen on this IP address only (127.0.0.1, ::1, a LAN address); "
         "by default every interface.  Endpoints that name an interface keep it."],
        ["passwd", None, None,
         "A password file (made with pistream-passwd): the page, the player, the "
         "stats and the stream then need a user name and password."],
        ["allow-origin", None, "",
         "Other origins whose pages may open the stream, comma-separated "
         "(https://example.com); * allows any.  The page's own always may."],
        ["max-viewers", None, _as_text(Config.max_viewers), "At most this many viewers at once; 0: no limit."],
        ["record", None, None,
         "Record the stream, as it is encoded, into this directory (made if missing): "
         "segments named by their start time in UTC, fragmented MP4 with --codec h264, "
         "MPEG-TS with mpeg1; listed at /recordings/."],
        ["record-segment", None, "10m",
         "With --record: the length of each segment (30s, 10m, 1h), cut at the next "
         "keyframe."],
        ["record-keep", None, "80%",
         "With --record: how much the recordings may take before the oldest are "
         "deleted: a size (500M, 20G) or a share of the space free at start (80%)."],
        ["push-audio", None, Config.push_audio,
         "The audio of each --push: none, or silent (a silent AAC track, which "
         "YouTube requires)."],
    ]

    def __init__(self):
        super().__init__()
        self["allow-host"] = []
        self["push"] = []

    def opt_allow_host(self, name):
        self["allow-host"].append(name)

    opt_allow_host.__doc__ = (
        "A host name the daemon is reached by, besides IP addresses, localhost and "
        "this machine's own names (HOSTNAME, HOSTNAME.local); repeatable or "
        "comma-separated; *.example.com allows its subdomains; * allows any (behind "
        "a proxy that rewrites Host).  Requests naming any other host get 421.")

    def opt_push(self, url):
        self["push"].append(url)

    opt_push.__doc__ = (
        "Push the stream to a media server (repeatable, one ffmpeg each): "
        "rtmp://HOST/APP/KEY or rtmps:// (FLV: nginx, YouTube, Twitch), "
        "rtsp://HOST:PORT/PATH (MediaMTX), srt://HOST:PORT?streamid=... "
        "(MPEG-TS).  H.264 is copied, MPEG-1 encoded to H.264.  Keys are "
        "masked wherever the URL is shown.")

    compData = usage.Completions(
        optActions={"camera": usage.CompleteList(CAMERAS),
                    "rotation": usage.CompleteList(ROTATIONS),
                    "codec": usage.CompleteList(CODECS),
                    "x264-preset": usage.CompleteList(X264_PRESETS),
                    "push-audio": usage.CompleteList(("none", "silent"))}
    )

    def postOptions(self):
        width, height = parse_resolution(self["resolution"])
        camera = parse_camera(self["camera"])
        vflip, hflip = parse_flips(self["rotation"], bool(self["vflip"]), bool(self["hflip"]))
        ffmpeg = find_ffmpeg(self["ffmpeg"])
        annotate, font = parse_annotation(self["annotate"], ffmpeg)
        interface = parse_interface(self["interface"])
        self.config = Config(
            http=with_interface(parse_endpoint("http", self["http"]), interface),
            ws=with_interface(parse_ws_port(self["ws-port"]), interface),
            width=width,
            height=height,
            framerate=parse_framerate(self["framerate"]),
            bitrate=parse_bitrate(self["bitrate"]),
            codec=parse_codec(self["codec"]),
            keyframe_interval=parse_seconds(
                "keyframe-interval", self["keyframe-interval"], 0.1, 60),
            x264_preset=parse_x264_preset(self["x264-preset"]),
            vflip=vflip,
            hflip=hflip,
            camera=camera,
            ffmpeg=ffmpeg,
            annotate=annotate,
            font=font,
            color=parse_colour("color", self["color"]),
            bgcolor=parse_colour("bgcolor", self["bgcolor"]),
            backlog=parse_backlog(self["backlog"]),
            viewer_timeout=parse_seconds("viewer-timeout", self["viewer-timeout"], 1, 3600),
            passwd=check_password_file(self["passwd"]) if self["passwd"] else None,
            allow_origins=check_origins_with_password(
                parse_origins(self["allow-origin"]), self["passwd"]),
            allow_hosts=parse_hosts(self["allow-host"]),
            max_viewers=parse_count("max-viewers", self["max-viewers"], 0, 100_000),
            **self._recording(),
            push=parse_pushes(self["push"]),
            push_audio=parse_push_audio(self["push-audio"]),
        )

    def _recording(self):
        """--record and its settings (which mean nothing without it)."""
        segment = parse_record_segment(self["record-segment"])
        keep = parse_record_keep(self["record-keep"])
        if self["record"] is None:
            for option, value, default in (("record-segment", segment, Config.record_segment),
                                           ("record-keep", keep, Config.record_keep)):
                if value != default:
                    raise usage.UsageError(
                        f"--{option}: only with --record DIR (where the recordings go)")
            return {}
        return dict(record=parse_record_dir(self["record"]), record_segment=segment,
                    record_keep=keep)
