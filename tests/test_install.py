"""The installed package (what ./dev and pip install put in the virtualenv)
carries the twistd plugin, the page and the player, and runs from anywhere."""

import os
import subprocess
import sys

from tests.daemon import ROOT, twistd_command


def installed_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env


def test_the_installed_copy_has_the_page_and_the_pinned_player(tmp_path):
    code = ("import os, pistreaming.web as w; print(w.STATIC); "
            "print(sorted(os.listdir(w.STATIC)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=installed_env(),
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode() + \
        "\n(is the package installed? ./dev test installs it)"
    static, listing = result.stdout.decode().splitlines()
    assert not static.startswith(os.path.join(ROOT, "pistreaming")), \
        f"not the installed copy: {static}"
    assert listing == str(sorted(["index.html", "jsmpg.js", "pistream.css", "pistream.js"]))
    with open(os.path.join(static, "jsmpg.js"), "rb") as a, \
            open(os.path.join(ROOT, "node_modules", "@cycjimmy", "jsmpeg-player", "dist",
                              "jsmpeg-player.umd.min.js"), "rb") as b:
        assert a.read() == b.read()


def test_twistd_finds_the_installed_plugin_from_any_directory(tmp_path):
    result = subprocess.run(twistd_command() + ["pistream", "--help"], cwd=tmp_path,
                            env=installed_env(), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    for option in ("--http=", "--ws-port=", "--resolution=", "--framerate=", "--bitrate=",
                   "--vflip", "--hflip", "--camera=", "--rotation=", "--annotate=",
                   "--ffmpeg=", "--color=", "--bgcolor="):
        assert option in out
