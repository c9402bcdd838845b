"""H.264 access units into MPEG-TS, each with its capture time as its
timestamp: how the recorder hands the stream to its ffmpeg.

Raw Annex B has no timestamps: ffmpeg reading it (C{-f h264}) would give
the pictures a fixed frame rate, so a camera that delivers fewer pictures
(a long exposure at night, a busy machine) would record video that plays
too fast, with a wrong length.  Wrapped in MPEG-TS, each access unit (as
the stream has it: Annex B, SPS and PPS before each IDR) keeps its
presentation time, the capture time relative to the segment's first
picture, and ffmpeg copies the pictures with those times (C{-c copy}).
The PES header also gives each picture's length (when it fits 16 bits),
so ffmpeg knows a picture is whole without waiting for the next.

Only what ffmpeg's demuxer needs: a PAT and a PMT (program 1, one H.264
stream, PID 0x100, which also carries the PCR) before the first picture
and before each keyframe; one PES packet per access unit, its first TS
packet with the PCR, the last one padded with an adaptation field.
"""

from pistreaming.mpegts import PACKET, PTS_CLOCK, PTS_WRAP

PMT_PID = 0x1000
VIDEO_PID = 0x100
#: stream_type of H.264 (ISO/IEC 13818-1 table 2-34).
H264_STREAM_TYPE = 0x1B
#: PTS of a segment's first picture: a second in, as muxers do, so that
#: nothing before it wraps below zero.
FIRST_PTS = PTS_CLOCK
#: Seconds between two pictures' capture times beyond which the clock is
#: taken to have been set, not the camera to have paused.
MAX_GAP = 60.0


def crc32_mpeg(data):
    """The CRC of PSI sections (MPEG-2: polynomial 0x04C11DB7, not reflected)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _section(table_id, table_id_extension, body):
    # section_syntax_indicator 1, '0', reserved '11', section_length (the
    # rest, CRC included); version 0, current_next 1; section 0 of 0.
    length = 5 + len(body) + 4
    head = bytes([table_id, 0xB0 | (length >> 8), length & 0xFF,
                  table_id_extension >> 8, table_id_extension & 0xFF, 0xC1, 0, 0])
    section = head + body
    return section + crc32_mpeg(section).to_bytes(4, "big")


def _psi_packet(pid, section):
    # payload_unit_start, pointer_field 0, the section, stuffing 0xFF.
    head = bytes([0x47, 0x40 | (pid >> 8), pid & 0xFF, 0x10, 0])
    return (head + section).ljust(PACKET, b"\xff")


#: Program 1 in the PMT at PMT_PID.
PAT = _section(0x00, 1, bytes([0, 1, 0xE0 | (PMT_PID >> 8), PMT_PID & 0xFF]))
#: The PCR on the video PID; one H.264 stream, no descriptors.
PMT = _section(0x02, 1, bytes([
    0xE0 | (VIDEO_PID >> 8), VIDEO_PID & 0xFF, 0xF0, 0,
    H264_STREAM_TYPE, 0xE0 | (VIDEO_PID >> 8), VIDEO_PID & 0xFF, 0xF0, 0]))
TABLES = _psi_packet(0, PAT) + _psi_packet(PMT_PID, PMT)


def _timestamp(marker, value):
    """A PTS field (5 bytes): 4 bits C{marker}, 33 bits of C{value}."""
    return bytes([
        (marker << 4) | ((value >> 29) & 0x0E) | 1,
        (value >> 22) & 0xFF, ((value >> 14) & 0xFE) | 1,
        (value >> 7) & 0xFF, ((value << 1) & 0xFE) | 1])


def _pcr(value):
    """An adaptation field's PCR (6 bytes): base C{value}, extension 0."""
    return bytes([(value >> 25) & 0xFF, (value >> 17) & 0xFF, (value >> 9) & 0xFF,
                  (value >> 1) & 0xFF, ((value & 1) << 7) | 0x7E, 0])


class H264Muxer:
    """Access units in, MPEG-TS out (L{write}); one per segment."""

    def __init__(self, framerate):
        self.frame = 1 / float(framerate)
        self.counter = {0: 0, PMT_PID: 0, VIDEO_PID: 0}
        self.pictures = 0
        self.first = None   # capture time of the first picture (None: unknown)
        self.last = 0.0     # the last picture's time, from the first

    def _header(self, pid, start, adaptation, payload_size):
        counter = self.counter[pid]
        self.counter[pid] = (counter + 1) & 0x0F
        control = 0x30 if adaptation is not None else 0x10
        head = bytes([0x47, (0x40 if start else 0) | (pid >> 8), pid & 0xFF, control | counter])
        if adaptation is None:
            return head
        return head + adaptation

    def _tables(self):
        out = bytearray(TABLES)
        for offset, pid in ((3, 0), (PACKET + 3, PMT_PID)):
            out[offset] = 0x10 | self.counter[pid]
            self.counter[pid] = (self.counter[pid] + 1) & 0x0F
        return bytes(out)

    def time_of(self, capture_time):
        """Seconds from the segment's first picture to this one: from the
        capture times; one frame on where a time is missing, goes back, or
        jumps more than L{MAX_GAP} (the clock was set)."""
        self.pictures += 1
        if self.pictures == 1:
            self.first = capture_time
            return 0.0
        at = None
        if capture_time is not None and self.first is not None:
            at = capture_time - self.first
        if at is None or not self.last < at <= self.last + MAX_GAP:
            at = self.last + self.frame
        self.last = at
        return at

    def write(self, access_unit, keyframe, capture_time):
        """The TS packets of one access unit (Annex B bytes) captured at
        C{capture_time} (seconds since the epoch, or None)."""
        pts = (FIRST_PTS + round(self.time_of(capture_time) * PTS_CLOCK)) % PTS_WRAP
        header = _timestamp(0x2, pts)
        pes_length = 3 + len(header) + len(access_unit)
        pes = (b"\x00\x00\x01\xe0"
               + (pes_length if pes_length <= 0xFFFF else 0).to_bytes(2, "big")
               + bytes([0x80, 0x80, len(header)]) + header + access_unit)
        out = [self._tables()] if keyframe or self.pictures == 1 else []
        # The first packet: an adaptation field with the PCR (the picture's
        # time; a random access point at a keyframe).
        flags = 0x10 | (0x40 if keyframe else 0)
        adaptation = bytes([7, flags]) + _pcr(pts)
        at = 0
        start = True
        while at < len(pes):
            room = PACKET - 4 - (len(adaptation) if adaptation is not None else 0)
            piece = pes[at:at + room]
            if len(piece) < room:  # the last packet: padded in its adaptation field
                pad = room - len(piece)
                if adaptation is None:
                    adaptation = (bytes([pad - 1]) + (b"\x00" + b"\xff" * (pad - 2)
                                                      if pad >= 2 else b""))
                else:
                    adaptation = (bytes([adaptation[0] + pad]) + adaptation[1:]
                                  + b"\xff" * pad)
            out.append(self._header(VIDEO_PID, start, adaptation, len(piece)) + piece)
            at += len(piece)
            start = False
            adaptation = None
        return b"".join(out)
