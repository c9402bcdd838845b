"""H.264 as the camera's encoder gives it: Annex-B access units, their
parameter sets, and the stage that turns them into the stream's messages.

The daemon never decodes a picture.  It reads only what it must to pass the
stream on safely:

- the sequence and picture parameter sets (SPS, PPS), for the size, profile
  and level the page is told about, the ``avc1.PPCCLL`` codecs string (RFC
  6381) and the AVCDecoderConfigurationRecord (``avcC``, ISO/IEC 14496-15)
  that decoders fed length-prefixed pictures need;
- each NAL unit's header, and the first few bytes of each slice header
  (``first_mb_in_slice``, ``slice_type``, ``pic_parameter_set_id``), so that
  an access unit that cannot be decoded is dropped here instead of breaking
  every viewer's decoder.

Big slices are never copied or walked in Python: NAL units are found with
``bytes.find`` and only small prefixes are read.

:class:`H264Stream` is the stage between a source of access units (the
camera's encoder, or ffmpeg) and the broadcaster.  Each access unit becomes
one binary message (:func:`frame_message`):

- byte 0: flags, bit 0 (``KEYFRAME``) set for an IDR picture, which has its
  SPS and PPS in the same message before it, so a decoder can start there;
- bytes 1-8: the capture time in microseconds since the Unix epoch, unsigned
  64-bit big-endian, 0 when unknown;
- bytes 9..: the access unit in Annex B.
"""

import base64
import struct
from collections import namedtuple

from twisted.logger import Logger

from pistreaming.mpegts import Chunk

START_CODE = b"\x00\x00\x01"
#: What this module puts in front of the parameter sets it inserts.
LONG_START_CODE = b"\x00\x00\x00\x01"

# nal_unit_type values (ITU-T H.264 table 7-1)
NON_IDR_SLICE = 1
PARTITION_A = 2
PARTITION_B = 3
PARTITION_C = 4
IDR_SLICE = 5
SEI = 6
SPS = 7
PPS = 8
AUD = 9
END_OF_SEQUENCE = 10
END_OF_STREAM = 11
FILLER = 12

#: NAL units of a picture's coded data.
VCL_TYPES = frozenset((NON_IDR_SLICE, PARTITION_A, IDR_SLICE))
#: NAL units that, after a picture's slices, begin the next access unit
#: (ITU-T H.264 7.4.1.2.3).
_AU_OPENERS = frozenset((SEI, SPS, PPS, AUD, 14, 15, 16, 17, 18))

#: The flags byte of a message: the access unit is an IDR picture.
KEYFRAME = 0x01
HEADER = struct.Struct(">BQ")

# profile_idc values whose SPS carries chroma_format_idc, bit depths and
# scaling lists (ITU-T H.264 7.3.2.1.1)
_HIGH_SPS_PROFILES = frozenset((100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135))

_CONSTRAINT_SET1 = 0x40
_CONSTRAINT_SET3 = 0x10
_CONSTRAINT_SET4 = 0x08
_CONSTRAINT_SET5 = 0x04


class H264Error(ValueError):
    """The bytes are not the H.264 they claim to be."""


# -- Annex B and NAL units ---------------------------------------------------

def nal_spans(data):
    """The NAL units of Annex-B C{data}: a list of (start code's first byte,
    NAL unit's first byte (its header), end of the NAL unit) offsets.

    A NAL unit's end excludes the zero bytes before the next start code
    (trailing_zero_8bits, or the first byte of a 4-byte start code).  Bytes
    before the first start code are not a NAL unit and are not reported; a
    NAL unit may be empty (start == end) where the data has two start codes
    in a row.  (C{data}: bytes or bytearray; read a memoryview's bytes().)
    """
    spans = []
    find = data.find
    at = find(START_CODE)
    while at >= 0:
        start = at + 3
        following = find(START_CODE, start)
        end = len(data) if following < 0 else following
        while end > start and data[end - 1] == 0:
            end -= 1
        code = at - 1 if at > 0 and data[at - 1] == 0 else at
        spans.append((code, start, end))
        at = following
    return spans


def nal_units(data):
    """The NAL units of Annex-B C{data} (bytes, each from its header byte on)."""
    return [data[start:end] for _, start, end in nal_spans(data)]


def nal_types(au):
    """The nal_unit_type of each NAL unit in Annex-B C{au}, in order."""
    return [au[start] & 0x1F for _, start, end in nal_spans(au) if end > start]


