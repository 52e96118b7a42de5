"""A writer for the crash harness: puts blocks in a loop and acknowledges every flush.

``python -m tests.reliability.crash_writer STORE START`` writes prompt i = [i*1000, i*1000+64)
as one block whose values are a function of i, from i = START on, printing ``acked I`` after each
flush() returns; it runs until killed.
"""

import sys

import torch

from kvstore import KVStore, StoreConfig

SHAPE = (4, 2, 2, 64, 32)  # 64 KiB of float16 per block


def block(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(SHAPE, generator=g).to(torch.float16)


def prompt(i: int) -> list[int]:
    return list(range(i * 1000, i * 1000 + 64))


def main() -> None:
    path, start = sys.argv[1], int(sys.argv[2])
    with KVStore.open(StoreConfig(path=path, host_bytes=0, disk_bytes="4GiB")) as s:
        i = start
        while True:
            for j in range(i, i + 8):
                s.put(prompt(j), [block(j)])
            s.flush()
            print(f"acked {i + 7}", flush=True)
            i += 8


if __name__ == "__main__":
    main()
