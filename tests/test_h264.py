"""pistreaming.h264 against what ffmpeg makes and reads: the SPS as ffprobe
reads it, the avcC as ffmpeg writes it into an MP4 file, and the stage's
messages as ffmpeg decodes them (every picture passed on decodes without an
error, to the very picture the camera's stream had)."""

import base64
import json
import shutil
import subprocess

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from pistreaming import h264
from pistreaming.h264 import (
    BitReader, Config, H264Error, H264Stream, access_units, frame_message, is_idr,
    nal_spans, nal_types, nal_units, parse_message, parse_pps, parse_sps, unescape)
from pistreaming.mpegts import Chunk

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
pytestmark = pytest.mark.skipif(FFMPEG is None or FFPROBE is None,
                                reason="needs ffmpeg and ffprobe")

#: A libx264 stream as the daemon has it encoded: no B-frames, an IDR every
#: 5 pictures, SPS and PPS in front of each (libx264's default in a raw
#: H.264 file), each picture cut into slices.
LIVE = ("-tune", "zerolatency", "-g", "5", "-sc_threshold", "0")


class Streams:
    """libx264 streams made once per module, by their arguments."""

    def __init__(self, directory):
        self.directory = directory
        self._made = {}

    def path(self, size="320x240", frames=20, args=LIVE, preset="ultrafast"):
        key = (size, frames, tuple(args), preset)
        if key not in self._made:
            path = self.directory / f"stream{len(self._made)}.h264"
            subprocess.run(
                [FFMPEG, "-v", "error", "-y", "-f", "lavfi",
                 "-i", "testsrc2=size=320x240:rate=30", "-s", size, "-frames:v", str(frames),
                 "-c:v", "libx264", "-preset", preset, *args, "-f", "h264", str(path)],
                check=True, timeout=60)
            self._made[key] = path
        return self._made[key]

    def data(self, *args, **kwargs):
        return self.path(*args, **kwargs).read_bytes()

    def units(self, *args, **kwargs):
        return access_units(self.data(*args, **kwargs))


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    return Streams(tmp_path_factory.mktemp("h264"))


