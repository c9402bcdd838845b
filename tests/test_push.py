"""The push to media servers (pistreaming.push), in process: its URLs and
what is masked in them, ffmpeg's command for each kind of target and
codec, and on a Clock with a recording spawnProcess: feeding without
blocking, live from ffmpeg's progress, the back-off, the watchdog, the stop,
and the key in nothing that is logged or shown.  (tests/test_push_nginx.py
pushes to a real nginx.)"""

import json
import os
import signal
from types import SimpleNamespace

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from pistreaming import push
from pistreaming.h264 import frame_message
from pistreaming.mpegts import Chunk
from pistreaming.options import Config
from pistreaming.push import (
    MASK, Push, Pushes, PushURLError, choose_encoder, parse_target, push_command)
from tests.fakes.inmemory import SpawningReactor

KEY = "abcd-7kq2-x9vw-secret"


# -- URLs ---------------------------------------------------------------------------

@pytest.mark.parametrize("url,scheme,host,port,muxer,shown", [
    (f"rtmp://a.rtmp.youtube.com/live2/{KEY}", "rtmp", "a.rtmp.youtube.com", 1935, "flv",
     "rtmp://a.rtmp.youtube.com/live2/****"),
    (f"RTMP://live.twitch.tv/app/{KEY}", "rtmp", "live.twitch.tv", 1935, "flv",
     "rtmp://live.twitch.tv/app/****"),
    (f"rtmps://live-api-s.facebook.com:443/rtmp/{KEY}?s_bl=1&s_sc=777", "rtmps",
     "live-api-s.facebook.com", 443, "flv",
     "rtmps://live-api-s.facebook.com:443/rtmp/****?s_bl=****&s_sc=****"),
    (f"rtmps://ingest.example/live/{KEY}", "rtmps", "ingest.example", 443, "flv",
     "rtmps://ingest.example/live/****"),
    (f"rtmp://[::1]:1935/live/inst/{KEY}", "rtmp", "::1", 1935, "flv",
     "rtmp://[::1]:1935/live/****"),
    (f"rtsp://cam:{KEY}@192.0.2.10:8554/garden", "rtsp", "192.0.2.10", 8554, "rtsp",
     "rtsp://cam:****@192.0.2.10:8554/garden"),
    ("rtsp://mediamtx.local/garden", "rtsp", "mediamtx.local", 554, "rtsp",
     "rtsp://mediamtx.local/garden"),
    # MediaMTX's RTMP: a path alone (it may be a key without its application)
    (f"rtmp://mediamtx.local/{KEY}?user=cam&pass={KEY}", "rtmp", "mediamtx.local", 1935,
     "flv", "rtmp://mediamtx.local/****?user=****&pass=****"),
    ("rtmp://h.example/live/", "rtmp", "h.example", 1935, "flv", "rtmp://h.example/****"),
    (f"srt://192.0.2.10:8890?streamid=publish:garden:cam:{KEY}&latency=200000&mode=caller",
     "srt", "192.0.2.10", 8890, "mpegts",
     "srt://192.0.2.10:8890?streamid=****&latency=200000&mode=caller"),
    (f"srt://relay.example:9000/?passphrase={KEY}", "srt", "relay.example", 9000, "mpegts",
     "srt://relay.example:9000/?passphrase=****"),
])
def test_a_push_url_is_read_and_shown_without_its_secrets(url, scheme, host, port, muxer, shown):
    target = parse_target(url)
    assert (target.scheme, target.host, target.port, target.muxer) == (scheme, host, port, muxer)
    assert target.url == url  # what ffmpeg is given, as written
    assert target.shown == shown == str(target)
    assert KEY not in target.shown and KEY not in repr(target)


def test_masking_covers_the_forms_ffmpeg_may_print():
    target = parse_target("rtmp://ingest.example/live/k%2Fe%20y?token=t0k&mode=x")
    line = ("rtmp://ingest.example/live/k%2Fe%20y?token=t0k&mode=x: I/O error; "
            "playpath k/e y, token t0k, k%2Fe%20y")
    masked = target.mask(line)
    assert "k/e y" not in masked and "k%2Fe%20y" not in masked and "t0k" not in masked
    assert masked.startswith("rtmp://ingest.example/live/****?token=****&mode=x: I/O error")
    # a password with a character written in %-form
    rtsp = parse_target("rtsp://u:p%40ss@h.example:8554/cam")
    assert rtsp.mask("p@ss p%40ss") == f"{MASK} {MASK}"
    assert rtsp.shown == "rtsp://u:****@h.example:8554/cam"


