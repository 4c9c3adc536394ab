"""Helpers for multi-rank tests: run a function on N spawned ranks with gloo initialized."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tpcomm.launch import spawn
from tpcomm.testing import exact


def init_gloo(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")


def exact_input(numel: int, rank: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    """Small integers, so every sum is exact in every dtype and every order."""
    return exact(numel, rank, dtype, salt)


def run(fn, world: int, *args, env=None, timeout_s: float = 240.0, **kw):
    return spawn(fn, world, *args, env=env, timeout_s=timeout_s, **kw)
