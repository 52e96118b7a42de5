"""Prometheus export of a store's metrics, served beside the built-in dashboard.

An engine process serves its own store in-process::

    server = start_metrics_server(store)          # http://127.0.0.1:9477/
    ...
    server.close()

``kvstore serve-metrics`` runs the same server from outside the engine, over a store the tool
opened read-only: it passes ``process_counters=False`` and exports the store's lifetime counters
(every process's, persisted every few seconds) instead of its own. Names, help texts and label
values come from kvstore/metrics.py's declarations.

Routes: ``/metrics`` (Prometheus text or OpenMetrics, by the Accept header), ``/`` (the
dashboard, tools/dashboard.html) and ``/api/history`` (the samples the dashboard draws).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from kvstore import KVStore
from kvstore.prometheus import StoreCollector

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9477
DASHBOARD = Path(__file__).with_name("dashboard.html")


class History:
    """The registry's samples taken every ``interval_s``, the last ``keep`` of them.

    Histogram buckets are left out (the dashboard needs only ``_sum`` and ``_count``).
    """

    def __init__(self, registry: CollectorRegistry, interval_s: float, keep: int):
        self.registry = registry
        self.interval_s = interval_s
        self.info: dict[str, str] = {}
        self._samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def sample(self) -> None:
        values: dict[str, float] = {}
        info: dict[str, str] = {}
        for fam in self.registry.collect():
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    continue
                if s.name == "kvstore_store_info":
                    info = dict(s.labels)
                    continue
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        with self._lock:
            self.info = info
            self._samples.append((time.time(), values))

    def table(self, since: float = 0.0) -> dict:
        """``{"interval_s", "info", "series": [names], "samples": [[t, v...]]}`` after ``since``.

        ``samples[i][j + 1]`` is the value of ``series[j]`` at ``samples[i][0]``, or None.
        """
        with self._lock:
            rows = [(t, v) for t, v in self._samples if t > since]
            info = self.info
        series = sorted({name for _, v in rows for name in v})
        return {"interval_s": self.interval_s, "info": info, "series": series,
                "samples": [[t, *(v.get(n) for n in series)] for t, v in rows]}


class MetricsServer:
    """An HTTP server on a daemon thread: ``/metrics``, ``/`` (dashboard), ``/api/history``.

    Raises (at construction):
        OSError: the address cannot be bound.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, interval_s: float,
                 history_s: float):
        self.registry = registry
        self.history = History(registry, interval_s, max(2, int(history_s / interval_s)))
        page = DASHBOARD.read_bytes()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/metrics":
                    encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                    self._send(200, ctype, encoder(server.registry))
                elif url.path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", page)
                elif url.path == "/api/history":
                    q = urllib.parse.parse_qs(url.query)
                    try:
                        since = float(q.get("since", ["0"])[0])
                    except ValueError:
                        self._send(400, "text/plain", b"since: expected a unix time\n")
                        return
                    body = json.dumps(server.history.table(since)).encode()
                    self._send(200, "application/json", body)
                else:
                    self._send(404, "text/plain", b"not found: try /metrics or /\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass  # scrapes every few seconds would flood the engine's stderr

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address[:2]
        self._stop = threading.Event()
        self.history.sample()
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, name="kvstore-metrics-http", daemon=True),
            threading.Thread(target=self._sampler, name="kvstore-metrics-sampler", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def _sampler(self) -> None:
        while not self._stop.wait(self.history.interval_s):
            try:
                self.history.sample()
            except Exception:  # a closed or failing store must not kill the thread: retry next tick
                pass

    def close(self) -> None:
        """Stops serving and sampling. Idempotent."""
        if not self._stop.is_set():
            self._stop.set()
            self._httpd.shutdown()
            self._httpd.server_close()
            for t in self._threads:
                t.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_metrics_server(store: KVStore, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                         process_counters: bool = True, interval_s: float = 5.0,
                         history_s: float = 3600.0) -> MetricsServer:
    """Serves ``store``'s metrics and the dashboard until ``close()``.

    Args:
        store: an open store (the engine's own, or one a tool opened).
        host, port: where to listen; 127.0.0.1 unless told otherwise; port 0 picks a free one.
        process_counters: see ``kvstore.prometheus.StoreCollector``.
        interval_s: how often the dashboard's history is sampled.
        history_s: how much history the dashboard keeps.

    Raises:
        OSError: the address cannot be bound.
        ValueError: ``interval_s`` or ``history_s`` is not positive.
    """
    if not interval_s > 0 or not history_s > 0:
        raise ValueError(f"interval_s and history_s: expected seconds > 0, got {interval_s!r}, {history_s!r}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, process_counters))
    return MetricsServer(registry, host, port, interval_s, history_s)