@pytest.mark.parametrize("url,message", [
    ("", "the URL is empty"),
    (f"ftp://h.example/live/{KEY}", "ftp:// is not a scheme a push takes; use rtmp://"),
    (f"http://h.example/{KEY}", "http:// is not a scheme a push takes"),
    (f"h.example/live/{KEY}", "not a URL: give rtmp://HOST/APP/KEY"),
    (f"rtmp://h.example/live/{KEY} x", "cannot hold spaces"),
    (f"rtmp:///live/{KEY}", "rtmp:///live/****: no host in it"),
    (f"rtmp://h_x!.example/live/{KEY}", "'h_x!.example' is not a host name or an IP address"),
    (f"rtmp://[::g]/live/{KEY}", "host in [ ] is not an IPv6 address"),
    (f"rtmp://h.example:99999/live/{KEY}", "rtmp://h.example:99999/live/****: its port is not"),
    (f"rtmp://h.example:0/live/{KEY}", "its port is not a number in 1..65535"),
    (f"rtmp://h.example:port/live/{KEY}", "its port is not a number in 1..65535"),
    ("rtmp://h.example/", "rtmp://h.example/: rtmp:// needs the stream's name: "
                          "rtmp://HOST/APP/KEY (nginx, YouTube, Twitch) or rtmp://HOST/PATH"),
    ("rtmps://h.example", "rtmps:// needs the stream's name"),
    (f"rtmp://h.example/live/{KEY}#2", "it has a # in it (write it as %23)"),
    ("rtsp://h.example:8554/", "rtsp:// needs the stream's path on the server"),
    (f"srt://h.example?streamid={KEY}", "srt://h.example?streamid=****: srt:// needs a port"),
    (f"srt://h.example:9000/live?streamid={KEY}", "srt:// takes no path"),
    (f"rtsp://u:{KEY}@:8554/cam", "rtsp://u:****@:8554/cam: no host in it"),
])
def test_a_bad_push_url_is_refused_without_its_key(url, message):
    with pytest.raises(PushURLError) as e:
        parse_target(url)
    assert message in str(e.value)
    assert KEY not in str(e.value)


# -- ffmpeg's command ---------------------------------------------------------------

def after(command, flag):
    return command[command.index(flag) + 1]


def test_h264_is_copied_never_encoded_and_stamped_as_it_is_read():
    target = parse_target(f"rtmp://h.example/live/{KEY}")
    command = push_command("/usr/bin/ffmpeg", target, "h264", framerate=30, bitrate=800_000)
    joined = " ".join(command)
    assert command[0] == "/usr/bin/ffmpeg" and command[-1] == target.url
    assert ("-probesize 32 -analyzeduration 0 -use_wallclock_as_timestamps 1 "
            "-f h264 -i pipe:0") in joined
    assert "-map 0:v:0 -c:v copy -f flv" in joined
    assert "libx264" not in joined and "-framerate" not in joined and "lavfi" not in joined
    # progress on stdout, for "live" and the watchdog
    assert "-nostats -progress pipe:1" in joined
    # a blocked write ends ffmpeg; half a second of video at most in the
    # kernel's send buffer (64 KiB at least)
    assert after(command, "-rw_timeout") == "5000000"
    assert after(command, "-send_buffer_size") == "65536"
    fast = push_command("ffmpeg", target, "h264", bitrate=4_000_000, timeout=1.5)
    assert after(fast, "-send_buffer_size") == "250000" and after(fast, "-rw_timeout") == "1500000"