def decode(directory, data, name="decoded.h264"):
    """ffmpeg decodes Annex-B C{data} and stops at the first error: the CRC
    of each picture, in display order."""
    path = directory / name
    path.write_bytes(data)
    out = subprocess.run(
        [FFMPEG, "-v", "error", "-xerror", "-f", "h264", "-i", str(path),
         "-f", "framecrc", "-"], capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stderr == b"", out.stderr.decode(errors="replace")
    return [line.split(",")[-1].strip() for line in out.stdout.decode().splitlines()
            if line and not line.startswith("#")]


def first_sps_pps(data):
    nals = nal_units(data)
    return ([n for n in nals if n[0] & 0x1F == h264.SPS][0],
            [n for n in nals if n[0] & 0x1F == h264.PPS][0])


class Run:
    """An H264Stream and everything it said."""

    def __init__(self, clock=None, keyframe_interval=2.0):
        self.chunks, self.configs, self.states, self.requests = [], [], [], []
        self.lines = []
        self.clock = clock or Clock()
        self.stream = H264Stream(
            self.chunks.append, self.configs.append, keyframe_interval, self.clock,
            on_state=lambda state, why: self.states.append((state, why)),
            request_keyframe=lambda: self.requests.append(self.clock.seconds()))
        self.stream.log = Logger(observer=lambda e: self.lines.append(formatEvent(e)))

    def feed(self, units, times=None):
        return [self.stream.feed(au, None if times is None else times[i])
                for i, au in enumerate(units)]

    def messages(self):
        return [parse_message(c.data) for c in self.chunks]

    def annexb(self):
        return b"".join(m.access_unit for m in self.messages())


def strip_parameter_sets(au):
    return b"".join(au[code:end] for code, start, end in nal_spans(au)
                    if au[start] & 0x1F not in (h264.SPS, h264.PPS))


# -- the SPS, avcC and codecs string against ffmpeg's ----------------------------

CASES = {
    # name: (size, encoder arguments, profile_idc)
    "baseline": ("320x240", ("-profile:v", "baseline"), 66),
    "main-odd-size": ("1296x730", ("-profile:v", "main"), 77),
    "high-1080p": ("1920x1080", ("-profile:v", "high"), 100),
    "high-scaling-lists": ("336x200", ("-profile:v", "high", "-x264-params", "cqm=jvt"), 100),
    "high-interlaced": ("352x200", ("-flags", "+ildct+ilme"), 100),
    "high10": ("322x242", ("-pix_fmt", "yuv420p10le"), 110),
    "high422": ("330x190", ("-pix_fmt", "yuv422p"), 122),
    "high444": ("321x241", ("-pix_fmt", "yuv444p"), 244),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sps_as_ffprobe_and_the_mp4_muxer_read_it(case, streams, tmp_path):
    size, args, profile_idc = CASES[case]
    # (ultrafast would make Baseline whatever profile is asked: no CABAC)
    path = streams.path(size=size, frames=2, args=args + ("-tune", "zerolatency"),
                        preset="veryfast")
    probe = json.loads(subprocess.run(
        [FFPROBE, "-v", "error", "-show_streams", "-of", "json", str(path)],
        check=True, capture_output=True, timeout=60).stdout)["streams"][0]
    sps_nal, pps_nal = first_sps_pps(path.read_bytes())
    sps = parse_sps(sps_nal)
    assert sps.profile_idc == profile_idc
    assert (sps.width, sps.height) == (probe["width"], probe["height"])
    assert f"{sps.width}x{sps.height}" == size
    assert sps.coded_width % 16 == 0 and sps.coded_height % 16 == 0
    assert sps.profile == probe["profile"]
    assert sps.level_idc == probe["level"]
    assert sps.level == str(probe["level"] / 10).replace(".0", "")
    assert sps.bit_depth_luma == int(probe["bits_per_raw_sample"])
    assert sps.frame_mbs_only == (probe["field_order"] == "progressive")

    mp4 = tmp_path / "out.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-i", str(path), "-c", "copy", str(mp4)],
                   check=True, timeout=60)
    data = mp4.read_bytes()
    at = data.find(b"avcC")
    record = data[at + 4:at - 4 + int.from_bytes(data[at - 4:at], "big")]
    config = Config(sps_nal, pps_nal)
    assert config.avcc() == record == h264.avcc([sps_nal], [pps_nal])
    assert config.codecs == "avc1." + record[1:4].hex()
    assert config.codecs == sps.codecs
    assert config.message(2)["avcc"] == base64.b64encode(record).decode()


def test_the_codecs_string_of_a_camera_stream(streams):
    sps_nal, pps_nal = first_sps_pps(streams.data(frames=2, args=("-profile:v", "baseline",
                                                                    "-level", "3.1")))
    message = Config(sps_nal, pps_nal).message(2)
    assert message == {
        "codec": "h264", "codecs": "avc1.42c01f", "profile": "Constrained Baseline",
        "level": "3.1", "width": 320, "height": 240, "keyframe_interval": 2.0,
        "avcc": message["avcc"]}
    json.dumps(message)


# -- hand-made parameter sets, for what libx264 never writes --------------------

class BitWriter:
    def __init__(self):
        self.bits = []

    def u(self, n, value):
        self.bits += [(value >> (n - 1 - i)) & 1 for i in range(n)]
        return self

    def ue(self, value):
        value += 1
        self.u(value.bit_length() - 1, 0)
        return self.u(value.bit_length(), value)

    def se(self, value):
        return self.ue(2 * value - 1 if value > 0 else -2 * value)

    def rbsp(self):
        bits = self.bits + [1]
        bits += [0] * (-len(bits) % 8)
        return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))


