"""A stand-in for the daemon in h264 mode, for the page's browser tests.

It serves the real page (pistreaming.web's site: the template filled in,
the page's policy) and, at the page's stream address, plays a prepared
libx264 stream in the H.264 stream format (docs, and the page's
pistream.js): a JSON text message {"stream": {...}}, then one binary
message per access unit (a flags byte, bit 0 = keyframe; the capture time
in microseconds since the epoch, 8 bytes big-endian; the access unit in
Annex B), framed by the daemon's own stage (pistreaming.h264.H264Stream).
Pictures go out at the clip's frame rate, looping; a newcomer gets the
stream message, the latest keyframe's message and every message since,
then the live ones.

At the stream's address with ?codec=mpeg1 it serves, as the daemon does
for browsers that can play H.264 neither through WebCodecs nor MSE, an
MPEG-1 stream: the 8-byte jsmp header, then MPEG-TS a picture to a message
(cut by the daemon's own pistreaming.mpegts.PictureSplitter), a newcomer
getting the pictures since the latest intra picture first.  It is testsrc2
of the first clip's size, made by ffmpeg with the daemon's own MPEG-1
output arguments (pistreaming.encoder.output_args).

The clips are made with ffmpeg when the server starts: testsrc2, baseline
profile, a keyframe every 2 s, SPS and PPS before every IDR, no B-frames
(x264's zerolatency tuning: several slices to a picture, as the daemon's
own libx264 path gives).

A test drives it over HTTP, on the same port as the page:

    /control/state            where the stream is: {"clip", "sent",
                              "since_key", "viewers", "keyframes",
                              "key_times" (the last 10 keyframes' capture
                              times as sent, us)}
    /control/midgroup?at=N    answers once the current group of pictures
                              has N pictures (N-1 after its keyframe), so that
                              a page opened then joins in mid-group
    /control/corrupt          the next picture that is no keyframe goes out
                              damaged (its slice data replaced by noise, past
                              what the daemon's checks read); answers once
                              it is sent
    /control/resize?clip=WxH  the stream changes to the clip of that size:
                              a new stream message to everyone, then that
                              clip from its keyframe; answers once sent
    /control/drop             every viewer's connection is cut, as when the
                              daemon stops
    /control/mpeg1?serve=0    ?codec=mpeg1 gets the H.264 stream, as from a
                              daemon that makes no MPEG-1 for such viewers
                              (serve=1: MPEG-1 again)

/control/state also counts the connections to each stream since the server
started ("h264_connects", "mpeg1_connects") and the MPEG-1 viewers now
("mpeg1_viewers").

Run it as ``python -m tests.h264_page_server DIRECTORY`` (it prints
"listening on PORT"), or from a test with L{PageServer}.
"""

import argparse
import json
import os
import random
import select
import struct
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

from pistreaming import encoder, h264, mpegts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The clips the server offers: the first plays from the start.
CLIPS = ("320x240", "480x360")
RATE = 30
KEYFRAME_INTERVAL = 2.0
CLIP_SECONDS = 4

# -- making the clips, and cutting them into access units --------------------


def encode_clip(path, size, rate=RATE, seconds=CLIP_SECONDS,
                keyframe_interval=KEYFRAME_INTERVAL):
    """An Annex-B H.264 file at C{path}: testsrc2 of C{size} ("WxH")."""
    gop = int(round(rate * keyframe_interval))
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-t", str(seconds),
         "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
         "-profile:v", "baseline", "-pix_fmt", "yuv420p",
         "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0", "-bf", "0",
         "-x264-params", "repeat-headers=1", "-f", "h264", path],
        check=True, timeout=120)


def encode_mpeg1_clip(path, size, rate=RATE, seconds=CLIP_SECONDS, bitrate=800_000):
    """An MPEG-TS file at C{path}: testsrc2 of C{size} ("WxH") in MPEG-1,
    as the daemon's encoder makes it."""
    output = encoder.output_args(rate, bitrate, codec="mpeg1")
    assert output[-1] == "pipe:1", output
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-t", str(seconds),
         "-pix_fmt", "yuv420p"] + output[:-1] + [path],
        check=True, timeout=120)


