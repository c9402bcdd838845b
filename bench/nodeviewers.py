"""Many viewers in one Node.js process (bench/node/viewers.js), for the benchmarks."""

import json
import os
import subprocess

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")


def npm_ci():
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                       cwd=NODE_DIR, check=True, stdout=subprocess.DEVNULL, timeout=300)


class Viewers:
    """bench/node/viewers.js, driven over its standard input."""

    def __init__(self, url, count, timeout=120):
        self.process = subprocess.Popen(
            ["node", os.path.join(NODE_DIR, "viewers.js"), url, str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.connected = self._read(timeout)["connected"]

    def _read(self, timeout=60):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("viewers.js ended early")
        return json.loads(line)

    def ask(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self):
        if self.process.poll() is None:
            try:
                self.ask("quit")
            except (BrokenPipeError, RuntimeError, ValueError):
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
