"""The GEMM core of the fused kernels: a persistent, TMA-fed, software-pipelined Triton matmul
(warp-group MMA through ``tl.dot`` on Hopper), as device helpers and a measured tile table.

A kernel built on it (``matmul_reduce_scatter_fused.py``; ``matmul`` below) owns its persistent
loop and its epilogue, and takes from here:

- the row mapping ("owner rows"): a launch computes the rows of R owners; owner d's rows are
  ``A[d*m + lo : d*m + lo + rows]`` (rows ``lo..lo+rows`` of its block of m rows). A plain GEMM is
  R = 1, m = M, lo = 0, rows = M;
- ``num_tiles`` / ``tile_coords``: the persistent schedule. NUM_SMS programs take tiles
  ``pid, pid + NUM_SMS, ...``. A tile never straddles two owners (so that one TMA box of A and
  one push serve it): row tile ``rt = t*R + d`` is local tile t of owner d, so every owner's
  first rows come first (its receiver polls from its first element on). Row tiles go in groups
  of GROUP_M per column of tiles (the grouped order of Triton's matmul tutorial: GROUP_M tiles
  of A stay in L2 while the columns of B stream past);
- ``mainloop``: the float32 accumulator of one tile, A and B read through TMA descriptors
  (host-side ``TensorDescriptor`` or device-side ``tl.make_tensor_descriptor``, out-of-bounds
  boxes filled with zeros) or through plain pointers (masks), one mode per operand;
- ``Plan`` / ``plan``: the host side: picks the tile configuration (``pick_config``: a
  measured table, never a search per call), the operands as the kernel takes them (descriptors
  where TMA can express them) and the launch options, once per op.

Rows of a tile past the owner's ``rows`` are computed from whatever rows follow in A (or TMA's
zeros past its end) and dropped by the epilogue's mask; columns past N likewise.

TMA needs: the operand's last dimension contiguous, its base and row stride 16-byte aligned.
A operand that does not meet it (N odd in bf16, a column slice at an odd offset, ...) is read
through pointers; so is everything under Triton's interpreter when the config says "off".
Under the interpreter both descriptor kinds run too (the interpreter turns each box into a
masked load), which is how CI checks their index arithmetic.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .barrier import INTERPRET

# operand modes (constexpr A_DESC / B_DESC): how the mainloop reads the operand
PTR, HOST_DESC, DEVICE_DESC = 0, 1, 2
TMA_MODES = {"off": PTR, "host": HOST_DESC, "device": DEVICE_DESC}
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One tile configuration of the core (every field a constexpr or a launch option)."""
    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    tma: str = "host"               # "host" | "device" (tl.make_tensor_descriptor) | "off"
    warp_specialize: bool = False   # tl.range(warp_specialize=): refused (check_config: hangs)
    flatten: bool = True            # tl.range(flatten=): one pipelined loop over tiles x K
    epilogue_split: bool = False    # the epilogue in two [BLOCK_M, BLOCK_N / 2] halves
    tma_store: bool = False         # local tiles leave through a host TMA descriptor over C
    num_sms: int | None = None      # programs of the persistent grid (None: the device's SMs)

    def name(self) -> str:
        ws = "_ws" if self.warp_specialize else ""
        fl = "" if self.flatten else "_nofl"
        sp = "_split" if self.epilogue_split else ""
        st = "_tmastore" if self.tma_store else ""
        return (f"{self.block_m}x{self.block_n}x{self.block_k}_s{self.num_stages}"
                f"_w{self.num_warps}_g{self.group_m}_{self.tma}{ws}{fl}{sp}{st}")


