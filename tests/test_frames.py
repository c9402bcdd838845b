"""The padding and crop arithmetic for picamera's raw YUV420 frames."""

import pytest

from pistreaming.frames import FrameGeometry, stream_header


@pytest.mark.parametrize("size,padded", [
    ((640, 480), (640, 480)),
    ((800, 600), (800, 608)),
    ((1296, 730), (1312, 736)),
    ((1280, 720), (1280, 720)),
    ((1920, 1080), (1920, 1088)),
    ((100, 50), (128, 64)),
])
def test_padded_size_rounds_width_to_32_and_height_to_16(size, padded):
    g = FrameGeometry(*size)
    assert (g.padded_width, g.padded_height) == padded


def test_frame_layout_is_y_then_quarter_size_u_and_v():
    g = FrameGeometry(800, 600)
    assert g.y_size == 800 * 608
    assert g.uv_size == 400 * 304
    assert g.frame_size == 800 * 608 * 3 // 2


def test_crop_recovers_the_real_picture_from_the_top_left():
    assert FrameGeometry(1296, 730).crop_filter == "crop=1296:730:0:0"


def test_stream_header_is_magic_then_big_endian_size():
    assert stream_header(640, 480) == b"jsmp\x02\x80\x01\xe0"
    assert stream_header(1296, 730) == b"jsmp\x05\x10\x02\xda"
    assert len(stream_header(4095, 4095)) == 8