@pytest.mark.parametrize("url,muxer_args", [
    (f"rtmp://h.example/live/{KEY}", ["-f", "flv", "-flush_packets", "1"]),
    (f"rtmps://h.example/live/{KEY}", ["-f", "flv", "-flush_packets", "1"]),
    ("rtsp://h.example:8554/cam", ["-f", "rtsp", "-rtsp_transport", "tcp"]),
    (f"srt://h.example:9000?streamid={KEY}", ["-f", "mpegts", "-flush_packets", "1"]),
])
def test_the_muxer_follows_the_scheme(url, muxer_args):
    target = parse_target(url)
    for codec in ("h264", "mpeg1"):
        command = push_command("ffmpeg", target, codec)
        at = command.index("-f", command.index("-map"))
        assert command[at:at + len(muxer_args)] == muxer_args
        assert command[-1] == url
    rtsp = push_command("ffmpeg", parse_target("rtsp://h.example:8554/cam"), "h264")
    assert "-rw_timeout" not in rtsp and "-timeout" not in rtsp  # (the watchdog's job)
    srt = push_command("ffmpeg", parse_target(f"srt://h.example:9000?streamid={KEY}"), "h264")
    assert "-rw_timeout" in srt and "-send_buffer_size" not in srt


def test_mpeg1_is_decoded_and_encoded_to_h264_by_the_encoder_chosen():
    target = parse_target(f"rtmp://h.example/live/{KEY}")
    command = push_command("ffmpeg", target, "mpeg1", framerate=30, bitrate=1_000_000,
                           keyframe_interval=2.0, encoder="libx264", x264_preset="veryfast")
    joined = " ".join(command)
    assert "-flags low_delay -f mpegts -i pipe:0" in joined
    assert "-c:v libx264 -preset veryfast -tune zerolatency" in joined
    assert after(command, "-g") == "60" and after(command, "-b:v") == "1000000"
    hardware = push_command("ffmpeg", target, "mpeg1", encoder="h264_v4l2m2m")
    assert after(hardware, "-c:v") == "h264_v4l2m2m" and "libx264" not in hardware


def test_the_hardware_encoder_is_used_where_there_is_one():
    assert choose_encoder("ffmpeg", find=lambda ffmpeg: ("/dev/video11", "bcm2835-codec"))[0] \
        == "h264_v4l2m2m"
    encoder, why = choose_encoder("ffmpeg", find=lambda ffmpeg: (None, "no device"))
    assert encoder == "libx264" and "no device" in why


@pytest.mark.parametrize("codec", ["h264", "mpeg1"])
def test_silent_audio_is_aac_from_anullsrc_in_the_filter_graph(codec):
    target = parse_target(f"rtmp://h.example/live/{KEY}")
    command = push_command("ffmpeg", target, codec, audio="silent")
    joined = " ".join(command)
    # made as the pictures go, not read as an input at its own pace (-re)
    assert "-filter_complex anullsrc=channel_layout=stereo:sample_rate=44100[a]" in joined
    assert "-map 0:v:0 -map [a]" in joined and "-c:a aac -b:a 128k" in joined
    assert "-re" not in command and "lavfi" not in command
    assert "anullsrc" not in " ".join(push_command("ffmpeg", target, codec))
    with pytest.raises(ValueError):
        push_command("ffmpeg", target, codec, audio="loud")


# -- on a Clock ------------------------------------------------------------------------

def keyframe(n=0):
    return Chunk(data=frame_message(b"\x00\x00\x00\x01\x65" + bytes([n]) * 10, True, 1.0),
                 picture=True, keyframe=True)


def picture(n=0):
    return Chunk(data=frame_message(b"\x00\x00\x00\x01\x41" + bytes([n]) * 10, False, 1.0),
                 picture=True, keyframe=False)


class Setup:
    """A Push on a SpawningReactor (the child is not there: the test says
    what ffmpeg prints and when it ends)."""

    def __init__(self, url=f"rtmp://h.example/live/{KEY}", codec="h264", cache=(), **kwargs):
        self.reactor = SpawningReactor(ends_on=(signal.SIGKILL,))
        self.reactor.advance(1_700_000_000)
        self.target = parse_target(url)
        self.cache = list(cache)
        self.push = Push(self.target, push_command("/bin/true", self.target, codec),
                         self.reactor, codec, start_cache=lambda: self.cache, env={},
                         **dict(dict(timeout=5.0, first_delay=1.0, max_delay=30.0,
                                     live_reset=60.0), **kwargs))
        self.events = []
        globalLogPublisher.addObserver(self.events.append)

    def close(self):
        globalLogPublisher.removeObserver(self.events.append)

    @property
    def proto(self):
        return self.reactor.spawned[-1][0]

    @property
    def transport(self):
        return self.reactor.spawned[-1][3]

    def progress(self, total_size, frame=10):
        self.proto.outReceived(f"frame={frame}\nfps=30.0\ntotal_size={total_size}\n"
                               "out_time_us=1000\nprogress=continue\n".encode())

    def exits(self, code=1, stderr=b""):
        if stderr:
            self.proto.errReceived(stderr)
        self.transport.end(Failure(ProcessTerminated(exitCode=code)))

    def lines(self):
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "pistreaming.push"]


