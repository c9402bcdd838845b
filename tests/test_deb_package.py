"""The Debian package, end to end, on this machine (root on Debian only; it
takes a minute or two, and ``-m "not package"`` leaves it out).

It builds the package from a copy of this tree with ``dpkg-buildpackage -us
-uc -b`` (installing the Build-Depends with ``apt-get build-dep``), runs
lintian on it, installs it with apt, checks the user, the unit and Twisted's
plugin cache, upgrades it over a changed configuration, runs the installed
daemon the way pistreaming.service does (its command line, its defaults file,
its user: this machine has no running systemd) and watches its stream, then
removes and purges it and checks that nothing is left.  Whatever fails, the
package is purged and its user removed at the end.

Each command's time is printed (``-s`` shows them).  While the test runs,
man-db's trigger (which rebuilds the whole manual page index after every
install and removal that touches a manual page, several seconds each) is
off, as ``man-db/auto-update=false`` turns it off; it is turned back on at
the end.  Nothing the test checks depends on that index.
"""

import grp
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import websocket

from pistreaming import __version__
from tests.daemon import ROOT, Daemon
from tests.test_stream import collect, decoded_frames, ffmpeg_children, read_header
from tests.unit import (
    DEFAULTS_VARIABLE, environment_files, expand_command, options_from_help,
    options_missing_from_defaults, parse_environment_file, parse_unit,
)

PACKAGE = USER = "pistreaming"
UNIT = "/lib/systemd/system/pistreaming.service"
DEFAULTS = "/etc/default/pistreaming"
WANTS = "/etc/systemd/system/multi-user.target.wants/pistreaming.service"
SITE = "/usr/lib/python3/dist-packages"
PLUGIN_CACHE = f"{SITE}/twisted/plugins/dropin.cache"
PLAYER = f"{SITE}/pistreaming/static/jsmpg.js"
NPM_PLAYER = "node_modules/@cycjimmy/jsmpeg-player/dist/jsmpeg-player.umd.min.js"
# What root's commands get from sudo on Debian, and what systemd gives a
# service: no pyenv or virtualenv in front of Debian's python3.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where a name containing "pistream" may be left by the package.
SYSTEM_TREES = ("/etc", "/lib", "/usr", "/var/lib")
# An administrator's change to the defaults file: both ports on loopback, on
# free ports (the test reads them from the log).
CHANGED_OPTS = "--http=tcp:0:interface=127.0.0.1 --ws-port=tcp:0:interface=127.0.0.1"
# The unit's StateDirectory=, and where the README says recordings go.
STATE = "/var/lib/pistreaming"
RECORDINGS = f"{STATE}/recordings"


def why_not_here():
    if os.geteuid() != 0:
        return "needs root: it installs and purges a Debian package (CI runs as root)"
    if not os.path.exists("/etc/debian_version") or not shutil.which("apt-get"):
        return "needs Debian (apt-get, dpkg): it builds and installs a .deb"
    return None


NOT_HERE = why_not_here()
pytestmark = [pytest.mark.package,
              pytest.mark.skipif(NOT_HERE is not None, reason=NOT_HERE or "")]


def system_env():
    env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    for name, value in os.environ.items():
        if name.lower() in ("http_proxy", "https_proxy", "no_proxy") \
                or name.lower().startswith("npm_config_"):
            env[name] = value
    return env


def run(command, timeout=600, check=True, **kwargs):
    kwargs.setdefault("env", system_env())
    started = time.monotonic()
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=timeout, **kwargs)
    print(f"{time.monotonic() - started:6.1f} s  {' '.join(command)[:100]}")
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n"
                             f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


def apt_get(*args, cwd=None, timeout=900):
    return run(["apt-get", "-y", "-q", *args], cwd=cwd, timeout=timeout)


#: man-db's trigger does nothing while this file is missing (what
#: "man-db/auto-update=false" in debconf does to it).
MAN_DB_AUTO_UPDATE = "/var/lib/man-db/auto-update"


