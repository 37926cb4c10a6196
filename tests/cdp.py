"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (no websocket, no
extra package): headless Chromium reads JSON commands on fd 3 and answers on fd 4, each message
ending in a NUL byte. Enough to load a page, run JavaScript, watch the network and screenshot."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import time


class Browser:
    def __init__(self, binary: str = "/usr/bin/chromium", timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.TemporaryDirectory(prefix="cdp-profile-")
        to_child, self._w = os.pipe()  # commands: we write _w, chromium reads fd 3
        self._r, from_child = os.pipe()  # answers: chromium writes fd 4, we read _r
        os.set_inheritable(to_child, True)
        os.set_inheritable(from_child, True)

        def fds():  # in the child: the two pipe ends become fds 3 and 4
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile.name}", "about:blank"],
            # 3 and 4 listed too: close_fds runs after preexec_fn and would close them
            preexec_fn=fds, pass_fds=(3, 4, to_child, from_child), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    # --------------------------------------------------------------------- protocol
    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            m = self._read()
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)
        raise TimeoutError(method)

    def wait_event(self, method: str, session: str | None = None) -> dict:
        for k, m in enumerate(self.events):
            if m.get("method") == method and (session is None or m.get("sessionId") == session):
                return self.events.pop(k)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            m = self._read()
            if m.get("method") == method and (session is None or m.get("sessionId") == session):
                return m
            self.events.append(m)
        raise TimeoutError(method)

    # ------------------------------------------------------------------------ pages
    def open(self, url: str, width: int = 1200, height: int = 900) -> str:
        """A new tab with the network watched from its first request; returns its session."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        s = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Network.enable", s)
        self.send("Page.enable", s)
        self.send("Emulation.setDeviceMetricsOverride", s, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", s, url=url)
        self.wait_event("Page.loadEventFired", s)
        return s

    def eval(self, session: str, expression: str):
        r = self.send("Runtime.evaluate", session, expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:60]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, session: str, path: str, full_page: bool = True) -> None:
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            m = self.send("Page.getLayoutMetrics", session)["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": m["width"],
                              "height": min(m["height"], 16000), "scale": 1}
        data = self.send("Page.captureScreenshot", session, **params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def requests(self, session: str) -> list[str]:
        """URLs of every request the tab made (Network.requestWillBeSent), data: URLs included."""
        return [m["params"]["request"]["url"] for m in self.events
                if m.get("method") == "Network.requestWillBeSent"
                and m.get("sessionId") == session]

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        self.profile.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