def is_idr(au):
    """Whether Annex-B C{au} holds an IDR picture (a slice of type 5)."""
    return IDR_SLICE in nal_types(au)


def unescape(nal):
    """The RBSP of a NAL unit: C{nal} without its emulation prevention bytes
    (each 0x03 of a 0x000003 sequence)."""
    return bytes(nal).replace(b"\x00\x00\x03", b"\x00\x00")


def access_units(data):
    """Cut a whole Annex-B byte string (a file, say) into access units
    (ITU-T H.264 7.4.1.2.3): a new one begins at an access unit delimiter,
    SPS, PPS or SEI that follows a picture's slices, or at a slice whose
    first_mb_in_slice is 0.  Returns a list of bytes, each with its start
    codes."""
    units = []
    begin = None
    seen_slice = False
    for code, start, end in nal_spans(data):
        if end == start:
            continue
        kind = data[start] & 0x1F
        new = False
        if kind in VCL_TYPES:
            if seen_slice and _first_mb(data, start, end) == 0:
                new = True
            seen_slice = True
        elif kind in _AU_OPENERS and seen_slice:
            new = True
        if new:
            units.append(data[begin:code])
            begin = code
            seen_slice = kind in VCL_TYPES
        elif begin is None:
            begin = code
    if begin is not None:
        units.append(data[begin:])
    return units


def _first_mb(data, start, end):
    try:
        return BitReader(unescape(data[start + 1:min(end, start + 9)])).ue()
    except H264Error:
        return None


class BitReader:
    """Reads an RBSP bit by bit: fixed-width fields and Exp-Golomb codes."""

    def __init__(self, data):
        self._value = int.from_bytes(data, "big")
        self._size = len(data) * 8
        self.position = 0

    def bits_left(self):
        return self._size - self.position

    def u(self, n):
        """An unsigned n-bit field."""
        end = self.position + n
        if end > self._size:
            raise H264Error("ends in the middle of a field")
        value = (self._value >> (self._size - end)) & ((1 << n) - 1)
        self.position = end
        return value

    def flag(self):
        return self.u(1) == 1

    def ue(self):
        """An unsigned Exp-Golomb code, ue(v)."""
        left = self._size - self.position
        rest = self._value & ((1 << left) - 1)
        if rest == 0:
            raise H264Error("ends in the middle of an Exp-Golomb code")
        zeros = left - rest.bit_length()
        if zeros > 31:
            raise H264Error("has an Exp-Golomb code of more than 32 bits")
        self.position += zeros + 1
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self):
        """A signed Exp-Golomb code, se(v)."""
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


# -- parameter sets -----------------------------------------------------------

def profile_name(profile_idc, constraints=0):
    """The name of an H.264 profile (ITU-T H.264 annex A) from profile_idc
    and the constraint-flags byte."""
    intra = constraints & _CONSTRAINT_SET3
    if profile_idc == 66:
        return "Constrained Baseline" if constraints & _CONSTRAINT_SET1 else "Baseline"
    if profile_idc == 77:
        return "Main"
    if profile_idc == 88:
        return "Extended"
    if profile_idc == 100:
        if constraints & _CONSTRAINT_SET4 and constraints & _CONSTRAINT_SET5:
            return "Constrained High"
        if constraints & _CONSTRAINT_SET4:
            return "Progressive High"
        return "High"
    if profile_idc == 110:
        if intra:
            return "High 10 Intra"
        return "Progressive High 10" if constraints & _CONSTRAINT_SET4 else "High 10"
    if profile_idc == 122:
        return "High 4:2:2 Intra" if intra else "High 4:2:2"
    if profile_idc == 244:
        return "High 4:4:4 Intra" if intra else "High 4:4:4 Predictive"
    names = {44: "CAVLC 4:4:4 Intra", 83: "Scalable Baseline", 86: "Scalable High",
             118: "Multiview High", 128: "Stereo High", 134: "MFC High",
             135: "MFC Depth High", 138: "Multiview Depth High",
             139: "Enhanced Multiview Depth High", 144: "High 4:4:4"}
    return names.get(profile_idc, f"profile {profile_idc}")


def level_text(level_idc, constraints=0, profile_idc=0):
    """An H.264 level as written in annex A: "3", "3.1", "1b"."""
    if level_idc == 9 or (level_idc == 11 and constraints & _CONSTRAINT_SET3
                          and profile_idc in (66, 77, 88)):
        return "1b"
    major, minor = divmod(level_idc, 10)
    return str(major) if minor == 0 else f"{major}.{minor}"


