"""The fused GEMM + reduce-scatter (``kernels/matmul_reduce_scatter_fused.py``) on the CPU, through
Triton's interpreter, with ranks as threads (the harness of gpu_protocol_sim.py).

Checks the routing of every tile to its owner's slot and its receive inside the same kernel (odd
M / N / K: rows that are not a multiple of the tile, N odd, K not a multiple of BLOCK_K; strided
a and b), the rounds, the push family's epochs, and that the receive regions are left clean:
every push region holds the sentinel afterwards, and plain all-reduces through the same
backends stay exact. The GEMM core (``kernels/_gemm.py``) runs in each operand mode: TMA
through host-side and device-side tensor descriptors (the interpreter turns each box into a
masked load, zeros out of bounds) and plain pointers, with a persistent grid of 3 programs (so
every program loops over tiles) and the split epilogue; the plain GEMM (``_gemm.matmul``) too.
Which mode each operand got is asserted, so a case meant for TMA cannot quietly fall back.
Inputs are small integers, so every sum is exact in float32 and bf16 and the result must equal
torch's bitwise. Says nothing about speed, the GPU memory model or the GPU compile of
``tl.dot`` (``scripts/compile_check.py`` and ``scripts/gpu_gemm_sweep.py`` do).

    TRITON_INTERPRET=1 python tests/unit/fused_gemm_sim.py
"""
from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import torch  # noqa: E402

from gpu_protocol_sim import check_all_reduce, make_group, run_ranks  # noqa: E402
from tpcomm.kernels import _gemm  # noqa: E402
from tpcomm.testing import exact  # noqa: E402

TILE = dict(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1, num_sms=3,
            group_m=2)
MODES = ("off", "host", "device")
P, D = _gemm.PTR, None   # expected operand mode: pointers, or the descriptor of the case's mode


def small(shape, seed, dtype):
    """Integers in [-2, 2] (K <= 64: |a @ b| <= 256, exact in float32 and bf16)."""
    n = shape[0] * shape[1]
    return (torch.remainder(exact(n, seed, torch.float32, seed * 7), 5) - 2).view(shape).to(dtype)


def regions_clean(backs, tensors):
    L = backs[0].layout
    pad = backs[0].buf.signal_pad_nbytes
    for r, t in enumerate(tensors):
        push = t[pad + L.push_off:pad + L.push_off + 2 * L.push_buf]
        assert bool((push == 0xFF).all()), f"rank {r}: push regions not all sentinel"


def operands(M, n, k, dtype, seed, strided, b_t, world=1):
    """a [M, k] per rank and b [k, n]: ``strided``: a's rows are a column slice of a wider
    matrix at an 8-byte offset (no TMA); ``b_t``: b is a transposed view of [n, k]."""
    if strided:
        a_s = [small((M, k + 5), seed + p, dtype)[:, 2:2 + k] for p in range(world)]
    else:
        a_s = [small((M, k), seed + p, dtype) for p in range(world)]
    b = small((n, k), seed + 50, dtype).t() if b_t else small((k, n), seed + 50, dtype)
    return a_s, b


def assert_modes(a, b, tile, want):
    """The operand modes the plan picks for ``tile`` are ``want`` (D: the tile's TMA mode)."""
    mode = _gemm.TMA_MODES[tile.get("tma", "off")]
    got = _gemm.plan(a, b, _gemm.GemmConfig(), **tile).modes[:2]
    want = tuple(mode if w is None else w for w in want)
    assert got == want, ("operand modes", got, "wanted", want, tile)


def check_matmul_rs(backs, tensors, m, n, k, dtype, seed, *, strided=False, b_t=None,
                    tile=TILE, modes=None):
    world = len(backs)
    M = world * m
    a_s, b = operands(M, n, k, dtype, seed, strided, strided if b_t is None else b_t, world)
    if modes is not None:
        assert_modes(a_s[0], b, tile, modes)
    outs = [torch.full((m, n), 77.0, dtype=dtype) for _ in range(world)]
    errs = run_ranks([lambda r=r: backs[r].matmul_reduce_scatter(a_s[r], b, outs[r], **tile)
                      for r in range(world)])
    assert not any(errs), errs
    full = sum(a.double() @ b.double() for a in a_s).to(dtype)
    for r in range(world):
        assert torch.equal(outs[r], full[r * m:(r + 1) * m]), ("matmul_rs", world, m, n, k, r)
    regions_clean(backs, tensors)


