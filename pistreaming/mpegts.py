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

For H.264 the daemon does not pass MPEG-TS on: :class:`PESAssembler` takes
the video PES packets apart and hands on each one's payload, which, out of
ffmpeg's MPEG-TS muxer, is one access unit (one picture) in Annex B.
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


def _video_pes(packet):
    """If C{packet} begins a video PES packet: (pts in seconds or None,
    whether the elementary stream starts with a sequence header, the PES
    packet's whole length in bytes or None if its header leaves it open,
    the PES bytes in this packet).  Else None."""
    if packet[0] != SYNC or not packet[1] & 0x40:  # payload_unit_start_indicator
        return None
    offset = _payload_offset(packet)
    if offset is None:
        return None
    pes = packet[offset:]
    if len(pes) < 9 or pes[:3] != b"\x00\x00\x01" or not 0xE0 <= pes[3] <= 0xEF:
        return None
    length = (pes[4] << 8) | pes[5]
    flags, header_length = pes[7], pes[8]
    pts = None
    if flags & 0x80 and len(pes) >= 14:
        pts = _read_pts(pes[9:14]) / PTS_CLOCK
    es = pes[9 + header_length:]
    return pts, es[:4] == SEQUENCE_HEADER, (6 + length if length else None), len(pes)


def video_pes_start(packet):
    """If C{packet} begins a video PES packet: (pts in seconds or None,
    whether the elementary stream starts with a sequence header).  Else None."""
    found = _video_pes(packet)
    return None if found is None else found[:2]


class PictureSplitter:
    """Cuts whole TS packets into chunks that begin where pictures begin.

    Where the PES header gives the picture's length (ffmpeg writes it when it
    fits in 16 bits), a picture's packets are handed on together once its
    last one is here: ffmpeg writes a picture in one go, so this costs no
    time, and a picture is one chunk (one message to each viewer).  A
    picture of unknown length is handed on as its bytes come.
    """

    def __init__(self):
        self.video_pid = None
        self._current = []     # packets not yet handed on
        self._meta = {}        # what the chunk that `_current` starts is
        self._run_start = None  # where table packets at the end of `_current` begin
        self._remaining = None  # PES bytes of the current picture still to come

    def feed(self, packets):
        """Take whole packets; return the chunks they complete, in order.

        Table packets at the very end are held until the next call (they
        belong in front of the next picture, if one follows), and so is a
        picture of known length that is not complete yet; everything else is
        returned at once.
        """
        chunks = []
        for i in range(0, len(packets), PACKET):
            packet = packets[i:i + PACKET]
            pes = _video_pes(packet)
            if pes is not None:
                if self.video_pid is None:
                    self.video_pid = _pid(packet)
                current, run_start = self._current, self._run_start
                leading = current[run_start:] if run_start is not None else []
                rest = current[:run_start] if run_start is not None else current
                if rest:
                    chunks.append(Chunk(b"".join(rest), **self._meta))
                pts, keyframe, total, here = pes
                self._current = leading + [packet]
                self._meta = {"picture": True, "keyframe": keyframe, "pts": pts}
                self._run_start = None
                self._remaining = None if total is None else total - here
            elif self.video_pid is not None and _pid(packet) == self.video_pid:
                self._run_start = None
                self._current.append(packet)
                if self._remaining is not None:
                    offset = _payload_offset(packet)
                    self._remaining -= PACKET - offset if offset is not None else 0
            else:
                if self._run_start is None:
                    self._run_start = len(self._current)
                self._current.append(packet)
                continue
            if self._remaining is not None and self._remaining <= 0:
                chunks.append(Chunk(b"".join(self._current), **self._meta))
                self._current, self._meta = [], {}
                self._run_start, self._remaining = None, None
        if self._remaining is None and self._current:
            run_start = self._run_start
            out = self._current[:run_start] if run_start is not None else self._current
            if out:
                chunks.append(Chunk(b"".join(out), **self._meta))
                self._meta = {}
            self._current = self._current[run_start:] if run_start is not None else []
            self._run_start = 0 if self._current else None
        return chunks

    def held(self):
        """The bytes held back for now (for tests)."""
        return b"".join(self._current)


#: PTS values are 33 bits: they wrap after 2**33 / 90 kHz, about 26.5 hours.
PTS_WRAP = 1 << 33


