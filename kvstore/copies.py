"""Block copies between host and device memory, and first-touch zeroing of fresh buffers.

Kept apart from the tiers because the store, the write-behind queue and every RAM tier copy
blocks the same way (copies into fresh memory were measured 10x slower than into touched memory,
so buffers are zeroed once when allocated).
"""

from __future__ import annotations

import numpy as np

from .codec import byte_view
from .lazy_torch import torch


def plain_cpu(t: torch.Tensor) -> bool:
    """Whether ``t`` is contiguous host memory (what numpy copies and the codec read as bytes)."""
    return t.device.type == "cpu" and t.is_contiguous()


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """One dedicated copy stream per CUDA device, so copies overlap the engine's compute."""
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device=device)
    return stream


def copy_block(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src``, safe to read on return from the CPU and from the current CUDA stream.

    - CPU to CPU (contiguous): a single-threaded memcpy (numpy). torch's intra-op threads were
      measured to stall a 1.4 MiB copy for a scheduler tick (8 ms) when the engine keeps the
      other cores busy, and a memcpy needs no threads.
    - Involving CUDA: a ``non_blocking`` copy on a dedicated stream that first waits for the
      current stream (which produced ``src``). Device to device, the current stream then waits
      on an event (the CPU does not block; every slab copy is on the same stream, so a slot is
      never overwritten before an earlier copy out of it ran). With a host buffer involved, the
      CPU waits on the event, because it may write or read that buffer next.
    """
    if plain_cpu(dst) and plain_cpu(src) and dst.dtype == src.dtype and dst.shape == src.shape:
        np.copyto(byte_view(dst), byte_view(src))
        return
    if (dst.is_cuda or src.is_cuda) and torch.cuda.is_available():
        device = dst.device if dst.is_cuda else src.device
        stream = _copy_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        if dst.is_cuda and src.is_cuda:
            torch.cuda.current_stream(device).wait_event(done)
        else:
            done.synchronize()
        return
    dst.copy_(src)


def fill_zero(t: torch.Tensor) -> None:
    """Zeroes ``t`` (touching every page now, not on the engine's first writes)."""
    if plain_cpu(t):
        byte_view(t).fill(0)
    else:
        t.zero_()
