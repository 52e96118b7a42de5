"""Headless Chromium driven through chromedriver's W3C WebDriver protocol (plain HTTP + JSON).

Used to test the built-in dashboard and to take the screenshot kept in docs/. The protocol needs
five endpoints, so this talks to chromedriver with urllib instead of adding a Selenium dependency.

``ensure_chromium()`` installs the Debian packages ``chromium`` and ``chromium-driver`` with
apt-get when they are missing (as root, or through passwordless sudo).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .ports import free_port

PACKAGES = ("chromium", "chromium-driver")
# Everything that would reach the network or do background work: none of it belongs in a test.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


class BrowserUnavailable(RuntimeError):
    """Chromium or chromedriver is missing and could not be installed; the message says why."""


def _binaries() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def ensure_chromium(timeout_s: float = 600) -> tuple[str, str]:
    """Paths of ``(chromium, chromedriver)``, installing the Debian packages when missing.

    Raises:
        BrowserUnavailable: not installed, and apt-get is absent, not permitted or failed.
    """
    found = _binaries()
    if found:
        return found
    if not shutil.which("apt-get"):
        raise BrowserUnavailable("chromium/chromedriver not installed and no apt-get to install them")
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        raise BrowserUnavailable("chromium/chromedriver not installed, and installing them needs "
                                 "root: run 'apt-get install chromium chromium-driver'")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    # A fresh machine has empty package lists: update once and retry before giving up.
    for step in (install, [*prefix, "apt-get", "update", "-q"], install):
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            raise BrowserUnavailable(f"'{' '.join(step)}' took over {timeout_s:.0f} s") from None
        if step is install and done.returncode == 0:
            break
    found = _binaries()
    if not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BrowserUnavailable(f"apt-get could not install {' and '.join(PACKAGES)}: {tail[0]}")
    return found


class Chromium:
    """One headless Chromium session with a fresh profile; use as a context manager.

    Args:
        width, height: window size in CSS pixels (the size of screenshots).
        timeout_s: how long to wait for chromedriver and the browser to come up.

    Raises:
        BrowserUnavailable: see ``ensure_chromium``; or the browser did not start.
    """

    def __init__(self, width: int = 1280, height: int = 900, timeout_s: float = 60):
        browser, driver = ensure_chromium()
        self._profile = tempfile.mkdtemp(prefix="kvstore-chromium-")
        port = free_port()
        self._base = f"http://127.0.0.1:{port}"
        self._driver = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    if self._call("GET", "/status")["ready"]:
                        break
                except (OSError, KeyError):
                    pass
                if time.monotonic() > deadline or self._driver.poll() is not None:
                    raise BrowserUnavailable("chromedriver did not start")
                time.sleep(0.05)
            options = {"binary": browser,
                       "args": [*CHROMIUM_FLAGS, f"--user-data-dir={self._profile}",
                                f"--window-size={width},{height}"]}
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                     "goog:chromeOptions": options}}}
            self._session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self._base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            value = json.loads(e.read() or b"{}").get("value", {})
            raise BrowserUnavailable(f"webdriver {method} {path}: {value.get('message', e)}") from None

    def _session_call(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._call(method, f"/session/{self._session}{path}", body)

    def _cdp(self, cmd: str, params: dict) -> Any:
        """A Chrome DevTools Protocol command, through chromedriver."""
        return self._session_call("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params})

    def get(self, url: str) -> None:
        """Navigates to ``url`` and waits for the page's load event."""
        self._session_call("POST", "/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """The value of ``script`` (a function body: ``return ...``) run in the page."""
        return self._session_call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout_s: float = 20, interval_s: float = 0.1) -> Any:
        """Re-runs ``script`` until it returns something truthy; returns that.

        Raises:
            TimeoutError: still falsy after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.run(script)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page condition not met within {timeout_s} s: {script}")
            time.sleep(interval_s)

    def screenshot(self, path: str | os.PathLike, full_page: bool = False) -> Path:
        """Saves a PNG of the viewport (or of the whole page) to ``path``."""
        if full_page:
            width, height = self.run("return [document.documentElement.clientWidth, "
                                     "document.documentElement.scrollHeight]")
            self._cdp("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        try:
            png = base64.b64decode(self._session_call("GET", "/screenshot"))
        finally:
            if full_page:
                self._cdp("Emulation.clearDeviceMetricsOverride", {})
        out = Path(path)
        out.write_bytes(png)
        return out

    def close(self) -> None:
        """Ends the session, chromedriver and the profile directory. Idempotent."""
        if getattr(self, "_session", None):
            try:
                self._session_call("DELETE", "")
            except (OSError, BrowserUnavailable):
                pass
            self._session = None
        if self._driver.poll() is None:
            self._driver.terminate()
            try:
                self._driver.wait(10)
            except subprocess.TimeoutExpired:
                self._driver.kill()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