# Measured tile table: (dtype, M bucket, N, K) -> config. M is the rows of one launch (a round
# of the fused op: R * rows, 1024 for N = 8192 in bf16 with the default 32 MiB buffer); the
# bucket is the next power of two, clamped to [64, 16384]. A shape not in it takes
# DEFAULTS[dtype]. From scripts/gpu_gemm_sweep.py on one H200, 2026-12-02 (torch 2.11, Triton
# 3.6; benchmarks/results/gemm-sweep-h200x1-2026-12-02.md), us per call against torch.mm's
# 170.9 / 676.0 / 2838.1 in the same run; every config there is within 1.03x of cuBLAS:
CONFIGS: dict[tuple[torch.dtype, int, int, int], GemmConfig] = {
    # M = 1024 (a round of the fused op): the plain loop, 165.0 us (flattened: 169.9)
    (torch.bfloat16, 1024, 8192, 7168): GemmConfig(flatten=False),
    # M = 4096: the default, 694.9 us (plain loop 701.7, group 16 698.4)
    (torch.bfloat16, 4096, 8192, 7168): GemmConfig(),
    # M = 16384: plain loop, 4 stages, 2774.8 us (group 16: 2788.7, default 2803.3)
    (torch.bfloat16, 16384, 8192, 7168): GemmConfig(flatten=False, num_stages=4),
}
# Without a measurement (registers and shared memory from scripts/compile_check.py, sm_90a):
# 16-bit: inductor's first persistent-TMA config for Hopper, 128x256x64, 3 stages, 8 warps
# (3 x 48 KiB operand stages + the epilogue's scratch = 176 KiB of 227; 179 registers);
# float32 ("ieee" dots run on the FMA units, no MMA): 128x64x16, 8 warps, 106 registers.
DEFAULTS = {torch.bfloat16: GemmConfig(), torch.float16: GemmConfig(),
            torch.float32: GemmConfig(block_n=64, block_k=16)}
# An operand whose rows are not 16-byte aligned (N odd in bf16, ...) is read element by element
# (no TMA, no cp.async): 128x256 spills 1.9 KB per thread there; 128x128x32 about none.
UNALIGNED = {torch.bfloat16: GemmConfig(block_n=128, block_k=32),
             torch.float16: GemmConfig(block_n=128, block_k=32),
             torch.float32: DEFAULTS[torch.float32]}


def m_bucket(m: int) -> int:
    return min(16384, max(64, triton.next_power_of_2(max(1, m))))


def pick_config(dtype: torch.dtype, m: int, n: int, k: int, aligned: bool = True) -> GemmConfig:
    """The table's config for a launch of ``m`` rows (a pure function: no search, no timing);
    ``aligned``: both operands' rows are 16-byte aligned (else UNALIGNED[dtype])."""
    if not aligned:
        return UNALIGNED[dtype]
    return CONFIGS.get((dtype, m_bucket(m), n, k), DEFAULTS[dtype])


# Why ``warp_specialize`` is refused: on one H200 (torch 2.11, Triton 3.6, 2026-12-02) the first
# launch of GemmConfig(num_warps=4, warp_specialize=True, flatten=False) never returned (no
# output for 9 minutes, the process had to be killed; benchmarks/results/
# gemm-sweep-h200x1-2026-12-02.md), while every other config ran in about a second.
WARP_SPECIALIZE_HANG = ("warp_specialize=True is refused: its first launch hung the process "
                        "on an H200 with Triton 3.6 (no output for 9 minutes; benchmarks/"
                        "results/gemm-sweep-h200x1-2026-12-02.md); use the software-pipelined "
                        "loop (warp_specialize=False)")


