"""A synthetic chat workload on a scratch store, served with the built-in dashboard.

    python -m tools.dashboard_demo [--seconds 90] [--screenshot docs/dashboard.png]

Users hold multi-turn conversations that share a system prompt, so later turns hit their own
history; some requests bring a new document (cold misses). Blocks have the real layout of
SmolLM2-135M in bf16 (1.4 MiB); the RAM tier is small and has a short idle TTL, so the dashboard
shows spills, capacity and TTL evictions too. Without ``--screenshot`` it keeps serving until
Ctrl-C, for a look at the dashboard without an engine.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time

import torch

from kvstore import KVStore, StoreConfig

from .exporter import start_metrics_server

BT = 64
SHAPE = (30, 2, 3, BT, 64)  # SmolLM2-135M: layers, k/v, kv heads, tokens, head dim


def block(rng: torch.Generator) -> torch.Tensor:
    return (torch.randn(SHAPE, generator=rng) * 0.5).to(torch.bfloat16)


def run(store: KVStore, seconds: float, stop: threading.Event, seed: int = 0) -> None:
    """Requests for ``seconds`` (or until ``stop``); each looks up, loads its hit prefix and stores
    the new blocks."""
    rnd, rng = random.Random(seed), torch.Generator().manual_seed(seed)
    system = [rnd.randrange(50_000) for _ in range(4 * BT)]
    chats: dict[int, list[int]] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        user = rnd.randrange(12)
        if rnd.random() < 0.15 or user not in chats:  # a new conversation, maybe with a document
            doc = [rnd.randrange(50_000) for _ in range(rnd.randrange(0, 6) * BT)]
            chats[user] = system + doc
        ids = chats[user] + [rnd.randrange(50_000) for _ in range(rnd.randrange(20, 2 * BT))]
        m = store.match(ids)
        loaded = len(store.get(m))
        n_full = len(ids) // BT
        store.put(ids[:n_full * BT], [block(rng) for _ in range(n_full - loaded)], start_block=loaded)
        chats[user] = ids + [rnd.randrange(50_000) for _ in range(rnd.randrange(BT // 2, 2 * BT))]
        time.sleep(rnd.uniform(0.02, 0.12))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=90.0, help="length of the workload")
    p.add_argument("--interval", type=float, default=3.0, help="dashboard sampling interval")
    p.add_argument("--port", type=int, default=0, help="port of the dashboard (0: a free one)")
    p.add_argument("--screenshot", metavar="PNG", help="save a full-page screenshot and exit")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvstore-demo-") as tmp:
        config = StoreConfig(path=f"{tmp}/store", block_tokens=BT, host_bytes="48MiB", host_ttl_s=20,
                             disk_bytes="160MiB", disk_ttl_s="1h")
        with KVStore.open(config) as store, \
                start_metrics_server(store, port=args.port, interval_s=args.interval) as server:
            print(f"dashboard at {server.url}", flush=True)
            stop = threading.Event()
            worker = threading.Thread(target=run, args=(store, args.seconds, stop))
            worker.start()
            try:
                if args.screenshot:
                    from .browser import Chromium

                    # Taken while requests still run, so the latest sample is not an idle one.
                    time.sleep(max(0.0, args.seconds - args.interval))
                    with Chromium(width=1280, height=900) as browser:
                        browser.get(server.url)
                        browser.wait_for("return document.body.dataset.ready")
                        print(f"saved {browser.screenshot(args.screenshot, full_page=True)}")
                else:
                    worker.join()
                    print("workload done; still serving (Ctrl-C stops)", flush=True)
                    while True:
                        time.sleep(1)
            except KeyboardInterrupt:
                pass
            finally:
                stop.set()
                worker.join()


if __name__ == "__main__":
    main()
