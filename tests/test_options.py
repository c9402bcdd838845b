"""Command-line options: defaults, parsing, and the errors a user sees."""

import os
import stat
import subprocess
from fractions import Fraction

import pytest
from twisted.python import usage

from pistreaming import tap
from pistreaming.options import Config, Options
from tests.daemon import ROOT, twistd_command


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options.config


def error_of(*args):
    with pytest.raises(usage.UsageError) as e:
        parse(*args)
    return str(e.value)


def test_defaults_match_the_original_demo():
    config = parse()
    assert config.http == "tcp:8082"
    assert config.ws == "tcp:8084"
    assert (config.width, config.height) == (640, 480)
    assert config.framerate == 24
    assert config.bitrate == 800_000
    assert (config.vflip, config.hflip) == (False, False)
    assert config.camera == "auto"
    assert os.path.isabs(config.ffmpeg) and os.path.basename(config.ffmpeg) == "ffmpeg"
    assert (config.color, config.bgcolor) == ("#444", "#333")
    assert (config.annotate, config.font) == (None, None)
    # a viewer may fall a second of video behind, and take nothing for 10 s
    assert config.backlog == ("seconds", 1.0) and config.backlog_bytes == 100_000
    assert config.viewer_timeout == 10.0


def test_every_option_is_taken():
    config = parse(
        "--http", "tcp:9000:interface=127.0.0.1", "--ws-port", "9001",
        "--resolution", "1296x730", "--framerate", "29.97", "--bitrate", "2.5M",
        "--vflip", "--hflip", "--camera", "TEST", "--color", "#abc", "--bgcolor", "black",
        "--backlog", "256k", "--viewer-timeout", "30",
    )
    assert config == Config(
        http="tcp:9000:interface=127.0.0.1", ws="tcp:9001", width=1296, height=730,
        framerate=Fraction(30000, 1001), bitrate=2_500_000, vflip=True, hflip=True,
        camera="test", ffmpeg=config.ffmpeg, color="#abc", bgcolor="black",
        backlog=("bytes", 256_000), viewer_timeout=30.0,
    )


@pytest.mark.parametrize("args,http,ws", [
    ((), "tcp:8082", "tcp:8084"),  # every interface: reachable on the LAN
    (("--interface", "127.0.0.1"), "tcp:8082:interface=127.0.0.1",
     "tcp:8084:interface=127.0.0.1"),
    (("--interface", "::1"), r"tcp:8082:interface=\:\:1", r"tcp:8084:interface=\:\:1"),
    (("--interface", "192.168.1.5", "--http", "tcp:80:interface=10.0.0.1", "--ws-port", "off"),
     "tcp:80:interface=10.0.0.1", None),
])
def test_interface_binds_the_ports_that_name_none(args, http, ws):
    config = parse(*args)
    assert (config.http, config.ws) == (http, ws)


def test_security_options():
    config = parse("--allow-origin", "https://Friend.example, http://10.0.0.2:8080",
                   "--max-viewers", "12")
    assert config.allow_origins == ("https://friend.example", "http://10.0.0.2:8080")
    assert config.max_viewers == 12
    assert parse().allow_origins == () and parse().max_viewers == 0
    assert parse().passwd is None


def test_allow_host_is_repeatable_and_comma_separated():
    config = parse("--allow-host", "Camera.Example., *.lan", "--allow-host", "camera.example",
                   "--allow-host", "other.example")
    assert config.allow_hosts == ("camera.example", "*.lan", "other.example")
    assert parse().allow_hosts == ()
    assert parse("--allow-host", "*").allow_hosts == ("*",)


def test_any_origin_with_a_password_is_refused(tmp_path):
    from pistreaming.auth import hash_password
    path = tmp_path / "passwd"
    path.write_text("alice:" + hash_password("x", iterations=1000) + "\n")
    message = error_of("--allow-origin", "*", "--passwd", str(path))
    assert "--allow-origin '*' cannot go with --passwd" in message
    assert parse("--allow-origin", "https://friend.example", "--passwd", str(path)).passwd