def _skip_scaling_list(bits, size):
    last = following = 8
    for _ in range(size):
        if following != 0:
            following = (last + bits.se() + 256) % 256
        if following != 0:
            last = following


_SPSFields = namedtuple("_SPSFields", [
    "nal", "profile_idc", "constraints", "level_idc", "sps_id",
    "chroma_format_idc", "separate_colour_plane", "bit_depth_luma",
    "bit_depth_chroma", "log2_max_frame_num", "pic_order_cnt_type",
    "max_num_ref_frames", "frame_mbs_only", "coded_width", "coded_height",
    "crop", "width", "height", "pic_size_in_mbs"])


class SequenceParameterSet(_SPSFields):
    """What this module reads of an SPS (see L{parse_sps})."""

    __slots__ = ()

    @property
    def profile(self):
        return profile_name(self.profile_idc, self.constraints)

    @property
    def level(self):
        return level_text(self.level_idc, self.constraints, self.profile_idc)

    @property
    def codecs(self):
        """The RFC 6381 codecs string, "avc1.PPCCLL"."""
        return "avc1.%02x%02x%02x" % (self.profile_idc, self.constraints, self.level_idc)


PictureParameterSet = namedtuple("PictureParameterSet", ["nal", "pps_id", "sps_id"])


def parse_sps(nal):
    """Read an SPS NAL unit (from its header byte on, emulation prevention
    bytes in): its profile, level, id, chroma format and bit depths, and
    the picture's size, coded and as shown (after frame cropping).  Raises
    L{H264Error} if it is not a well-formed SPS."""
    nal = bytes(nal)
    if len(nal) < 4 or nal[0] & 0x80 or nal[0] & 0x1F != SPS:
        raise H264Error("is not an SPS")
    bits = BitReader(unescape(nal[1:]))
    profile_idc, constraints, level_idc = bits.u(8), bits.u(8), bits.u(8)
    sps_id = bits.ue()
    if sps_id > 31:
        raise H264Error(f"has seq_parameter_set_id {sps_id} (at most 31)")
    chroma_format_idc, separate, depth_luma, depth_chroma = 1, False, 8, 8
    if profile_idc in _HIGH_SPS_PROFILES:
        chroma_format_idc = bits.ue()
        if chroma_format_idc > 3:
            raise H264Error(f"has chroma_format_idc {chroma_format_idc}")
        if chroma_format_idc == 3:
            separate = bits.flag()
        depth_luma = 8 + bits.ue()
        depth_chroma = 8 + bits.ue()
        if depth_luma > 14 or depth_chroma > 14:
            raise H264Error("has a bit depth over 14")
        bits.u(1)  # qpprime_y_zero_transform_bypass_flag
        if bits.flag():  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format_idc != 3 else 12):
                if bits.flag():
                    _skip_scaling_list(bits, 16 if i < 6 else 64)
    log2_max_frame_num = 4 + bits.ue()
    if log2_max_frame_num > 16:
        raise H264Error("has log2_max_frame_num over 16")
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        bits.u(1)  # delta_pic_order_always_zero_flag
        bits.se()  # offset_for_non_ref_pic
        bits.se()  # offset_for_top_to_bottom_field
        cycle = bits.ue()
        if cycle > 255:
            raise H264Error("has more than 255 reference frames in its POC cycle")
        for _ in range(cycle):
            bits.se()
    elif poc_type != 2:
        raise H264Error(f"has pic_order_cnt_type {poc_type}")
    max_num_ref_frames = bits.ue()
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_map_units = bits.ue() + 1
    frame_mbs_only = bits.flag()
    if not frame_mbs_only:
        bits.u(1)  # mb_adaptive_frame_field_flag
    bits.u(1)  # direct_8x8_inference_flag
    crop = (0, 0, 0, 0)
    if bits.flag():  # frame_cropping_flag
        crop = (bits.ue(), bits.ue(), bits.ue(), bits.ue())
    height_mbs = height_map_units * (1 if frame_mbs_only else 2)
    coded_width, coded_height = width_mbs * 16, height_mbs * 16
    chroma_array_type = 0 if separate else chroma_format_idc
    if chroma_array_type == 0:
        unit_x, unit_y = 1, 1
    else:
        unit_x = 1 if chroma_format_idc == 3 else 2
        unit_y = 2 if chroma_format_idc == 1 else 1
    unit_y *= 1 if frame_mbs_only else 2
    width = coded_width - unit_x * (crop[0] + crop[1])
    height = coded_height - unit_y * (crop[2] + crop[3])
    if width <= 0 or height <= 0:
        raise H264Error(f"crops its {coded_width}x{coded_height} pictures to nothing")
    return SequenceParameterSet(
        nal, profile_idc, constraints, level_idc, sps_id, chroma_format_idc,
        separate, depth_luma, depth_chroma, log2_max_frame_num, poc_type,
        max_num_ref_frames, frame_mbs_only, coded_width, coded_height, crop,
        width, height, width_mbs * height_mbs)


