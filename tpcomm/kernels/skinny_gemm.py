"""Skinny GEMM (the decode GEMV): y[M, N] = x[M, K] @ W[N, K]^T for M <= 16 rows, built to
stream W at close to HBM bandwidth, with the split-K reduction folded into the kernel.

Problem: a decode step multiplies a handful of rows by every weight of the model once, so its
GEMMs are bound by reading W (16.1 GB per Llama-3-8B step, 3.7 ms at the 4.3 TB/s an H200
moves). cuBLAS's M = 1 kernels read the attention projections at 3.1-3.2 TB/s and run o_proj and
down_proj as split-K GEMMs whose partial sums a second kernel reduces: 64 reduce launches per
step (measured on one H200, 2026-12-03, ``tpcomm bench model --compile --breakdown``).

Algorithm: one kernel, grid (cdiv(N_out, BLOCK_N), split_k). Program (j, s) owns output columns
``[j * BLOCK_N, (j + 1) * BLOCK_N)`` and the K range ``[s * k_per_split, (s + 1) * k_per_split)``
(k_per_split a whole number of BLOCK_K): it streams its [BLOCK_N, k_per_split] slice of W once,
in [BLOCK_N, BLOCK_K] tiles (software-pipelined over ``num_stages``), multiplying each by the
matching [M, BLOCK_K] slice of x and accumulating in float32, either on the tensor cores
(``use_dot``: rows padded to 16) or as a broadcast multiply and a sum over K (M of 1 to 4).

- split_k == 1: the program applies the epilogue and stores its columns.
- split_k > 1 (where N alone gives too few programs for the SMs): the last-block pattern of
  ``decode_attention.py`` (``_tile_sync.last_to_arrive`` states the memory-ordering contract)::

      every program:  store its float32 partial [M, BLOCK_N] at part[s]
                      barrier (all its threads' stores before the next line)
                      done = atomic_add(counters[j], 1)     # acq_rel, gpu scope
                      if done == split_k - 1:               # the last one: all partials visible
                          counters[j] = 0                   # for the next launch / graph replay
                          y = part[0] + part[1] + ... + part[split_k - 1]   (in split order, .cg)
                          epilogue, store

  The sum runs in split order whichever program arrives last, so the result does not depend on
  the arrival order (deterministic, run to run). ``fold=False`` writes the partials only and
  sums them in a second kernel, grid (cdiv(N_out, BLOCK_N),): the yardstick of the fold (what
  cuBLAS's split-K does).

Epilogues: ``swiglu``: W is [2 I, K], the gate rows then the up rows (a fused gate_up
projection); a program loads the gate tile and the matching up tile in the same loop and
writes silu(gate) * up, [M, I]. Gate and up are rounded to the output dtype first (what the
unfused GEMM would store), then silu(g) * u in float32, rounded once (what inductor's fused
SwiGLU computes from them). No residual-add epilogue: in the TP model the residual add lives
in ``comm.all_reduce_add_rms_norm``, which at world 1 compiles to one add + RMSNorm kernel that
must read the GEMM's output anyway, so adding it here would save no kernel.

Rows of W past N are clamped (read row N - 1, never stored), so the main loop has no masks when
K is a multiple of BLOCK_K (``EVEN_K``: every split is then whole BLOCK_K tiles).

Shapes: x [M, K] (rows of K contiguous); w [N, K] row-major (nn.Linear's weight), N = N_out or
2 N_out (swiglu); out [M, N_out] (N_out contiguous), x's dtype; counters int32 [>= cdiv(N_out,
BLOCK_N)], zeros, left zero by every launch (one set per concurrent launch). fp16 / bf16 (and
fp32, IEEE) in, float32 accumulation.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._tile_sync import last_to_arrive

MAX_M = 16          # rows: above this the GEMM is no longer a weight stream (cuBLAS's job)
MIN_BLOCK_N = 16    # the smallest column block: callers size their counters with it
MAX_SUM_M = 4       # the FMA path keeps [M, BLOCK_N, BLOCK_K] float32 in registers:
SUM_REGS = 128      # at most this many of them per thread (x2 with SwiGLU's up tile)


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    """One launch configuration (a row of the tuned table; never searched per call)."""
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True

    def as_list(self) -> list[int]:
        """The config as ints (how the registered op carries it)."""
        return [self.block_n, self.block_k, self.split_k, self.num_warps, self.num_stages,
                int(self.use_dot)]

    @classmethod
    def from_list(cls, v) -> "SkinnyConfig":
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), bool(v[5]))

    def name(self) -> str:
        return (f"n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}"
                f"p{self.num_stages}{'dot' if self.use_dot else 'sum'}")


def check_config(cfg: SkinnyConfig, m: int, swiglu: bool = False) -> None:
    """ValueError where ``cfg`` cannot run ``m`` rows."""
    for name in ("block_n", "block_k"):
        v = getattr(cfg, name)
        if v < MIN_BLOCK_N or v & (v - 1):
            raise ValueError(f"skinny_gemm: {name} must be a power of two >= {MIN_BLOCK_N}, "
                             f"got {v}")
    if cfg.split_k < 1 or cfg.num_warps < 1 or cfg.num_stages < 1:
        raise ValueError(f"skinny_gemm: split_k, num_warps, num_stages must be >= 1: {cfg}")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"skinny_gemm takes 1 to {MAX_M} rows, got {m}")
    if not cfg.use_dot and m > MAX_SUM_M:
        raise ValueError(f"skinny_gemm: the sum path (use_dot=False) takes at most "
                         f"{MAX_SUM_M} rows, got {m}")
    if not cfg.use_dot:
        regs = (1 << (m - 1).bit_length()) * cfg.block_n * cfg.block_k * (2 if swiglu else 1)
        if regs > SUM_REGS * 32 * cfg.num_warps:
            raise ValueError(f"skinny_gemm: the sum path's accumulator ({regs} float32) needs "
                             f"more than {SUM_REGS} registers per thread with {cfg.num_warps} "
                             f"warps; use a smaller block_n * block_k or more warps")


@triton.jit
def _load_w(rows, kc, k_end, EVEN_K: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] tile of W at columns ``kc`` (streamed once: evict first)."""
    if EVEN_K:
        return tl.load(rows + kc[None, :], eviction_policy="evict_first")
    return tl.load(rows + kc[None, :], mask=(kc < k_end)[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _stream_dot(x_ptr, w_rows, up_rows, m, mm, k0, k_end, stride_xm,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SWIGLU: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """(y, up) [BLOCK_M, BLOCK_N] float32 over K in [k0, k_end), on the tensor cores: W's tile
    is the MMA's A operand ([BLOCK_N, BLOCK_K]), x^T ([BLOCK_K, BLOCK_M], rows padded to 16)
    its B; the accumulators stay in the MMA's layout until the loop ends."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    kk = tl.arange(0, BLOCK_K)
    x_cols = x_ptr + m[None, :] * stride_xm
    for k in range(k0, k_end, BLOCK_K):
        kc = k + kk
        if EVEN_K:
            xt = tl.load(x_cols + kc[:, None], mask=mm[None, :], other=0.0)
        else:
            xt = tl.load(x_cols + kc[:, None], mask=mm[None, :] & (kc < k_end)[:, None],
                         other=0.0)
        acc = tl.dot(_load_w(w_rows, kc, k_end, EVEN_K), xt, acc, input_precision=PRECISION)
        if SWIGLU:
            acc_up = tl.dot(_load_w(up_rows, kc, k_end, EVEN_K), xt, acc_up,
                            input_precision=PRECISION)
    return tl.trans(acc), tl.trans(acc_up)


@triton.jit
def _stream_sum(x_ptr, w_rows, up_rows, m, mm, k0, k_end, stride_xm,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SWIGLU: tl.constexpr, EVEN_K: tl.constexpr):
    """The same on the FMA units (M <= 4): float32 products accumulate in a [BLOCK_M, BLOCK_N,
    BLOCK_K] register tile, summed over K once after the loop (no shuffles in the loop)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + m[:, None] * stride_xm
    for k in range(k0, k_end, BLOCK_K):
        kc = k + kk
        if EVEN_K:
            xt = tl.load(x_rows + kc[None, :], mask=mm[:, None], other=0.0)
        else:
            xt = tl.load(x_rows + kc[None, :], mask=mm[:, None] & (kc < k_end)[None, :],
                         other=0.0)
        xf = xt.to(tl.float32)[:, None, :]
        acc += xf * _load_w(w_rows, kc, k_end, EVEN_K).to(tl.float32)[None, :, :]
        if SWIGLU:
            acc_up += xf * _load_w(up_rows, kc, k_end, EVEN_K).to(tl.float32)[None, :, :]
    return tl.sum(acc, 2), tl.sum(acc_up, 2)


@triton.jit
def _epilogue_store(out_ptr, acc, acc_up, m, n, mask, stride_om, SWIGLU: tl.constexpr):
    """out[m, n] = acc, or silu(gate) * up with gate, up rounded to out's dtype first."""
    dt = out_ptr.dtype.element_ty
    if SWIGLU:
        g = acc.to(dt).to(tl.float32)
        u = acc_up.to(dt).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
    else:
        y = acc
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], y.to(dt), mask=mask)


@triton.jit
def _sum_partials(part_ptr, m, n, mask, splits, M, NP, N_OUT, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, SWIGLU: tl.constexpr):
    """(gate or y, up) = sum over s = 0..splits-1, in that order, of part[s] (.cg: from L2,
    never a line this SM's L1 kept from an earlier launch)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for s in range(splits):
        rows = part_ptr + (s * M + m)[:, None] * NP
        acc += tl.load(rows + n[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        if SWIGLU:
            acc_up += tl.load(rows + N_OUT + n[None, :], mask=mask, other=0.0,
                              cache_modifier=".cg")
    return acc, acc_up


@triton.jit(do_not_specialize=["M"])   # one binary for M = 1 and M = 8 (BLOCK_M 16 for both)
def _skinny_gemm_kernel(
        x_ptr, w_ptr, out_ptr, part_ptr, count_ptr, M, N_OUT, NP, K, k_per_split,
        stride_xm, stride_wn, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SWIGLU: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
        PRECISION: tl.constexpr, SPLIT: tl.constexpr, FOLD: tl.constexpr,
        REVERSE_SPLITS: tl.constexpr):
    pid_n = tl.program_id(0)
    splits = tl.num_programs(1)
    s = tl.program_id(1)
    if REVERSE_SPLITS:   # tests: the programs of a column block arrive in the other order
        s = splits - 1 - s
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    mm = m < M
    n_row = tl.minimum(n, N_OUT - 1).to(tl.int64)       # clamped: no row mask in the loop
    w_rows = w_ptr + n_row[:, None] * stride_wn
    up_rows = w_ptr + (n_row + N_OUT)[:, None] * stride_wn     # SWIGLU: the up rows
    k0 = s * k_per_split
    k_end = tl.minimum(k0 + k_per_split, K)
    if USE_DOT:
        acc, acc_up = _stream_dot(x_ptr, w_rows, up_rows, m, mm, k0, k_end, stride_xm, BLOCK_M,
                                  BLOCK_N, BLOCK_K, SWIGLU, EVEN_K, PRECISION)
    else:
        acc, acc_up = _stream_sum(x_ptr, w_rows, up_rows, m, mm, k0, k_end, stride_xm, BLOCK_M,
                                  BLOCK_N, BLOCK_K, SWIGLU, EVEN_K)
    mask = mm[:, None] & (n < N_OUT)[None, :]
    if not SPLIT:
        _epilogue_store(out_ptr, acc, acc_up, m, n, mask, stride_om, SWIGLU)
    else:
        rows = part_ptr + (s * M + m)[:, None] * NP
        tl.store(rows + n[None, :], acc, mask=mask)
        if SWIGLU:
            tl.store(rows + N_OUT + n[None, :], acc_up, mask=mask)
        if FOLD:   # the last program of column block pid_n sums (module docstring)
            if last_to_arrive(count_ptr + pid_n, splits):   # and has reset the counter
                acc, acc_up = _sum_partials(part_ptr, m, n, mask, splits, M, NP, N_OUT,
                                            BLOCK_M, BLOCK_N, SWIGLU)
                _epilogue_store(out_ptr, acc, acc_up, m, n, mask, stride_om, SWIGLU)


@triton.jit
def _skinny_gemm_reduce_kernel(part_ptr, out_ptr, M, N_OUT, NP, splits, stride_om,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               SWIGLU: tl.constexpr):
    """The split-K sum as a kernel of its own, grid (cdiv(N_out, BLOCK_N),) (``fold=False``)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    mask = (m < M)[:, None] & (n < N_OUT)[None, :]
    acc, acc_up = _sum_partials(part_ptr, m, n, mask, splits, M, NP, N_OUT, BLOCK_M, BLOCK_N,
                                SWIGLU)
    _epilogue_store(out_ptr, acc, acc_up, m, n, mask, stride_om, SWIGLU)


def counters_for(n_out: int, device) -> torch.Tensor:
    """Zeroed counters for any config of an output of ``n_out`` columns (one per column block
    of the smallest block)."""
    return torch.zeros(triton.cdiv(n_out, MIN_BLOCK_N), dtype=torch.int32, device=device)


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: SkinnyConfig, *,
                swiglu: bool = False, counters: torch.Tensor | None = None, fold: bool = True,
                reverse_splits: bool = False) -> torch.Tensor:
    """out[M, N_out] = x[M, K] @ w[N, K]^T, or silu(gate) * up of it (``swiglu``: N = 2 N_out),
    with ``cfg``'s blocks, split and launch options (shapes: the module docstring).

    ``counters``: int32 zeros [>= cdiv(N_out, block_n)] on x's device, kept by the caller and
    left zero by every launch (:func:`counters_for`); None allocates zeros per call (a memset
    more) where the split needs them. ``fold=False``: the split-K sum as a second kernel.
    ``reverse_splits``: programs take the splits in reverse order (tests of the arrival order).
    Returns ``out``."""
    M, K = x.shape
    N = w.shape[0]
    check_config(cfg, M, swiglu)
    if w.shape[1] != K or x.dtype != w.dtype or out.dtype != x.dtype:
        raise ValueError(f"skinny_gemm: x {tuple(x.shape)} {x.dtype} @ w {tuple(w.shape)} "
                         f"{w.dtype}^T -> out {out.dtype}: K and dtypes must match")
    if x.stride(1) != 1 or w.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("skinny_gemm: x, w and out need contiguous rows (stride 1 along K / N)")
    if swiglu and N % 2:
        raise ValueError(f"skinny_gemm: swiglu needs an even number of weight rows, got {N}")
    n_out = N // 2 if swiglu else N
    if tuple(out.shape) != (M, n_out):
        raise ValueError(f"skinny_gemm: out must be [{M}, {n_out}], got {tuple(out.shape)}")
    blocks = triton.cdiv(n_out, cfg.block_n)
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.block_k), cfg.split_k) * cfg.block_k
    splits = triton.cdiv(K, k_per_split)          # no empty split
    part, counters = _workspace(x, splits, M, n_out, swiglu, counters, blocks, fold)
    block_m = max(16, triton.next_power_of_2(M)) if cfg.use_dot else triton.next_power_of_2(M)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _skinny_gemm_kernel[(blocks, splits)](
        x, w, out, part, counters, M, n_out, N, K, k_per_split, x.stride(0), w.stride(0),
        out.stride(0), BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SWIGLU=swiglu, USE_DOT=cfg.use_dot, EVEN_K=K % cfg.block_k == 0, PRECISION=precision,
        SPLIT=splits > 1, FOLD=fold,
        REVERSE_SPLITS=reverse_splits, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1 and not fold:
        _skinny_gemm_reduce_kernel[(blocks,)](
            part, out, M, n_out, N, splits, out.stride(0), BLOCK_M=triton.next_power_of_2(M),
            BLOCK_N=cfg.block_n, SWIGLU=swiglu, num_warps=4)
    return out


def _workspace(x, splits, M, n_out, swiglu, counters, blocks, fold):
    """(float32 partials, counters) of a split launch; (x, x) without a split or fold (any
    pointer: not read)."""
    if splits == 1:
        return x, x
    part = torch.empty(splits * M * n_out * (2 if swiglu else 1), dtype=torch.float32,
                       device=x.device)
    if not fold:
        return part, x
    if counters is None:
        counters = torch.zeros(blocks, dtype=torch.int32, device=x.device)
    elif (counters.dtype != torch.int32 or counters.device != x.device
          or counters.numel() < blocks):
        raise ValueError(f"skinny_gemm: counters must be int32 [>= {blocks}] on {x.device}, "
                         f"got {counters.dtype} [{counters.numel()}] on {counters.device}")
    return part, counters
