"""nginx with its RTMP module (Debian's nginx and libnginx-mod-rtmp),
run unprivileged from a directory of its own on loopback ports, for the
push tests (tests/test_push_nginx.py) and bench/push: an RTMP server
whose statistics page (rtmp_stat) says who publishes what, and which
writes each stream's HLS segments in the directory.  The test or the
benchmark starts it, kills it, stops it (SIGSTOP) and lets it go."""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
RTMP_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"


class NginxMissing(Exception):
    """nginx or its RTMP module is not installed."""


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
load_module {module};
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{rtmp};
        chunk_size 4096;
        application live {{
            live on;
            record off;
            hls on;
            hls_path {dir}/hls;
            hls_fragment 500ms;
            hls_playlist_length 3s;
        }}
    }}
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{http};
        location /stat {{ rtmp_stat all; }}
    }}
}}
"""


class Nginx:
    """nginx with the RTMP module, unprivileged, in C{directory}: started,
    killed, stopped and let go by the test."""

    def __init__(self, directory):
        if not os.path.exists(NGINX) or not os.path.exists(RTMP_MODULE):
            raise NginxMissing("nginx with its RTMP module is not installed: ./dev test "
                               "installs it (apt-get install nginx libnginx-mod-rtmp)")
        self.dir = str(directory)
        os.makedirs(os.path.join(self.dir, "hls"), exist_ok=True)
        self.rtmp, self.http = free_port(), free_port()
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(NGINX_CONF.format(dir=self.dir, module=RTMP_MODULE, rtmp=self.rtmp,
                                      http=self.http))
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [NGINX, "-p", self.dir, "-c", self.conf, "-e", os.path.join(self.dir, "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:  # up once its statistics answer
            try:
                self.stat()
                return
            except OSError:
                assert self.process.poll() is None, "nginx exited: " + self.error_log()
                assert time.monotonic() < deadline, "nginx did not answer within 10 s"
                time.sleep(0.05)

    def signal(self, signum):
        self.process.send_signal(signum)
        if signum == signal.SIGKILL:
            self.process.wait(5)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(5)

    def stat(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/stat", timeout=2) as r:
            return ET.fromstring(r.read())

    def publisher(self, name):
        """The statistics page's <stream> of C{name}, if it is published."""
        for stream in self.stat().iter("stream"):
            if stream.findtext("name") == name and stream.find("publishing") is not None:
                return stream
        return None

    def error_log(self):
        with open(os.path.join(self.dir, "error.log")) as f:
            return f.read()[-3000:]
