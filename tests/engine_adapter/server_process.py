"""The HTTP server as the tests run it: ``python -m engine_adapter.server`` in a subprocess on a
free loopback port (the server binds port 0 and prints the one it got), stopped at the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import urllib.request

START_TIMEOUT_S = 300  # model load on a loaded 2-core machine


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies (a killed run leaves no server)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """``with ServerProcess(store_dir, "--max-queue", "1") as s: s.url ...``"""

    def __init__(self, store: Path, *args: str, config: str | None = None, tmp: Path | None = None):
        self.store, self.args = Path(store), list(args)
        if config is not None:
            path = (tmp or self.store.parent) / f"server-{os.getpid()}-{id(self)}.toml"
            path.write_text(config)
            self.args += ["--config", str(path)]
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log: list[str] = []

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "engine_adapter.server", "--store", str(self.store),
               "--host", "127.0.0.1", "--port", "0", *self.args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        found = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.log.append(line)
                m = re.match(r"serving (http://127\.0\.0\.1:\d+)/v1", line)
                if m and not found.is_set():
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(START_TIMEOUT_S) or not self.url:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.log[-30:]))
        deadline = time.monotonic() + 60
        while True:  # bound, announced; wait until it answers
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:  # refused, reset, or an HTTP error
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("server did not answer /health:\n" + "".join(self.log[-30:]))
            time.sleep(0.2)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (0 when absent)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name + ("{" if labels else " ")):
                if labels:
                    got = line[len(name) + 1:line.index("}")]
                    if ",".join(sorted(got.split(","))) != want:
                        continue
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