class PESAssembler:
    """Whole video PES payloads out of whole TS packets.

    ffmpeg's MPEG-TS muxer puts one access unit of H.264 (one picture, with
    an access unit delimiter in front if the encoder wrote none) in each PES
    packet of the video stream, and starts each PES packet in a TS packet of
    its own.  A payload is handed on the moment it is complete:

    - when the PES header gives the packet's length (ffmpeg writes it when it
      fits in 16 bits, with ``-omit_video_pes_length 0``), as soon as its
      last byte is here;
    - when the header leaves it open (a payload over 65535 bytes: a big IDR
      picture), when the next PES packet of the video begins (or at
      L{flush}), since nothing else says where it ends.

    The video is the first PID that begins a PES packet with a video stream
    id (0xE0-0xEF); everything else (PAT, PMT, SDT, other streams) is skipped.
    """

    def __init__(self):
        self.video_pid = None
        self._parts = []     # PES bytes of the packet being gathered
        self._size = 0
        self._total = None   # its whole length (header included), if known yet
        self._open = False   # whether its header leaves the length open
        self._last_pts = None  # the last raw 90 kHz PTS, to unwrap
        self._pts_base = 0
        #: PES packets dropped because they did not make sense or were cut
        #: short (a new one began before the stated length was reached).
        self.dropped = 0
        #: Payloads handed on whose length was open (complete only when the
        #: next began: they waited a frame interval).
        self.open_length = 0

    def feed(self, packets):
        """Take whole TS packets (a multiple of 188 bytes); return the
        payloads they complete, in order, as (payload bytes, pts in seconds
        or None)."""
        out = []
        for i in range(0, len(packets), PACKET):
            packet = packets[i:i + PACKET]
            if packet[0] != SYNC:
                continue
            pid = _pid(packet)
            start = packet[1] & 0x40
            if pid != self.video_pid:
                if self.video_pid is not None or not start or _video_pes(packet) is None:
                    continue
                self.video_pid = pid
            offset = _payload_offset(packet)
            if offset is None:
                continue
            if start:
                if self._parts:
                    if self._open:
                        self._finish(out)
                    else:
                        self.dropped += 1  # shorter than its header said
                        self._reset()
            elif not self._parts:
                continue  # the rest of a packet whose start was not seen
            self._parts.append(packet[offset:])
            self._size += PACKET - offset
            if self._total is None and not self._open and self._size >= 6:
                head = b"".join(self._parts)[:6]
                if head[:3] != b"\x00\x00\x01" or not 0xE0 <= head[3] <= 0xEF:
                    self.dropped += 1
                    self._reset()
                    continue
                length = (head[4] << 8) | head[5]
                if length:
                    self._total = 6 + length
                else:
                    self._open = True
            if self._total is not None and self._size >= self._total:
                self._finish(out)
        return out

    def flush(self):
        """The payload being gathered, if its length was open (the end of the
        stream ends it), as a list like L{feed}'s; forget any other."""
        out = []
        if self._parts and self._open:
            self._finish(out)
        elif self._parts:
            self.dropped += 1
            self._reset()
        return out

    def discard(self):
        """Forget the PES packet being gathered, if any (the stream was cut:
        its end is not known to be its end); it counts as dropped."""
        if self._parts:
            self.dropped += 1
            self._reset()

    def pending(self):
        """Bytes gathered of a PES packet not complete yet (for tests)."""
        return self._size

    def _reset(self):
        self._parts, self._size = [], 0
        self._total, self._open = None, False

    def _finish(self, out):
        pes = b"".join(self._parts)
        was_open = self._open
        if self._total is not None:
            pes = pes[:self._total]
        self._reset()
        if len(pes) < 9:
            self.dropped += 1
            return
        flags, header_length = pes[7], pes[8]
        if len(pes) < 9 + header_length:
            self.dropped += 1
            return
        pts = None
        if flags & 0x80 and header_length >= 5:
            pts = self._unwrap(_read_pts(pes[9:14])) / PTS_CLOCK
        if was_open:
            self.open_length += 1
        out.append((pes[9 + header_length:], pts))

    def _unwrap(self, raw):
        """A PTS that keeps counting past the 33-bit wrap."""
        last = self._last_pts
        if last is not None:
            if raw < last - PTS_WRAP // 2:
                self._pts_base += PTS_WRAP
            elif raw > last + PTS_WRAP // 2 and self._pts_base:
                self._pts_base -= PTS_WRAP  # a late picture from before the wrap
        self._last_pts = raw
        return self._pts_base + raw
