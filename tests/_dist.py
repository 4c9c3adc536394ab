"""Helpers for multi-rank tests: run a function on N spawned ranks with gloo initialized."""
from __future__ import annotations

import torch

from tpcomm.groups.launch import init_rank, spawn
from tpcomm.testing import exact


def init_gloo(threads: int = 1) -> None:
    init_rank("cpu", 0, threads)


def exact_input(numel: int, rank: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    """Small integers, so every sum is exact in every dtype and every order."""
    return exact(numel, rank, dtype, salt)


def run(fn, world: int, *args, env=None, timeout_s: float = 240.0, **kw):
    return spawn(fn, world, *args, env=env, timeout_s=timeout_s, **kw)