def parse_pps(nal):
    """Read a PPS NAL unit's id and the id of the SPS it refers to."""
    nal = bytes(nal)
    if len(nal) < 2 or nal[0] & 0x80 or nal[0] & 0x1F != PPS:
        raise H264Error("is not a PPS")
    bits = BitReader(unescape(nal[1:16]))
    pps_id, sps_id = bits.ue(), bits.ue()
    if pps_id > 255 or sps_id > 31:
        raise H264Error(f"has ids out of range (PPS {pps_id}, SPS {sps_id})")
    return PictureParameterSet(nal, pps_id, sps_id)


def avcc(sps_nals, pps_nals):
    """The AVCDecoderConfigurationRecord (ISO/IEC 14496-15 5.3.3.1) of these
    SPS and PPS NAL units (each from its header byte on), with 4-byte NAL
    lengths, and the chroma format and bit depths that the record carries
    for profiles other than Baseline, Main and Extended."""
    sps_nals = [bytes(n) for n in sps_nals]
    pps_nals = [bytes(n) for n in pps_nals]
    if not sps_nals or not pps_nals or len(sps_nals) > 31 or len(pps_nals) > 255:
        raise H264Error("an avcC needs 1 to 31 SPS and 1 to 255 PPS")
    first = parse_sps(sps_nals[0])
    out = [bytes((1, first.profile_idc, first.constraints, first.level_idc,
                  0xFC | 3, 0xE0 | len(sps_nals)))]
    for nal in sps_nals:
        out.append(struct.pack(">H", len(nal)) + nal)
    out.append(bytes((len(pps_nals),)))
    for nal in pps_nals:
        out.append(struct.pack(">H", len(nal)) + nal)
    if first.profile_idc not in (66, 77, 88):
        out.append(bytes((0xFC | first.chroma_format_idc, 0xF8 | (first.bit_depth_luma - 8),
                          0xF8 | (first.bit_depth_chroma - 8), 0)))
    return b"".join(out)


class Config:
    """A stream's configuration: the SPS and PPS its pictures use."""

    def __init__(self, sps, pps):
        """@param sps: a L{SequenceParameterSet} (or an SPS NAL unit).
        @param pps: a L{PictureParameterSet} (or a PPS NAL unit)."""
        self.sps = sps if isinstance(sps, SequenceParameterSet) else parse_sps(sps)
        self.pps = pps if isinstance(pps, PictureParameterSet) else parse_pps(pps)
        self.codecs = self.sps.codecs
        self.profile = self.sps.profile
        self.level = self.sps.level
        self.width = self.sps.width
        self.height = self.sps.height
        self._avcc = None

    def avcc(self):
        """The AVCDecoderConfigurationRecord (bytes)."""
        if self._avcc is None:
            self._avcc = avcc([self.sps.nal], [self.pps.nal])
        return self._avcc

    def parameter_sets(self):
        """The SPS and PPS in Annex B."""
        return LONG_START_CODE + self.sps.nal + LONG_START_CODE + self.pps.nal

    def message(self, keyframe_interval):
        """The stream message's content (the daemon sends it as
        C{{"stream": ...}})."""
        return {
            "codec": "h264",
            "codecs": self.codecs,
            "profile": self.profile,
            "level": self.level,
            "width": self.width,
            "height": self.height,
            "keyframe_interval": float(keyframe_interval),
            "avcc": base64.b64encode(self.avcc()).decode("ascii"),
        }

    def __eq__(self, other):
        if not isinstance(other, Config):
            return NotImplemented
        return self.sps.nal == other.sps.nal and self.pps.nal == other.pps.nal

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __hash__(self):
        return hash((self.sps.nal, self.pps.nal))

    def __repr__(self):
        return (f"<Config {self.codecs} {self.profile} level {self.level} "
                f"{self.width}x{self.height}>")