@contextmanager
def man_db_index_left_alone():
    """man-db's trigger off for the test's own apt and dpkg calls, back on after."""
    aside = MAN_DB_AUTO_UPDATE + ".off-for-a-package-test"
    if not os.path.exists(MAN_DB_AUTO_UPDATE):
        yield
        return
    os.rename(MAN_DB_AUTO_UPDATE, aside)
    try:
        yield
    finally:
        os.rename(aside, MAN_DB_AUTO_UPDATE)


def package_status():
    """dpkg's state of the package: 'installed', 'config-files', ... or None."""
    result = run(["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", PACKAGE],
                 check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    status, _, version = result.stdout.strip().partition(" ")
    return None if status == "not-installed" else (status, version)


def names_containing_pistream():
    found = set()
    for top in SYSTEM_TREES:
        for directory, dirs, files in os.walk(top):
            for name in dirs + files:
                if "pistream" in name:
                    found.add(os.path.join(directory, name))
    return found


def user_exists():
    try:
        pwd.getpwnam(USER)
        return True
    except KeyError:
        return False


def group_exists():
    try:
        grp.getgrnam(USER)
        return True
    except KeyError:
        return False


def clean_up():
    """Purge the package and remove its user, whatever state a failure left."""
    for pid in processes_of_user():
        os.kill(pid, signal.SIGKILL)
    if package_status() is not None:
        run(["dpkg", "--purge", PACKAGE], check=False, timeout=300)
    if user_exists():
        run(["userdel", USER], check=False)
    if group_exists():
        run(["groupdel", USER], check=False)
    shutil.rmtree(STATE, ignore_errors=True)  # made by the tests (build() checks)


def processes_of_user():
    try:
        uid = pwd.getpwnam(USER).pw_uid
    except KeyError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                pass
    return pids


def copy_tree(destination):
    """This tree's files as git sees them (tracked and new, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True)
    if listed.returncode == 0:
        for name in listed.stdout.decode().split("\0"):
            source = os.path.join(ROOT, name)
            if name and os.path.isfile(source):
                os.makedirs(os.path.join(destination, os.path.dirname(name)), exist_ok=True)
                shutil.copy2(source, os.path.join(destination, name))
    else:
        shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "node_modules", "build", "dist", "*.egg-info", "__pycache__",
            ".pybuild", ".pytest_cache", "jsmpg.js"), dirs_exist_ok=True)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    state = package_status()
    if state is not None:
        pytest.fail(f"{PACKAGE} is already on this machine ({' '.join(state)}); this test "
                    f"installs and purges it, so remove it first: apt-get purge {PACKAGE}")
    if os.path.lexists(STATE):
        pytest.fail(f"{STATE} is on this machine (recordings of an earlier install?); "
                    f"this test makes and deletes it, so move it away first")
    before = names_containing_pistream()
    top = tmp_path_factory.mktemp("deb")
    source = top / "pistreaming"
    try:
        copy_tree(source)
        tools = [pkg for cmd, pkg in (("lintian", "lintian"), ("systemd-analyze", "systemd"),
                                      ("setpriv", "util-linux")) if not shutil.which(cmd)]

        def install_build_tools():
            # debian/control's Build-Depends, where dpkg finds some missing
            if run(["dpkg-checkbuilddeps"], cwd=source, check=False).returncode != 0:
                apt_get("build-dep", "./", cwd=source)
            if tools:
                apt_get("install", "--no-install-recommends", *tools)

        try:
            install_build_tools()
        except AssertionError:  # package lists missing or out of date
            apt_get("update")
            install_build_tools()
        started = time.monotonic()
        log = run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, timeout=1200)
        print(f"dpkg-buildpackage took {time.monotonic() - started:.0f} s")
        debs = sorted(top.glob("pistreaming_*_all.deb"))
        assert len(debs) == 1, f"built {debs}:\n{log.stdout[-3000:]}"
        with man_db_index_left_alone():
            try:
                yield SimpleNamespace(top=top, source=source, deb=debs[0], before=before)
            finally:
                clean_up()
    finally:
        clean_up()
        shutil.rmtree(top, ignore_errors=True)


def test_the_package_builds_and_lintian_reports_no_error_or_warning(build):
    assert build.deb.name == f"pistreaming_{__version__}_all.deb"
    # (Overridden tags are left out: with --show-overrides lintian fails on
    # them too.  tests/test_debian.py checks that each override has a reason.)
    result = run(["lintian", "--fail-on", "error,warning", "--display-info", str(build.deb)],
                 check=False, timeout=600)
    report = result.stdout + result.stderr
    print(report)
    assert result.returncode == 0, report
    assert not re.search(r"^[EW]: ", report, re.M), report


def test_the_package_carries_the_player_the_plugin_the_unit_and_the_conffile(build):
    listing = run(["dpkg-deb", "--contents", str(build.deb)]).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for path in (UNIT, DEFAULTS, PLAYER, f"{SITE}/twisted/plugins/pistream_plugin.py",
                 f"{SITE}/pistreaming/static/index.html", f"{SITE}/pistreaming/tap.py",
                 "/usr/share/doc/pistreaming/copyright"):
        assert path in paths, path
    assert not [p for p in paths if "dropin.cache" in p or "node_modules" in p
                or "__pycache__" in p or p.endswith("/twisted/__init__.py")
                or p.endswith("/plugins/__init__.py")]

    fields = {name: run(["dpkg-deb", "--field", str(build.deb), name]).stdout.strip()
              for name in ("Version", "Depends", "Recommends")}
    assert fields["Version"] == __version__
    depends = [d.strip() for d in fields["Depends"].split(",")]
    for needed in ("python3-twisted (>= 22.4)", "python3-autobahn (>= 22.7)", "ffmpeg",
                   "adduser"):
        assert needed in depends, fields["Depends"]
    assert fields["Recommends"] == "python3-picamera2 | python3-picamera"

    control = build.top / "control"
    run(["dpkg-deb", "--control", str(build.deb), str(control)])
    assert (control / "conffiles").read_text().split() == [DEFAULTS]
    assert (control / "triggers").read_text().split() == ["activate-noawait",
                                                           "twisted-plugins-cache"]

    unpacked = build.top / "unpacked"
    run(["dpkg-deb", "--extract", str(build.deb), str(unpacked)])
    player = (unpacked / PLAYER.lstrip("/")).read_bytes()
    assert player == (build.source / NPM_PLAYER).read_bytes()
    assert b"JSMpeg" in player and len(player) > 50_000


def test_apt_installs_it_with_its_user_an_enabled_unit_and_a_fresh_plugin_cache(build):
    apt_get("install", "--no-install-recommends", f"./{build.deb.name}", cwd=build.top)
    assert package_status() == ("installed", __version__)

    user = pwd.getpwnam(USER)
    assert user.pw_uid < 1000, "not a system user"
    assert user.pw_dir == "/nonexistent" and not os.path.exists(user.pw_dir)
    assert user.pw_shell == "/usr/sbin/nologin"
    assert grp.getgrgid(user.pw_gid).gr_name == USER
    assert USER in grp.getgrnam("video").gr_mem

    assert os.readlink(WANTS) == UNIT, "the unit is not enabled"
    with open(DEFAULTS) as installed, open(build.source / "debian/pistreaming.default") as ours:
        assert installed.read() == ours.read()

    # Twisted finds the plugin in its cache at once: a twistd run that would
    # have to add it rewrites the cache, and this one leaves it as it was.
    with open(PLUGIN_CACHE, "rb") as f:
        cache = f.read()
    assert b"pistream_plugin" in cache
    stamp = os.stat(PLUGIN_CACHE).st_mtime_ns
    listed = run(["/usr/bin/twistd3", "--help"], cwd="/").stdout
    assert re.search(r"^\s+pistream\s", listed, re.M), listed
    with open(PLUGIN_CACHE, "rb") as f:
        assert f.read() == cache and os.stat(PLUGIN_CACHE).st_mtime_ns == stamp


def test_systemd_analyze_verify_accepts_the_installed_unit(build):
    result = run(["systemd-analyze", "verify", UNIT], check=False, cwd="/")
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "pistreaming" not in report, report


def test_the_installed_defaults_file_shows_every_option_of_the_installed_daemon(build):
    help_text = as_service_user("/usr/bin/twistd3", "pistream", "--help")
    options = options_from_help(help_text)
    assert "resolution" in options
    with open(DEFAULTS) as f:
        assert options_missing_from_defaults(options, f.read()) == []


def as_service_user(*command):
    """What C{command} prints, run as the service's user with its groups."""
    return run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", *command],
               cwd="/").stdout


