"""Push: the stream to media servers that serve thousands (nginx's RTMP
module, MediaMTX, SRS, Owncast, YouTube, Twitch), one supervised ffmpeg per
target, apart from the viewers' path.

    fan-out's chunks --(tap: feed, never blocks)--> ffmpeg --> rtmp:// rtmps:// (FLV)
                                                           --> rtsp:// (publish)
                                                           --> srt:// (MPEG-TS)

What ffmpeg is given (L{push_command}):

- C{--codec h264}: the stream's access units (docs/stream.rst), each as
  Annex B with an access unit delimiter after it (as the on-demand MPEG-1
  encoder has them: the raw H.264 demuxer then knows at once that a picture
  is whole), read by ffmpeg's raw H.264 demuxer and copied (C{-c:v copy}):
  the camera's H.264 is never encoded again.  The raw stream carries no
  timestamps, so each picture is stamped when ffmpeg reads it
  (C{-use_wallclock_as_timestamps 1}).  C{-framerate} would instead number
  the pictures at the nominal rate: every picture this push or the camera
  drops would then pull the stream's clock behind the wall's, and the
  server's HLS segments and a player's buffer with it (docs/design.rst,
  "Push").
- C{--codec mpeg1}: the MPEG-TS chunks of MPEG-1 as the viewers get them;
  ffmpeg decodes them and encodes H.264 (the hardware encoder,
  C{h264_v4l2m2m}, where there is one, else libx264 at C{--x264-preset}),
  since none of these servers takes MPEG-1.
- C{--push-audio silent}: a silent AAC track, for servers that want audio
  (YouTube): C{anullsrc} as a source of ffmpeg's filter graph, which ffmpeg
  pulls only as far as the pictures have gone, so it keeps step with them
  (an input C{-f lavfi -i anullsrc} read at its own pace with C{-re} starts
  its clock only once the server is connected, after the first pictures
  were stamped, and the muxer then held each picture back for the audio:
  about 0.2 s more lag, measured; docs/design.rst, "Push").

Each ffmpeg is fed without blocking: each chunk is written to its stdin and
Twisted buffers what the pipe does not take; when that buffer passes 64 KiB
(the transport pauses the push), chunks are dropped up to the next keyframe
(counted while the push is live), so what reaches the server always decodes
and a push that cannot keep up never slows a viewer.  A newly started
ffmpeg is first given the fan-out's start cache (the latest keyframe and
every chunk since), so it has a picture to start at.

Whether a push is live is read from ffmpeg's progress reports (C{-progress
pipe:1}, twice a second): live once the bytes it has sent grow (the pictures
it has muxed, for RTSP, whose muxer does not count bytes).  A push whose
progress has stopped for L{TIMEOUT} seconds while what it was given waits
unread (a server that accepts and never reads) is killed and restarted, and
so is one not live L{TIMEOUT} seconds after it was first given pictures;
ffmpeg's own C{-rw_timeout} ends a write blocked that long (RTMP and SRT),
and its send buffer is kept to half a second of video (RTMP), so that a
stalled server shows after seconds of video have gone into the kernel's
buffers rather than tens.  A push that ends is started again after a
back-off of 1 s, doubling to 30 s (L{FIRST_DELAY}, L{MAX_DELAY}), from 1 s
again after a run live for a minute (L{LIVE_RESET}).

Stream keys are never shown: each target is known by its URL with its
secrets masked (L{Target.shown}: for RTMP the path past the application, or
the whole path where it has one name only; the password of
C{user:password@}; every query value but a few settings of SRT's), in the
log, /stats.json, /metrics and the page; what ffmpeg writes on its stderr,
which names the URL, is masked before it is logged or kept.
"""

import errno
import ipaddress
import os
import re
import signal
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from pistreaming.backoff import Backoff
from pistreaming.encoder import h264_args, unread
from pistreaming.ondemand import decoder_input

#: URL schemes and what they carry: (ffmpeg's muxer, the default port).
SCHEMES = {
    "rtmp": ("flv", 1935),
    "rtmps": ("flv", 443),
    "rtsp": ("rtsp", 554),
    "srt": ("mpegts", None),
}
#: --push-audio: none, or a silent AAC track.
AUDIO = ("none", "silent")
#: What stands for a secret wherever one would be shown.
MASK = "****"
#: Query parameters shown as they are (SRT's settings); every other
#: parameter's value is masked (a streamid, a passphrase, a key=).
SHOWN_QUERY = frozenset((
    "mode", "latency", "rcvlatency", "peerlatency", "pkt_size", "payload_size",
    "transtype", "maxbw", "connect_timeout", "tlpktdrop", "oheadbw"))