def escape(rbsp):
    out, zeros = bytearray(), 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def make_sps(profile_idc=100, constraints=0, level_idc=31, chroma=1, separate=False,
             depth=8, scaling=(), poc_type=0, poc_cycle=(), width_mbs=20, height_units=15,
             frame_mbs_only=True, crop=None):
    w = BitWriter().u(8, profile_idc).u(8, constraints).u(8, level_idc).ue(0)
    if profile_idc in (100, 110, 122, 244):
        w.ue(chroma)
        if chroma == 3:
            w.u(1, separate)
        w.ue(depth - 8).ue(depth - 8).u(1, 0)
        w.u(1, bool(scaling))
        if scaling:
            for deltas in scaling:
                w.u(1, deltas is not None)
                for delta in deltas or ():
                    w.se(delta)
    w.ue(0).ue(poc_type)
    if poc_type == 0:
        w.ue(2)
    elif poc_type == 1:
        w.u(1, 0).se(-1).se(3).ue(len(poc_cycle))
        for offset in poc_cycle:
            w.se(offset)
    w.ue(4).u(1, 0).ue(width_mbs - 1).ue(height_units - 1).u(1, frame_mbs_only)
    if not frame_mbs_only:
        w.u(1, 1)
    w.u(1, 1).u(1, crop is not None)
    for value in crop or ():
        w.ue(value)
    w.u(1, 0)  # no VUI
    return b"\x67" + escape(w.rbsp())


def test_sps_fields_libx264_never_writes():
    # picture order count type 1, interlaced, cropped in field pairs
    sps = parse_sps(make_sps(profile_idc=77, poc_type=1, poc_cycle=(2, -5, 300),
                             height_units=9, frame_mbs_only=False, crop=(1, 2, 0, 3)))
    assert (sps.coded_width, sps.coded_height) == (320, 288)
    assert (sps.width, sps.height) == (320 - 2 * 3, 288 - 4 * 3)
    assert sps.pic_order_cnt_type == 1 and sps.profile == "Main"
    # monochrome: cropped in single samples (rows in field pairs)
    sps = parse_sps(make_sps(chroma=0, frame_mbs_only=False, height_units=8, crop=(3, 0, 0, 5)))
    assert (sps.width, sps.height) == (317, 256 - 10)
    # 4:4:4 coded as three separate planes; twelve scaling lists, some
    # ending early (a delta that makes the next scale 0)
    scaling = [None, [0] * 16, [-8], None, None, [1, 2, -3] + [0] * 13, [-8], [0] * 64,
               None, None, [5] * 64, None]
    sps = parse_sps(make_sps(profile_idc=244, chroma=3, separate=True, depth=10,
                             scaling=scaling, crop=(1, 1, 1, 1)))
    assert (sps.width, sps.height) == (318, 238)
    assert (sps.chroma_format_idc, sps.bit_depth_luma, sps.profile) == (3, 10, "High 4:4:4 Predictive")
    # 4:2:2: chroma halves the width only
    sps = parse_sps(make_sps(profile_idc=122, chroma=2, crop=(1, 1, 1, 1)))
    assert (sps.width, sps.height, sps.profile) == (316, 238, "High 4:2:2")


@pytest.mark.parametrize("profile_idc, constraints, level_idc, profile, level, codecs", [
    (66, 0xC0, 31, "Constrained Baseline", "3.1", "avc1.42c01f"),
    (66, 0x80, 30, "Baseline", "3", "avc1.42801e"),
    (66, 0x10, 11, "Baseline", "1b", "avc1.42100b"),
    (77, 0x40, 11, "Main", "1.1", "avc1.4d400b"),
    (88, 0x00, 40, "Extended", "4", "avc1.580028"),
    (100, 0x00, 9, "High", "1b", "avc1.640009"),
    (100, 0x08, 42, "Progressive High", "4.2", "avc1.64082a"),
    (100, 0x0C, 51, "Constrained High", "5.1", "avc1.640c33"),
    (110, 0x10, 41, "High 10 Intra", "4.1", "avc1.6e1029"),
    (110, 0x00, 41, "High 10", "4.1", "avc1.6e0029"),
    (122, 0x00, 50, "High 4:2:2", "5", "avc1.7a0032"),
    (244, 0x00, 52, "High 4:4:4 Predictive", "5.2", "avc1.f40034"),
])
def test_profile_level_and_codecs(profile_idc, constraints, level_idc, profile, level, codecs):
    sps = parse_sps(make_sps(profile_idc, constraints, level_idc))
    assert (sps.profile, sps.level, sps.codecs) == (profile, level, codecs)