# -- messages -----------------------------------------------------------------

Message = namedtuple("Message", ["keyframe", "capture_time", "access_unit"])


def _header(keyframe, capture_time):
    micros = 0
    if capture_time is not None and capture_time > 0:
        micros = min(int(round(capture_time * 1e6)), 0xFFFFFFFFFFFFFFFF)
    return HEADER.pack(KEYFRAME if keyframe else 0, micros)


def frame_message(au, keyframe, capture_time):
    """The binary message of one access unit: flags, capture time (seconds
    since the epoch, or None) in microseconds, the access unit."""
    return _header(keyframe, capture_time) + bytes(au)


def parse_message(payload):
    """The inverse of L{frame_message}: a L{Message} (keyframe, capture time
    in seconds or None where it was 0, the access unit's bytes)."""
    if len(payload) < HEADER.size:
        raise H264Error(f"a message of {len(payload)} bytes has no room for its header")
    flags, micros = HEADER.unpack_from(payload)
    return Message(bool(flags & KEYFRAME), micros / 1e6 if micros else None,
                   bytes(payload[HEADER.size:]))


# -- the stage ----------------------------------------------------------------

#: Reasons an access unit is dropped (the keys of L{H264Stream.dropped}).
NO_PARAMETER_SETS = "no_parameter_sets"
CORRUPT = "corrupt"
AWAITING_KEYFRAME = "awaiting_keyframe"


class _Corrupt(Exception):
    """An access unit that no decoder should be given; the text says why."""