#: Seconds before the first restart of a push that ended; doubled after
#: each failure, up to L{MAX_DELAY}.
FIRST_DELAY = 1.0
MAX_DELAY = 30.0
#: A push live this many seconds starts its back-off from L{FIRST_DELAY}
#: again.
LIVE_RESET = 60.0
#: Seconds a push may make no progress while it has pictures to send (or
#: take to get live) before it is restarted; ffmpeg's -rw_timeout too.
TIMEOUT = 5.0
#: On stop: stdin is closed at once (ffmpeg ends the stream cleanly), then
#: SIGTERM, then SIGKILL (a server that takes nothing holds ffmpeg up).
TERM_AFTER = 0.5
KILL_AFTER = 1.5
#: Bytes of ffmpeg's stderr kept per run.
STDERR_LIMIT = 8192

log = Logger(namespace="pistreaming.push")

_HOST_NAME = re.compile(r"^(?=.{1,253}\.?$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                        r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")
#: ffmpeg's "[tcp @ 0x55d0c3a4e2c0] " in front of a component's messages.
_COMPONENT = re.compile(r"^\[(\w+) @ 0x[0-9a-fA-F]+\] ")


class PushURLError(ValueError):
    """A --push URL that cannot be used; its text never holds the key."""


@dataclass(frozen=True)
class Target:
    """Where a push goes.  C{url} is what ffmpeg is given; anything shown
    to anyone is L{shown}, or text through L{mask}."""

    #: The URL as given (with its key): for ffmpeg only.
    url: str = field(repr=False)
    scheme: str
    host: str
    port: int
    #: ffmpeg's muxer: "flv", "rtsp" or "mpegts".
    muxer: str
    #: The URL with every secret in it masked.
    shown: str
    #: The secrets (as written, decoded and encoded), longest first.
    secrets: tuple = field(repr=False, default=())

    def mask(self, text):
        """C{text} with every secret of this URL in it masked."""
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def __str__(self):
        return self.shown


def _forms(raw):
    """A secret as written in the URL, decoded, and encoded again: ffmpeg
    may print any of them."""
    forms = {raw, unquote(raw), quote(unquote(raw), safe="")}
    return {form for form in forms if form}


def parse_target(text):
    """The L{Target} of a --push URL, or L{PushURLError} saying what is
    wrong with it (never with its key in the message)."""
    text = text.strip()
    if not text:
        raise PushURLError("the URL is empty")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
        raise PushURLError("a URL cannot hold spaces or control characters")
    scheme, sep, _ = text.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,15}", scheme):
        raise PushURLError(
            "not a URL: give rtmp://HOST/APP/KEY, rtmps://HOST/APP/KEY, "
            "rtsp://HOST:PORT/PATH or srt://HOST:PORT")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise PushURLError(
            f"{scheme}:// is not a scheme a push takes; use rtmp://, rtmps://, rtsp:// "
            "or srt://")
    try:
        parts = urlsplit(text)
    except ValueError:  # an unbalanced [, or (Python 3.11) no IPv6 address in [ ]
        raise PushURLError(f"a {scheme}:// URL whose host in [ ] is not an IPv6 address") \
            from None

    # The secrets first, so that whatever is said below is masked.
    secrets = set()
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if password:
        secrets |= _forms(password)
    path = parts.path
    app = key = None
    if scheme in ("rtmp", "rtmps"):
        app, _, key = path.lstrip("/").partition("/")
        key = key.strip("/")
        if key:
            secrets |= _forms(key)
        elif app:  # one name only (MediaMTX's path), or a key without its application
            secrets |= _forms(app)
    pairs = []
    for item in parts.query.split("&") if parts.query else ():
        name, equals, value = item.partition("=")
        if value and unquote(name).lower() not in SHOWN_QUERY:
            secrets |= _forms(value)
            value = MASK
        pairs.append(name + equals + value)
    shown_netloc = ((user + (":" + MASK if colon else "") + "@") if at else "") + hostport
    if scheme in ("rtmp", "rtmps"):
        shown_path = ("/" + app + "/" + MASK if key else "/" + MASK) if app else path
    else:
        shown_path = path
    shown = (f"{scheme}://{shown_netloc}{shown_path}"
             + ("?" + "&".join(pairs) if parts.query else ""))
    ordered = tuple(sorted(secrets, key=len, reverse=True))

    def wrong(why):
        return PushURLError(f"{shown}: {why}")

    if parts.fragment or text.endswith("#"):
        raise wrong("it has a # in it (write it as %23)")
    host = parts.hostname
    if not host:
        raise wrong("no host in it")
    if hostport.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise wrong("its host in [ ] is not an IPv6 address") from None
    elif not _HOST_NAME.match(host):
        raise wrong(f"{host!r} is not a host name or an IP address")
    try:
        port = parts.port
    except ValueError:
        raise wrong("its port is not a number in 1..65535") from None
    muxer, default_port = SCHEMES[scheme]
    if port is None:
        if default_port is None:
            raise wrong(f"{scheme}:// needs a port ({scheme}://HOST:PORT)")
        port = default_port
    if not 1 <= port <= 65535:
        raise wrong("its port is not a number in 1..65535")
    if scheme in ("rtmp", "rtmps") and not app:
        raise wrong(f"{scheme}:// needs the stream's name: {scheme}://HOST/APP/KEY "
                    f"(nginx, YouTube, Twitch) or {scheme}://HOST/PATH (MediaMTX)")
    if scheme == "rtsp" and not path.strip("/"):
        raise wrong("rtsp:// needs the stream's path on the server: rtsp://HOST:PORT/PATH")
    if scheme == "srt" and path.strip("/"):
        raise wrong("srt:// takes no path; the stream's name goes in ?streamid=")
    return Target(url=text, scheme=scheme, host=host, port=port, muxer=muxer,
                  shown=shown, secrets=ordered)


