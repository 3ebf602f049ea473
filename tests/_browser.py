"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (no websocket library, no
npm): headless chromium reads commands from fd 3 and writes replies and events to fd 4, one JSON
message per NUL-terminated record. Enough to load a page at a window size, evaluate JavaScript, send
real mouse and key events, take screenshots and catch downloads.

Used by the viewer's browser tests (tests/test_graphs_viewer.py) and scripts/figures_docs.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe",
]


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless chromium with one page (``with Browser(1280, 800) as b: b.open(url)``)."""

    def __init__(self, width: int = 1280, height: int = 800, timeout: float = 60.0) -> None:
        if CHROMIUM is None:
            raise BrowserError("no chromium binary")
        self.width, self.height, self.timeout = width, height, timeout
        self._profile = tempfile.mkdtemp(prefix="sparsetrace-chromium-")
        import fcntl

        def high(fd: int) -> int:  # above 4, so that moving it onto fd 3 or 4 in the child clobbers nothing
            new = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
            os.close(fd)
            return new

        r, w = os.pipe()
        to_child_r, self._to_child = high(r), high(w)
        r, w = os.pipe()
        self._from_child, from_child_w = high(r), high(w)

        def fds() -> None:  # in the child: fd 3 = commands in, fd 4 = replies out (kept: pass_fds)
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self._profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=fds, pass_fds=(3, 4),
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.page("Page.enable")
        self.page("Runtime.enable")
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    # ---- protocol -------------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise BrowserError("chromium did not answer in time")
            import select

            ready, _, _ = select.select([self._from_child], [], [], 0.5)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise BrowserError("chromium closed the pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self._send(msg)
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise BrowserError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def page(self, method: str, **params: Any) -> dict:
        return self.call(method, session=self.session, **params)

    def wait_event(self, method: str, timeout: float | None = None, match=lambda p: True) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for k, m in enumerate(self.events):
                if m.get("method") == method and match(m.get("params", {})):
                    return self.events.pop(k)["params"]
            self.events.append(self._read(deadline))

    # ---- conveniences ---------------------------------------------------------------------------
    def open(self, url: str, ready: str = "document.body && document.body.dataset.ready === '1'") -> None:
        self.events.clear()
        self.page("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")
        self.wait_for(ready)

    def js(self, expression: str) -> Any:
        r = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise BrowserError(f"{expression[:80]}: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(f"!!({expression})"):
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression}")
            time.sleep(0.05)

    def rect(self, selector: str) -> dict:
        """The element's client rectangle {x, y, width, height} (ValueError-free: None if absent)."""
        return self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
                       " const r = e.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; })()")

    def mouse(self, kind: str, x: float, y: float, **extra: Any) -> None:
        self.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def click(self, selector: str, modifiers: int = 0) -> None:
        """A real left click in the middle of the element (hit-testing included)."""
        r = self.rect(selector)
        if r is None:
            raise BrowserError(f"no element {selector}")
        x, y = r["x"] + r["width"] / 2, r["y"] + r["height"] / 2
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, button="left", clickCount=1, modifiers=modifiers)
        self.mouse("mouseReleased", x, y, button="left", clickCount=1, modifiers=modifiers)

    def hover(self, selector: str) -> None:
        r = self.rect(selector)
        self.mouse("mouseMoved", r["x"] + r["width"] / 2, r["y"] + r["height"] / 2)

    def type(self, selector: str, text: str, enter: bool = False) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.page("Input.insertText", text=text)
        if enter:
            for kind in ("keyDown", "keyUp"):
                self.page("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                          **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self, path: str | os.PathLike) -> Path:
        data = self.page("Page.captureScreenshot", format="png")["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def allow_downloads(self, folder: str | os.PathLike) -> None:
        self.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(folder), eventsEnabled=True)

    def wait_download(self, timeout: float = 20.0) -> dict:
        return self.wait_event("Browser.downloadProgress", timeout, match=lambda p: p.get("state") == "completed")

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
