"""Headless Chromium driven over the DevTools protocol (CDP), for the browser tests.

    with Chromium() as browser:
        page = browser.new_page()
        page.navigate("http://127.0.0.1:8188/")
        page.wait_for("window.app && window.app.graph && window.LiteGraph", timeout=60)
        n = page.evaluate("app.graph._nodes.length")
        page.screenshot(Path("shot.png"))

Only aiohttp (already in the ComfyUI environment) is needed: no playwright, no driver download.
Chromium is Debian's package (scripts/install_chromium.sh); LLMDIFF_CHROMIUM names another binary.

Lifetime: Chromium runs in its own process group with a throw-away profile directory; close()
kills the group, waits for it and removes the profile. The DevTools port is chosen by Chromium
itself (--remote-debugging-port=0, read back from DevToolsActivePort), so parallel runs never race.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio",
    "--hide-scrollbars", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
)


class BrowserError(RuntimeError):
    """Chromium failed to start, a CDP call failed, or a page-side wait timed out."""


def find_chromium() -> str | None:
    """The Chromium binary: $LLMDIFF_CHROMIUM, else the first known name on PATH."""
    explicit = os.environ.get("LLMDIFF_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    """One browser tab over its own CDP websocket. All methods block; timeouts are in seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ws_url: str, default_timeout: float = 60.0) -> None:
        self._loop = loop
        self._ws_url = ws_url
        self.default_timeout = default_timeout
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._load_event: asyncio.Event | None = None
        self.console: list[str] = []  # console messages and uncaught page exceptions, for diagnostics

    # ---- plumbing -------------------------------------------------------------------------------
    def _run(self, coro: Any, timeout: float | None) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout or self.default_timeout))

    async def _connect(self) -> None:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self._ws_url, max_msg_size=0)
        self._load_event = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())
        for domain in ("Page", "Runtime"):
            await self._call(f"{domain}.enable", {})

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                self._on_event(data.get("method", ""), data.get("params", {}))
        for fut in self._pending.values():  # the socket closed: fail every waiting call
            if not fut.done():
                fut.set_exception(BrowserError("the DevTools connection closed"))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired" and self._load_event is not None:
            self._load_event.set()
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            desc = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append(f"uncaught: {desc}")

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self._ws is not None
        self._next_id += 1
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[self._next_id] = fut
        await self._ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        reply = await fut
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """A raw CDP command."""
        return self._run(self._call(method, params or {}), timeout)

    # ---- page operations ------------------------------------------------------------------------
    def navigate(self, url: str, timeout: float | None = None) -> None:
        """Open `url` and wait for its load event."""
        async def go() -> None:
            assert self._load_event is not None
            self._load_event.clear()
            result = await self._call("Page.navigate", {"url": url})
            if result.get("errorText"):
                raise BrowserError(f"navigation to {url} failed: {result['errorText']}")
            await self._load_event.wait()
        self._run(go(), timeout)

    def set_viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """Evaluate JS in the page (promises are awaited) and return its JSON value.

        A page-side exception becomes a BrowserError carrying the JS message and stack.
        """
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "userGesture": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            desc = details.get("exception", {}).get("description") or details.get("text", "")
            raise BrowserError(f"JS error: {desc}\n--- expression ---\n{expression[:2000]}")
        return result.get("result", {}).get("value")

    def wait_for(self, condition: str, timeout: float | None = None, interval: float = 0.2) -> Any:
        """Poll the JS expression `condition` until it is truthy; return its value."""
        timeout = timeout or self.default_timeout
        deadline = time.monotonic() + timeout
        last_error: str | None = None
        while True:
            try:
                value = self.evaluate(f"(() => {{ try {{ return ({condition}); }} catch (e) {{ return null; }} }})()",
                                      timeout=max(1.0, deadline - time.monotonic()))
            except BrowserError as e:
                value, last_error = None, str(e)
            if value:
                return value
            if time.monotonic() > deadline:
                tail = "\n".join(self.console[-20:])
                raise BrowserError(f"timed out after {timeout:.0f} s waiting for: {condition}"
                                   f"{f' (last error: {last_error})' if last_error else ''}\n--- console ---\n{tail}")
            self._loop.run_until_complete(asyncio.sleep(interval))

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport."""
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        async def shut() -> None:
            if self._ws is not None:
                await self._ws.close()
            if self._reader is not None:
                try:
                    await asyncio.wait_for(self._reader, 5)
                except (asyncio.TimeoutError, Exception):
                    self._reader.cancel()
            if self._session is not None:
                await self._session.close()
        if not self._loop.is_closed():
            self._loop.run_until_complete(shut())
        self._ws = self._session = self._reader = None


class Chromium:
    """A headless Chromium process (context manager). `new_page()` opens tabs driven over CDP."""

    def __init__(self, binary: str | None = None, window: tuple[int, int] = (1600, 1000),
                 startup_timeout: float = 60.0, extra_flags: tuple[str, ...] = ()) -> None:
        found = binary or find_chromium()
        if not found:
            raise BrowserError("no Chromium found: run scripts/install_chromium.sh or set LLMDIFF_CHROMIUM")
        self.binary = found
        self.window = window
        self.startup_timeout = startup_timeout
        self.extra_flags = extra_flags
        self.profile = Path(tempfile.mkdtemp(prefix="llmdiff-chromium-"))
        self.log_path = self.profile.parent / f"{self.profile.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._pages: list[Page] = []

    def start(self) -> "Chromium":
        cmd = [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
               f"--window-size={self.window[0]},{self.window[1]}", *self.extra_flags, "about:blank"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"  # line 1: the port Chromium picked
        deadline = time.monotonic() + self.startup_timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                self._fail(f"Chromium exited with code {self.proc.returncode} during startup")
            if time.monotonic() > deadline:
                self._fail(f"Chromium did not open its DevTools port within {self.startup_timeout:.0f} s")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        return self

    def _fail(self, what: str) -> None:
        log = self.log_tail()
        self.close()
        raise BrowserError(f"{what}.\n--- chromium log ---\n{log}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _http_json(self, path: str, method: str = "GET") -> Any:
        async def get() -> Any:
            async with aiohttp.ClientSession() as s:
                async with s.request(method, f"http://127.0.0.1:{self.port}{path}") as r:
                    r.raise_for_status()
                    return await r.json(content_type=None)
        return self._loop.run_until_complete(asyncio.wait_for(get(), 15))

    def new_page(self, default_timeout: float = 60.0) -> Page:
        """A new tab (about:blank) with the Page and Runtime domains enabled."""
        target = self._http_json("/json/new?about:blank", method="PUT")
        page = Page(self._loop, target["webSocketDebuggerUrl"], default_timeout)
        self._loop.run_until_complete(asyncio.wait_for(page._connect(), 15))
        self._pages.append(page)
        return page

    def close(self, timeout: float = 10.0) -> None:
        """Close the tabs, kill Chromium's process group, wait, remove the profile. Safe twice."""
        for page in self._pages:
            try:
                page.close()
            except Exception:  # a dead browser cannot close its sockets cleanly; the kill follows
                pass
        self._pages.clear()
        proc, self.proc = self.proc, None
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # helpers (zygote, renderers) share the group: make sure none survived
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self._loop.is_closed():
            self._loop.close()
        shutil.rmtree(self.profile, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "Chromium":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
