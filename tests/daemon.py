"""Run the real daemon (``twistd -n pistream``) in a child process for tests.

Both ports are bound to 127.0.0.1 on free ports; the numbers are read from
the start-up log lines ("HTTP server on port N", "websockets server on port N").
Every wait is bounded in time.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twistd_command():
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Daemon:
    """One running ``twistd -n pistream``; use as a context manager."""

    #: Every daemon started, so that none outlives the test session (conftest.py).
    started = []

    def __init__(self, *args, camera="test", codec="mpeg1", start_timeout=30, env=None,
                 prelude=None):
        """
        @param codec: the C{--codec} to give where C{args} give none (most
            end-to-end tests check MPEG-1 behaviour, which is not the
            daemon's default); C{None} leaves the daemon's default.
        @param env: extra environment variables; a C{PYTHONPATH} given here
            goes before the checkout's.
        @param prelude: Python code the daemon's process runs before twistd
            (to shorten a timeout that has no option, say).
        """
        self.extra_env = dict(env or {})
        self.prelude = prelude
        self.args = [
            "--camera", camera,
            "--http", "tcp:0:interface=127.0.0.1",
            "--ws-port", "tcp:0:interface=127.0.0.1",
            *args,
        ]
        if codec is not None and not any(a == "--codec" or a.startswith("--codec=")
                                         for a in args):
            self.args += ["--codec", codec]
        self.start_timeout = start_timeout
        self.lines = []
        self._read_all = False
        self._changed = threading.Condition()
        self.process = None
        self.http_port = None
        self.ws_port = None

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.http_port}/"

    def command(self):
        """The command line, and the keyword arguments of Popen that go with it."""
        if self.prelude:
            start = [sys.executable, "-c",
                     self.prelude + "\nfrom twisted.scripts.twistd import run\nrun()"]
        else:
            start = twistd_command()
        return start + ["-n", "--pidfile=", "pistream"] + self.args, \
            {"cwd": ROOT, "env": self.environment()}

    def environment(self):
        env = dict(os.environ)
        extra = dict(self.extra_env)
        paths = [p for p in (extra.pop("PYTHONPATH", None), ROOT, env.get("PYTHONPATH")) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def run_to_exit(self, timeout=30):
        """Run a daemon expected to refuse to start; its CompletedProcess (text)."""
        command, how = self.command()
        return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, text=True, **how)

    def start(self):
        command, how = self.command()
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, **how,
        )
        Daemon.started.append(self)
        threading.Thread(target=self._read, daemon=True).start()
        http = self.wait_for(r"HTTP server on port (\d+)", self.start_timeout)
        self.http_port = int(http.group(1))
        ws = self.search(r"websockets server on port (\d+)")
        self.ws_port = int(ws.group(1)) if ws else None
        return self

    def _read(self):
        for raw in self.process.stdout:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._read_all = True
            self._changed.notify_all()

    def output(self):
        with self._changed:
            return "\n".join(self.lines)

    def search(self, pattern, start=0):
        with self._changed:
            for line in self.lines[start:]:
                match = re.search(pattern, line)
                if match:
                    return match
        return None

    def wait_for(self, pattern, timeout=10, start=0):
        """The first log line from index C{start} matching C{pattern}, waiting up to C{timeout}s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None and not self._more_to_read():
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {timeout}s; "
                        f"daemon {'exited ' + str(self.process.returncode) if self.process.poll() is not None else 'running'}; "
                        f"output:\n" + "\n".join(self.lines[-60:])
                    )
                self._changed.wait(min(remaining, 0.5))

    def _more_to_read(self):
        # Until the reader has met the end of the output: a daemon that has
        # exited may still have lines in the pipe that are not read yet.
        return not self._read_all

    def pids(self):
        """This daemon's process id and its children's (from /proc)."""
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                children.append(int(entry))
        return children

    def stop(self, signum=signal.SIGTERM, timeout=10):
        """Signal the daemon and wait for it; returns (exit code, seconds taken)."""
        if self.process.poll() is not None:
            return self.process.returncode, 0.0
        started = time.monotonic()
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
            raise AssertionError(f"daemon did not exit within {timeout}s of signal {signum}")
        return code, time.monotonic() - started

    def kill(self):
        """Kill the daemon's whole process group, if it still runs."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(5)

    def __enter__(self):
        return self if self.process is not None else self.start()

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop(timeout=10)
            finally:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return False
