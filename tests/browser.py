"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Playwright's own browser download is never used: it launches the system
Chromium with the flags this closed network needs (no background
connections to Google), in a fresh profile.
"""

import io
import os
import shutil

CHROMIUM = os.environ.get("PISTREAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    # Keep timers and animation frames running in pages that are not in front.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    # Chromium 156 builds its address bar's drop-down (a WebUI page,
    # chrome://omnibox-popup.top-chrome) for every tab Playwright opens,
    # headless too: about 1.7 s of CPU on a renderer of its own and as much
    # again on worker threads, right while the tab's page starts.  A person's
    # browser built its address bar before they typed the camera's address;
    # here, on two cores, it would measure the browser's own UI instead of the
    # page (bench/latency: the first picture took twice as long behind it).
    "--disable-features=WebUIOmniboxPopup,WebUIOmniboxAimPopup,WebUIOmniboxFullPopup",
]


#: A name that is no secure context on plain http, as a LAN's names are;
#: launch(lan_name=True) makes Chromium resolve it to 127.0.0.1.
INSECURE_HOST = "pistream.test"


def launch(playwright, headless=True, lan_name=False):
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"Chromium is not installed at {CHROMIUM} (apt install chromium)")
    args = list(CHROMIUM_ARGS)
    if lan_name:
        args.append(f"--host-resolver-rules=MAP {INSECURE_HOST} 127.0.0.1")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=headless, args=args)


def picture(png_bytes):
    """A screenshot as a Pillow RGB image."""
    from PIL import Image
    return Image.open(io.BytesIO(png_bytes)).convert("RGB")