def check_config(cfg: GemmConfig) -> None:
    """Refuse what cannot run: Triton 3.6's warp specialization (``WARP_SPECIALIZE_HANG``,
    on every device and under the interpreter alike: a refused config costs an error, a hang
    the whole process), a TMA mode that does not exist."""
    if cfg.tma not in TMA_MODES:
        raise ValueError(f"GemmConfig.tma must be one of {sorted(TMA_MODES)}, got {cfg.tma!r}")
    if cfg.warp_specialize:
        raise ValueError(f"{WARP_SPECIALIZE_HANG}; got {cfg}")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tma_ok(t: torch.Tensor) -> bool:
    """Can a TMA descriptor describe the 2-D view ``t`` (rows of contiguous elements)?"""
    item = t.element_size()
    return (t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * item) % 16 == 0
            and t.shape[0] > 0 and t.shape[1] > 0)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator():
    """Device-side descriptors live in global scratch that Triton asks an allocator for; set a
    torch one unless the application set its own (triton.set_allocator is process-wide)."""
    from triton.runtime import _allocation
    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The GEMM core's arguments for ``a`` [M, K] x ``b`` [K, N], built once per op: ``args``
    lead every kernel's parameters, ``meta`` are its constexprs and launch options."""
    args: tuple
    meta: dict
    config: GemmConfig
    modes: tuple          # (A mode, B mode, B read as [N, K]) for reports
    grid_cap: int         # NUM_SMS
    n: int
    item: int             # bytes per element

    def grid(self, tiles: int) -> tuple:
        return (max(1, min(self.grid_cap, tiles)),)


def _operand_a(a, mode, cfg):
    if mode != PTR and _tma_ok(a):
        if mode == HOST_DESC:
            return TensorDescriptor(a, list(a.shape), [a.stride(0), 1],
                                    [cfg.block_m, cfg.block_k]), mode
        return a, mode
    return a, PTR


def _operand_b(b, mode, cfg):
    """(kernel argument, mode, B_T): B as [K, N] (N contiguous), or as its transpose [N, K]
    (K contiguous: ``w.t()`` of a linear layer's weight) with B_T."""
    if mode != PTR:
        for view, bt, box in ((b, False, [cfg.block_k, cfg.block_n]),
                              (b.t(), True, [cfg.block_n, cfg.block_k])):
            if _tma_ok(view):
                if mode == HOST_DESC:
                    return TensorDescriptor(view, list(view.shape), [view.stride(0), 1], box), \
                        mode, bt
                return b, mode, bt
    return b, PTR, False


def plan(a: torch.Tensor, b: torch.Tensor, config: GemmConfig | None = None, *,
         rows_hint: int | None = None, input_precision: str | None = None, **overrides) -> Plan:
    """Plan ``a`` [M, K] x ``b`` [K, N] (any strides, one dtype) with ``config`` (default: the
    table's for ``rows_hint`` rows per launch, else M), fields replaced by ``overrides``.
    ``input_precision``: ``tl.dot``'s; default "ieee" for float32 (torch's default matmul),
    the hardware default for 16-bit dtypes."""
    M, K = a.shape
    N = b.shape[1]
    aligned = _tma_ok(a) and (_tma_ok(b) or _tma_ok(b.t()))
    cfg = config or pick_config(a.dtype, rows_hint or M, N, K, aligned)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    check_config(cfg)
    mode = TMA_MODES[cfg.tma]
    a_arg, a_mode = _operand_a(a, mode, cfg)
    b_arg, b_mode, b_t = _operand_b(b, mode, cfg)
    if DEVICE_DESC in (a_mode, b_mode) and not INTERPRET:
        ensure_allocator()
    if input_precision is None and a.element_size() == 4:
        input_precision = "ieee"
    if cfg.num_sms is not None:
        sms = cfg.num_sms
    elif a.is_cuda:
        sms = _sm_count(a.device.index if a.device.index is not None else
                        torch.cuda.current_device())
    else:
        sms = 4   # the interpreter: a few programs, each looping over several tiles
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m, NUM_SMS=sms, A_DESC=a_mode, B_DESC=b_mode, B_T=b_t,
                EVEN_K=K % cfg.block_k == 0, WARP_SPECIALIZE=cfg.warp_specialize,
                FLATTEN=cfg.flatten, EPI_SPLIT=cfg.epilogue_split, DTYPE=TL_DTYPES[a.dtype],
                INPUT_PRECISION=input_precision, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    args = (a_arg, b_arg, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1))
    return Plan(args=args, meta=meta, config=cfg, modes=(a_mode, b_mode, b_t), grid_cap=sms,
                n=N, item=a.element_size())


