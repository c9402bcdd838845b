"""The files of debian/ agree with the code: the version, every option in the
defaults file, and a unit that runs the documented command without closing
the camera's devices.  (tests/test_deb_package.py builds and runs the package.)"""

import os
import re
import subprocess

import pytest

from pistreaming import __version__
from tests.daemon import ROOT, twistd_command
from tests.unit import (
    DEFAULTS_VARIABLE, environment_files, expand_command, options_from_help,
    options_missing_from_defaults, parse_environment_file, parse_unit,
)


def debian_file(name):
    with open(os.path.join(ROOT, "debian", name)) as f:
        return f.read()


@pytest.fixture(scope="module")
def source_help():
    """``twistd pistream --help`` of the source tree (where new options land first)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(twistd_command() + ["pistream", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def service():
    return parse_unit(debian_file("pistreaming.service"))["Service"]


def test_the_changelog_version_is_the_package_version():
    first = debian_file("changelog").splitlines()[0]
    match = re.match(r"^pistreaming \(([^)]+)\) \S+; urgency=\w+$", first)
    assert match, first
    assert match.group(1) == __version__, \
        f"debian/changelog says {match.group(1)}, pistreaming/__init__.py says {__version__}"


def test_the_defaults_file_shows_every_option_with_its_default(source_help):
    options = options_from_help(source_help)
    assert {"http", "ws-port", "resolution", "framerate", "bitrate", "vflip", "hflip",
            "camera", "ffmpeg", "color", "bgcolor"} <= set(options)
    missing = options_missing_from_defaults(options, debian_file("pistreaming.default"))
    assert not missing, (
        "debian/pistreaming.default (installed as /etc/default/pistreaming) does not "
        "show these options of 'twistd pistream --help' with their defaults, as a "
        "comment line like '#   --name=DEFAULT': " + ", ".join(missing))


def test_the_completeness_check_notices_a_missing_option_or_a_changed_default(source_help):
    options = options_from_help(source_help)
    text = debian_file("pistreaming.default")
    without = "\n".join(line for line in text.splitlines() if "--hflip" not in line)
    assert options_missing_from_defaults(options, without) == ["--hflip"]
    changed = text.replace("--bitrate=800k", "--bitrate=900k")
    assert options_missing_from_defaults(options, changed) == ["--bitrate=800k"]
    options["brand-new"] = "42"
    assert options_missing_from_defaults(options, text) == ["--brand-new=42"]


def test_the_defaults_file_sets_no_option_so_every_default_applies(service):
    env = parse_environment_file(debian_file("pistreaming.default"))
    assert env == {DEFAULTS_VARIABLE: ""}
    assert expand_command(service["ExecStart"][-1], env) == [
        "/usr/bin/twistd3", "--nodaemon", "--pidfile=", "pistream"]


def test_the_unit_runs_twistd_with_the_options_of_the_defaults_file(service):
    assert service["ExecStart"] == ["/usr/bin/twistd3 --nodaemon --pidfile= pistream $PISTREAM_OPTS"]
    assert environment_files(service) == [("/etc/default/pistreaming", True)]
    assert expand_command(service["ExecStart"][-1],
                          {DEFAULTS_VARIABLE: "--vflip  --resolution=1280x720"})[-2:] == [
        "--vflip", "--resolution=1280x720"]
    assert service["User"] == ["pistreaming"] and service["Group"] == ["pistreaming"]
    assert service["Restart"] == ["on-failure"]
    assert "StandardOutput" not in service  # the default: the journal


def test_the_sandbox_leaves_the_camera_devices_reachable(service):
    # PrivateDevices= would hide /dev/video*, /dev/vchiq, /dev/dma_heap/...;
    # DevicePolicy=, DeviceAllow= and ProtectClock= (which implies a
    # DeviceAllow= line) make /dev an allow-list.
    assert service.get("PrivateDevices", ["no"])[-1] in ("no", "false", "0")
    assert service.get("ProtectClock", ["no"])[-1] in ("no", "false", "0")
    assert "DevicePolicy" not in service and "DeviceAllow" not in service
    for option in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                   "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                   "RestrictNamespaces", "SystemCallFilter", "CapabilityBoundingSet"):
        assert option in service, option


def test_recordings_have_a_writable_state_directory_and_the_rest_stays_read_only(service):
    # systemd makes /var/lib/pistreaming for the service's user: the one
    # place it may write; --record there is how recording is turned on.
    assert service["ProtectSystem"] == ["strict"]
    assert service["StateDirectory"] == ["pistreaming"]
    assert "--record=/var/lib/pistreaming/recordings" in debian_file("pistreaming.default")
    # (That purging keeps recordings: tests/test_deb_package.py.)


def test_the_sandbox_lets_a_push_connect_out(service):
    # --push: ffmpeg connects out over TCP (RTMP, RTSP) or UDP (SRT), to any
    # address, and resolves the server's name; nothing in the unit may close
    # that.  (docs/design.rst, "Push", says how the unit's system call
    # filter and families were checked with a real push.)
    families = " ".join(service["RestrictAddressFamilies"]).split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    for option in ("PrivateNetwork", "IPAddressDeny", "IPAddressAllow", "SocketBindDeny",
                   "SocketBindAllow", "RestrictNetworkInterfaces", "NetworkNamespacePath"):
        assert option not in service, option
    filters = " ".join(service["SystemCallFilter"]).split()
    assert "@system-service" in filters  # which holds @network-io
    assert not {"@network-io", "~@network-io"} & set(filters)


def test_every_lintian_override_gives_its_reason():
    lines = debian_file("pistreaming.lintian-overrides").splitlines()
    overrides = [i for i, line in enumerate(lines) if line.startswith("pistreaming: ")]
    assert overrides
    for i in overrides:
        above = i - 1
        while above >= 0 and lines[above].startswith("pistreaming: "):
            above -= 1  # overrides grouped under one reason
        assert above >= 0 and lines[above].startswith("# "), \
            f"no comment giving the reason above: {lines[i]}"


def test_the_password_hashing_may_make_its_threads_nicer(service):
    # pistreaming.lowpriority: the hashing threads call setpriority, which
    # @resources holds; the unit denies that group, then allows it back
    # (a later allow-list entry adds to the filter the first one started).
    filters = service["SystemCallFilter"]
    denied = max(i for i, f in enumerate(filters)
                 if f.startswith("~") and "@resources" in f[1:].split())
    assert any(f.split() == ["setpriority"] for f in filters[denied + 1:]), filters
    assert service["SystemCallErrorNumber"] == ["EPERM"]
