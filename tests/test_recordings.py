"""/recordings/ (pistreaming.recordings), in-process: the daemon built with
--record on a SpawningReactor, its recorder's disk work done at once on a
real directory.  The listing in HTML and JSON, a segment served whole and
by Range, and nothing but the recordings: other names, traversal in any
spelling, symbolic links and directories get 404; the password and the
Host check hold as for every page.  The real daemon:
tests/test_recording_daemon.py."""

import json
import os
import re
import tempfile

from twisted.internet import _producer_helpers, task

from pistreaming import recorder as recorder_module
from pistreaming.auth import hash_password
from tests.fakes.inmemory import SyncThreadPool
from tests.test_service import PasswordTests, ServiceCase
from tests.test_snapshot import answer as whole_answer, get

#: 2026-12-05T10:20:30Z and 10:30:30Z.
FIRST, SECOND = "20261205T102030Z.mp4", "20261205T103030Z.mp4"
FIRST_START = 1796466030


class RecordingsCase(ServiceCase):
    def setUp(self):
        super().setUp()
        self.patch(recorder_module, "ThreadPool", SyncThreadPool)
        # A file's body is written by a pull producer that Twisted's HTTP
        # channel drives with a cooperator: on the test's clock here.
        cooperator = task.Cooperator(scheduler=lambda work: self.reactor.callLater(0, work))
        self.patch(_producer_helpers, "cooperate", cooperator.cooperate)
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.directory = directory.name
        self.recordings = os.path.join(self.directory, "recordings")
        os.makedirs(self.recordings)
        self.content = bytes(range(256)) * 40  # 10240 bytes
        for name, data, length in ((FIRST, self.content, 600), (SECOND, b"x" * 3000, 312)):
            path = os.path.join(self.recordings, name)
            with open(path, "wb") as f:
                f.write(data)
            start = FIRST_START + (600 if name == SECOND else 0)
            os.utime(path, (start + length, start + length))

    def answer(self, transport):
        for _ in range(50):
            self.reactor.advance(0)
        return whole_answer(transport)

    def build_recording(self, *args, codec="h264"):
        service = self.build("--codec", codec, "--record", self.recordings, *args)
        self.start()  # the recorder's first pass lists the directory
        return service