@pytest.mark.parametrize("value,bitrate,limit", [
    ("1s", "800k", 100_000), ("0.5s", "2M", 125_000), ("0.1s", "32k", 16_000),
    ("256k", "800k", 256_000), ("2M", "800k", 2_000_000), ("64000", "800k", 64_000),
])
def test_backlog_is_a_time_of_video_or_a_size(value, bitrate, limit):
    assert parse("--backlog", value, "--bitrate", bitrate).backlog_bytes == limit


@pytest.mark.parametrize("value,endpoint", [
    ("8084", "tcp:8084"), ("0", "tcp:0"), ("off", None), ("none", None),
    ("tcp:8084:interface=127.0.0.1", "tcp:8084:interface=127.0.0.1"),
    (r"tcp:8084:interface=\:\:1", r"tcp:8084:interface=\:\:1"),
])
def test_ws_port_forms(value, endpoint):
    assert parse("--ws-port", value).ws == endpoint


@pytest.mark.parametrize("args,message", [
    (("--resolution", "640"), "--resolution: '640' is not WIDTHxHEIGHT"),
    (("--resolution", "640x481"), "height 481 must be even"),
    (("--resolution", "16x480"), "width 16 is outside 32..4095"),
    (("--resolution", "5000x480"), "width 5000 is outside 32..4095"),
    (("--framerate", "20"), "'20' is not a rate MPEG-1 can carry; use one of 5, 10"),
    (("--framerate", "fast"), "--framerate: 'fast' is not a rate"),
    (("--bitrate", "lots"), "--bitrate: 'lots' is not a bit rate"),
    (("--bitrate", "1k"), "--bitrate: 1k is outside 32k..50M"),
    (("--camera", "webcam"), "--camera: 'webcam' is not one of auto, picamera2, picamera, "
                             "test, v4l2:DEVICE, file:PATH"),
    (("--camera", "file:"), "--camera file: needs a path (for example file:demo.mp4)"),
    (("--rotation", "90"), "--rotation: '90' is not 0 or 180"),
    (("--rotation", "180", "--hflip"), "--rotation 180 already flips both ways"),
    (("--http", "bogus:8082"), "--http: 'bogus:8082' is not a server endpoint"),
    (("--http", "tcp:notaport"), "--http: 'tcp:notaport' is not a server endpoint"),
    (("--ws-port", "70000"), "--ws-port: 70000 is outside 0..65535"),
    (("--ws-port", "abc"), "--ws-port: 'abc' is not a port number"),
    (("--color", "red;}body{"), "--color: 'red;}body{' is not a colour"),
    (("--bgcolor", "#12"), "--bgcolor: '#12' is not a colour"),
    (("--backlog", "lots"), "--backlog: 'lots' is neither a time (for example 1s) nor a size"),
    (("--backlog", "60s"), "--backlog: 60s is outside 0.1s..30s"),
    (("--backlog", "1k"), "--backlog: 1k is outside 16k..64M bytes"),
    (("--viewer-timeout", "soon"), "--viewer-timeout: 'soon' is not a number of seconds"),
    (("--viewer-timeout", "0"), "--viewer-timeout: 0 is outside 1..3600 seconds"),
    (("--interface", "localhost"), "--interface: 'localhost' is not an IP address"),
    (("--allow-origin", "evil.example"), "--allow-origin: 'evil.example' is not an origin"),
    (("--allow-origin", "https://x/path"), "--allow-origin: 'https://x/path' is not an origin"),
    (("--allow-host", "evil example"), "--allow-host: 'evil example' is not a host name"),
    (("--allow-host", "evil.example:8082"), "--allow-host: 'evil.example:8082' is not a host"),
    (("--allow-host", "x\x00y"), "--allow-host: 'x\\x00y' is not a host name"),
    (("--max-viewers", "many"), "--max-viewers: 'many' is not a whole number"),
    (("--max-viewers", "-1"), "--max-viewers: -1 is outside 0..100000"),
    (("--ffmpeg", "/nonexistent/ffmpeg"), "--ffmpeg: /nonexistent/ffmpeg is not an executable"),
    (("--ffmpeg", "no-such-ffmpeg"), "ffmpeg (no-such-ffmpeg) was not found on PATH; install it"),
    (("--push", "ftp://h.example/live/s3cret"), "--push: ftp:// is not a scheme a push takes"),
    (("--push", "rtmp://h.example:70000/live/s3cret"),
     "--push: rtmp://h.example:70000/live/****: its port is not a number in 1..65535"),
    (("--push", "rtmp://h.example/live/s3cret", "--push", "rtmp://h.example/live/s3cret"),
     "--push: rtmp://h.example/live/**** is given twice"),
    (("--push-audio", "loud"), "--push-audio: 'loud' is not one of none, silent"),
])
def test_bad_values_are_refused_with_a_reason(args, message):
    assert message in error_of(*args)
    assert "s3cret" not in error_of(*args)


