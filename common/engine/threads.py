"""Scoped intra-op thread count for tiny training problems.

Adapter / residual / prompt-head steps on cached features are tiny matmuls; on a few shared CPU cores,
thread synchronisation then costs far more than the arithmetic (measured on 2 loaded cores: a 32x128 @
128x32 linear takes ~550 us with 2 threads and ~26 us with 1). Wrap such training loops in
`with torch_threads(1):` and leave image encoding multi-threaded.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` intra-op threads (None or 0: unchanged), restoring the old count after."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)
