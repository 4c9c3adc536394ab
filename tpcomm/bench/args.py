"""Argument types and resolution shared by the sub-benchmarks (``tpcomm bench model``,
``tpcomm bench overlap``)."""
from __future__ import annotations

import argparse
import os

import torch

from ..cli import UsageError
from ..launch import under_torchrun


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: "1,8,32" -> (1, 8, 32), every value >= 1, at least one."""
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    val = int(text)
    if val < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return val


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