def test_push_is_repeatable_and_its_audio_none_or_silent():
    config = parse("--push", "rtmp://h.example/live/k1", "--push", "srt://h.example:9000",
                   "--push-audio", "Silent")
    assert [t.shown for t in config.push] == ["rtmp://h.example/live/****",
                                              "srt://h.example:9000"]
    assert config.push_audio == "silent"
    assert parse().push == () and parse().push_audio == "none"


@pytest.mark.parametrize("value,camera", [
    ("auto", "auto"), ("PiCamera2", "picamera2"), ("picamera", "picamera"), ("test", "test"),
    ("v4l2:/dev/video2", "v4l2:/dev/video2"), ("V4L2:/dev/video2", "v4l2:/dev/video2"),
    ("v4l2", "v4l2:/dev/video0"), ("file:/srv/Demo.mp4", "file:/srv/Demo.mp4"),
])
def test_camera_forms(value, camera):
    assert parse("--camera", value).camera == camera


def test_a_relative_file_is_taken_from_where_the_daemon_starts():
    assert parse("--camera", "file:clips/demo.mp4").camera == \
        "file:" + os.path.join(os.getcwd(), "clips", "demo.mp4")


@pytest.mark.parametrize("args,flips", [
    ((), (False, False)), (("--rotation", "0"), (False, False)),
    (("--rotation", "180"), (True, True)), (("--rotation", "0", "--vflip"), (True, False)),
])
def test_rotation_by_180_is_both_flips(args, flips):
    config = parse(*args)
    assert (config.vflip, config.hflip) == flips


def test_rates_mpeg1_carries_are_accepted():
    for rate, value in [("5", 5), ("15", 15), ("23.976", Fraction(24000, 1001)),
                        ("30", 30), ("60.0", 60)]:
        assert parse("--framerate", rate).framerate == value


def test_ffmpeg_given_as_a_path(tmp_path):
    fake = tmp_path / "my-ffmpeg"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert parse("--ffmpeg", str(fake)).ffmpeg == str(fake)


def test_tap_turns_a_usage_error_into_one_line():
    options = tap.Options()
    with pytest.raises(SystemExit) as e:
        options.parseOptions(["--resolution", "big"])
    assert str(e.value) == (
        "twistd pistream: error: --resolution: 'big' is not WIDTHxHEIGHT (for example 640x480)"
    )


@pytest.mark.parametrize("args,expected", [
    (["--framerate", "20"], "twistd pistream: error: --framerate: '20' is not a rate MPEG-1 can carry"),
    (["--ffmpeg", "/nonexistent/ffmpeg"], "twistd pistream: error: --ffmpeg: /nonexistent/ffmpeg is not an executable file"),
    (["--no-such-option"], "twistd pistream: error: option --no-such-option not recognized"),
    (["--push", "rtmp://h.example:0/live/s3cret"], "twistd pistream: error: --push: "
     "rtmp://h.example:0/live/****: its port is not a number in 1..65535"),
])
def test_daemon_refuses_to_start_with_one_line(args, expected):
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "pistream"] + args,
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr.decode()
    assert lines[0].startswith(expected), lines[0]
    assert result.stdout == b""


