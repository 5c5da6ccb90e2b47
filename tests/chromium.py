"""A headless Chromium driven over the DevTools protocol, for the dashboard's tests.

The protocol goes over a pair of pipes (``--remote-debugging-pipe``: the
browser reads commands from its fd 3 and writes answers to its fd 4, each a
JSON message ended by a NUL byte), as Playwright and Puppeteer drive it: no
debugging port to find or leave open, and no websocket client to add as a
dependency. The tests can then wait for what the page shows instead of
guessing how long its fetches take, measure its layout and take screenshots.

Chromium is Debian's ``chromium`` (``CHROMIUM`` names another binary). Without
one the tests skip, saying how to get it; in CI (CI=true) they fail instead,
since scripts/test installs it there.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

START_SECONDS = 30.0  # a cold start on a loaded two-core machine takes a few seconds
# Recorded from the first script of every page: what the Content-Security-Policy refused, and uncaught errors.
WATCH = """
window.__refused = []; window.__errors = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__refused.push(e.violatedDirective + " " + e.blockedURI));
window.addEventListener("error", (e) => window.__errors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => window.__errors.push(String(e.reason)));
"""


def chromium_binary() -> str:
    """The Chromium to run; skip (fail in CI) when there is none."""
    named = os.environ.get("CHROMIUM")
    for name in [named] if named else ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]:
        found = shutil.which(name)
        if found:
            return found
    why = f"no Chromium ({named or 'chromium'} not on PATH): apt-get install chromium, or set CHROMIUM to a binary"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {why} (scripts/test installs it in CI)", pytrace=False)
    pytest.skip(why)


def _above_9(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """One headless Chromium with one page; every call has a deadline, so a stuck browser fails the test."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = ""
        self._next = 0
        self._buffer = b""

    def __enter__(self) -> Browser:
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()
        # The child's ends, moved above 9 first, so that putting them on 3 and 4 cannot overwrite one another.
        commands_read, answers_write = (_above_9(fd) for fd in (commands_read, answers_write))

        def onto_3_and_4() -> None:  # in the child, before exec; dup2 leaves them open across the exec
            os.dup2(commands_read, 3)
            os.dup2(answers_write, 4)

        self.log = open(self.workdir / "chromium.log", "wb")
        args = [
            chromium_binary(),
            "--headless=new",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",  # a container's /dev/shm is often 64 MiB
            "--no-first-run",
            "--hide-scrollbars",  # screenshots the same with or without overlay scrollbars
            "--remote-debugging-pipe",
            f"--user-data-dir={self.workdir / 'profile'}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # Our other fds are close-on-exec already (Python's default); pass_fds would keep the parent's
            # fds 3 and 4, which may not exist, and close the ones the browser needs after preexec_fn.
            close_fds=False,
            preexec_fn=onto_3_and_4,
            start_new_session=True,
        )
        os.close(commands_read)
        os.close(answers_write)
        try:
            target = self.call("Target.createTarget", url="about:blank", timeout=START_SECONDS)["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Page.enable", session=True)
            self.call("Page.addScriptToEvaluateOnNewDocument", source=WATCH, session=True)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", timeout=5)
        except (OSError, EOFError, TimeoutError, AssertionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
        for fd in (self._commands, self._answers):
            os.close(fd)
        self.log.close()
        self.proc = None

    def call(self, method: str, *, session: bool = False, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are dropped."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = json.loads(self._read_message(deadline))
            if answer.get("id") == self._next:
                assert "error" not in answer, f"{method}: {answer['error']}"
                return answer["result"]

    def _read_message(self, deadline: float) -> bytes:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer in time; its log: {self.workdir / 'chromium.log'}")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise EOFError(f"Chromium exited; its log: {self.workdir / 'chromium.log'}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return message

    # ---- the page ------------------------------------------------------------------------

    def size(self, width: int, height: int, *, mobile: bool = False) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
            session=True,
        )

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url, session=True)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True, session=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0, what: str = "") -> Any:
        """Poll an expression until it is truthy; its value. Fails, naming ``what``, after ``timeout``."""
        deadline = time.monotonic() + timeout
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"  # page half-loaded
        while True:
            value = self.evaluate(guarded)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or expression} not true within {timeout}s")
            time.sleep(0.1)

    def screenshot(self, path: Path, *, whole_page: bool = False) -> None:
        """A PNG of the viewport, or of the whole page however tall (at the viewport's width)."""
        params: dict[str, Any] = {"format": "png"}
        if whole_page:
            size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
            width = self.evaluate("window.innerWidth")
            params.update(
                captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1}
            )
        data = self.call("Page.captureScreenshot", session=True, timeout=30, **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