class Mpeg1Clip:
    """A prepared MPEG-1 stream: its header and its pictures (TS chunks)."""

    def __init__(self, path, size):
        with open(path, "rb") as f:
            data = f.read()
        data = data[:len(data) - len(data) % mpegts.PACKET]
        self.chunks = [c for c in mpegts.PictureSplitter().feed(data) if c.picture]
        if not self.chunks or not self.chunks[0].keyframe:
            raise ValueError(f"{path}: the clip does not begin with an intra picture")
        width, height = map(int, size.split("x"))
        self.header = b"jsmp" + struct.pack(">HH", width, height)


def clip_units(path):
    """The access units of the Annex-B file at C{path}: [(keyframe, bytes)]."""
    with open(path, "rb") as f:
        data = f.read()
    return [(h264.is_idr(unit), unit) for unit in h264.access_units(data)]


class Clip:
    """One prepared stream: its access units and its name ("WxH")."""

    def __init__(self, path):
        self.units = clip_units(path)
        if not self.units or not self.units[0][0]:
            raise ValueError(f"{path}: the clip does not begin with a keyframe")
        nals = h264.nal_units(self.units[0][1])
        config = h264.Config(next(n for n in nals if n[0] & 0x1F == h264.SPS),
                             next(n for n in nals if n[0] & 0x1F == h264.PPS))
        self.name = f"{config.width}x{config.height}"


def damaged(access_unit, seed=14):
    """C{access_unit} with each slice's data after its first bytes replaced
    by noise (no zero byte, so no start code appears): a picture that
    arrived broken, past what the daemon's checks read."""
    noise = random.Random(seed)
    out = []
    for nal in h264.nal_units(access_unit):
        if nal[0] & 0x1F in h264.VCL_TYPES:
            nal = nal[:3] + bytes(noise.randrange(1, 256) for _ in range(len(nal) - 3))
        out.append(h264.LONG_START_CODE + nal)
    return b"".join(out)


# -- the server ---------------------------------------------------------------


class Player:
    """Plays a clip to every viewer at its frame rate, looping, through
    the daemon's own H.264 stage (L{pistreaming.h264.H264Stream}): it
    frames each access unit as the stream's message and says when the
    configuration (SPS, PPS) changes."""

    def __init__(self, clips, clock):
        self.clips = clips
        self.clip = clips[0]
        self.index = 0
        self.stage = h264.H264Stream(self.send_chunk, self.send_config, KEYFRAME_INTERVAL, clock)
        self.viewers = []
        self.since_key = []  # the messages since (and with) the latest keyframe
        self.connects = 0
        self.sent = 0
        self.keyframes = 0
        self.key_times = []  # the latest keyframes' capture times (us), as sent
        self.corrupt = False
        self.change = None  # the clip to change to at the next picture
        self.waiters = []  # (test, deferred): answered after a picture goes out

    def stream_message(self):
        return json.dumps({"stream": self.stage.message()}).encode("utf-8")

    def join(self, viewer):
        self.connects += 1
        if self.stage.config is not None:
            viewer.send(self.stream_message(), False)
            for message in self.since_key:
                viewer.send(message, True)
        self.viewers.append(viewer)
        self.tell_viewers()

    def leave(self, viewer):
        if viewer in self.viewers:
            self.viewers.remove(viewer)
            self.tell_viewers()

    def tell_viewers(self):
        count = json.dumps({"viewers": len(self.viewers)}).encode("utf-8")
        for viewer in self.viewers:
            if viewer.wants_status:
                viewer.send(count, False)

    def tick(self):
        if self.change is not None:
            self.clip, self.index, self.change = self.change, 0, None
        keyframe, unit = self.clip.units[self.index]
        self.index = (self.index + 1) % len(self.clip.units)
        self.stage.feed(unit, time.time())
        waiters, self.waiters = self.waiters, []
        for test, d in waiters:
            if test():
                d.callback(self.state())
            else:
                self.waiters.append((test, d))

    def send_config(self, config):
        message = self.stream_message()
        for viewer in self.viewers:
            viewer.send(message, False)

    def send_chunk(self, chunk):
        message = chunk.data
        if self.corrupt and not chunk.keyframe:
            message = message[:h264.HEADER.size] + damaged(message[h264.HEADER.size:])
            self.corrupt = False
        if chunk.keyframe:
            self.since_key = []
            self.keyframes += 1
            # its capture time as the message says it (us)
            self.key_times = (self.key_times + [h264.HEADER.unpack_from(message)[1]])[-10:]
        self.since_key.append(message)
        self.sent += 1
        for viewer in self.viewers:
            viewer.send(message, True)

    def state(self):
        return {"clip": self.clip.name, "sent": self.sent, "since_key": len(self.since_key),
                "viewers": len(self.viewers), "keyframes": self.keyframes,
                "h264_connects": self.connects, "key_times": self.key_times}

    def after(self, test):
        from twisted.internet import defer
        d = defer.Deferred()
        self.waiters.append((test, d))
        return d