def test_a_port_in_use_stops_start_up_with_one_line():
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        env = dict(os.environ, PYTHONPATH=ROOT)
        result = subprocess.run(
            twistd_command() + ["-n", "--pidfile=", "pistream", "--camera", "test",
                                "--http", f"tcp:{port}:interface=127.0.0.1", "--ws-port", "off"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )
    finally:
        taken.close()
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 1
    assert (f"twistd pistream: error: --http tcp:{port}:interface=127.0.0.1: "
            f"cannot listen on port {port}: address already in use") in output
    assert "Traceback" not in output


# -- recording (--record, --record-segment, --record-keep) ----------------------

def test_recording_is_off_unless_asked_and_its_settings_have_defaults(tmp_path):
    config = parse()
    assert config.record is None
    assert (config.record_segment, config.record_keep) == (600.0, ("percent", 80.0))
    where = tmp_path / "new" / "recordings"
    config = parse("--record", str(where))
    assert config.record == str(where) and where.is_dir()  # made if missing


@pytest.mark.parametrize("value,seconds", [
    ("30s", 30.0), ("10m", 600.0), ("1h", 3600.0), ("90", 90.0), ("1.5m", 90.0),
    ("2S", 2.0), ("24h", 86400.0), ("1s", 1.0)])
def test_a_segment_is_a_time_as_backlog_takes(value, seconds, tmp_path):
    assert parse("--record", str(tmp_path), "--record-segment", value).record_segment == seconds


@pytest.mark.parametrize("value,keep", [
    ("500M", ("bytes", 500 * 10 ** 6)), ("20G", ("bytes", 20 * 10 ** 9)),
    ("1.5T", ("bytes", 1.5 * 10 ** 12)), ("2GB", ("bytes", 2 * 10 ** 9)),
    ("50%", ("percent", 50.0)), ("1000000", ("bytes", 10 ** 6))])
def test_keep_is_a_size_or_a_share_of_the_free_space(value, keep, tmp_path):
    assert parse("--record", str(tmp_path), "--record-keep", value).record_keep == keep


def test_bad_recording_settings_are_refused_with_a_reason(tmp_path):
    where = str(tmp_path)
    for args, message in (
            (("--record-segment", "soon"), "--record-segment: 'soon' is not a time (for "
                                           "example 30s, 10m or 1h)"),
            (("--record-segment", "0.5s"), "--record-segment: 0.5s is outside 1s..24h"),
            (("--record-segment", "2d"), "--record-segment: '2d' is not a time"),
            (("--record-segment", "25h"), "--record-segment: 25h is outside 1s..24h"),
            (("--record-keep", "lots"), "--record-keep: 'lots' is neither a size"),
            (("--record-keep", "100%"), "--record-keep: 100% is outside 1%..95%"),
            (("--record-keep", "0.5M"), "--record-keep: 0.5M is less than 1M"),
            (("--record-keep", "5P"), "--record-keep: '5P' is neither a size")):
        assert message in error_of("--record", where, *args)
    # the settings mean nothing without --record: said, not ignored
    assert error_of("--record-keep", "20G") == \
        "--record-keep: only with --record DIR (where the recordings go)"
    assert "--record-segment: only with --record" in error_of("--record-segment", "30s")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_directory_that_cannot_be_written_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert error_of("--record", str(locked)) == \
        f"--record: {locked}: permission denied (the daemon cannot write there)"
    assert error_of("--record", str(locked / "sub")) == \
        f"--record: cannot make {locked / 'sub'}: permission denied"


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    assert error_of("--record", str(tmp_path / "file")) == \
        f"--record: {tmp_path / 'file'} is not a directory"
    assert error_of("--record", "") == \
        "--record: needs a directory (for example /var/lib/pistreaming/recordings)"