def check_modes(backs, tensors, seed):
    """Every operand mode on odd shapes; each case says which mode A and B must get."""
    for tma in MODES:
        for split in (False, True):
            tile = dict(TILE, tma=tma, epilogue_split=split)
            # fp32, K = 44 (not a multiple of 16: TMA zero fill / masks), N = 36, b = w.t()
            check_matmul_rs(backs, tensors, 27, 36, 44, torch.float32, seed, b_t=True,
                            tile=tile, modes=(D, D))
            # bf16, N = 40, K = 56: b row-major through TMA, a 27-row round tail
            check_matmul_rs(backs, tensors, 19, 40, 56, torch.bfloat16, seed + 1, tile=tile,
                            modes=(D, D))
            # N = 37 odd: b's rows are 148 B apart, so b through pointers, a through TMA
            check_matmul_rs(backs, tensors, 9, 37, 40, torch.float32, seed + 2, tile=tile,
                            modes=(D, P))
            # a at an 8-byte offset: pointers for a; b = w.t() through TMA
            check_matmul_rs(backs, tensors, 5, 19, 16, torch.float32, seed + 3, strided=True,
                            tile=tile, modes=(P, D))
        seed += 10


def check_plain_matmul():
    """``_gemm.matmul`` (the core with a local store) in every mode, odd shapes, TMA store."""
    for tma in MODES:
        for (M, n, k, dtype, strided, b_t, tma_store) in (
                (45, 36, 44, torch.float32, False, True, True),
                (33, 37, 40, torch.float32, False, False, False),
                (20, 40, 56, torch.bfloat16, True, False, True),
                (7, 24, 64, torch.float16, False, True, False)):
            (a,), b = operands(M, n, k, dtype, M + n, strided, b_t)
            c = torch.full((M, n), 77.0, dtype=dtype)
            p = _gemm.plan(a, b, _gemm.GemmConfig(), **dict(TILE, tma=tma))
            _gemm.matmul(p, c, tma_store=tma_store)
            assert torch.equal(c, (a.double() @ b.double()).to(dtype)), ("matmul", tma, M, n, k)


def check_timeout(op="matmul_reduce_scatter", out_rows=3):
    """Rank 0 alone: its kernel's wait for rank 1 gives up, and the error names ``op``
    (fused) and rank 1. a [6, 8] (a_shard for the all-gather), b [8, 5], out [out_rows, 5]."""
    from tpcomm.errors import PeerTimeoutError
    backs, _ = make_group(2, 4096, 2, timeout_s=0.5)
    a, b = small((6, 8), 1, torch.float32), small((8, 5), 2, torch.float32)
    out = torch.empty(out_rows, 5)
    try:
        getattr(backs[0], op)(a, b, out, **TILE)
        backs[0].check()
    except PeerTimeoutError as e:
        assert e.peers == [1] and e.algorithm == "fused" and op in str(e), e
        print("timeout ok:", str(e)[:120])
        return
    raise AssertionError(f"{op}: no PeerTimeoutError after a stalled peer")


def main():
    t0 = time.time()
    for world in (2, 3):
        # max_bytes 4096: push slots of 1024 (world 2) / 640 (world 3) float32 elements, so
        # m = 37 rows of N = 37: a slot holds 27 / 17 rows, rounded down to whole 16-row tiles:
        # 3 rounds of 16, 16 and 5 rows (every owner's last tile partial)
        backs, tensors = make_group(world, 4096, 3)
        slot = backs[0].layout.push_buf // world // 4
        rounds = -(-37 // (slot // 37 // 16 * 16))
        check_matmul_rs(backs, tensors, 37, 37, 40, torch.float32, 1)
        check_matmul_rs(backs, tensors, 5, 19, 16, torch.float32, 2, strided=True)
        check_matmul_rs(backs, tensors, 1, 3, 7, torch.float32, 3)
        check_all_reduce(backs, "one_shot/push", 300, torch.float32, 11)
        check_all_reduce(backs, "two_shot", 517, torch.float32, 12)
        check_matmul_rs(backs, tensors, 21, 33, 64, torch.bfloat16, 4)
        check_all_reduce(backs, "one_shot/push", 301, torch.bfloat16, 13)
        check_modes(backs, tensors, 100 * world)
        check_all_reduce(backs, "two_shot", 519, torch.bfloat16, 14)
        regions_clean(backs, tensors)
        print(f"world {world}: ok ({rounds} rounds of the 37-row case, {time.time() - t0:.1f} s)",
              flush=True)
    check_plain_matmul()
    print(f"plain matmul: ok ({time.time() - t0:.1f} s)", flush=True)
    check_timeout()
    print("ALL OK")


if __name__ == "__main__":
    main()