def test_avcc_for_the_baseline_and_high_profiles():
    pps = b"\x68\xce\x3c\x80"
    record = h264.avcc([make_sps(66, 0xC0, 31)], [pps])
    assert record[:6] == bytes((1, 66, 0xC0, 31, 0xFF, 0xE1))
    assert record.endswith(b"\x01\x00\x04" + pps)   # nothing after the PPS
    high = make_sps(110, 0, 41, depth=10)
    record = h264.avcc([high], [pps])
    assert record[6:8] == len(high).to_bytes(2, "big") and record[8:8 + len(high)] == high
    assert record.endswith(pps + bytes((0xFD, 0xFA, 0xFA, 0)))  # 4:2:0, 10 bits, no SPS-ext


def test_broken_parameter_sets_are_refused():
    good = make_sps(crop=(0, 0, 0, 2))
    for bad in (good[:6], b"\x68" + good[1:], b"\xe7" + good[1:],
                make_sps(crop=(200, 0, 0, 0)), make_sps(poc_type=3),
                b"\x67\x64\x00\x1f" + b"\x00" * 8):
        with pytest.raises(H264Error):
            parse_sps(bad)
    with pytest.raises(H264Error):
        parse_pps(b"\x68")
    assert parse_pps(b"\x68\xce\x3c\x80")[1:] == (0, 0)


def test_bits_and_emulation_prevention():
    written = BitWriter().ue(0).ue(1).ue(2).se(-1).se(1).ue(300).u(5, 0b10011)
    assert written.bits[:10] == [1, 0, 1, 0, 0, 1, 1, 0, 1, 1]  # 0, 1, 2, then -1 is 2
    bits = BitReader(written.rbsp())
    assert [bits.ue(), bits.ue(), bits.ue(), bits.se(), bits.se(), bits.ue()] == [
        0, 1, 2, -1, 1, 300]
    assert bits.u(5) == 0b10011
    assert bits.u(1) == 1 and bits.bits_left() < 8   # the stop bit, then padding
    with pytest.raises(H264Error):
        bits.u(bits.bits_left() + 1)
    with pytest.raises(H264Error):
        BitReader(b"\x00\x00").ue()   # no end to the code's zeros
    assert unescape(b"\x00\x00\x03\x00\x00\x03\x01\x00\x00\x03\x03") == \
        b"\x00\x00\x00\x00\x01\x00\x00\x03"
    raw = bytes(range(4)) * 3 + b"\x00\x00\x00\x00\x02"
    assert unescape(escape(raw)) == raw


def test_nal_units_with_3_and_4_byte_start_codes():
    data = b"\x00\x00\x00\x01\x09\xf0\x00\x00\x01\x67\x42\x00\x00\x00\x00\x01\x65\x88\x80\x00\x00"
    assert nal_types(data) == [9, 7, 5]
    assert nal_units(data) == [b"\x09\xf0", b"\x67\x42", b"\x65\x88\x80"]
    assert [code for code, _, _ in nal_spans(data)] == [0, 6, 12]
    assert is_idr(data) and not is_idr(data[:11])


# -- the stage -----------------------------------------------------------------