# -- ffmpeg's command -----------------------------------------------------------

def send_buffer(bitrate):
    """ffmpeg's TCP send buffer for a push (C{-send_buffer_size}): half a
    second of video, at least 64 KiB.  Enough for a round trip of half a
    second at the stream's rate; without it the kernel lets the buffer grow
    to megabytes, and a server that stopped reading would show only after
    tens of seconds of video had gone into it."""
    return max(64 * 1024, bitrate // 16)


def push_command(ffmpeg, target, codec, audio="none", framerate=30, bitrate=800_000,
                 keyframe_interval=2.0, encoder="libx264", x264_preset="superfast",
                 timeout=None):
    """The ffmpeg argument list (argv[0] included) that pushes to C{target}
    (a L{Target}): what is written to its stdin (see the module's
    docstring) out to the server, with its progress on stdout.

    @param codec: the stream's, C{"h264"} (copied) or C{"mpeg1"} (encoded
        to H.264 with C{encoder}, C{"libx264"} or C{"h264_v4l2m2m"}, at
        C{bitrate}, a keyframe every C{keyframe_interval} seconds).
    @param audio: one of L{AUDIO}.
    @param timeout: seconds a network write may block (default L{TIMEOUT}).
    """
    if codec not in ("h264", "mpeg1"):
        raise ValueError(f"not a codec the push takes: {codec!r}")
    if audio not in AUDIO:
        raise ValueError(f"not a --push-audio: {audio!r}")
    timeout = TIMEOUT if timeout is None else timeout
    command = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error",
               # progress as key=value lines on stdout, twice a second
               "-nostats", "-progress", "pipe:1"]
    if codec == "h264":
        command += [
            # each picture read as it comes (the SPS in front of the first
            # keyframe says all), stamped with the time it is read
            "-probesize", "32", "-analyzeduration", "0",
            "-use_wallclock_as_timestamps", "1",
            "-f", "h264", "-i", "pipe:0",
        ]
    else:
        command += [
            # MPEG-1 in MPEG-TS as the viewers get it, each picture decoded
            # as soon as it is in (low_delay: not held for the next one)
            "-probesize", "32", "-analyzeduration", "0", "-flags", "low_delay",
            "-f", "mpegts", "-i", "pipe:0",
        ]
    if audio == "silent":
        # made as far as the pictures have gone (see the module's docstring)
        command += ["-filter_complex", "anullsrc=channel_layout=stereo:sample_rate=44100[a]"]
    command += ["-map", "0:v:0"]
    if audio == "silent":
        command += ["-map", "[a]"]
    if codec == "h264":
        command += ["-c:v", "copy"]
    else:
        command += h264_args(framerate, bitrate, keyframe_interval, encoder, x264_preset)
    if audio == "silent":
        command += ["-c:a", "aac", "-b:a", "128k"]
    micros = str(int(timeout * 1_000_000))
    if target.muxer == "flv":
        command += ["-f", "flv", "-flush_packets", "1",
                    "-rw_timeout", micros, "-send_buffer_size", str(send_buffer(bitrate))]
    elif target.muxer == "rtsp":
        # (RTSP's own socket timeout is -stimeout up to ffmpeg 4.4 and
        # -timeout since 5.0, where 4.4's -timeout means listening: the
        # watchdog stands in for it.)
        command += ["-f", "rtsp", "-rtsp_transport", "tcp"]
    else:
        command += ["-f", "mpegts", "-flush_packets", "1", "-rw_timeout", micros]
    command.append(target.url)
    return command


