"""pistreaming's packaging.

The browser-side player (JSMpeg's UMD build, from the npm package
@cycjimmy/jsmpeg-player pinned in package.json and package-lock.json) is not
kept in the tree: ``build_player`` installs it with ``npm ci`` and copies it to
pistreaming/static/jsmpg.js, and ``build_py`` runs it first when needed.
"""

import json
import os
import shutil
import subprocess

from setuptools import Command, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PLAYER_PACKAGE = "@cycjimmy/jsmpeg-player"
PLAYER_FILE = "dist/jsmpeg-player.umd.min.js"
PLAYER_TARGET = os.path.join(HERE, "pistreaming", "static", "jsmpg.js")


def read_version():
    with open(os.path.join(HERE, "pistreaming", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("no __version__")


class build_player(Command):
    description = "fetch the pinned JSMpeg player with npm and copy it into the package"
    user_options = [("force", "f", "fetch even if the player is already built")]

    def initialize_options(self):
        self.force = False

    def finalize_options(self):
        pass

    def run(self):
        lock = os.path.join(HERE, "package-lock.json")
        if (not self.force and os.path.exists(PLAYER_TARGET)
                and os.path.getmtime(PLAYER_TARGET) >= os.path.getmtime(lock)):
            return
        with open(os.path.join(HERE, "package.json")) as f:
            pinned = json.load(f)["dependencies"][PLAYER_PACKAGE]
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit(
                "build_player: npm is needed to fetch the JSMpeg player "
                "(apt install npm), or put a built pistreaming/static/jsmpg.js in place"
            )
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=HERE, check=True,
        )
        installed = os.path.join(HERE, "node_modules", *PLAYER_PACKAGE.split("/"))
        with open(os.path.join(installed, "package.json")) as f:
            version = json.load(f)["version"]
        if version != pinned:
            raise SystemExit(f"build_player: npm gave {PLAYER_PACKAGE} {version}, not {pinned}")
        shutil.copyfile(os.path.join(installed, PLAYER_FILE), PLAYER_TARGET)
        self.announce(f"copied {PLAYER_PACKAGE} {version} to {PLAYER_TARGET}", level=2)


class build_py_with_player(build_py):
    def run(self):
        self.run_command("build_player")
        super().run()


setup(
    name="pistreaming",
    version=read_version(),
    description="Low-latency Raspberry Pi camera streaming to web browsers "
                "(MPEG-1 over WebSockets, played by JSMpeg)",
    long_description=open(os.path.join(HERE, "README.rst")).read(),
    long_description_content_type="text/x-rst",
    license="BSD-3-Clause",
    packages=["pistreaming", "pistreaming.camera", "twisted.plugins"],
    package_data={
        "pistreaming": ["static/index.html", "static/pistream.js",
                        "static/pistream.css", "static/jsmpg.js"],
        "twisted.plugins": ["pistream_plugin.py"],
    },
    python_requires=">=3.9",
    install_requires=[
        "Twisted>=22.4",
        "autobahn>=22.7",
        "prometheus_client>=0.16",
        # TLS (ssl: endpoints) for Twisted
        "pyOpenSSL>=21",
        "service_identity>=18.1",
    ],
    extras_require={
        "picamera": ["picamera>=1.13"],
    },
    entry_points={"console_scripts": ["pistream-passwd = pistreaming.passwd:main"]},
    cmdclass={"build_player": build_player, "build_py": build_py_with_player},
    zip_safe=False,
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Multimedia :: Video :: Capture",
        "Operating System :: POSIX :: Linux",
    ],
)