def test_a_live_stream_passes_whole_and_decodes(streams, tmp_path):
    units = streams.units()
    assert len(units) == 20 and [nal_types(u).count(5) > 0 for u in units[:6]] == [
        True, False, False, False, False, True]
    run = Run()
    times = [1700000000 + i / 30 for i in range(20)]
    assert run.feed(units, times) == [True] * 20
    messages = run.messages()
    assert [m.keyframe for m in messages] == [i % 5 == 0 for i in range(20)]
    assert [c.keyframe for c in run.chunks] == [i % 5 == 0 for i in range(20)]
    assert all(isinstance(c, Chunk) and c.picture for c in run.chunks)
    assert [c.pts for c in run.chunks] == times
    assert [m.capture_time for m in messages] == pytest.approx(times, abs=1e-6)
    assert [m.access_unit for m in messages] == units   # as the encoder gave them
    assert len(run.configs) == 1 and run.stream.config is run.configs[0]
    assert (run.configs[0].width, run.configs[0].height) == (320, 240)
    assert run.states == [] and run.requests == [] and run.lines == []
    stats = run.stream.stats()
    assert stats["access_units"] == 20 and stats["keyframes"] == 4
    assert stats["bytes"] == sum(len(c.data) for c in run.chunks)
    assert stats["dropped"] == {"no_parameter_sets": 0, "corrupt": 0, "awaiting_keyframe": 0}
    assert stats["measured_keyframe_interval"] == pytest.approx(5 / 30)
    assert run.stream.message()["codecs"] == run.configs[0].codecs
    assert decode(tmp_path, run.annexb()) == decode(tmp_path, streams.data(), "original.h264")


@pytest.mark.parametrize("args", [LIVE, ("-g", "5", "-sc_threshold", "0", "-bf", "2",
                                         "-x264-params", "aud=1")], ids=["live", "b-frames-aud"])
def test_keyframes_without_parameter_sets_get_them(args, streams, tmp_path):
    """A camera that sends SPS and PPS once, at the start: each IDR gets them,
    so a newcomer starting at any keyframe message decodes."""
    units = streams.units(args=args, preset="veryfast")
    once = units[:1] + [strip_parameter_sets(u) for u in units[1:]]
    assert nal_types(once[5]).count(h264.SPS) == 0
    run = Run()
    run.feed(once)
    messages = run.messages()
    assert len(messages) == 20
    for i in (5, 10, 15):
        assert messages[i].access_unit == units[i]
        assert messages[i].keyframe
    assert [m.access_unit for m in messages if not m.keyframe] == [
        u for u in units if not is_idr(u)]
    original = decode(tmp_path, streams.data(args=args, preset="veryfast"), "original.h264")
    tail = b"".join(m.access_unit for m in messages[10:])
    assert decode(tmp_path, tail) == original[10:]


def test_parameter_sets_alone_are_kept_for_the_next_keyframe(streams):
    units = streams.units()
    sps_nal, pps_nal = first_sps_pps(units[0])
    run = Run()
    assert run.stream.feed(b"\x00\x00\x00\x01" + sps_nal + b"\x00\x00\x00\x01" + pps_nal) is False
    assert run.chunks == [] and run.configs == [] and run.states == []
    assert run.stream.feed(strip_parameter_sets(units[0]))
    assert run.messages()[0].access_unit == units[0]
    assert len(run.configs) == 1


def test_a_stream_that_never_carries_parameter_sets(streams):
    """A webcam whose H.264 has no SPS or PPS: nothing is passed on, and the
    page is told why, once."""
    units = streams.units(args=LIVE + ("-x264-params", "repeat-headers=0"))
    assert not {h264.SPS, h264.PPS} & {t for u in units for t in nal_types(u)}
    run = Run()
    assert run.feed(units) == [False] * 20
    assert run.chunks == [] and run.configs == [] and run.stream.config is None
    assert run.states == [("waiting", "the camera's H.264 keyframes come without their SPS "
                           "and PPS (parameter sets), so no viewer can decode them")]
    assert len(run.lines) == 1 and "without their SPS and PPS" in run.lines[0]
    assert len(run.requests) == 1
    assert run.stream.dropped["no_parameter_sets"] == 20
    assert run.stream.message() is None