def choose_encoder(ffmpeg, find=None):
    """How a push makes H.264 of the MPEG-1 stream: (C{"h264_v4l2m2m"} or
    C{"libx264"}, why in words).

    @param find: a stand-in for
        L{pistreaming.camera.v4l2.find_hardware_encoder}, for tests.
    """
    if find is None:
        from pistreaming.camera.v4l2 import find_hardware_encoder as find
    device, text = find(ffmpeg)
    if device is not None:
        return "h264_v4l2m2m", f"the hardware encoder ({text} at {device}, ffmpeg's h264_v4l2m2m)"
    return "libx264", f"libx264 ({text})"


# -- back-off and progress ----------------------------------------------------------

class ProgressReader:
    """ffmpeg's C{-progress} output: blocks of key=value lines, each ended
    by C{progress=continue} (or C{end}); L{feed} returns the whole blocks
    (dicts) in the bytes given."""

    limit = 65536

    def __init__(self):
        self._rest = b""
        self._block = {}

    def feed(self, data):
        data = self._rest + data
        *lines, self._rest = data.split(b"\n")
        if len(self._rest) > self.limit:  # not ffmpeg's progress: forget it
            self._rest = b""
        blocks = []
        for line in lines:
            key, equals, value = line.decode("utf-8", "replace").strip().partition("=")
            if not equals:
                continue
            self._block[key] = value
            if key == "progress":
                blocks.append(self._block)
                self._block = {}
        return blocks


def _count(text):
    """A progress report's number, or None (ffmpeg's N/A)."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


# -- one push -------------------------------------------------------------------

@implementer(IPushProducer)
class PushProtocol(protocol.ProcessProtocol):
    """One ffmpeg run of a L{Push}.  The producer of its stdin: the
    transport pauses it when its buffer is full, and chunks are then
    dropped."""

    def __init__(self, push):
        self.push = push
        self.progress = ProgressReader()
        self.paused = False
        self.writable = False
        self.started_at = None
        self.stderr = b""
        #: ffmpeg's counts in this run: bytes sent (None while unknown, and
        #: for muxers that do not count them), pictures muxed.
        self.bytes_out = None
        self.frames_out = 0
        #: What grows while the push makes progress (bytes, or pictures).
        self.measure = 0
        self.stalled = None  # why it was killed, if it stalled
        self.fell_behind = False  # whether chunks were dropped in this run

    def connectionMade(self):
        self.started_at = self.push.reactor.seconds()
        self.writable = True
        self.transport.registerProducer(self, True)
        self.push._started(self)

    def outReceived(self, data):
        for block in self.progress.feed(data):
            self.push._progress(self, block)

    def errReceived(self, data):
        self.stderr = (self.stderr + data)[-STDERR_LIMIT:]

    def processEnded(self, reason):
        self.writable = False
        self.push._ended(self, reason)

    def input_waiting(self):
        """Whether ffmpeg has not read everything it was given: its stdin
        pipe holds bytes, or Twisted's buffer in front of it does."""
        if self.paused:
            return True
        writer = getattr(self.transport, "pipes", {}).get(0)
        if writer is None:
            return False
        try:
            if writer._tempDataLen or len(writer.dataBuffer) > writer.offset:
                return True
        except AttributeError:  # not Twisted's FileDescriptor
            pass
        try:
            return unread(writer.fileno()) > 0
        except (OSError, ValueError):
            return False

    def error_lines(self):
        """ffmpeg's stderr of this run, masked, one item a line, without
        the addresses of ffmpeg's components ("[tcp @ 0x55...] " is "tcp: ")."""
        text = self.push.target.mask(self.stderr.decode("utf-8", "replace"))
        return [_COMPONENT.sub(r"\1: ", line.strip()) for line in text.splitlines()
                if line.strip()]

    # IPushProducer, for stdin
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.writable = False


