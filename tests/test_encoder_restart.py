"""The encoder's restarts, driven on a Clock: an ffmpeg that cannot even be
started (its executable gone during an upgrade, no file descriptors left)
is said, retried with back-off until it starts again, and the state reaches
whoever listens (the page, through the status channel)."""

import errno

from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.python import failure
from twisted.internet.error import ProcessTerminated

from pistreaming.encoder import Encoder
from pistreaming.mpegts import Chunk


class SpawningClock(task.Clock):
    """A Clock whose spawnProcess fails with C{errors} (in turn) and then
    records the process protocols it was given."""

    def __init__(self, errors=()):
        super().__init__()
        self.errors = list(errors)
        self.spawned = []
        self.attempts = 0

    def spawnProcess(self, proto, executable, args, env=None, **kwargs):
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        self.spawned.append(proto)
        return proto


def logged(events):
    def observer(event):
        if event.get("log_namespace", "").startswith("pistreaming"):
            events.append(event)
    return observer


def make(errors, executable="/bin/sh"):
    clock = SpawningClock(errors)
    states = []
    encoder = Encoder([executable, "-i", "-"], lambda chunk: None, clock,
                      on_state=lambda state, why: states.append((state, why)))
    return clock, encoder, states


def test_an_ffmpeg_that_cannot_be_started_is_retried_until_it_starts():
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory")
    no_fds = OSError(errno.EMFILE, "Too many open files")
    clock, encoder, states = make([gone, gone, no_fds, gone])
    events = []
    observer = logged(events)
    globalLogPublisher.addObserver(observer)
    try:
        encoder.startService()  # first try: fails at once, does not raise
        assert clock.attempts == 1 and encoder.process is None
        assert states == [("unavailable",
                           "cannot start /bin/sh: no such file or directory")]
        # The back-off goes on (0.25 s doubling) until it starts.
        waits = []
        while not clock.spawned and len(waits) < 10:
            waits.append(clock.getDelayedCalls()[0].getTime() - clock.seconds())
            clock.advance(waits[-1])
        assert waits == [0.25, 0.5, 1.0, 2.0]
        assert clock.attempts == 5 and encoder.restarts == 4
        assert [why for _, why in states] == [
            "cannot start /bin/sh: no such file or directory",
            "cannot start /bin/sh: too many open files",
            "cannot start /bin/sh: no such file or directory"]
        text = [e["log_format"].format(**e) for e in events if "log_format" in e]
        assert any("cannot start /bin/sh: no such file or directory; trying again "
                   "in 0.25s" in line for line in text), text
        # ffmpeg runs again; the state is "ok" once pictures come out.
        proto = clock.spawned[0]
        encoder._encoded(proto, Chunk(b"\x47" * 188, picture=True, keyframe=True, pts=0.0))
        assert states[-1] == ("ok", None)
    finally:
        globalLogPublisher.removeObserver(observer)
        encoder.stopService()
    assert not clock.getDelayedCalls()


def test_a_crashed_ffmpeg_says_why_and_is_unavailable_until_pictures_return():
    clock, encoder, states = make([])
    encoder.startService()
    proto = clock.spawned[0]
    proto.started_at = clock.seconds()
    proto.stderr = b"[video4linux2 @ 0x1] Cannot open video device /dev/video0: No such device\n"
    proto.processEnded(failure.Failure(ProcessTerminated(exitCode=1)))
    assert states == [("unavailable", "ffmpeg exited with code 1: [video4linux2 @ 0x1] "
                                      "Cannot open video device /dev/video0: No such device")]
    clock.advance(0.25)
    assert len(clock.spawned) == 2
    encoder._encoded(clock.spawned[1], Chunk(b"\x47" * 188, picture=True, keyframe=True, pts=0.0))
    assert states[-1] == ("ok", None)
    encoder.stopService()


def test_stopping_during_the_back_off_leaves_nothing_pending():
    clock, encoder, states = make([FileNotFoundError(errno.ENOENT, "No such file or directory")])
    encoder.startService()
    assert clock.getDelayedCalls()
    encoder.stopService()
    assert not clock.getDelayedCalls()


def test_a_missing_executable_is_said_as_such_before_any_spawn(tmp_path):
    # Where Twisted forks (22.4), spawnProcess itself would not fail: the
    # child would exit 1 after its exec failed.
    gone = str(tmp_path / "ffmpeg")
    clock, encoder, states = make([], executable=gone)
    encoder.startService()
    assert clock.attempts == 0
    assert states == [("unavailable", f"cannot start {gone}: no such file or directory")]
    (tmp_path / "ffmpeg").symlink_to("/bin/sh")
    clock.advance(0.25)
    assert clock.attempts == 1 and len(clock.spawned) == 1
    encoder.stopService()
