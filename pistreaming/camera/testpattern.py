"""A built-in frame source for machines without a camera.

It produces the same padded raw YUV420 frames picamera does (width rounded up
to 32, height to 16), through the same ``run(output, stopping)`` loop, so the
rest of the daemon cannot tell it from a camera.  The picture moves (diagonal
stripes drifting, a bouncing box) and shows a clock and a frame counter in
large seven-segment digits.  At the top left, a strip of black and white
blocks says, machine-readably, when the frame was captured and its number
(pistreaming.stamp), so that latency can be measured on what a viewer sees.

Everything is drawn with slice copies of precomputed byte strings, so it is
cheap: 1280x720 at 30 fps takes a few percent of one core.
"""

import time

from pistreaming import stamp

BLACK, WHITE = 16, 235  # video-range luma

#: Segments lit for each glyph: a (top), b (top right), c (bottom right),
#: d (bottom), e (bottom left), f (top left), g (middle).
SEGMENTS = {
    "0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg",
    "5": "acdfg", "6": "acdefg", "7": "abc", "8": "abcdefg", "9": "abcdfg",
    "-": "g", " ": "",
}


class TestPattern:
    """A moving test picture with a visible clock."""

    name = "test"
    __test__ = False  # not a test case, whatever pytest thinks of the name

    def __init__(self, picture, now=time.time, monotonic=time.monotonic):
        """
        @param picture: the L{pistreaming.camera.picture.Picture} to draw.
        """
        self.picture = picture
        self.geometry = picture.geometry
        self.framerate = picture.framerate
        self._now = now
        self._monotonic = monotonic
        self._prepare()

    def describe(self):
        return f"built-in test pattern {self.geometry.width}x{self.geometry.height}"

    # -- drawing -----------------------------------------------------------

    def _prepare(self):
        g = self.geometry
        w, h = g.width, g.height
        self._period = 64
        ramp = bytes(40 + 120 * abs(i - 32) // 32 for i in range(self._period))
        self._stripes = ramp * ((w + self._period) // self._period + 2)
        # Chroma: six colour bars, static.
        cw, ch = w // 2, h // 2
        bars_u = (90, 240, 54, 202, 16, 166)
        bars_v = (240, 110, 34, 222, 146, 16)
        row_u = bytearray(cw)
        row_v = bytearray(cw)
        for x in range(cw):
            bar = min(x * 6 // cw, 5)
            row_u[x] = bars_u[bar]
            row_v[x] = bars_v[bar]
        # The text band gets neutral chroma, so the digits read black and white.
        self._digit_h = max(16, (h // 8) // 2 * 2)
        self._digit_w = max(8, self._digit_h // 2 // 2 * 2)
        self._thick = max(2, self._digit_h // 8)
        self._text_top = h - self._digit_h - max(4, h // 24)
        self._text_top -= self._text_top % 2
        band_top = (self._text_top - self._thick * 2) // 2
        # So does the band at the top with the stamp and the frame counter.
        shape = stamp.layout(w, h)
        stamp_bottom = shape[1] * stamp.BLOCK if shape else 0
        self._counter_top = self._thick * 2
        top_band = max(stamp_bottom, self._counter_top + self._digit_h + self._thick * 2)
        top_band = (top_band + 1) // 2
        grey = bytes([128]) * cw
        u_rows = [bytes(row_u)] * ch
        v_rows = [bytes(row_v)] * ch
        for y in list(range(0, min(top_band, ch))) + list(range(max(0, band_top), ch)):
            u_rows[y] = grey
            v_rows[y] = grey
        self._u_rows = self._flip_rows(u_rows)
        self._v_rows = self._flip_rows(v_rows)
        self._box = max(16, min(w, h) // 6)
        self._box_row = bytes([WHITE]) * self._box

    def _flip_rows(self, rows):
        if self.picture.hflip:
            rows = [r[::-1] for r in rows]
        if self.picture.vflip:
            rows = rows[::-1]
        return rows

    def _fill(self, luma, x, y, w, h, value):
        width = self.geometry.width
        x0, y0 = max(0, x), max(0, y)
        x1 = min(width, x + w)
        y1 = min(self.geometry.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        piece = bytes([value]) * (x1 - x0)
        for row in range(y0, y1):
            start = row * width + x0
            luma[start:start + x1 - x0] = piece

    def _draw_glyph(self, luma, char, x, y):
        dw, dh, t = self._digit_w, self._digit_h, self._thick
        half = dh // 2
        rects = {
            "a": (x, y, dw, t), "d": (x, y + dh - t, dw, t),
            "g": (x, y + half - t // 2, dw, t),
            "f": (x, y, t, half), "b": (x + dw - t, y, t, half),
            "e": (x, y + half, t, dh - half), "c": (x + dw - t, y + half, t, dh - half),
        }
        if char == ":":
            self._fill(luma, x + dw // 2 - t // 2, y + dh // 4, t, t, WHITE)
            self._fill(luma, x + dw // 2 - t // 2, y + 3 * dh // 4 - t, t, t, WHITE)
            return
        if char == ".":
            self._fill(luma, x + dw // 2 - t // 2, y + dh - t, t, t, WHITE)
            return
        for segment in SEGMENTS.get(char, ""):
            self._fill(luma, *rects[segment], WHITE)

    def _draw_text(self, luma, text, x, y):
        step = self._digit_w + self._thick * 2
        pad = self._thick * 2
        self._fill(luma, x - pad, y - pad, step * len(text) + pad, self._digit_h + 2 * pad, BLACK)
        for i, char in enumerate(text):
            self._draw_glyph(luma, char, x + i * step, y)

    def render(self, number, timestamp):
        """One padded raw YUV420 frame: frame C{number}, stamped C{timestamp}."""
        g = self.geometry
        w, h = g.width, g.height
        shift = (number * 2) % self._period
        stripes = self._stripes
        luma = bytearray(b"".join(
            stripes[(y + shift) % self._period:(y + shift) % self._period + w]
            for y in range(h)
        ))
        # A box bouncing left and right across the upper half.
        span = max(1, w - self._box)
        pos = (number * 4) % (2 * span)
        bx = pos if pos < span else 2 * span - pos
        by = h // 4
        for row in range(by, min(h, by + self._box)):
            luma[row * w + bx:row * w + bx + self._box] = self._box_row
        # The clock: HH:MM:SS.hh and the frame number.
        local = time.localtime(timestamp)
        hundredths = int((timestamp % 1) * 100)
        text = time.strftime("%H:%M:%S", local) + f".{hundredths:02d}"
        x = max(self._thick * 2, (w - len(text) * (self._digit_w + self._thick * 2)) // 2)
        self._draw_text(luma, text, x, self._text_top)
        counter = f"{number % 100000:5d}"
        step = self._digit_w + self._thick * 2
        self._draw_text(luma, counter, w - step * len(counter) - self._thick,
                        self._counter_top)
        if self.picture.vflip or self.picture.hflip:
            rows = self._flip_rows([luma[y * w:(y + 1) * w] for y in range(h)])
            luma = bytearray(b"".join(rows))
        # The stamp goes on last, unflipped: it is for machines, not the scene.
        stamp.draw(luma, w, w, h, stamp.Stamp.at(timestamp, number))
        rows = [luma[y * w:(y + 1) * w] for y in range(h)]
        return self._pad(rows, w, h, g.padded_width, g.padded_height, BLACK) + \
            self._pad(self._u_rows, w // 2, h // 2, g.padded_width // 2, g.padded_height // 2, 128) + \
            self._pad(self._v_rows, w // 2, h // 2, g.padded_width // 2, g.padded_height // 2, 128)

    @staticmethod
    def _pad(rows, w, h, pw, ph, value):
        if pw != w:
            pad = bytes([value]) * (pw - w)
            pieces = []
            for row in rows:
                pieces.append(row)
                pieces.append(pad)
        else:
            pieces = list(rows)
        if ph != h:
            pieces.append(bytes([value]) * (pw * (ph - h)))
        return b"".join(pieces)

    # -- the capture loop --------------------------------------------------

    def run(self, output, stopping):
        """Write frames to C{output} at the frame rate until C{stopping} is set.

        Runs on a thread of its own.  If drawing falls behind, the schedule
        resets instead of bursting to catch up.
        """
        interval = 1.0 / float(self.framerate)
        number = 0
        due = self._monotonic()
        while not stopping.is_set():
            captured = self._now()
            output.write(self.render(number, captured), captured_at=captured)
            number += 1
            due += interval
            delay = due - self._monotonic()
            if delay < -interval:
                due = self._monotonic()
                delay = 0
            if delay > 0:
                stopping.wait(delay)