class Push(service.Service):
    """Keeps one ffmpeg pushing the stream to one L{Target}; a tap of the
    daemon (L{feed})."""

    #: States: ffmpeg started, nothing sent yet; bytes going out; waiting
    #: to start it again; the daemon stops.
    CONNECTING, LIVE, BACKING_OFF, STOPPED = "connecting", "live", "backing off", "stopped"

    def __init__(self, target, command, reactor, codec, start_cache=None, env=None,
                 timeout=None, first_delay=None, max_delay=None, live_reset=None, label=None):
        """
        @param target: the L{Target}.
        @param label: what the push is called in the log and the figures:
            by default the target's masked URL (L{Pushes} numbers pushes
            whose masked URLs are the same).
        @param command: L{push_command}'s.
        @param codec: the stream's, C{"h264"} or C{"mpeg1"}: what L{feed}
            is given.
        @param start_cache: called with no arguments, gives the chunks a
            decoder needs first (the latest keyframe's and every one
            since), written to each new ffmpeg before anything else.
        @param timeout, first_delay, max_delay, live_reset: see L{TIMEOUT},
            L{FIRST_DELAY}, L{MAX_DELAY}, L{LIVE_RESET} (their values by
            default).
        """
        self.target = target
        self.label = label or target.shown
        self.command = list(command)
        self.reactor = reactor
        self.codec = codec
        self.start_cache = start_cache or (lambda: [])
        self.env = dict(os.environ) if env is None else env
        self.timeout = TIMEOUT if timeout is None else timeout
        self.backoff = Backoff(FIRST_DELAY if first_delay is None else first_delay,
                               MAX_DELAY if max_delay is None else max_delay)
        self.live_reset = LIVE_RESET if live_reset is None else live_reset
        self.process = None
        self.state = self.STOPPED
        self.since = reactor.seconds()
        #: When the next try starts, while backing off.
        self.next_try_at = None
        #: Since when the current run is live (None while it is not).
        self.live_since = None
        #: The last failure, in a line (ffmpeg's last error line, masked).
        self.error = None
        self.starts = 0
        self.restarts = 0
        self.stalls = 0
        #: Chunks given to ffmpeg and their bytes; chunks not given to it
        #: while it was live (it was behind, or waited for a keyframe);
        #: times it fell behind.
        self.chunks_in = 0
        self.bytes_in = 0
        self.dropped = 0
        self.fell_behind = 0
        self._bytes_before = 0  # bytes sent by the runs that ended
        self._counts_bytes = None  # whether ffmpeg says how many bytes it sent
        self.skipping = True
        self._pending_since = None  # first write since ffmpeg last made progress
        self._restart_call = None
        self._watchdog = None
        self._stopping = False
        self._stopped = None
        self._stop_timers = []

    # -- feeding
    def feed(self, chunk):
        """One chunk of the stream, as the viewers get it (in h264 mode an
        access-unit message, in mpeg1 mode MPEG-TS): written to ffmpeg, or
        dropped while it is behind or waits for a keyframe (counted while
        the push is live: while it connects, ffmpeg reads nothing, and the
        start cache has filled its pipe).  Ignored while no ffmpeg runs."""
        proto = self.process
        if proto is None or not proto.writable:
            return
        live = self.state == self.LIVE
        if self.skipping and not chunk.keyframe:
            if live:
                self.dropped += 1
            return
        if proto.paused:
            if not live:
                self.skipping = True
                return
            self.dropped += 1
            if not self.skipping:
                self.skipping = True
                self.fell_behind += 1
            if not proto.fell_behind:
                proto.fell_behind = True  # said once a run
                log.warn("push {target}: ffmpeg takes the stream slower than it comes; "
                         "dropping pictures until the next keyframe", target=self.label)
            return
        self._write(proto, chunk)

    def _write(self, proto, chunk):
        self.skipping = False
        data = decoder_input(chunk.data) if self.codec == "h264" else chunk.data
        proto.transport.write(data)
        self.chunks_in += 1
        self.bytes_in += len(data)
        if self._pending_since is None:
            self._pending_since = self.reactor.seconds()

    # -- the process
    def startService(self):
        super().startService()
        self._stopping = False
        self.backoff.reset()
        self._spawn()

    def _spawn(self):
        self._restart_call = None
        proto = PushProtocol(self)
        self._set_state(self.CONNECTING)
        try:
            # Where Twisted forks (22.4), a missing executable would show
            # only as a child exiting 1; asked first, it is said as it is.
            if os.path.isabs(self.command[0]) and not os.access(self.command[0], os.X_OK):
                raise OSError(errno.ENOENT if not os.path.exists(self.command[0])
                              else errno.EACCES, "")
            self.reactor.spawnProcess(proto, self.command[0], self.command, env=self.env)
        except Exception as e:
            why = (e.strerror or (os.strerror(e.errno) if e.errno else "") or str(e)) \
                if isinstance(e, OSError) else str(e)
            self._failed(f"cannot start {self.command[0]}: "
                         f"{why.lower() if why else type(e).__name__}", None)

    def _started(self, proto):
        self.process = proto
        self.starts += 1
        self.skipping = True
        self._pending_since = None
        self.live_since = None
        if self.starts == 1:
            log.info("push {target}: ffmpeg pid {pid} started: {command}",
                     target=self.label, pid=proto.transport.pid,
                     command=self.target.mask(" ".join(self.command)))
        else:
            log.info("push {target}: ffmpeg pid {pid} started (try {number})",
                     target=self.label, pid=proto.transport.pid, number=self.starts)
        # What a decoder needs first, whole, however full the pipe gets.
        for chunk in self.start_cache():
            if self.skipping and not chunk.keyframe:
                continue
            self._write(proto, chunk)
        self._watch()

    def _watch(self):
        self._watchdog = self.reactor.callLater(min(1.0, self.timeout / 4), self._check)

    def _check(self):
        """The watchdog: a push that has had pictures to send for
        C{timeout} seconds without sending any is restarted; so is one not
        live C{timeout} seconds after it was first given pictures."""
        self._watchdog = None
        proto = self.process
        if proto is None or self._stopping:
            return
        now = self.reactor.seconds()
        if self.state == self.LIVE and not proto.input_waiting():
            # ffmpeg has read all it was given: it waits for pictures, not
            # for the server (it says nothing new until the next comes).
            self._pending_since = None
        if self._pending_since is not None and now - self._pending_since >= self.timeout:
            waited = now - self._pending_since
            proto.stalled = (f"ffmpeg made no progress for {waited:.1f}s, killed"
                             if self.state == self.LIVE
                             else f"ffmpeg was not live {waited:.1f}s after it was given "
                                  "the stream, killed")
            self.stalls += 1
            self._signal(proto, signal.SIGKILL)
            return
        self._watch()

    def _progress(self, proto, block):
        if proto is not self.process:
            return
        size = _count(block.get("total_size"))
        if self._counts_bytes is None and "total_size" in block:
            self._counts_bytes = size is not None
        frames = _count(block.get("frame"))
        if frames is not None:
            proto.frames_out = frames
        if size is not None:
            proto.bytes_out = size
        measure = size if self._counts_bytes else frames
        if measure is None or measure <= proto.measure:
            return
        proto.measure = measure
        self._pending_since = None
        if self.state == self.CONNECTING:
            now = self.reactor.seconds()
            self.live_since = now
            self._set_state(self.LIVE)
            log.info("push {target}: live, {took:.1f}s after ffmpeg started",
                     target=self.label, took=now - proto.started_at)

    def _ended(self, proto, reason):
        if self.process is proto:
            self.process = None
        self._bytes_before += proto.bytes_out or 0
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        if self._stopping:
            for timer in self._stop_timers:
                if timer.active():
                    timer.cancel()
            self._stop_timers = []
            if self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        now = self.reactor.seconds()
        ran = now - (proto.started_at or now)
        if self.live_since is not None and now - self.live_since >= self.live_reset:
            self.backoff.reset()
        lines = proto.error_lines()
        if proto.stalled:
            how = proto.stalled
        else:
            code = getattr(reason.value, "exitCode", None)
            sig = getattr(reason.value, "signal", None)
            how = f"ffmpeg was killed by signal {sig}" if sig else f"ffmpeg exited with code {code}"
        live = (f"live for {now - self.live_since:.1f}s" if self.live_since is not None
                else "never live")
        self._failed(f"{how} (ran {ran:.1f}s, {live})", lines[-1][:200] if lines else None,
                     " / ".join(lines[-3:]))

    def _failed(self, how, last_line, detail=""):
        """This try failed (C{how}); back off and try again."""
        self.live_since = None
        self.error = f"{how}: {last_line}" if last_line else how
        delay = self.backoff.next()
        log.error("push {target}: {how}; trying again in {delay:g}s{detail}",
                  target=self.label, how=how, delay=delay,
                  detail=(": " + detail) if detail else "")
        self.next_try_at = self.reactor.seconds() + delay
        self._set_state(self.BACKING_OFF)
        self.restarts += 1
        self._restart_call = self.reactor.callLater(delay, self._spawn)

    def _set_state(self, state):
        if state != self.state:
            self.state = state
            self.since = self.reactor.seconds()
        if state != self.BACKING_OFF:
            self.next_try_at = None

    def stopService(self):
        super().stopService()
        self._stopping = True
        for call in (self._restart_call, self._watchdog):
            if call is not None and call.active():
                call.cancel()
        self._restart_call = self._watchdog = None
        self._set_state(self.STOPPED)
        proto = self.process
        if proto is None:
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        proto.writable = False
        try:
            # The producer first (a paused one would keep stdin open).
            proto.transport.unregisterProducer()
            proto.transport.closeStdin()
        except Exception:
            pass
        self._stop_timers = [
            self.reactor.callLater(TERM_AFTER, self._signal, proto, signal.SIGTERM),
            self.reactor.callLater(KILL_AFTER, self._signal, proto, signal.SIGKILL),
        ]
        return self._stopped

    def _signal(self, proto, signum):
        try:
            proto.transport.signalProcess(signum)
        except error.ProcessExitedAlready:
            pass

    # -- figures
    @property
    def bytes_sent(self):
        """Bytes ffmpeg has sent to the server, over every run; None where
        its muxer does not say (RTSP)."""
        if not self._counts_bytes:
            return None
        proto = self.process
        return self._bytes_before + ((proto.bytes_out or 0) if proto is not None else 0)

    def figures(self, now):
        """For /stats.json, /metrics and the page: never the key."""
        proto = self.process
        return {
            "target": self.label,
            "state": self.state,
            "since": round(self.since, 3),
            "for": round(now - self.since, 3),
            "next_try_in": (round(max(0.0, self.next_try_at - now), 3)
                            if self.next_try_at is not None else None),
            "pid": proto.transport.pid if proto is not None else None,
            "bytes_sent": self.bytes_sent,
            "bytes_in": self.bytes_in,
            "chunks_in": self.chunks_in,
            "dropped": self.dropped,
            "fell_behind": self.fell_behind,
            "starts": self.starts,
            "restarts": self.restarts,
            "stalls": self.stalls,
            "error": self.error,
        }


