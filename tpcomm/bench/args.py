"""Argument resolution shared by the sub-benchmarks (``tpcomm bench model``, ``... overlap``)."""
from __future__ import annotations

import os

import torch

from ..cli import UsageError
from ..launch import under_torchrun


def resolve_device(device: str | None) -> str:
    """--device, defaulting to cuda where torch sees a GPU; UsageError for cuda without one."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU")
    return device


def resolve_world(nranks: int | None, device: str) -> int:
    """Ranks of the run: torchrun's world, else -n (default 2 on cpu, every GPU on cuda)."""
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if nranks is not None and nranks != world:
            raise UsageError(f"-n {nranks}, but torchrun started {world} ranks")
        return world
    if device == "cpu":
        return nranks or 2
    gpus = torch.cuda.device_count()
    world = nranks or gpus
    if world > gpus:
        raise UsageError(f"-n {world} ranks need {world} GPUs; {gpus} visible")
    return world