@pytest.fixture
def setup():
    made = []

    def make(**kwargs):
        made.append(Setup(**kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_a_new_ffmpeg_is_given_the_start_cache_then_each_chunk_as_annex_b(setup):
    s = setup(cache=[picture(9), keyframe(1), picture(2)])
    s.push.startService()
    assert s.push.state == "connecting"
    # the cache from its keyframe on, each access unit without its message
    # header and with a delimiter after it
    delimiter = b"\x00\x00\x00\x01\x09\xf0"
    assert s.transport.written == [keyframe(1).data[9:] + delimiter,
                                   picture(2).data[9:] + delimiter]
    s.push.feed(picture(3))
    assert s.transport.written[-1] == picture(3).data[9:] + delimiter
    assert (s.push.chunks_in, s.push.dropped) == (3, 0)


def test_mpeg1_chunks_go_to_ffmpeg_as_they_are(setup):
    s = setup(codec="mpeg1")
    s.push.startService()
    ts = Chunk(data=b"\x47" + bytes(187), picture=True, keyframe=True)
    s.push.feed(ts)
    assert s.transport.written == [ts.data]


def test_nothing_before_a_keyframe_and_while_ffmpeg_is_behind_until_the_next(setup):
    s = setup()
    s.push.startService()
    s.push.feed(picture(1))  # nothing to start at yet
    # ffmpeg connecting reads nothing: what does not fit waits for the next
    # keyframe, uncounted and unsaid
    s.proto.pauseProducing()
    s.push.feed(keyframe(2))
    s.proto.resumeProducing()
    s.push.feed(picture(3))
    assert s.transport.written == [] and s.push.dropped == 0
    s.push.feed(keyframe(4))
    s.push.feed(picture(5))
    assert len(s.transport.written) == 2
    s.progress(1000)
    assert s.push.state == "live"
    # live, the pipe and Twisted's buffer full: the transport pauses the push
    s.proto.pauseProducing()
    s.push.feed(picture(6))
    s.proto.resumeProducing()
    s.push.feed(picture(7))  # would not decode without 6: dropped too
    assert len(s.transport.written) == 2 and s.push.dropped == 2
    assert s.push.fell_behind == 1
    s.push.feed(keyframe(8))
    s.push.feed(picture(9))
    assert len(s.transport.written) == 4
    assert [line for line in s.lines() if "slower than it comes" in line] == [
        "push rtmp://h.example/live/****: ffmpeg takes the stream slower than it comes; "
        "dropping pictures until the next keyframe"]


def test_live_when_the_bytes_out_grow_and_rtsp_by_its_pictures(setup):
    s = setup()
    s.push.startService()
    s.push.feed(keyframe())
    assert s.push.state == "connecting"
    s.reactor.advance(0.4)
    s.progress(13661)
    assert s.push.state == "live" and s.push.since == s.reactor.seconds()
    assert s.push.bytes_sent == 13661
    # RTSP's muxer does not count bytes: pictures out tell it is live
    r = setup(url="rtsp://h.example:8554/cam")
    r.push.startService()
    r.push.feed(keyframe())
    r.proto.outReceived(b"frame=0\ntotal_size=N/A\nprogress=continue\n")
    assert r.push.state == "connecting"
    r.proto.outReceived(b"frame=3\ntotal_size=N/A\nprogress=continue\n")
    assert r.push.state == "live" and r.push.bytes_sent is None
    assert r.push.figures(r.reactor.seconds())["bytes_sent"] is None


def test_progress_read_in_pieces():
    reader = push.ProgressReader()
    text = b"frame=5\nfps=30\ntotal_size=100\nprogress=continue\nframe=6\ntotal_size=200\nprogress=end\n"
    blocks = []
    for i in range(0, len(text), 7):
        blocks += reader.feed(text[i:i + 7])
    assert [(b["frame"], b["total_size"], b["progress"]) for b in blocks] == [
        ("5", "100", "continue"), ("6", "200", "end")]


def test_back_off_doubles_from_1s_to_30s_and_starts_over_after_a_minute_live(setup):
    s = setup()
    s.push.startService()
    delays = []
    for _ in range(8):
        s.exits(1)
        assert s.push.state == "backing off"
        delays.append(s.push.next_try_at - s.reactor.seconds())
        spawned = len(s.reactor.spawned)
        s.reactor.advance(delays[-1] - 0.01)
        assert len(s.reactor.spawned) == spawned
        s.reactor.advance(0.01)
        assert len(s.reactor.spawned) == spawned + 1 and s.push.state == "connecting"
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert s.push.restarts == 8 and s.push.starts == 9
    # live for 59 s: the back-off goes on
    s.push.feed(keyframe())
    s.progress(1000)
    s.reactor.advance(59)
    s.progress(2000)
    s.exits(1)
    assert s.push.next_try_at - s.reactor.seconds() == 30
    # live for a minute: from 1 s again
    s.reactor.advance(30)
    s.push.feed(keyframe())
    s.progress(1000)
    for _ in range(60):
        s.reactor.advance(1)
        s.push.feed(picture())
        s.progress(1000 + int(s.reactor.seconds()))
    s.exits(1)
    assert s.push.next_try_at - s.reactor.seconds() == 1


def test_a_stalled_push_is_killed_after_its_timeout_and_started_again(setup):
    s = setup()
    s.push.startService()
    s.push.feed(keyframe())
    s.progress(1000)
    assert s.push.state == "live"
    # the server takes nothing: ffmpeg's progress stops while pictures
    # come; soon its pipe and Twisted's buffer are full
    s.push.feed(picture())
    stalled_at = s.reactor.seconds()
    for _ in range(10):
        s.reactor.advance(0.1)
        s.push.feed(picture())
    s.proto.pauseProducing()
    while s.reactor.seconds() < stalled_at + 4.9:
        s.reactor.advance(0.1)
        s.push.feed(picture())
    assert s.push.state == "live" and s.transport.signals == []
    while not s.transport.signals:
        s.reactor.advance(0.1)
        s.push.feed(picture())
    # within a second (the watchdog's round) of the timeout
    assert s.transport.signals == [signal.SIGKILL]
    assert 5.0 <= s.reactor.seconds() - stalled_at <= 6.05
    assert s.push.state == "backing off" and s.push.stalls == 1
    assert s.push.error.startswith("ffmpeg made no progress for 5.")
    s.reactor.advance(1)
    assert s.push.state == "connecting" and len(s.reactor.spawned) == 2


def test_the_watchdog_leaves_alone_a_push_that_progresses_or_has_nothing_to_send(setup):
    s = setup()
    s.push.startService()
    s.push.feed(keyframe())
    for i in range(200):  # 20 s of pictures, progress twice a second
        s.reactor.advance(0.1)
        s.push.feed(picture())
        if i % 5 == 0:
            s.progress(1000 + i)
    # the camera stops: ffmpeg has read all it was given and says nothing
    # more (its last pictures' progress is never reported), for a minute
    for _ in range(600):
        s.reactor.advance(0.1)
    assert s.transport.signals == [] and s.push.state == "live" and s.push.restarts == 0


def test_input_waiting_is_what_ffmpeg_has_not_read_of_its_pipe_or_twisteds_buffer():
    read_end, write_end = os.pipe()
    try:
        writer = SimpleNamespace(_tempDataLen=0, dataBuffer=b"", offset=0,
                                 fileno=lambda: write_end)
        proto = push.PushProtocol(None)
        proto.transport = SimpleNamespace(pipes={0: writer})
        assert not proto.input_waiting()
        os.write(write_end, b"picture")
        assert proto.input_waiting()
        os.read(read_end, 7)
        assert not proto.input_waiting()
        writer.dataBuffer, writer.offset = b"buffered", 3
        assert proto.input_waiting()
        writer.dataBuffer = b""
        writer.offset = 0
        proto.pauseProducing()
        assert proto.input_waiting()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_push_that_does_not_get_live_is_killed_after_its_timeout(setup):
    s = setup(cache=[keyframe()])  # given the start cache at once
    s.push.startService()
    started = s.reactor.seconds()
    while not s.transport.signals:
        s.reactor.advance(0.1)
    assert 5.0 <= s.reactor.seconds() - started <= 6.05
    assert s.transport.signals == [signal.SIGKILL] and s.push.state == "backing off"
    assert s.push.error.startswith("ffmpeg was not live 5.")
    assert "never live" in s.push.error


def test_the_key_is_in_no_log_line_field_or_figure(setup):
    s = setup(url=f"rtmp://127.0.0.1:1935/live/{KEY}?token=tok3n")
    s.push.startService()
    s.push.feed(keyframe())
    s.exits(1, f"[tcp @ 0x55d0c3a4e2c0] Connection to tcp://127.0.0.1:1935 failed: "
               f"Connection refused\nrtmp://127.0.0.1:1935/live/{KEY}?token=tok3n: "
               "Connection refused\n".encode())
    s.reactor.advance(1)
    s.push.feed(keyframe())
    s.progress(10)
    s.reactor.advance(30)
    s.push.feed(picture())
    s.proto.pauseProducing()
    s.reactor.advance(10)  # stalled: killed
    figures = s.push.figures(s.reactor.seconds())
    text = "\n".join(s.lines()) + json.dumps(figures) + repr(s.events)
    for secret in (KEY, "tok3n"):
        assert secret not in text
    assert figures["target"] == "rtmp://127.0.0.1:1935/live/****?token=****"
    (refused,) = [line for line in s.lines() if "exited with code 1" in line]
    assert refused == (
        "push rtmp://127.0.0.1:1935/live/****?token=****: ffmpeg exited with code 1 "
        "(ran 0.0s, never live); trying again in 1s: tcp: Connection to "
        "tcp://127.0.0.1:1935 failed: Connection refused / "
        "rtmp://127.0.0.1:1935/live/****?token=****: Connection refused")
    assert figures["restarts"] == 2 and figures["state"] == "backing off"
    assert figures["error"].startswith("ffmpeg made no progress")


def test_the_figures_say_state_since_when_what_was_sent_and_the_last_error(setup):
    s = setup()
    s.push.startService()
    s.push.feed(keyframe())
    s.progress(5000)
    s.reactor.advance(3)
    s.progress(9000)
    s.exits(1, b"av_interleaved_write_frame(): Broken pipe\n")
    now = s.reactor.seconds()
    figures = s.push.figures(now)
    assert figures["state"] == "backing off" and figures["since"] == now
    assert figures["next_try_in"] == 1.0 and figures["bytes_sent"] == 9000
    assert figures["error"] == ("ffmpeg exited with code 1 (ran 3.0s, live for 3.0s): "
                                "av_interleaved_write_frame(): Broken pipe")
    s.reactor.advance(1)
    s.push.feed(keyframe())
    s.progress(4000)
    figures = s.push.figures(s.reactor.seconds())
    # bytes over every run; the last error stays while it is live again
    assert figures["state"] == "live" and figures["bytes_sent"] == 13000
    assert figures["error"].endswith("Broken pipe") and figures["restarts"] == 1


def test_a_missing_ffmpeg_is_said_and_tried_again(setup, tmp_path):
    s = setup()
    s.push.command[0] = str(tmp_path / "no-ffmpeg")
    s.push.startService()
    assert s.reactor.spawned == [] and s.push.state == "backing off"
    assert "cannot start" in s.push.error and "no such file" in s.push.error


def test_stopping_closes_stdin_then_terms_then_kills_and_starts_nothing_again(setup):
    s = setup()
    s.push.startService()
    transport = s.transport
    done = s.push.stopService()
    assert transport.stdin_closed and transport.signals == []
    s.reactor.advance(0.5)
    assert transport.signals == [signal.SIGTERM]
    s.reactor.advance(1.0)
    assert transport.signals == [signal.SIGTERM, signal.SIGKILL]
    assert done.called and s.push.state == "stopped"
    s.reactor.advance(60)
    assert len(s.reactor.spawned) == 1
    # one that ends when its input does, no signal needed
    t = setup()
    t.push.startService()
    stopping = t.push.stopService()
    t.transport.end(Failure(ProcessDone(0)))
    assert stopping.called and t.transport.signals == []
    t.reactor.advance(5)
    assert t.transport.signals == [] and len(t.reactor.spawned) == 1


def test_pushes_one_ffmpeg_per_target_and_numbers_the_ones_shown_alike():
    reactor = SpawningReactor()
    config = Config(codec="h264", ffmpeg="/usr/bin/ffmpeg", push=(
        parse_target(f"rtmp://h.example/live/{KEY}"),
        parse_target("rtmp://h.example/live/other-key"),
        parse_target("srt://h.example:9000")))
    pushes = Pushes(config, reactor, env={})
    assert [p.label for p in pushes.targets] == [
        "rtmp://h.example/live/**** (#1)", "rtmp://h.example/live/**** (#2)",
        "srt://h.example:9000"]
    pushes.startService()
    assert [args[-1] for _, _, args, _ in reactor.spawned] == [t.url for t in config.push]
    assert [f["state"] for f in pushes.figures(reactor.seconds())] == ["connecting"] * 3
    assert pushes.encoder is None  # H.264 is copied
    mpeg1 = Pushes(Config(codec="mpeg1", ffmpeg="/usr/bin/ffmpeg", push=config.push[:1]),
                   reactor, find_encoder=lambda ffmpeg: (None, "none here"), env={})
    assert mpeg1.encoder == "libx264"
    assert "libx264" in mpeg1.targets[0].command


def test_stats_json_and_metrics_show_each_push_by_its_masked_url():
    from pistreaming.broadcast import StreamFactory
    from pistreaming.frames import stream_header
    from pistreaming.stats import Stats
    from pistreaming.web import metrics_text

    reactor = SpawningReactor()
    config = Config(codec="mpeg1", ffmpeg="/usr/bin/ffmpeg",
                    push=(parse_target(f"rtmp://h.example/live/{KEY}"),
                          parse_target(f"srt://h.example:9000?streamid={KEY}")))
    pushes = Pushes(config, reactor, find_encoder=lambda ffmpeg: (None, "none here"), env={})
    stream = StreamFactory(stream_header(640, 480), reactor)
    encoder = SimpleNamespace(process=None, restarts=0, frames_in=0, frames_dropped=0,
                              bytes_in=0, bytes_out=0, pictures_out=0, state="ok", why=None)
    stats = Stats(reactor, config, SimpleNamespace(name="test"), encoder, stream.fanout,
                  stream, push=pushes)
    pushes.startService()
    rtmp, srt = pushes.targets
    rtmp.feed(keyframe())
    reactor.spawned[0][0].outReceived(b"frame=3\ntotal_size=13661\nprogress=continue\n")
    srt_transport = reactor.spawned[1][3]
    srt_transport.end(Failure(ProcessTerminated(exitCode=1)))
    figures = stats.gather()
    text = metrics_text(stats)[0](None).decode()
    assert KEY not in json.dumps(figures) and KEY not in text
    assert [(p["target"], p["state"]) for p in figures["push"]] == [
        ("rtmp://h.example/live/****", "live"),
        ("srt://h.example:9000?streamid=****", "backing off")]
    rtmp_label = 'target="rtmp://h.example/live/****"'
    srt_label = 'target="srt://h.example:9000?streamid=****"'
    for line in (f"pistream_push_up{{{rtmp_label}}} 1.0",
                 f"pistream_push_up{{{srt_label}}} 0.0",
                 f'pistream_push_state{{state="live",{rtmp_label}}} 1.0',
                 f'pistream_push_state{{state="connecting",{rtmp_label}}} 0.0',
                 f'pistream_push_state{{state="backing off",{srt_label}}} 1.0',
                 f"pistream_push_sent_bytes_total{{{rtmp_label}}} 13661.0",
                 f"pistream_push_restarts_total{{{srt_label}}} 1.0",
                 f"pistream_push_dropped_chunks_total{{{rtmp_label}}} 0.0"):
        assert line in text.splitlines(), line
    assert "pistream_push" not in metrics_text(
        Stats(reactor, config, SimpleNamespace(name="test"), encoder, stream.fanout,
              stream))[0](None).decode()