class Pushes(service.MultiService):
    """Every --push target's L{Push}: the daemon's taps, one per target."""

    name = "push"

    def __init__(self, config, reactor, start_cache=None, find_encoder=None, env=None):
        """
        @param config: the daemon's L{pistreaming.options.Config}: its
            C{push} targets, C{push_audio}, codec, rate, bit rate, keyframe
            interval, x264 preset and ffmpeg.
        @param start_cache: see L{Push}.
        @param find_encoder: see L{choose_encoder}.
        """
        super().__init__()
        self.encoder, self.encoder_why = None, None
        if config.codec == "mpeg1":
            self.encoder, self.encoder_why = choose_encoder(config.ffmpeg, find_encoder)
        self.targets = []
        shown = [target.shown for target in config.push]
        for number, target in enumerate(config.push, 1):
            label = target.shown if shown.count(target.shown) == 1 else f"{target.shown} (#{number})"
            command = push_command(
                config.ffmpeg, target, config.codec, config.push_audio, config.framerate,
                config.bitrate, config.keyframe_interval, self.encoder or "libx264",
                config.x264_preset)
            push = Push(target, command, reactor, config.codec, start_cache=start_cache, env=env,
                        label=label)
            push.setServiceParent(self)
            self.targets.append(push)

    def startService(self):
        if self.encoder is not None:
            log.info("push: H.264 for the push made of the MPEG-1 stream by {why}",
                     why=self.encoder_why)
        super().startService()

    def figures(self, now):
        return [push.figures(now) for push in self.targets]
