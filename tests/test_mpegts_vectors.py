"""pistreaming.mpegts and the page's own MPEG-TS parsing (in
pistreaming/static/pistream.js, run under Node.js) against the same test
vectors (tests/vectors/mpegts.json): where pictures begin, which ones a
decoder can start at, and how the stream is cut."""

import json
import os
import shutil
import subprocess

import pytest

from pistreaming.mpegts import PACKET, PictureSplitter, video_pes_start
from pistreaming.web import STATIC

HERE = os.path.join(os.path.dirname(__file__), "vectors")
with open(os.path.join(HERE, "mpegts.json"), encoding="utf-8") as f:
    VECTORS = json.load(f)["vectors"]
NAMES = [v["name"] for v in VECTORS]


def packets(vector):
    return [bytes.fromhex(p) for message in vector["messages"] for p in message]


@pytest.mark.parametrize("vector", VECTORS, ids=NAMES)
def test_mpegts_finds_where_pictures_begin(vector):
    found = []
    for i, packet in enumerate(packets(vector)):
        start = video_pes_start(packet)
        if start is not None:
            found.append([i, start[1]])
    assert found == vector["pictures"]


@pytest.mark.parametrize("vector", VECTORS, ids=NAMES)
def test_mpegts_cuts_the_stream_where_pictures_begin(vector):
    splitter = PictureSplitter()
    chunks = []
    for message in vector["messages"]:
        chunks += splitter.feed(b"".join(bytes.fromhex(p) for p in message))
    assert splitter.held() == b""
    assert b"".join(c.data for c in chunks) == b"".join(packets(vector))
    assert all(c.picture for c in chunks)
    cut, at = [], 0
    for chunk in chunks:
        cut.append([at, len(chunk) // PACKET, chunk.keyframe, chunk.pts])
        at += len(chunk) // PACKET
    assert cut == vector["chunks"]


@pytest.fixture(scope="module")
def page():
    """What the page's parsing finds in each vector."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("no Node.js here to run the page's script")
    out = subprocess.run(
        [node, os.path.join(HERE, "page_parsing.js"), os.path.join(STATIC, "pistream.js"),
         os.path.join(HERE, "mpegts.json")],
        check=True, capture_output=True, timeout=60).stdout
    return {result["name"]: result for result in json.loads(out)}


@pytest.mark.parametrize("vector", VECTORS, ids=NAMES)
def test_the_page_finds_where_pictures_begin_and_which_it_can_start_at(page, vector):
    found = page[vector["name"]]
    assert found["pictures"] == vector["pictures"]
    assert found["decodable"] == vector["decodable"]
    assert found["first_picture_end"] == vector["first_picture_end"]
