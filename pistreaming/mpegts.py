"""Just enough MPEG-TS to cut ffmpeg's output where a decoder can start.

ffmpeg writes the stream as 188-byte packets: the video's PES packets (one
per picture), with PAT/PMT/SDT tables in between.  The broadcaster needs to
know where each picture starts, and which pictures a decoder can start at
(an intra picture behind a sequence header), so that:

- a newcomer can be sent the latest such starting point and what followed,
  and shows a picture at once;
- a viewer that fell behind can skip to the next starting point and still
  receive a decodable stream.

:class:`PictureSplitter` cuts a run of whole packets into :class:`Chunk`\\ s
such that every picture's first packet (with the tables just before it)
begins a chunk.  It never holds back video: a chunk is handed on as soon as
its bytes are here, so cutting adds no delay.
"""

from dataclasses import dataclass

PACKET = 188
SYNC = 0x47
SEQUENCE_HEADER = b"\x00\x00\x01\xb3"
PTS_CLOCK = 90_000


@dataclass(frozen=True)
class Chunk:
    """Whole TS packets, in stream order."""

    data: bytes
    #: Begins with the first packet of a picture (maybe after PSI tables).
    picture: bool = False
    #: ...and a decoder can start there (a sequence header precedes it).
    keyframe: bool = False
    #: The picture's presentation time in seconds (when ``picture``).
    pts: "float | None" = None

    def __len__(self):
        return len(self.data)


class TSPacketizer:
    """Cuts a byte stream into runs of whole 188-byte MPEG-TS packets."""

    def __init__(self):
        self._rest = b""

    def feed(self, data):
        """Return the whole packets available now (possibly b''); keep the rest."""
        if self._rest:
            data = self._rest + data
        whole = len(data) - len(data) % PACKET
        self._rest = data[whole:]
        return data[:whole]


def _payload_offset(packet):
    """Where the packet's payload starts, or None if it carries none."""
    control = (packet[3] >> 4) & 0x3
    if not control & 0x1:
        return None
    offset = 4
    if control & 0x2:
        offset += 1 + packet[4]
    return offset if offset < PACKET else None


def _pid(packet):
    return ((packet[1] & 0x1F) << 8) | packet[2]


def _read_pts(b):
    return (((b[0] >> 1) & 0x07) << 30 | b[1] << 22 | (b[2] >> 1) << 15
            | b[3] << 7 | b[4] >> 1)


def video_pes_start(packet):
    """If C{packet} begins a video PES packet: (pts in seconds or None,
    whether the elementary stream starts with a sequence header).  Else None."""
    if packet[0] != SYNC or not packet[1] & 0x40:  # payload_unit_start_indicator
        return None
    offset = _payload_offset(packet)
    if offset is None:
        return None
    pes = packet[offset:]
    if len(pes) < 9 or pes[:3] != b"\x00\x00\x01" or not 0xE0 <= pes[3] <= 0xEF:
        return None
    flags, header_length = pes[7], pes[8]
    pts = None
    if flags & 0x80 and len(pes) >= 14:
        pts = _read_pts(pes[9:14]) / PTS_CLOCK
    es = pes[9 + header_length:]
    return pts, es[:4] == SEQUENCE_HEADER


class PictureSplitter:
    """Cuts whole TS packets into chunks that begin where pictures begin."""

    def __init__(self):
        self.video_pid = None
        self._held = []  # trailing table packets, which may lead the next picture

    def feed(self, packets):
        """Take whole packets; return the chunks they complete, in order.

        Table packets at the very end are held until the next call (they
        belong in front of the next picture, if one follows); everything
        else is returned at once.
        """
        chunks = []
        current = self._held
        meta = {}
        self._held = []
        # Where the table packets at the end of `current` begin, if it ends in some.
        run_start = 0 if current else None
        for i in range(0, len(packets), PACKET):
            packet = packets[i:i + PACKET]
            start = video_pes_start(packet)
            if start is not None:
                if self.video_pid is None:
                    self.video_pid = _pid(packet)
                leading = current[run_start:] if run_start is not None else []
                rest = current[:run_start] if run_start is not None else current
                if rest:
                    chunks.append(Chunk(b"".join(rest), **meta))
                pts, keyframe = start
                current = leading + [packet]
                meta = {"picture": True, "keyframe": keyframe, "pts": pts}
                run_start = None
                continue
            if self.video_pid is not None and _pid(packet) == self.video_pid:
                run_start = None
            elif run_start is None:
                run_start = len(current)
            current.append(packet)
        if run_start is not None:
            self._held = current[run_start:]
            current = current[:run_start]
        if current:
            chunks.append(Chunk(b"".join(current), **meta))
        return chunks