def test_pictures_before_the_first_configuration_are_dropped(streams, tmp_path):
    units = streams.units()
    run = Run()
    assert run.feed(units[2:]) == [False] * 3 + [True] * 15
    assert run.states == [
        ("waiting", "waiting for the camera's first keyframe with its SPS and PPS "
                    "(H.264 parameter sets)"),
        ("ok", "")]
    assert len(run.requests) == 1 and len(run.lines) == 2
    assert "pictures again, after 3 access units dropped" in run.lines[1]
    assert run.stream.dropped["no_parameter_sets"] == 3
    assert run.messages()[0].keyframe
    assert decode(tmp_path, run.annexb()) == decode(tmp_path, streams.data(), "all.h264")[5:]


def rewrite_pps_id(au, pps_id):
    """C{au} with its slices' pic_parameter_set_id changed."""
    out = []
    for code, start, end in nal_spans(au):
        nal = au[start:end]
        if nal[0] & 0x1F in h264.VCL_TYPES:
            rbsp = unescape(nal[1:])
            bits = BitReader(rbsp)
            head = BitWriter().ue(bits.ue()).ue(bits.ue()).ue(pps_id)
            bits.ue()
            left = bits.bits_left()
            rest = BitWriter().u(left, bits.u(left)).bits
            while rest and rest[-1] == 0:
                rest.pop()
            head.bits += rest[:-1]   # rbsp() adds the stop bit again
            nal = nal[:1] + escape(head.rbsp())
        out.append(b"\x00\x00\x00\x01" + nal)
    return b"".join(out)


def flip_forbidden_bit(au):
    spans = [s for s in nal_spans(au) if au[s[1]] & 0x1F in h264.VCL_TYPES]
    at = spans[-1][1]
    return au[:at] + bytes((au[at] | 0x80,)) + au[at + 1:]


