"""``kvstore serve-metrics``: Prometheus metrics and the dashboard of a store, served from
outside the engine (disk-tier figures) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal
import threading

from kvstore import KVStoreError

from .options import port, positive_seconds
from .reading import open_view
from .render import Result, print_text

NAME = "serve-metrics"


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser(NAME, parents=[common], help="serve the disk tier's metrics and the dashboard",
                        description="Serve Prometheus metrics (/metrics) and the dashboard (/) for a store, "
                                    "from outside the engine: disk-tier figures only.")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sp.add_argument("--port", type=port, default=9477, help="port (default 9477; 0 picks a free one)")
    sp.add_argument("--interval", type=positive_seconds, default=5.0, metavar="S",
                    help="dashboard sampling interval, seconds > 0 (default 5)")


def run(args: argparse.Namespace) -> Result:
    """Prints where it serves (a JSON line with --json) and serves until stopped; no result."""
    from ..exporter import start_metrics_server  # prometheus_client: only this command needs it

    with open_view(args) as view:
        try:
            server = start_metrics_server(view.store, args.host, args.port, process_counters=False,
                                          interval_s=args.interval)
        except OSError as e:  # the address is taken or cannot be bound: say which one
            raise KVStoreError(f"--host {args.host} --port {args.port}: cannot listen there: "
                               f"{e.strerror or e}") from None
        with server:
            info = {"url": server.url, "metrics": server.url + "metrics", "dashboard": server.url}
            print_text(json.dumps(info) if args.json else
                       f"serving {info['metrics']} and the dashboard at {info['dashboard']} "
                       f"(disk-tier figures of {view.path}; Ctrl-C stops)")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(1):
                    pass
            except KeyboardInterrupt:
                pass
    return Result(None)