def set_options(text, opts):
    line = f'{DEFAULTS_VARIABLE}="{opts}"'
    changed, count = re.subn(rf"^{DEFAULTS_VARIABLE}=.*$", line, text, flags=re.M)
    assert count == 1
    return changed


def test_an_upgrade_keeps_a_changed_configuration(build):
    with open(DEFAULTS) as f:
        changed = set_options(f.read(), CHANGED_OPTS) + "# changed by the administrator\n"
    with open(DEFAULTS, "w") as f:
        f.write(changed)

    newer = f"{__version__}+upgradetest1"
    tree = build.top / "newer"
    run(["dpkg-deb", "--raw-extract", str(build.deb), str(tree)])
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {newer}", control.read_text(),
                              flags=re.M))
    deb = build.top / f"pistreaming_{newer}_all.deb"
    run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)])
    apt_get("install", "--no-install-recommends", f"./{deb.name}", cwd=build.top)

    assert package_status() == ("installed", newer)
    with open(DEFAULTS) as f:
        assert f.read() == changed
    assert not [n for n in os.listdir("/etc/default") if n.startswith("pistreaming.")]
    assert USER in grp.getgrnam("video").gr_mem
    assert os.readlink(WANTS) == UNIT
    with open(PLUGIN_CACHE, "rb") as f:
        assert b"pistream_plugin" in f.read()


