"""Measured algorithm table for the GPU backend (pure: no CUDA, no Triton).

Until the GPU kernels are measured, every GPU call goes to torch.distributed (NCCL).
"""
from __future__ import annotations

import torch


def select_cuda(op: str, nbytes: int, dtype: torch.dtype, world_size: int) -> str:
    return "torch"