class ListingTests(RecordingsCase):
    def test_json_lists_each_segment_with_its_time_length_and_size(self):
        service = self.build_recording()
        status, headers, body = self.answer(get(service.site, b"/recordings/?format=json"))
        assert (status, headers[b"content-type"]) == (200, b"application/json")
        document = json.loads(body)
        assert (document["container"], document["content_type"],
                document["plays_in_browsers"]) == ("fragmented MP4", "video/mp4", True)
        assert document["recordings"] == [
            {"name": FIRST, "url": FIRST, "start": "2026-12-05T10:20:30Z",
             "start_unix": FIRST_START, "length": 600.0, "size": 10240, "recording": False},
            {"name": SECOND, "url": SECOND, "start": "2026-12-05T10:30:30Z",
             "start_unix": FIRST_START + 600, "length": 312.0, "size": 3000,
             "recording": False}]
        assert document["state"] == "starting"  # no keyframe yet

    def test_the_page_lists_them_newest_first_with_players_for_mp4(self):
        service = self.build_recording()
        status, headers, body = self.answer(get(service.site, b"/recordings/"))
        assert (status, headers[b"content-type"]) == (200, b"text/html; charset=utf-8")
        page = body.decode()
        rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>", page)
        assert rows == [("2026-12-05T10:30:30Z", "5:12", "3 kB"),
                        ("2026-12-05T10:20:30Z", "10:00", "10 kB")]
        assert f'<a href="{FIRST}" download>download</a>' in page
        assert f'<a href="?play={FIRST}">play</a>' in page
        status, _, body = self.answer(get(service.site, b"/recordings/?play=" + FIRST.encode()))
        assert status == 200 and f'src="{FIRST}"></video>' in body.decode()
        # A page this strict policy allows: no script, no inline style.
        assert "<script" not in page and "style" not in page

    def test_mpeg_ts_is_for_download_only(self):
        for name in (FIRST, SECOND):
            os.rename(os.path.join(self.recordings, name),
                      os.path.join(self.recordings, name[:-4] + ".ts"))
        service = self.build_recording(codec="mpeg1")
        status, _, body = self.answer(get(service.site, b"/recordings/"))
        assert status == 200 and "play" not in body.decode().split("</h1>")[1].split(
            "<table>")[1] and "VLC" in body.decode()
        assert self.answer(get(service.site, b"/recordings/?play=" + FIRST[:-4].encode()
                          + b".ts"))[0] == 404
        document = json.loads(self.answer(get(service.site, b"/recordings/?format=json"))[2])
        assert (document["content_type"], document["plays_in_browsers"]) == (
            "video/mp2t", False)

    def test_a_segment_is_served_whole_and_by_range(self):
        service = self.build_recording()
        status, headers, body = self.answer(get(service.site, b"/recordings/" + FIRST.encode()))
        assert (status, headers[b"content-type"], body) == (200, b"video/mp4", self.content)
        assert headers[b"accept-ranges"] == b"bytes"
        status, headers, body = self.answer(get(service.site, b"/recordings/" + FIRST.encode(),
                                           b"Range: bytes=1000-1099\r\n"))
        assert (status, headers[b"content-range"], body) == (
            206, b"bytes 1000-1099/10240", self.content[1000:1100])
        status, headers, body = self.answer(get(service.site, b"/recordings/" + FIRST.encode(),
                                           b"Range: bytes=-10\r\n"))
        assert (status, body) == (206, self.content[-10:])
        status, headers, _ = self.answer(get(service.site, b"/recordings/" + FIRST.encode(),
                                        b"Range: bytes=20000-\r\n"))
        assert status == 416
        status, headers, body = self.answer(get(service.site, b"/recordings/" + FIRST.encode(),
                                           method=b"HEAD"))
        assert (status, headers[b"content-length"], body) == (200, b"10240", b"")

    def test_nothing_but_the_recordings_is_served(self):
        os.symlink("/etc/passwd", os.path.join(self.recordings, "20261205T110000Z.mp4"))
        os.mkdir(os.path.join(self.recordings, "20261205T120000Z.mp4"))
        with open(os.path.join(self.recordings, "notes.txt"), "w") as f:
            f.write("private")
        service = self.build_recording()
        for path in (b"/recordings/notes.txt", b"/recordings/20261205T110000Z.mp4",
                     b"/recordings/20261205T120000Z.mp4", b"/recordings/../stats.json",
                     b"/recordings/%2e%2e/stats.json", b"/recordings/..%2fnotes.txt",
                     b"/recordings/" + FIRST.encode() + b"/x",
                     b"/recordings/" + FIRST.encode() + b"%00",
                     b"/recordings/" + FIRST.encode() + b"%0a",
                     b"/recordings/%2fetc%2fpasswd", b"/recordings//" + FIRST.encode(),
                     b"/recordings/20261205T130000Z.mp4",  # not there at all
                     b"/recordings/" + FIRST.upper().encode()):
            status, headers, body = self.answer(get(service.site, path))
            assert (status, body) == (404, b"404 not found\n"), path
        # the listing shows none of them either
        listed = json.loads(self.answer(get(service.site, b"/recordings/?format=json"))[2])
        assert [r["name"] for r in listed["recordings"]] == [FIRST, SECOND]

    def test_bad_requests_get_an_http_error(self):
        service = self.build_recording()
        status, headers, _ = self.answer(get(service.site, b"/recordings"))
        assert (status, headers[b"location"]) == (301, b"recordings/")
        assert self.answer(get(service.site, b"/recordings/?format=xml"))[0] == 400
        assert self.answer(get(service.site, b"/recordings/?play=nothing.mp4"))[0] == 404
        for path in (b"/recordings/", b"/recordings/" + FIRST.encode()):
            status, headers, _ = self.answer(get(service.site, path, method=b"POST"))
            assert (status, headers[b"allow"]) == (405, b"GET, HEAD")

    def test_the_figures_say_what_the_recorder_and_the_snapshot_do(self):
        service = self.build_recording()
        recording = json.loads(self.answer(get(service.site, b"/stats.json"))[2])["recording"]
        assert (recording["state"], recording["segments"], recording["bytes"],
                recording["directory"]) == ("starting", 2, 13240, self.recordings)
        metrics = self.answer(get(service.site, b"/metrics"))[2].decode()
        for line in ('pistream_recording_info{state="starting"} 1.0',
                     "pistream_recording_up 0.0", "pistream_recording_segments 2.0",
                     "pistream_recording_bytes 13240.0", "pistream_snapshot_decodes_total 0.0"):
            assert line in metrics.splitlines(), line

    def test_without_record_there_are_no_recordings(self):
        self.build("--codec", "h264")
        self.start()
        assert self.answer(get(self.service.site, b"/recordings/"))[0] == 404
        assert self.answer(get(self.service.site, b"/recordings/" + FIRST.encode()))[0] == 404


class GuardTests(RecordingsCase):
    def test_the_password_and_the_host_check_hold(self):
        path = os.path.join(self.directory, "passwd")
        with open(path, "w") as f:
            f.write(f"alice:{hash_password('wonder land', iterations=1000)}\n")
        service = self.build_recording("--passwd", path)
        good = b"Authorization: " + PasswordTests.basic("alice", "wonder land").encode() + b"\r\n"
        for page in (b"/recordings/", b"/recordings/?format=json",
                     b"/recordings/" + FIRST.encode(), b"/snapshot.jpg"):
            assert self.answer(get(service.site, page))[0] == 401, page
            assert self.answer(get(service.site, page, good))[0] in (200, 503), page
        channel = get(service.site, b"/recordings/" + FIRST.encode(), good)
        assert self.answer(channel)[0] == 200
        evil = service.site.buildProtocol(None)
        from twisted.internet.testing import StringTransport
        transport = StringTransport()
        evil.makeConnection(transport)
        evil.dataReceived(b"GET /recordings/" + FIRST.encode() + b" HTTP/1.1\r\n"
                          b"Host: evil.example\r\n" + good + b"\r\n")
        assert self.answer(transport)[0] == 421