class Mpeg1Player:
    """Plays an MPEG-1 clip to its viewers at its frame rate, looping: the
    header and the pictures since the latest intra picture to a newcomer,
    then each picture as it comes."""

    def __init__(self, clip):
        self.clip = clip
        self.index = 0
        self.viewers = []
        self.since_key = []
        self.connects = 0
        self.served = True  # (else ?codec=mpeg1 gets the H.264 stream)

    def join(self, viewer):
        self.connects += 1
        viewer.send(self.clip.header, True)
        for message in self.since_key:
            viewer.send(message, True)
        self.viewers.append(viewer)

    def leave(self, viewer):
        if viewer in self.viewers:
            self.viewers.remove(viewer)

    def tick(self):
        chunk = self.clip.chunks[self.index]
        self.index = (self.index + 1) % len(self.clip.chunks)
        if chunk.keyframe:
            self.since_key = []
        self.since_key.append(chunk.data)
        for viewer in self.viewers:
            viewer.send(chunk.data, True)

    def state(self):
        return {"mpeg1_connects": self.connects, "mpeg1_viewers": len(self.viewers)}


def control_resource(player, mpeg1):
    from twisted.web import resource, server

    class Control(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            command = request.postpath[0].decode() if request.postpath else ""
            args = {k.decode(): v[0].decode() for k, v in request.args.items()}
            if command == "state":
                request.setHeader(b"content-type", b"application/json")
                return json.dumps(dict(player.state(), **mpeg1.state())).encode()
            if command == "mpeg1":
                mpeg1.served = args.get("serve", "1") == "1"
                request.setHeader(b"content-type", b"application/json")
                return json.dumps(dict(player.state(), **mpeg1.state())).encode()
            if command == "midgroup":
                at = int(args.get("at", "30"))
                d = player.after(lambda: len(player.since_key) == at)
            elif command == "corrupt":
                player.corrupt = True
                d = player.after(lambda: not player.corrupt)
            elif command == "drop":
                # As a daemon that stops does: the connections just end.
                for viewer in list(player.viewers):
                    viewer.dropConnection(abort=True)
                d = player.after(lambda: True)
            elif command == "resize":
                clip = next((c for c in player.clips if c.name == args.get("clip")), None)
                if clip is None:
                    request.setResponseCode(404)
                    return b"no such clip\n"
                player.change = clip
                d = player.after(lambda: player.change is None)
            else:
                request.setResponseCode(404)
                return b"no such command\n"

            def answer(state):
                request.setHeader(b"content-type", b"application/json")
                request.write(json.dumps(state).encode())
                request.finish()
            d.addCallback(answer)
            return server.NOT_DONE_YET

    return Control()


def make_server(clips, rate, reactor, mpeg1_clip):
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import task
    from twisted.web import resource, static

    from pistreaming import web

    player = Player(clips, reactor)
    mpeg1 = Mpeg1Player(mpeg1_clip)

    class Viewer(WebSocketServerProtocol):
        wants_status = False

        def onConnect(self, request):
            if "pistream" in request.protocols:
                self.wants_status = True
                return "pistream"
            return None

        def onOpen(self):
            self.factory.stream.join(self)

        def onClose(self, wasClean, code, reason):
            self.factory.stream.leave(self)

        def send(self, payload, binary):
            if self.state == self.STATE_OPEN:
                self.sendMessage(payload, isBinary=binary)

    factory = WebSocketServerFactory()
    factory.protocol = Viewer
    factory.stream = player
    factory.setProtocolOptions(autoPingInterval=0)
    mpeg1_factory = WebSocketServerFactory()
    mpeg1_factory.protocol = Viewer
    mpeg1_factory.stream = mpeg1
    mpeg1_factory.setProtocolOptions(autoPingInterval=0)
    first = clips[0]
    width, height = map(int, first.name.split("x"))
    config = SimpleNamespace(width=width, height=height, color="#444", bgcolor="#333")
    site = web.make_site(config, factory, reactor=reactor)
    pages = site.resource

    class Routes(resource.Resource):
        def __init__(self):
            super().__init__()
            self.control = control_resource(player, mpeg1)
            self.mpeg1 = web.Stream(mpeg1_factory)
            # The page reads the daemon's figures while its overlay shows
            # (for the pushes): a daemon that pushes nowhere.
            self.stats = static.Data(b"{}", "application/json")

        def getChild(self, name, request):
            if name == b"control":
                return self.control
            if name == b"stats.json":
                return self.stats
            if (name == b"stream" and not request.postpath and mpeg1.served
                    and request.args.get(b"codec") == [b"mpeg1"]):
                return self.mpeg1
            return pages.getChildWithDefault(name, request)

    site.resource = Routes()
    for stream in (player, mpeg1):
        ticks = task.LoopingCall(stream.tick)
        ticks.clock = reactor
        ticks.start(1.0 / rate)
    return site, player


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where the clips are made")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    clips = []
    for size in CLIPS:
        path = os.path.join(args.directory, f"{size}.264")
        encode_clip(path, size)
        clips.append(Clip(path))
    path = os.path.join(args.directory, f"{CLIPS[0]}.ts")
    encode_mpeg1_clip(path, CLIPS[0])
    mpeg1_clip = Mpeg1Clip(path, CLIPS[0])
    from twisted.internet import reactor
    site, _ = make_server(clips, RATE, reactor, mpeg1_clip)
    port = reactor.listenTCP(args.port, site, interface="127.0.0.1")
    print(f"listening on {port.getHost().port}", flush=True)
    reactor.run()


# -- from a test ----------------------------------------------------------------


class PageServer:
    """The server above in a child process; use as a context manager."""

    def __init__(self, directory, start_timeout=60):
        self.directory = str(directory)
        self.start_timeout = start_timeout
        self.process = None
        self.port = None

    def __enter__(self):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.h264_page_server", self.directory],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([self.process.stdout], [], [], self.start_timeout)
            line = self.process.stdout.readline() if ready else ""
            if not line.startswith("listening on "):
                raise AssertionError(f"the H.264 page server did not start: {line!r}")
            self.port = int(line.split()[-1])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process.stdout.close()

    def url(self, host="127.0.0.1"):
        return f"http://{host}:{self.port}/"

    def control(self, command, timeout=10, **args):
        query = "&".join(f"{k}={v}" for k, v in args.items())
        with urllib.request.urlopen(f"{self.url()}control/{command}?{query}",
                                    timeout=timeout) as answer:
            return json.loads(answer.read())


if __name__ == "__main__":
    main()