class UnitDaemon(Daemon):
    """The installed daemon started as pistreaming.service starts it: the
    unit's ExecStart= with its EnvironmentFile= expanded, as its User= and
    Group= (and the user's groups), from /, with the unit's UMask=, no new
    privileges and no capabilities, in an environment like systemd's."""

    def __init__(self):
        super().__init__(start_timeout=60)
        with open(UNIT) as f:
            self.service = parse_unit(f.read())["Service"]

    def command(self):
        service = self.service
        env = {}
        for path, optional in environment_files(service):
            if os.path.exists(path) or not optional:
                with open(path) as f:
                    env.update(parse_environment_file(f.read()))
        argv = expand_command(service["ExecStart"][-1], env)
        user = service["User"][-1]
        account = pwd.getpwnam(user)
        sandbox = ["setpriv", f"--reuid={user}", f"--regid={service['Group'][-1]}",
                   "--init-groups", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"]
        umask = int(service.get("UMask", ["0022"])[-1], 8)
        for name in service.get("StateDirectory", []):  # as systemd makes it
            path = os.path.join("/var/lib", name)
            os.makedirs(path, mode=0o755, exist_ok=True)
            shutil.chown(path, user, service["Group"][-1])
        return sandbox + ["--"] + argv, {
            "cwd": "/", "umask": umask,
            "env": {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": account.pw_dir,
                    "USER": user, "LOGNAME": user, "SHELL": account.pw_shell},
        }


def debian_upstream_version(package):
    """The upstream part of an installed package's version (22.4.0 of 22.4.0-4+deb12u1)."""
    version = run(["dpkg-query", "-W", "-f=${Version}", package]).stdout
    return re.sub(r"^\d+:|\+dfsg\d*|-[^-]*$", "", version)


def proc_status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def http_get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_the_installed_daemon_run_as_its_unit_runs_it_serves_the_page_and_the_stream(
        build, tmp_path):
    with open(DEFAULTS) as f:
        text = f.read()
    if CHANGED_OPTS not in text:  # this test run on its own
        with open(DEFAULTS, "w") as f:
            f.write(set_options(text, CHANGED_OPTS))

    daemon = UnitDaemon()
    command, _ = daemon.command()
    assert command[command.index("--") + 1:] == [
        "/usr/bin/twistd3", "--nodaemon", "--pidfile=", "pistream", *CHANGED_OPTS.split()]
    with daemon:
        # Debian's Python, Twisted and Autobahn (22.4 and 22.7 on Debian 12),
        # and the installed copy of the package.
        twisted, autobahn = (debian_upstream_version(name)
                             for name in ("python3-twisted", "python3-autobahn"))
        assert daemon.search(rf"twistd {re.escape(twisted)} \(/usr/bin/python3 ")
        where = as_service_user(
            "/usr/bin/python3", "-c",
            "import autobahn, pistreaming.web as w; print(w.STATIC, autobahn.__version__)")
        assert where.split() == [f"{SITE}/pistreaming/static", autobahn]

        status, page = http_get(daemon.http_port, "/index.html")
        assert status == 200
        assert b'data-width="640" data-height="480"' in page
        status, player = http_get(daemon.http_port, "/jsmpg.js")
        with open(PLAYER, "rb") as f:
            assert status == 200 and player == f.read()

        # Both ports at once: the default codec's H.264 on the page's port,
        # and the MPEG-1 made on demand for the original demo's clients.
        h264_url = f"ws://127.0.0.1:{daemon.http_port}/stream"
        mpeg1_url = f"ws://127.0.0.1:{daemon.ws_port}/"
        received = {}

        def watch(url, read):
            try:
                ws = websocket.create_connection(url, timeout=10)
                try:
                    received[url] = read(ws)
                finally:
                    ws.close()
            except Exception as e:  # reported below
                received[url] = e

        watchers = [threading.Thread(target=watch, args=args, daemon=True) for args in (
            (h264_url, lambda ws: read_h264(ws, 45)),
            (mpeg1_url, lambda ws: (read_header(ws), collect(ws, 2.5))))]
        for watcher in watchers:
            watcher.start()
        for watcher in watchers:
            watcher.join(30)
        for url in (h264_url, mpeg1_url):
            assert isinstance(received.get(url), tuple), (url, received.get(url))
        check_h264(*received[h264_url], tmp_path)
        header, video_bytes = received[mpeg1_url]
        assert header == (640, 480)
        frames = decoded_frames(video_bytes, tmp_path)
        assert len(frames) >= 20, f"{len(frames)} pictures in 2.5 s from {mpeg1_url}"
        assert {(f["width"], f["height"]) for f in frames} == {(640, 480)}

        # The daemon and its ffmpeg (which has been encoding by now) run as the
        # service's user, with the video group, no new privileges, no capabilities.
        user = pwd.getpwnam(USER)
        video = grp.getgrnam("video").gr_gid
        assert ffmpeg_children(daemon), "no ffmpeg child"
        for pid in [daemon.process.pid] + ffmpeg_children(daemon):
            status = proc_status(pid)
            assert status["Uid"].split() == [str(user.pw_uid)] * 4
            assert status["Gid"].split() == [str(user.pw_gid)] * 4
            assert str(video) in status["Groups"].split()
            assert status["NoNewPrivs"] == "1" and int(status["CapBnd"], 16) == 0

        code, seconds = daemon.stop(signal.SIGTERM, timeout=10)  # what systemctl stop sends
    assert code in (0, -signal.SIGTERM), daemon.output()[-3000:]
    assert seconds < 5
    assert processes_of_user() == []


def read_h264(ws, count):
    """The H.264 stream's description, then C{count} access-unit messages."""
    first = ws.recv()
    units = []
    deadline = time.monotonic() + 10
    while len(units) < count and time.monotonic() < deadline:
        message = ws.recv()
        if isinstance(message, bytes):
            units.append(message)
    return first, units


def check_h264(first, units, tmp_path):
    """The test pattern through the ffmpeg package's libx264: the
    description, a keyframe first, and pictures that decode."""
    description = json.loads(first)["stream"]
    assert (description["codec"], description["width"], description["height"]) == (
        "h264", 640, 480)
    assert description["profile"] == "High"  # x264's, without B-frames
    assert len(units) == 45
    assert units[0][0] & 1  # a keyframe first: a decoder starts at once
    stream = tmp_path / "received.h264"
    stream.write_bytes(b"".join(unit[9:] for unit in units))
    decoded = run(["ffmpeg", "-v", "error", "-xerror", "-i", str(stream), "-f", "framemd5",
                   "-"]).stdout
    assert len([line for line in decoded.splitlines() if not line.startswith("#")]) == 45


def test_the_installed_daemon_streams_mpeg1_when_asked(build, tmp_path):
    # --codec mpeg1 on Debian's own Python, Twisted and Autobahn: ffmpeg's
    # MPEG-1 on the page's port, as the original demo streamed.
    with open(DEFAULTS) as f:
        kept = f.read()
    with open(DEFAULTS, "w") as f:
        f.write(set_options(kept, CHANGED_OPTS + f" --codec=mpeg1 --record={RECORDINGS}"))
    try:
        with UnitDaemon() as daemon:
            ws = websocket.create_connection(
                f"ws://127.0.0.1:{daemon.http_port}/stream", timeout=10)
            try:
                header, video_bytes = read_header(ws), collect(ws, 2.0)
            finally:
                ws.close()
            code, _ = daemon.stop(signal.SIGTERM, timeout=10)
    finally:
        with open(DEFAULTS, "w") as f:
            f.write(kept)
    assert code in (0, -signal.SIGTERM)
    assert header == (640, 480)
    frames = decoded_frames(video_bytes, tmp_path)
    assert len(frames) >= 20, f"{len(frames)} pictures in 2 s"
    assert {(f["width"], f["height"]) for f in frames} == {(640, 480)}
    # and recorded it in the state directory, the one place it may write
    recorded = sorted(os.listdir(RECORDINGS))
    assert len(recorded) == 1 and recorded[0].endswith("Z.ts"), recorded
    probe = run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                 "stream=nb_read_frames", "-of", "csv=p=0",
                 os.path.join(RECORDINGS, recorded[0])]).stdout
    assert int(probe.split()[0]) >= 12