def num_tiles(rows: int, n: int, world: int, cfg: GemmConfig) -> int:
    return world * triton.cdiv(rows, cfg.block_m) * triton.cdiv(n, cfg.block_n)


# ---------------------------------------------------------------- device helpers


@triton.jit
def device_descs(a, b, M, N, K, stride_am, stride_bk, stride_bn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 A_DESC: tl.constexpr, B_DESC: tl.constexpr, B_T: tl.constexpr):
    """The operands as the mainloop reads them: device-side descriptors made here where the
    mode says so, else as passed (pointers, or host-side descriptors)."""
    if A_DESC == 2:
        a = tl.make_tensor_descriptor(a, shape=[M, K], strides=[stride_am, 1],
                                      block_shape=[BLOCK_M, BLOCK_K])
    if B_DESC == 2:
        if B_T:
            b = tl.make_tensor_descriptor(b, shape=[N, K], strides=[stride_bn, 1],
                                          block_shape=[BLOCK_N, BLOCK_K])
        else:
            b = tl.make_tensor_descriptor(b, shape=[K, N], strides=[stride_bk, 1],
                                          block_shape=[BLOCK_K, BLOCK_N])
    return a, b


@triton.jit
def tile_count(rows, N, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return R * tl.cdiv(rows, BLOCK_M) * tl.cdiv(N, BLOCK_N)


@triton.jit
def tile_coords(tile, rows, N, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                GROUP_M: tl.constexpr):
    """(owner d, first local row, first column) of tile number ``tile`` (see the docstring)."""
    row_tiles = R * tl.cdiv(rows, BLOCK_M)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first = (tile // width) * GROUP_M
    size = tl.minimum(row_tiles - first, GROUP_M)
    rt = first + tile % size
    t = rt // R
    return rt - t * R, t * BLOCK_M, ((tile % width) // size) * BLOCK_N


@triton.jit
def mainloop(a, b, a_row, a_rows, col, N, K, stride_am, stride_ak, stride_bk, stride_bn,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             A_DESC: tl.constexpr, B_DESC: tl.constexpr, B_T: tl.constexpr,
             EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """float32 ``A[a_row : a_row + BLOCK_M, :] @ B[:, col : col + BLOCK_N]``; only the first
    ``a_rows`` rows and the columns below N matter (pointer mode masks the others to zero; TMA
    reads what is there, zeros past the end)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    rn = col + tl.arange(0, BLOCK_N)
    if A_DESC == 0:
        pa0 = a + (a_row + rm).to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
        row_ok = (rm < a_rows)[:, None]
    if B_DESC == 0:
        pb0 = b + rk[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
        col_ok = (rn < N)[None, :]
    for k0 in range(0, K, BLOCK_K):
        if A_DESC == 0:
            if EVEN_K:
                x = tl.load(pa0 + k0 * stride_ak, mask=row_ok, other=0.0)
            else:
                x = tl.load(pa0 + k0 * stride_ak, mask=row_ok & ((k0 + rk) < K)[None, :],
                            other=0.0)
        else:
            x = a.load([a_row, k0])
        if B_DESC == 0:
            if EVEN_K:
                y = tl.load(pb0 + k0 * stride_bk, mask=col_ok, other=0.0)
            else:
                y = tl.load(pb0 + k0 * stride_bk, mask=col_ok & ((k0 + rk) < K)[:, None],
                            other=0.0)
        elif B_T:
            y = b.load([col, k0]).T
        else:
            y = b.load([k0, col])
        if INTERPRET:   # triton 3.6's interpreter multiplies bf16 as their uint16 bits
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] as its left and right [BLOCK_M, BLOCK_N / 2] halves (an epilogue
    in two halves needs half the shared memory to change layouts)."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


# ---------------------------------------------------------------- the plain GEMM


@triton.jit
def _store_tile(c, vals, r0, c0, M, N, stride_cm, stride_cn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, C_DESC: tl.constexpr):
    if C_DESC:
        c.store([r0, c0], vals)
    else:
        ri = r0 + tl.arange(0, BLOCK_M)
        cj = c0 + tl.arange(0, BLOCK_N)
        ptrs = c + ri.to(tl.int64)[:, None] * stride_cm + cj[None, :] * stride_cn
        tl.store(ptrs, vals, mask=(ri < M)[:, None] & (cj < N)[None, :])


@triton.jit
def _matmul_kernel(
        a, b, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, c, stride_cm, stride_cn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, A_DESC: tl.constexpr,
        B_DESC: tl.constexpr, B_T: tl.constexpr, EVEN_K: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr,
        DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, C_DESC: tl.constexpr):
    """c = a @ b on the core (R = 1): the fused kernels without their push."""
    a, b = device_descs(a, b, M, N, K, stride_am, stride_bk, stride_bn, BLOCK_M, BLOCK_N,
                        BLOCK_K, A_DESC, B_DESC, B_T)
    pid = tl.program_id(0)
    tiles = tile_count(M, N, 1, BLOCK_M, BLOCK_N)
    tile_c = pid - NUM_SMS   # the epilogue's own counter (as in Triton's persistent tutorial)
    for tile in tl.range(pid, tiles, NUM_SMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        _, r0, c0 = tile_coords(tile, M, N, 1, BLOCK_M, BLOCK_N, GROUP_M)
        acc = mainloop(a, b, r0, M - r0, c0, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                       BLOCK_M, BLOCK_N, BLOCK_K, A_DESC, B_DESC, B_T, EVEN_K,
                       INPUT_PRECISION)
        tile_c += NUM_SMS
        _, r0, c0 = tile_coords(tile_c, M, N, 1, BLOCK_M, BLOCK_N, GROUP_M)
        if EPI_SPLIT:
            left, right = halves(acc, BLOCK_M, BLOCK_N)
            _store_tile(c, left.to(DTYPE), r0, c0, M, N, stride_cm, stride_cn, BLOCK_M,
                        BLOCK_N // 2, C_DESC)
            _store_tile(c, right.to(DTYPE), r0, c0 + BLOCK_N // 2, M, N, stride_cm, stride_cn,
                        BLOCK_M, BLOCK_N // 2, C_DESC)
        else:
            _store_tile(c, acc.to(DTYPE), r0, c0, M, N, stride_cm, stride_cn, BLOCK_M, BLOCK_N,
                        C_DESC)


def store_desc(c: torch.Tensor, cfg: GemmConfig):
    """A host TMA descriptor over the 2-D ``c`` for the epilogue's boxes (a tile, or half a tile
    with ``epilogue_split``), or None where TMA cannot describe ``c``. TMA clips a box at the
    descriptor's shape only: ``c`` must be exactly the rows a launch may write."""
    if not _tma_ok(c):
        return None
    bn = cfg.block_n // 2 if cfg.epilogue_split else cfg.block_n
    return TensorDescriptor(c, list(c.shape), [c.stride(0), 1], [cfg.block_m, bn])


def matmul(p: Plan, c: torch.Tensor, *, tma_store: bool | None = None, warmup: bool = False):
    """c [M, N] = the planned a @ b through the core, stored locally (pointer stores, or a
    host-side TMA descriptor with ``tma_store``, default the config's, where C allows one).
    ``warmup``: compile only."""
    cfg = p.config
    M, N = c.shape
    c_arg, c_desc = c, False
    desc = store_desc(c, cfg) if (cfg.tma_store if tma_store is None else tma_store) else None
    if desc is not None:
        c_arg, c_desc = desc, True
    grid = p.grid(num_tiles(M, N, 1, cfg))
    fn = _matmul_kernel.warmup if warmup else _matmul_kernel[grid]
    kw = dict(grid=grid) if warmup else {}
    return fn(*p.args, c_arg, c.stride(0), c.stride(1), C_DESC=c_desc, **p.meta, **kw)
