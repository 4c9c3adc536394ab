"""Decode attention of the TP Llama model: one new token per sequence against the static KV
cache, up to the filled length read on the device (so a CUDA graph of the step stays valid),
with the step's RoPE and cache write in the same kernel.

On CUDA it is the Triton kernel of ``tpcomm/kernels/decode_attention.py`` (split over the cache,
GQA without repeating K and V, positions past the length never read), registered as
``torch.ops.tpcomm.decode_attention`` (the caches declared mutated) so that torch.compile keeps
it as one node. Eagerly the launcher is called directly (no dispatcher on the host path).
Elsewhere (CPU), and as the tests' oracle: :func:`decode_attention_reference`, torch ops.

Shapes: qkv [B, (HQ + 2 HK) * D] (this step's fused projection, before RoPE); cos, sin [D];
k_cache, v_cache [>= B, HK, S, D], written at ``pos``; pos int64 [1] on qkv's device, this
step's position; counters: None, or int32 zeros [>= B * HK] on qkv's device that the kernel
uses and leaves zero (it combines its splits in the last program to finish; the model keeps
one per layer, so a step allocates nothing for them). Returns [B, HQ, D].
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch.library import custom_op

_is_compiling = torch.compiler.is_dynamo_compiling   # see tpcomm/communicator.py


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, h, D]; cos, sin: [T, D] (rotate-half layout, as Hugging Face)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def decode_attention_reference(qkv, cos, sin, k_cache, v_cache, pos):
    """The same in torch ops: RoPE, ``index_copy_`` into the caches, masked attention over
    the whole cache (positions after ``pos`` masked out)."""
    B = qkv.shape[0]
    hk, S, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    hq = qkv.shape[1] // D - 2 * hk
    q, k, v = qkv.view(B, 1, hq + 2 * hk, D).split([hq, hk, hk], dim=2)
    q = apply_rope(q, cos[None], sin[None]).transpose(1, 2)                    # [B, hq, 1, D]
    k_cache[:B].index_copy_(2, pos, apply_rope(k, cos[None], sin[None]).transpose(1, 2))
    v_cache[:B].index_copy_(2, pos, v.transpose(1, 2))
    mask = torch.arange(S, device=qkv.device)[None, :] <= pos[:, None]            # [1, S]
    y = F.scaled_dot_product_attention(q, k_cache[:B], v_cache[:B], attn_mask=mask,
                                       enable_gqa=hq != hk)
    return y.view(B, hq, D)


def _launch(qkv, cos, sin, k_cache, v_cache, pos, counters=None, **tuning):
    """The kernel (``tuning``: keywords of ``decode_attention_rope``, e.g. fold_combine)."""
    from ..kernels.decode_attention import decode_attention_rope as kernel
    D = k_cache.shape[-1]
    hq = qkv.shape[1] // D - 2 * k_cache.shape[1]
    out = torch.empty(qkv.shape[0], hq, D, dtype=qkv.dtype, device=qkv.device)
    kernel(qkv, cos, sin, k_cache, v_cache, pos, out, 1.0 / math.sqrt(D), counters=counters,
           **tuning)
    return out


def use_kernel(t: torch.Tensor) -> bool:
    """The Triton kernel runs for tensors on CUDA (and under Triton's interpreter, where the
    CPU tests run it)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# counters: declared mutated (the kernel counts in them and resets them), so that inductor
# neither reorders the op nor treats them as constants
@custom_op("tpcomm::decode_attention", mutates_args=("k_cache", "v_cache", "counters"))
def _decode_attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                         counters: torch.Tensor | None = None) -> torch.Tensor:
    if use_kernel(qkv):
        return _launch(qkv, cos, sin, k_cache, v_cache, pos, counters)
    return decode_attention_reference(qkv, cos, sin, k_cache, v_cache, pos).clone()


@_decode_attention_op.register_fake
def _(qkv, cos, sin, k_cache, v_cache, pos, counters=None):
    D = k_cache.shape[-1]
    return qkv.new_empty((qkv.shape[0], qkv.shape[1] // D - 2 * k_cache.shape[1], D))


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     counters: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE, cache write at ``pos``, softmax(q K^T / sqrt(D)) V over cache positions [0, pos]
    (shapes: the module docstring)."""
    if _is_compiling():
        return torch.ops.tpcomm.decode_attention(qkv, cos, sin, k_cache, v_cache, pos, counters)
    if use_kernel(qkv):
        return _launch(qkv, cos, sin, k_cache, v_cache, pos, counters)
    return decode_attention_reference(qkv, cos, sin, k_cache, v_cache, pos)