def test_remove_then_purge_leave_nothing_behind(build):
    files = run(["dpkg", "--listfiles", PACKAGE]).stdout.split()

    apt_get("remove", PACKAGE)
    assert package_status()[0] == "config-files"
    assert os.path.exists(DEFAULTS) and user_exists()
    assert not os.path.exists(f"{SITE}/pistreaming")
    with open(PLUGIN_CACHE, "rb") as f:  # rebuilt by python3-twisted's trigger
        assert b"pistream_plugin" not in f.read(), f"{PLUGIN_CACHE} still lists the plugin"
    listed = run(["/usr/bin/twistd3", "--help"], cwd="/").stdout
    assert not re.search(r"^\s+pistream\s", listed, re.M)

    # What the daemon recorded (if the test above ran) is the user's: purge
    # keeps it and says so; the test deletes it afterwards.
    os.makedirs(RECORDINGS, exist_ok=True)
    kept = os.path.join(RECORDINGS, "20261205T102030Z.mp4")
    with open(kept, "wb") as f:
        f.write(b"recorded")
    purged = apt_get("purge", PACKAGE)
    assert os.path.exists(kept) and "kept /var/lib/pistreaming" in purged.stdout + purged.stderr
    shutil.rmtree(STATE)
    assert package_status() is None
    for path in (DEFAULTS, WANTS, UNIT,
                 "/var/lib/systemd/deb-systemd-helper-enabled/pistreaming.service.dsh-also"):
        assert not os.path.lexists(path), path
    assert not user_exists() and not group_exists()
    assert USER not in grp.getgrnam("video").gr_mem
    for database in ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow"):
        with open(database) as f:
            assert not re.search(rf"\b{USER}\b", f.read()), database
    left = [path for path in files if os.path.lexists(path)
            and not (os.path.isdir(path) and "pistream" not in path)]
    assert left == [], left
    assert names_containing_pistream() == build.before
