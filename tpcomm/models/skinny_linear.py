"""The TP model's linears at decode sizes: the skinny GEMM of ``tpcomm/kernels/skinny_gemm.py``
where a measured table says it beats cuBLAS, else ``F.linear``.

Routing (:func:`maybe_linear`, a pure lookup, decided at trace time under torch.compile): the
kernel runs for x on CUDA (or under Triton's interpreter, where the CPU tests run it) with at
most 16 rows (M = the product of x's leading dims, a plain int: a symbolic M under dynamic
shapes never takes it), 16-bit x and weight of one dtype, weight [N, K] contiguous, and an entry
in ``TUNED`` for (N, K, epilogue) whose row bound covers M. Anything else returns None and the
caller runs ``F.linear``. ``TUNED`` holds only measured shapes (today the llama3_8b world-1
ones, on one H200); every other shape runs cuBLAS.

``TUNED`` maps (N weight rows, K, epilogue) to ((m_max, config or None), ...) in increasing
m_max: the first entry with m_max >= M decides (None: cuBLAS). Epilogue "" is the plain GEMM,
"swiglu" the gate_up projection writing silu(gate) * up. Filled only from
``scripts/gpu_skinny_gemm.py`` (it prints the literal), with configs that beat F.linear there
by >= 2 %; M = 1's measured config serves M = 1, M = 8's serves 2..8.

Under torch.compile the kernel is ``torch.ops.tpcomm.skinny_linear`` (the counters declared
mutated); eagerly the launcher is called directly (no dispatcher on the host path).

Counters: each linear keeps its own int32 zeros (:func:`maybe_counters`, made with the layer so
a CUDA graph capture never allocates them), which the kernel's split-K uses and leaves zero. A
layer made with ``TPCOMM_SKINNY_GEMM=0`` has none and always runs ``F.linear`` (the A/B switch).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.library import custom_op

from ..settings import get_settings
from .attention import use_kernel

_is_compiling = torch.compiler.is_dynamo_compiling

MAX_ROWS = 16           # = kernels.skinny_gemm.MAX_M
COUNTER_BLOCK = 16      # = kernels.skinny_gemm.MIN_BLOCK_N: one counter per smallest column block
_DTYPES = (torch.bfloat16, torch.float16)

# (N weight rows, K, epilogue) -> ((m_max, config or None), ...); a config is
# (block_n, block_k, split_k, num_warps, num_stages, use_dot), kernels.skinny_gemm.SkinnyConfig's
# fields (plain tuples: importing the model does not import Triton). Measured on one H200,
# 2026-12-03 16:01 UTC (scripts/gpu_skinny_gemm.py --budget-s 150, bf16, llama3_8b at world 1;
# benchmarks/results/skinny-gemm-h200-2026-12-03.md), us per call in CUDA graphs over >= 200 MB
# of rotating weights, the best config against F.linear (cuBLAS, its split-K reduce included)
# at M = 1 and M = 8;
# entries only where the kernel won by >= 2 % (gate_up plain lost, 0.99x; qkv at M = 8 won
# 1.01x only); M = 8's config serves M = 2..8, M > 8 is not measured (cuBLAS):
TUNED: dict = {
    # o_proj: 11.04 us (3.04 TB/s) vs 13.51 at M = 1 (1.22x); 11.43 vs 13.22 at M = 8 (1.16x)
    (4096, 4096, ""): ((1, (64, 128, 4, 4, 4, True)), (8, (64, 128, 4, 4, 4, True))),
    # down_proj: 29.73 us (3.95 TB/s) vs 31.50 (1.06x); 30.56 vs 32.20 (1.05x)
    (4096, 14336, ""): ((1, (64, 128, 4, 4, 4, True)), (8, (64, 128, 4, 4, 4, True))),
    # qkv: 1.05x at M = 1; 1.01x at M = 8 (not taken)
    (6144, 4096, ""): ((1, (64, 128, 2, 4, 4, True)),),
    # gate_up + SwiGLU: 56.19 us (4.18 TB/s) vs 60.76 for F.linear + a SwiGLU kernel (1.08x);
    # 56.58 vs 63.14 (1.12x)
    (28672, 4096, "swiglu"): ((1, (64, 128, 1, 4, 4, True)), (8, (64, 128, 1, 4, 4, True))),
    # lm_head: 231.39 us (4.54 TB/s) vs 239.80 (1.04x); 235.32 vs 242.76 (1.03x)
    (128256, 4096, ""): ((1, (128, 128, 1, 4, 3, True)), (8, (64, 128, 1, 4, 4, True))),
}


def counters_for(n_weight_rows: int, device) -> torch.Tensor:
    """Zeroed counters for any config of a linear of ``n_weight_rows`` output rows (enough for
    its SwiGLU form, which has half the columns)."""
    return torch.zeros(-(-n_weight_rows // COUNTER_BLOCK), dtype=torch.int32, device=device)


def maybe_counters(n_weight_rows: int, device) -> torch.Tensor | None:
    """A new layer's counters, or None (the layer never takes the skinny GEMM) with
    ``TPCOMM_SKINNY_GEMM=0``."""
    return counters_for(n_weight_rows, device) if get_settings().skinny_gemm else None


def lookup(n: int, k: int, m: int, epilogue: str = ""):
    """The tuned config for an [m, k] x [n, k]^T GEMM with ``epilogue``, or None (cuBLAS)."""
    for m_max, cfg in TUNED.get((n, k, epilogue), ()):
        if m <= m_max:
            return cfg
    return None


def _rows(x: torch.Tensor) -> int | None:
    """M of x as a plain int, None where a dim is symbolic."""
    dims = x.shape[:-1]
    if not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)


def _config(x: torch.Tensor, weight: torch.Tensor, epilogue: str):
    if not TUNED or not use_kernel(x):
        return None
    m = _rows(x)
    if (m is None or not 1 <= m <= MAX_ROWS or x.dtype not in _DTYPES
            or weight.dtype != x.dtype or weight.dim() != 2 or not weight.is_contiguous()
            or x.shape[-1] != weight.shape[1] or x.stride(-1) != 1):
        return None
    return lookup(weight.shape[0], weight.shape[1], m, epilogue)


def _launch(x2, weight, counters, swiglu, cfg):
    """The kernel with ``cfg``, a TUNED config tuple (or the op's list of ints)."""
    from ..kernels.skinny_gemm import SkinnyConfig, skinny_gemm
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
    return skinny_gemm(x2, weight, out, SkinnyConfig.from_list(cfg), swiglu=swiglu,
                       counters=counters)


@custom_op("tpcomm::skinny_linear", mutates_args=("counters",))
def _skinny_linear_op(x: torch.Tensor, weight: torch.Tensor, counters: torch.Tensor,
                      swiglu: bool, config: list[int]) -> torch.Tensor:
    return _launch(x, weight, counters, swiglu, config)


@_skinny_linear_op.register_fake
def _(x, weight, counters, swiglu, config):
    return x.new_empty((x.shape[0], weight.shape[0] // 2 if swiglu else weight.shape[0]))


def maybe_linear(x: torch.Tensor, weight: torch.Tensor, counters: torch.Tensor | None, *,
                 swiglu: bool = False) -> torch.Tensor | None:
    """x @ weight^T (or silu(gate) * up of it: ``swiglu``, weight [gate rows; up rows]) by the
    skinny GEMM, [..., N] (or [..., N / 2]); None where the routing (module docstring) says
    cuBLAS or ``counters`` is None."""
    if counters is None:
        return None
    cfg = _config(x, weight, "swiglu" if swiglu else "")
    if cfg is None:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if _is_compiling():
        y = torch.ops.tpcomm.skinny_linear(x2, weight, counters, swiglu, [int(v) for v in cfg])
    else:
        y = _launch(x2, weight, counters, swiglu, cfg)
    return y.view(*x.shape[:-1], y.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, counters: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T: the skinny GEMM where :func:`maybe_linear` takes it, else ``F.linear``."""
    y = maybe_linear(x, weight, counters)
    return F.linear(x, weight) if y is None else y
