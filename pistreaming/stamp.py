"""A machine-readable time stamp drawn into the picture, for measuring latency.

The test pattern draws, at the top left of every frame, a strip of black and
white 16x16 blocks (one per bit, aligned to MPEG-1's macroblocks, so they
survive compression) that says when the frame was captured and which frame
it is.  Whoever sees the picture (ffmpeg's decoder in the tests, the page's
canvas in bench/latency) reads the bits back and knows how old the picture is.

Layout, in reading order (left to right, then the next row of blocks):

    marker   2 bits   1, 0 (tells a stamp from anything else)
    time    32 bits   capture time in milliseconds since the epoch, mod 2**32
    frame   16 bits   frame number, mod 2**16
    check    8 bits   CRC-8 of the 6 bytes of time and frame

Bits are written most significant first; 1 is white (luma 235), 0 black (16).
The strip is ``columns`` blocks wide (at most 32, fewer for narrow pictures)
and as many rows as it takes.  bench/latency carries the same reader in
JavaScript.
"""

from dataclasses import dataclass

BLOCK = 16
MARKER = (1, 0)
BITS = len(MARKER) + 32 + 16 + 8
MAX_COLUMNS = 32
BLACK, WHITE = 16, 235
THRESHOLD = (BLACK + WHITE) // 2


def crc8(data):
    """CRC-8 (polynomial 0x07, initial value 0)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


@dataclass(frozen=True)
class Stamp:
    millis: int      # capture time in ms since the epoch, mod 2**32
    frame: int       # frame number, mod 2**16

    @classmethod
    def at(cls, seconds, frame):
        return cls(int(round(seconds * 1000)) % 2**32, frame % 2**16)

    def bits(self):
        payload = self.millis.to_bytes(4, "big") + self.frame.to_bytes(2, "big")
        value = int.from_bytes(payload + bytes([crc8(payload)]), "big")
        return list(MARKER) + [(value >> (55 - i)) & 1 for i in range(56)]

    def seconds_near(self, reference):
        """The full capture time (s since the epoch) closest to C{reference}."""
        ref_ms = int(reference * 1000)
        base = ref_ms - ref_ms % 2**32
        candidates = (base - 2**32 + self.millis, base + self.millis, base + 2**32 + self.millis)
        return min(candidates, key=lambda ms: abs(ms - ref_ms)) / 1000


def layout(width, height):
    """(columns, rows) of the strip for a picture of this size, or None if it
    does not fit in the picture's top quarter."""
    columns = min(MAX_COLUMNS, width // BLOCK)
    if columns < 2:
        return None
    rows = -(-BITS // columns)
    if rows * BLOCK > height // 4:
        return None
    return columns, rows


def draw(luma, stride, width, height, stamp):
    """Draw C{stamp} into the luma plane C{luma} (a bytearray, C{stride}
    bytes a row).  Returns False if the picture is too small for it."""
    shape = layout(width, height)
    if shape is None:
        return False
    columns, rows = shape
    white, black = bytes([WHITE]) * BLOCK, bytes([BLACK]) * BLOCK
    bits = stamp.bits() + [0] * (columns * rows - BITS)
    for row in range(rows):
        # One line of this row of blocks, then copied into its 16 lines.
        line = b"".join(white if bit else black
                        for bit in bits[row * columns:(row + 1) * columns])
        if row == rows - 1:  # the last row's unused blocks keep the picture
            used = BITS - row * columns
            line = line[:used * BLOCK]
        for y in range(row * BLOCK, (row + 1) * BLOCK):
            start = y * stride
            luma[start:start + len(line)] = line
    return True


def read(luma, stride, width, height):
    """The stamp in a (decoded) luma plane, or None if there is none or it
    does not check out.  Each bit is the mean of its block's middle 8x8."""
    shape = layout(width, height)
    if shape is None:
        return None
    columns, _ = shape
    bits = []
    for i in range(BITS):
        x = (i % columns) * BLOCK + 4
        y0 = (i // columns) * BLOCK + 4
        total = 0
        for y in range(y0, y0 + 8):
            start = y * stride + x
            total += sum(luma[start:start + 8])
        bits.append(1 if total / 64 > THRESHOLD else 0)
    if tuple(bits[:2]) != MARKER:
        return None
    value = 0
    for bit in bits[2:]:
        value = (value << 1) | bit
    data = value.to_bytes(7, "big")
    if crc8(data[:6]) != data[6]:
        return None
    return Stamp(int.from_bytes(data[:4], "big"), int.from_bytes(data[4:6], "big"))
