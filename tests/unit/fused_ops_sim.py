"""The three fused GEMM + collective ops of the GPU engine on the CPU, through Triton's
interpreter, with ranks as threads (the harness of gpu_protocol_sim.py): worlds 1, 2 and 4.

- matmul_reduce_scatter (``kernels/matmul_reduce_scatter_fused.py``: push and receive inside the
  GEMM) at worlds 1 and 4 (fused_gemm_sim.py covers 2 and 3 and every operand mode);
- all_gather_matmul (``kernels/all_gather_matmul_fused.py``: the push kernel, the GEMM waiting on
  per-row-tile flags, own shard first, the clearing of the received rows): several rounds;
- matmul_all_reduce (the fused reduce-scatter, then the push all-gather; M % R tail rows as a
  plain GEMM and an all-reduce).

The warm-up (compile and load every kernel of an op, launch none) leaves epochs and outputs
alone. Odd shapes everywhere: M and the rows per rank not a multiple of the tile (16), N odd (b through
pointers), K not a multiple of BLOCK_K; b = w.t(); TMA descriptors (host and device side, the
interpreter turns each box into a masked load) and pointers. Inputs are small integers, so every
product and sum is exact and the result must equal float64's rounded once, bitwise (the unfused
path: per-rank products rounded once, summed in rank order). Outputs are poisoned first; after
every op every push region must hold the sentinel again and a plain all-reduce through the same
engines must still be exact (the ops share the push family's regions and epochs). Then a stalled
peer: the all-gather GEMM's flag wait and the all-reduce's receive give up, and each error names
its op and the peer.

    TRITON_INTERPRET=1 python tests/unit/fused_ops_sim.py
"""
from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import torch  # noqa: E402

from fused_gemm_sim import (TILE, check_matmul_rs, check_timeout, regions_clean,  # noqa: E402
                            small)
from gpu_protocol_sim import check_all_reduce, make_group, run_ranks  # noqa: E402

MAX_BYTES = 4096   # push slots of 1024 (world 1) .. 128 (world 4) float32 elements: many rounds


def check_all_gather_matmul(backs, tensors, m, n, k, dtype, seed, *, b_t=False, tile=TILE):
    world = len(backs)
    shards = [small((m, k), seed + p, dtype) for p in range(world)]
    b = small((n, k), seed + 50, dtype).t() if b_t else small((k, n), seed + 50, dtype)
    outs = [torch.full((world * m, n), 77.0, dtype=dtype) for _ in range(world)]
    errs = run_ranks([lambda r=r: backs[r].all_gather_matmul(shards[r], b, outs[r], **tile)
                      for r in range(world)])
    assert not any(errs), errs
    want = torch.cat([(s.double() @ b.double()).to(dtype) for s in shards])
    for r in range(world):
        assert torch.equal(outs[r], want), ("all_gather_matmul", world, m, n, k, dtype, r)
    regions_clean(backs, tensors)


def check_matmul_all_reduce(backs, tensors, M, n, k, dtype, seed, *, b_t=False, tile=TILE):
    world = len(backs)
    a_s = [small((M, k), seed + p, dtype) for p in range(world)]
    b = small((n, k), seed + 50, dtype).t() if b_t else small((k, n), seed + 50, dtype)
    outs = [torch.full((M, n), 77.0, dtype=dtype) for _ in range(world)]
    errs = run_ranks([lambda r=r: backs[r].matmul_all_reduce(a_s[r], b, outs[r], **tile)
                      for r in range(world)])
    assert not any(errs), errs
    want = sum((a.double() @ b.double()).to(dtype).double() for a in a_s).to(dtype)
    for r in range(world):
        assert torch.equal(outs[r], want), ("matmul_all_reduce", world, M, n, k, dtype, r)
    regions_clean(backs, tensors)


def check_rs_rows_after_out_kept(backs, m, n, k, dtype, seed, tile):
    """World 1: ``out`` is the first m rows of a larger tensor; the rows after it keep their
    values (a TMA store clips a box at its descriptor's shape only, so the descriptor must
    cover exactly the rows the launch writes)."""
    a, b = small((m, k), seed, dtype), small((k, n), seed + 50, dtype)
    big = torch.full((m + 16, n), 77.0, dtype=dtype)
    out = big[:m]
    errs = run_ranks([lambda: backs[0].matmul_reduce_scatter(a, b, out, **tile)])
    assert not any(errs), errs
    assert torch.equal(out, (a.double() @ b.double()).to(dtype)), ("rs rows", m, n, k, tile)
    assert bool((big[m:] == 77.0).all()), ("rows after out written", tile)


def rounds(backs, k, item=4):
    L = backs[0].layout
    return L.push_buf // L.world // item // k