class H264Stream:
    """Access units in, the stream's messages out.

    C{feed} takes one access unit at a time.  Each one that a decoder can use
    goes to C{sink} as a L{Chunk} whose data is its L{frame_message}; the
    others are dropped:

    - before the first IDR picture with known SPS and PPS (nothing could
      decode them), and after L{gap}: the state is "waiting";
    - a corrupt access unit (no start code at its head, an empty NAL unit, a
      NAL unit's forbidden bit set, no slice, a parameter set or slice header
      that cannot be read, or a slice whose PPS is unknown), and every
      following one until the next IDR, which is the first picture whose
      references a decoder will have: the state is "corrupt".

    A run of dropped access units is logged in one line (one more only where
    it turns out worse: keyframes that come without SPS and PPS, or a corrupt
    one while waiting), reported to C{on_state(state, why)}, and
    C{request_keyframe()} is called once, so that the camera starts a new
    group of pictures soon.  When pictures flow again the state is "ok".

    An IDR without its SPS and PPS in front gets the latest ones.
    C{on_config} is called with the L{Config} just before the first IDR that
    uses it: the first one, and whenever the SPS or PPS bytes change.
    """

    log = Logger()

    def __init__(self, sink, on_config, keyframe_interval, clock,
                 on_state=None, request_keyframe=None):
        """
        @param sink: called with each L{Chunk}.
        @param on_config: called with the new L{Config}.
        @param keyframe_interval: the seconds between IDRs asked of the
            encoder (for L{message} and L{stats}).
        @param clock: an IReactorTime (or a callable giving seconds), for the
            measured keyframe interval where capture times are unknown.
        @param on_state: called with ("waiting" | "corrupt" | "ok", why) when
            the state changes; "ok" only after one of the others.
        @param request_keyframe: called (no arguments) to ask the source for
            an IDR soon; once per run of dropped access units.
        """
        self.sink = sink
        self.on_config = on_config
        self.keyframe_interval = keyframe_interval
        self._now = clock.seconds if hasattr(clock, "seconds") else clock
        self.on_state = on_state
        self.request_keyframe = request_keyframe
        #: The L{Config} of the pictures passed on (None before the first).
        self.config = None
        #: "starting" until the first picture or failure, then "ok",
        #: "waiting" or "corrupt"; C{why} says why not "ok".
        self.state = "starting"
        self.why = ""
        self._sps = {}
        self._pps = {}
        self._need_idr = True
        self._run = set()          # what this run of drops has reported
        self._run_dropped = 0
        self._last_idr = None      # (time, whether it is a capture time)
        #: Access units passed on, IDRs among them, and their messages' bytes.
        self.access_units = 0
        self.keyframes = 0
        self.bytes = 0
        #: Access units dropped, by reason.
        self.dropped = {NO_PARAMETER_SETS: 0, CORRUPT: 0, AWAITING_KEYFRAME: 0}
        #: Seconds between the last two IDRs passed on, by their capture
        #: times (or the clock's where unknown); None before two.
        self.measured_keyframe_interval = None

    def message(self):
        """The stream message's content for the current configuration, or
        None before one is known."""
        if self.config is None:
            return None
        return self.config.message(self.keyframe_interval)

    def stats(self):
        """The counters, for /stats.json and /metrics."""
        config = self.config
        return {
            "codec": "h264",
            "codecs": config.codecs if config else None,
            "profile": config.profile if config else None,
            "level": config.level if config else None,
            "width": config.width if config else None,
            "height": config.height if config else None,
            "state": self.state,
            "access_units": self.access_units,
            "keyframes": self.keyframes,
            "bytes": self.bytes,
            "dropped": dict(self.dropped),
            "keyframe_interval": self.keyframe_interval,
            "measured_keyframe_interval": self.measured_keyframe_interval,
        }

    def gap(self, why):
        """Access units were lost before the next one fed (a full hand-off
        queue, say): drop pictures until the next IDR, whose references a
        decoder will have."""
        self._need_idr = True
        self._trouble("gap", "waiting", why)

    def feed(self, data, capture_time=None):
        """Take one access unit (Annex B); return whether it was passed on.

        An access unit of SPS and PPS alone (some encoders give them apart)
        is kept for the next IDR and not passed on.

        @param capture_time: when the camera captured the picture, in
            seconds since the epoch, or None.
        """
        if not isinstance(data, bytes):
            data = bytes(data)
        try:
            found = self._check(data)
        except _Corrupt as e:
            self._need_idr = True
            self._drop(CORRUPT, "corrupt", "corrupt", f"a corrupt access unit ({e})")
            return False
        idr, carried, pps_id, sps, pps, insert_at = found
        if not idr and self.config is not None:
            for sps_id, new in sps.items():
                old = self._sps.get(sps_id)
                if old is not None and old.nal != new.nal:
                    self._need_idr = True  # a new SPS takes effect at an IDR only
        self._sps.update(sps)
        self._pps.update(pps)
        if pps_id is None:
            return False
        if idr:
            return self._keyframe(data, capture_time, pps_id, carried, insert_at)
        if self.config is None:
            self._drop(NO_PARAMETER_SETS, "no config", "waiting",
                       "waiting for the camera's first keyframe with its SPS and PPS "
                       "(H.264 parameter sets)")
            return False
        if self._need_idr:
            self._drop(AWAITING_KEYFRAME, "awaiting keyframe", "waiting",
                       "waiting for a keyframe")
            return False
        self._pass(data, False, capture_time, None)
        return True

    def _keyframe(self, data, capture_time, pps_id, carried, insert_at):
        pps = self._pps.get(pps_id)
        sps = None if pps is None else self._sps.get(pps.sps_id)
        if sps is None:
            self._drop(NO_PARAMETER_SETS, "keyframe without config", "waiting",
                       "the camera's H.264 keyframes come without their SPS and PPS "
                       "(parameter sets), so no viewer can decode them")
            return False
        config = Config(sps, pps)
        if config != self.config:
            self.config = config
            self.on_config(config)
        self._need_idr = False
        known = capture_time is not None
        at = capture_time if known else self._now()
        if self._last_idr is not None and self._last_idr[1] == known:
            self.measured_keyframe_interval = at - self._last_idr[0]
        self._last_idr = (at, known)
        missing = []
        if SPS not in carried:
            missing.append(LONG_START_CODE + sps.nal)
        if PPS not in carried:
            missing.append(LONG_START_CODE + pps.nal)
        self._pass(data, True, capture_time, (insert_at, missing) if missing else None)
        return True

    def _pass(self, data, keyframe, capture_time, insert):
        if insert is None:
            message = _header(keyframe, capture_time) + data
        else:
            at, parts = insert
            message = b"".join([_header(keyframe, capture_time), data[:at], *parts, data[at:]])
        self.access_units += 1
        if keyframe:
            self.keyframes += 1
        self.bytes += len(message)
        if self.state != "ok":
            if self._run:
                self.log.info("H.264: pictures again, after {dropped} access units dropped",
                              dropped=self._run_dropped)
                self._set_state("ok", "")
            else:
                self.state = "ok"
            self._run = set()
            self._run_dropped = 0
        self.sink(Chunk(data=message, picture=True, keyframe=keyframe, pts=capture_time))

    def _drop(self, reason, kind, state, why):
        self.dropped[reason] += 1
        self._run_dropped += 1
        self._trouble(kind, state, why)

    def _trouble(self, kind, state, why):
        """Pictures are being dropped, for a reason of this C{kind}: log and
        report it if this run of drops has not yet, and ask for a keyframe
        at the start of the run."""
        if kind in self._run or (kind in _RUN_OPENERS_ONLY and self._run):
            return
        first = not self._run
        self._run.add(kind)
        if state == "corrupt":
            self.log.warn("H.264: {why}; dropping pictures until the next keyframe", why=why)
        else:
            self.log.warn("H.264: {why}", why=why)
        self._set_state(state, why)
        if first and self.request_keyframe is not None:
            self.request_keyframe()

    def _set_state(self, state, why):
        self.state, self.why = state, why
        if self.on_state is not None:
            self.on_state(state, why)

    def _check(self, data):
        """Validate an access unit.  Returns (whether it is an IDR, the
        parameter-set types it carries, the PPS id of its slices or None
        where it has none, the SPS and PPS it carries by id, where missing
        parameter sets go).  Raises L{_Corrupt}."""
        head = data.find(START_CODE)
        if head < 0 or data[:head].strip(b"\x00"):
            raise _Corrupt("no start code at its head")
        sps, pps = {}, {}
        kinds = set()
        slice_pps = None
        insert_at = 0
        for _, start, end in nal_spans(data):
            if end == start:
                raise _Corrupt("an empty NAL unit")
            header = data[start]
            if header & 0x80:
                raise _Corrupt("a NAL unit's forbidden_zero_bit is set")
            kind = header & 0x1F
            kinds.add(kind)
            try:
                if kind in VCL_TYPES:
                    pps_id = self._check_slice(data, start, end, kind, header, sps, pps)
                    if slice_pps is None:
                        slice_pps = pps_id
                    elif pps_id != slice_pps:
                        raise H264Error("refers to another PPS than the picture's first slice")
                elif kind == SPS:
                    found = parse_sps(data[start:end])
                    sps[found.sps_id] = found
                    insert_at = end
                elif kind == PPS:
                    found = parse_pps(data[start:end])
                    pps[found.pps_id] = found
                elif kind == AUD and not kinds & {SPS, PPS}:
                    insert_at = end
            except H264Error as e:
                raise _Corrupt(f"its {_NAL_NAMES.get(kind, 'NAL unit')} {e}")
        if IDR_SLICE in kinds and kinds & {NON_IDR_SLICE, PARTITION_A}:
            raise _Corrupt("it mixes IDR and non-IDR slices")
        if slice_pps is None and not kinds & {SPS, PPS}:
            raise _Corrupt("no slice in it")
        return IDR_SLICE in kinds, kinds & {SPS, PPS}, slice_pps, sps, pps, insert_at

    def _check_slice(self, data, start, end, kind, header, sps, pps):
        """Read a slice header's start; return its PPS id."""
        bits = BitReader(unescape(data[start + 1:min(end, start + 17)]))
        first_mb, slice_type, pps_id = bits.ue(), bits.ue(), bits.ue()
        if slice_type > 9:
            raise H264Error(f"has slice_type {slice_type}")
        if kind == IDR_SLICE and (slice_type % 5 not in (2, 4) or not header & 0x60):
            raise H264Error("is not an intra reference picture")
        known = pps.get(pps_id) or self._pps.get(pps_id)
        if known is None:
            if not (pps or self._pps):
                return pps_id  # no PPS known yet: waiting, not corrupt
            raise H264Error(f"refers to PPS {pps_id}, which the stream never had")
        parameters = sps.get(known.sps_id) or self._sps.get(known.sps_id)
        if parameters is not None and first_mb >= parameters.pic_size_in_mbs:
            raise H264Error(f"begins at macroblock {first_mb}, past the picture's end")
        return pps_id


#: Kinds of drop reported only where they begin a run: within one, they
#: say nothing new.
_RUN_OPENERS_ONLY = frozenset(("no config", "awaiting keyframe"))

_NAL_NAMES = {SPS: "SPS", PPS: "PPS", NON_IDR_SLICE: "slice", IDR_SLICE: "IDR slice",
              PARTITION_A: "slice"}
