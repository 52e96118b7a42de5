"""A TCP relay between a client and a real server that can reset the connection mid-reply:
the network fault "connection reset by peer" in the middle of a pipelined batch.

Not a stand-in for the server: every byte goes to and comes from the real one.
"""

from __future__ import annotations

import select
import socket
import struct
import threading


class ResetProxy:
    """``with ResetProxy(port) as p: p.url ...; p.reset_after(n)`` resets the next connection
    that has relayed ``n`` more bytes of the server's replies (RST, not FIN)."""

    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self.target = (host, target_port)
        self._listen = socket.create_server((host, 0))
        self.url = f"redis://{host}:{self._listen.getsockname()[1]}"
        self._lock = threading.Lock()
        self._budget: int | None = None
        self.resets = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def reset_after(self, nbytes: int | None) -> None:
        """Arms (or with None disarms) one reset after ``nbytes`` more reply bytes."""
        with self._lock:
            self._budget = nbytes

    def __enter__(self) -> ResetProxy:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._listen.close()
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            t = threading.Thread(target=self._relay, args=(client, server), daemon=True)
            t.start()
            self._threads.append(t)

    def _take(self, n: int) -> int | None:
        """How many of ``n`` reply bytes to pass before resetting, or None: pass them all."""
        with self._lock:
            if self._budget is None:
                return None
            if n < self._budget:
                self._budget -= n
                return None
            cut, self._budget = self._budget, None
            self.resets += 1
            return cut

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, server], [], [], 0.2)
                for s in ready:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    if s is client:
                        server.sendall(data)
                        continue
                    cut = self._take(len(data))
                    if cut is None:
                        client.sendall(data)
                        continue
                    client.sendall(data[:cut])
                    # SO_LINGER 0: close sends RST; the client reads ECONNRESET mid-reply.
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
        except OSError:
            return
        finally:
            client.close()
            server.close()