CORRUPTIONS = {
    "head lost": lambda au: au[5:],
    "forbidden bit": flip_forbidden_bit,
    "no slice": lambda au: b"\x00\x00\x00\x01\x09\xf0",
    "empty NAL unit": lambda au: au[:4] + b"\x00\x00\x01" + au,
    "unknown PPS": lambda au: rewrite_pps_id(au, 3),
    "cut in a slice header": lambda au: au[:[s for s in nal_spans(au)
                                             if au[s[1]] & 0x1F in h264.VCL_TYPES][0][1] + 1],
    "garbage": lambda au: bytes(range(256)),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("at", [7, 5], ids=["picture", "keyframe"])
def test_a_corrupt_access_unit_and_those_after_it_until_a_keyframe(corruption, at, streams,
                                                                   tmp_path):
    units = streams.units()
    assert access_units(rewrite_pps_id(units[7], 0)) == [rewrite_pps_id(units[7], 0)]
    fed = list(units)
    fed[at] = CORRUPTIONS[corruption](units[at])
    run = Run()
    passed = run.feed(fed)
    assert passed == [True] * at + [False] * (10 - at) + [True] * 10
    assert [s for s, _ in run.states] == ["corrupt", "ok"]
    assert run.states[0][1].startswith("a corrupt access unit (")
    assert len(run.requests) == 1
    assert len(run.lines) == 2 and "dropping pictures until the next keyframe" in run.lines[0]
    assert run.stream.dropped == {"no_parameter_sets": 0, "corrupt": 1,
                                  "awaiting_keyframe": 10 - at - 1}
    assert run.stream.access_units == 10 + at
    original = decode(tmp_path, streams.data(), "original.h264")
    assert decode(tmp_path, run.annexb()) == original[:at] + original[10:]


def test_two_corrupt_runs_each_said_once(streams):
    units = streams.units()
    fed = list(units)
    for i in (6, 8, 12):
        fed[i] = flip_forbidden_bit(units[i])
    run = Run()
    passed = run.feed(fed)
    assert passed == [True] * 6 + [False] * 4 + [True] * 2 + [False] * 3 + [True] * 5
    assert [s for s, _ in run.states] == ["corrupt", "ok", "corrupt", "ok"]
    assert len(run.requests) == 2 and len(run.lines) == 4
    assert run.stream.dropped["corrupt"] == 3


def test_a_gap_drops_pictures_until_a_keyframe(streams):
    units = streams.units()
    run = Run()
    run.feed(units[:3])
    run.stream.gap("the camera's queue overflowed: 2 pictures lost")
    assert run.feed(units[4:]) == [False] + [True] * 15
    assert run.states == [("waiting", "the camera's queue overflowed: 2 pictures lost"),
                          ("ok", "")]
    assert run.stream.dropped["awaiting_keyframe"] == 1 and len(run.requests) == 1


def test_a_new_picture_size_is_a_new_configuration(streams, tmp_path):
    first = streams.units(frames=7)
    second = streams.units(size="352x288", frames=8, args=("-profile:v", "main") + LIVE,
                           preset="veryfast")
    run = Run()
    assert run.feed(first + second) == [True] * 15
    assert [(c.width, c.height, c.profile) for c in run.configs] == [
        (320, 240, "Constrained Baseline"), (352, 288, "Main")]
    assert len(run.chunks) == 15
    assert run.stream.config is run.configs[1]
    frames = decode(tmp_path, run.annexb())
    assert len(frames) == 15


def test_a_new_sps_before_a_picture_waits_for_its_keyframe(streams, tmp_path):
    """An encoder restarted at another size whose first keyframe got lost:
    its pictures are not given to decoders set up for the old size."""
    first = streams.units(frames=7)
    second = streams.units(size="352x288", frames=8)
    sps_nal, pps_nal = first_sps_pps(second[0])
    lead = b"\x00\x00\x00\x01" + sps_nal + b"\x00\x00\x00\x01" + pps_nal
    run = Run()
    assert run.feed(first + [lead + second[1]] + second[2:]) == [True] * 7 + [False] * 4 + [True] * 3
    assert [(c.width, c.height) for c in run.configs] == [(320, 240), (352, 288)]
    assert run.states == [("waiting", "waiting for a keyframe"), ("ok", "")]
    assert len(decode(tmp_path, run.annexb())) == 10


def test_the_same_parameter_sets_again_are_no_new_configuration(streams):
    units = streams.units()
    run = Run()
    run.feed(units + units)
    assert len(run.configs) == 1 and run.stream.keyframes == 8


def test_measured_keyframe_interval_by_the_clock(streams):
    clock = Clock()
    run = Run(clock)
    assert run.stream.measured_keyframe_interval is None
    for au in streams.units():
        run.stream.feed(au)
        clock.advance(0.04)
    assert run.stream.measured_keyframe_interval == pytest.approx(0.2)
    assert run.stream.stats()["keyframe_interval"] == 2.0


def test_message_framing():
    au = b"\x00\x00\x00\x01\x65\x88"
    message = frame_message(au, True, 1700000000.123456)
    assert message[:9] == b"\x01" + (1700000000123456).to_bytes(8, "big")
    assert message[9:] == au
    assert parse_message(message) == (True, pytest.approx(1700000000.123456, abs=1e-6), au)
    message = frame_message(bytearray(au), False, None)
    assert message == b"\x00" + bytes(8) + au
    assert parse_message(memoryview(message)) == (False, None, au)
    with pytest.raises(H264Error):
        parse_message(b"\x01\x00")


def test_access_units_of_a_sliced_stream(streams):
    data = streams.data()
    units = access_units(data)
    assert b"".join(units) == data
    assert all(sum(t in (1, 5) for t in nal_types(u)) >= 1 for u in units)
    # libx264 with zerolatency cuts each picture in as many slices as threads
    assert len({sum(t in (1, 5) for t in nal_types(u)) for u in units}) == 1