def check_warm_up_runs_nothing(backs):
    """warm_up_fused compiles (and on a GPU loads) the op's kernels without launching them:
    no epoch moves, the output stays as it was."""
    e = backs[0]
    before = e._counters[0].clone()
    for op, shapes in (("matmul_reduce_scatter", ((8, 8), (8, 5), (8 // e.world, 5))),
                       ("all_gather_matmul", ((6, 8), (8, 5), (6 * e.world, 5))),
                       ("matmul_all_reduce", ((7, 8), (8, 5), (7, 5)))):
        a, b, out = torch.ones(shapes[0]), torch.ones(shapes[1]), torch.full(shapes[2], 9.0)
        e.warm_up_fused(op, a, b, out, **TILE)
        assert bool((out == 9.0).all()), op
    assert torch.equal(e._counters[0], before)


def main():
    t0 = time.time()
    host = dict(TILE, tma="host")
    device = dict(TILE, tma="device")
    for world in (1, 2, 4):
        backs, tensors = make_group(world, MAX_BYTES, 3)
        f32, bf16 = torch.float32, torch.bfloat16
        check_warm_up_runs_nothing(backs)
        # all-gather + GEMM: m = 37 rows per rank in rounds of 1024 / 25 / 12 rows (K = 40),
        # N = 37 odd (b through pointers); bf16 with b = w.t(); TMA (host, device) and pointers
        check_all_gather_matmul(backs, tensors, 37, 37, 40, f32, 1)
        check_all_gather_matmul(backs, tensors, 19, 40, 56, bf16, 2, b_t=True, tile=host)
        check_all_gather_matmul(backs, tensors, 21, 24, 48, f32, 3, tile=device)
        check_all_gather_matmul(backs, tensors, 1, 3, 7, f32, 4)
        check_all_reduce(backs, "one_shot/push", 300, f32, 11)
        # GEMM + all-reduce: M = 4 * 9 + 3 (a tail of M % R rows for worlds 2 and 4)
        check_matmul_all_reduce(backs, tensors, 39, 37, 40, f32, 5)
        check_matmul_all_reduce(backs, tensors, 4 * world, 40, 56, bf16, 6, b_t=True, tile=host)
        check_all_reduce(backs, "two_shot", 517, f32, 12)
        if world != 2:   # fused_gemm_sim.py covers world 2 (and 3)
            check_matmul_rs(backs, tensors, 37, 37, 40, f32, 7)
            check_matmul_rs(backs, tensors, 19, 40, 56, bf16, 8, b_t=True, tile=host)
            check_matmul_rs(backs, tensors, 21, 24, 48, f32, 9, tile=device)
        if world == 1:   # both schedules: one launch (the default) and slot-sized rounds
            rounds_ = dict(TILE, schedule="rounds")
            check_matmul_rs(backs, tensors, 150, 40, 24, f32, 14)                  # 1 launch
            check_matmul_rs(backs, tensors, 150, 40, 24, f32, 14, tile=rounds_)    # 4 rounds
            check_matmul_rs(backs, tensors, 150, 40, 24, bf16, 15,
                            tile=dict(host, schedule="single"))
            # the TMA-store epilogue (the default "single" fields: half tiles; whole tiles;
            # off): 150 rows end inside a tile, the descriptor clips the box at its last row
            check_matmul_rs(backs, tensors, 150, 48, 24, bf16, 17,
                            tile=dict(host, tma_store=True, epilogue_split=False))
            check_matmul_rs(backs, tensors, 150, 48, 24, bf16, 18,
                            tile=dict(host, tma_store=False))
            # the all-gather's GEMM at world 1 takes the same epilogue and loop choices
            check_all_gather_matmul(backs, tensors, 150, 48, 24, bf16, 20,
                                    tile=dict(host, tma_store=True, flatten=True))
            check_all_gather_matmul(backs, tensors, 150, 48, 24, bf16, 21,
                                    tile=dict(host, tma_store=False, epilogue_split=True))
            for split in (False, True):
                check_rs_rows_after_out_kept(backs, 150, 48, 24, bf16, 19,
                                             dict(host, tma_store=True, epilogue_split=split))
            check_matmul_all_reduce(backs, tensors, 150, 40, 24, f32, 16, tile=rounds_)
        check_all_gather_matmul(backs, tensors, 5, 19, 16, f32, 10)
        check_all_reduce(backs, "one_shot/push", 301, bf16, 13)
        regions_clean(backs, tensors)
        ag = f"rounds of {rounds(backs, 40)} rows at K = 40" if world > 1 else "one round"
        print(f"world {world}: ok (all_gather_matmul in {ag}; {time.time() - t0:.1f} s)",
              flush=True)
    check_timeout("all_gather_matmul", 12)     # the GEMM's flag wait
    check_timeout("matmul_all_reduce", 6)      # the reduce-scatter's receive
    print("ALL OK")


if __name__ == "__main__":
    main()
