"""tpcomm's GPU kernels with R emulated ranks on ONE GPU: correctness, graphs, soak, fused ops.

Each emulated rank is a :class:`tpcomm.cuda.p2p_collectives.P2PCollectives` over its own buffer on the
same GPU (``tpcomm.cuda.emulated``) and launches on its own CUDA stream, so the R ranks'
kernels run at the same time and talk through the same push/poll/flag protocol they use over
NVLink. What this shows: the kernels compile for the GPU, give exact sums and bitwise-equal
results across ranks on the GPU's memory model, survive CUDA-graph capture and replays with
changed inputs, and a stalled rank raises instead of hanging. What it does not show: NVLink,
separate processes, or speed against NCCL (all ranks share one GPU's SMs and memory).

    python scripts/gpu_emulated_ranks.py [--worlds 2,4] [--soak-ops 100000] [--json FILE]
    python scripts/gpu_emulated_ranks.py --only mismatch,latency --json FILE   # ~2-4 min

``--only`` runs the named cases alone: ``mismatch`` (calls that differ across ranks raise
MismatchError from the kernels' call check on every rank, no timeout; the mismatched call
writes no output; every rank's engine resets itself and the next 100 eager calls and the
replays of CUDA graphs captured before and after are exact), ``latency`` (graph replays of small all-reduces, microseconds per call: compare
against the same case run on the previous commit), ``timeout``.

Exit status 1 on any wrong element or failed case.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
# every kernel loaded when CUDA starts: a lazy module load waits for the running kernels, and an
# emulated rank's kernel spins until the next rank's kernel (launched after it) runs
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tpcomm.errors import MismatchError, PeerTimeoutError  # noqa: E402
from tpcomm.cuda.emulated import StreamRanks  # noqa: E402
from tpcomm.reference import add_rms_norm  # noqa: E402
from tpcomm.testing import exact  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ALGOS = ("one_shot_push", "one_shot_pull", "two_shot", "ring")
GRID = 16          # blocks per rank: 4 ranks x 16 blocks stay resident on 132 SMs
DEV = torch.device("cuda", 0)


class Ranks(StreamRanks):
    """R emulated ranks: backends and one stream each; ``run`` launches fn(r) on rank r's
    stream for every r, then joins the streams to the current one (tpcomm.cuda.emulated)."""

    def __init__(self, world, max_bytes, timeout_s=20.0):
        super().__init__(world, max_bytes, GRID, device=DEV, timeout_s=timeout_s)


def _want_sum(numel, world, dtype, salt, offset=0):
    return sum(exact(numel + offset, r, torch.float64, salt, device=DEV)[offset:]
               for r in range(world)).to(dtype)


def correctness(g: Ranks, failures: list, tally: dict):
    world = g.world
    salt = 1000 * world
    sizes = [1, 7, 16, 300, 2048 + 5, 5000, 65536 + 37, (3 << 20) + 11]
    for dtype in DTYPES:
        for algo in ALGOS:
            for numel in sizes:
                salt += 1
                off = salt % 3
                ins = [exact(numel + off, r, dtype, salt, device=DEV)[off:] for r in range(world)]
                outs = [torch.full((numel + off + 8,), 77.0, dtype=dtype, device=DEV)
                        for _ in range(world)]
                views = [o[off:off + numel] for o in outs]
                g.run(lambda r: g.backs[r].all_reduce(ins[r], views[r], algo))
                g.check()
                want = _want_sum(numel, world, dtype, salt, off)
                for r in range(world):
                    ok = (torch.equal(views[r], want) and bool(torch.all(outs[r][:off] == 77))
                          and bool(torch.all(outs[r][off + numel:] == 77)))
                    tally["checked"] += 1
                    if not ok:
                        failures.append(f"all_reduce {algo} {dtype} n={numel} rank {r}")
        for c in (1, 33, 4096 + 3, 300_001):
            salt += 1
            ins = [exact(world * c, r, dtype, salt, device=DEV).view(world, c)
                   for r in range(world)]
            outs = [torch.full((c,), 5.0, dtype=dtype, device=DEV) for _ in range(world)]
            g.run(lambda r: g.backs[r].reduce_scatter(ins[r], outs[r]))
            gin = [exact(c, r, dtype, salt + 1, device=DEV) for r in range(world)]
            gout = [torch.full((world, c), 5.0, dtype=dtype, device=DEV) for _ in range(world)]
            g.run(lambda r: g.backs[r].all_gather(gin[r], gout[r]))
            g.check()
            full = _want_sum(world * c, world, dtype, salt).view(world, c)
            for r in range(world):
                tally["checked"] += 2
                if not torch.equal(outs[r], full[r]):
                    failures.append(f"reduce_scatter {dtype} c={c} rank {r}")
                if not torch.equal(gout[r], torch.stack(gin)):
                    failures.append(f"all_gather {dtype} c={c} rank {r}")
    return salt


FUSED_SHAPES = ((1, 8192), (8, 8192), (64, 8192), (3, 4097), (5, 99), (700, 4096))


def fused_suite(world, failures, tally):
    """The fused kernel on a fresh group per dtype: every shape, then every shape again."""
    salt = 50_000
    for dtype in DTYPES:
        g = Ranks(world, 8 << 20, timeout_s=5.0)
        try:
            for _ in range(2):
                for rows, hidden in FUSED_SHAPES:
                    salt += 1
                    fused_norm(g, rows, hidden, dtype, salt, failures, tally)
        except PeerTimeoutError as e:
            failures.append(f"fused suite {dtype} world {world}: {str(e)[:200]}")


def fused_after_other_ops(g: Ranks, failures, tally):
    """One fused call on a group that already ran every other kernel (the last use of ``g``:
    a timeout breaks it)."""
    try:
        fused_norm(g, 1, 8192, torch.bfloat16, 77, failures, tally)
        tally[f"fused_after_other_ops_w{g.world}"] = "ok"
    except PeerTimeoutError as e:
        tally[f"fused_after_other_ops_w{g.world}"] = f"timed out: {str(e)[:160]}"
        failures.append(f"fused add_rms_norm after the other kernels on one group: {e}")


def fused_norm(g: Ranks, rows, hidden, dtype, salt, failures, tally):
    world = g.world
    xs = [exact(rows * hidden, r, dtype, salt, device=DEV).view(rows, hidden)
          for r in range(world)]
    res0 = exact(rows * hidden, 7, dtype, salt + 1, device=DEV).view(rows, hidden)
    w = (exact(hidden, 3, torch.float32, salt, device=DEV) / 8).to(dtype)
    ress = [res0.clone() for _ in range(world)]
    normed = [torch.full((rows, hidden), 9.0, dtype=dtype, device=DEV) for _ in range(world)]
    g.run(lambda r: g.backs[r].all_reduce_add_rms_norm(xs[r], ress[r], w, 1e-6, normed[r]))
    g.check()
    want_x = _want_sum(rows * hidden, world, dtype, salt).view(rows, hidden)
    want_n, want_r = add_rms_norm(want_x.clone(), res0.clone(), w, 1e-6)
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    for r in range(world):
        tally["checked"] += 1
        err = (normed[r].float() - want_n.float()).abs().max().item()
        scale = want_n.float().abs().max().item() + 1e-6
        if not (torch.equal(xs[r], want_x) and torch.equal(ress[r], want_r)
                and err <= tol * scale and torch.equal(normed[r], normed[0])):
            failures.append(f"fused add_rms_norm {dtype} {rows}x{hidden} rank {r} "
                            f"(normed max err {err:.3g} of {scale:.3g})")
    tally["fused_norm_max_rel_err"] = max(tally.get("fused_norm_max_rel_err", 0.0), err / scale)


def soak(g: Ranks, algo, ops_target, failures, tally, seed, graph_mode=True):
    """50 all-reduces of random sizes at odd offsets of one flat tensor per rank, captured in a
    graph and replayed (``graph_mode``) or launched eagerly, with new inputs every time, until
    ``ops_target`` calls ran; every output of every round checked (exact sums, bitwise)."""
    world = g.world
    mode = "graph" if graph_mode else "eager"
    rng = random.Random(seed)
    per_graph = 50
    sizes = [rng.choice([rng.randint(1, 4096), rng.randint(4096, 1 << 18)])
             for _ in range(per_graph)]
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n + rng.randint(0, 7))
    total = offs[-1]
    dtype = torch.bfloat16
    in_flat = [torch.empty(total, dtype=dtype, device=DEV) for _ in range(world)]
    out_flat = [torch.empty(total, dtype=dtype, device=DEV) for _ in range(world)]
    ins = [[t[o:o + n] for o, n in zip(offs, sizes)] for t in in_flat]
    outs = [[t[o:o + n] for o, n in zip(offs, sizes)] for t in out_flat]
    covered = torch.zeros(total, dtype=torch.bool, device=DEV)
    for o, n in zip(offs, sizes):
        covered[o:o + n] = True

    def body():
        for i in range(per_graph):
            g.run(lambda r: g.backs[r].all_reduce(ins[r][i], outs[r][i], algo))

    def fill(salt):
        for r in range(world):
            in_flat[r].copy_(exact(total, r, dtype, salt, device=DEV))
            out_flat[r].fill_(3.0)

    fill(seed)
    body()          # warm up (compiles every size) outside the capture
    g.check()
    if graph_mode:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
    run = graph.replay if graph_mode else body
    replays = max(1, ops_target // per_graph)
    wrong = 0
    for k in range(replays):
        salt = seed + 7 * (k + 1)
        fill(salt)
        run()
        want = torch.where(covered, _want_sum(total, world, dtype, salt),
                           torch.full((total,), 3.0, dtype=dtype, device=DEV))
        for r in range(world):
            if not torch.equal(out_flat[r], want):
                bad = (out_flat[r] != want).nonzero()[:1].item()
                wrong += 1
                if len(failures) < 50:
                    failures.append(f"{mode} soak {algo} round {k} rank {r} first bad "
                                    f"element {bad}")
        if k % 50 == 49:
            g.check()
    g.check()
    tally[f"soak_{mode}_{algo}_w{world}"] = {"ops": replays * per_graph,
                                             "rounds_with_a_wrong_rank": wrong}


def p2p_probe_case(world, failures, tally):
    """The data-moving P2P probe kernels (``kernels/p2p_probe.py``) on the GPU: a healthy
    mapping reads back no wrong word; a table whose entry for rank 1 points at rank 0's area
    (a mapping that does not reach the peer) is caught and names rank 1."""
    from tpcomm.kernels import p2p_probe
    nbytes = 64 << 10
    areas = [torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=DEV) for _ in range(world)]
    addrs = tuple(a.data_ptr() for a in areas)
    words = p2p_probe.slot_words(nbytes, world)
    result = {}
    broken = (addrs[0], addrs[0]) + addrs[2:]   # rank 0's entry for rank 1 is its own area
    for label, table in (("healthy", addrs), ("broken", broken)):
        for a in areas:
            a.fill_(0xFF)
        nonce = 12345 if label == "healthy" else 777
        for r in range(world):
            p2p_probe.p2p_probe_write(addrs if r != 0 else table, words, r, nonce)
        torch.cuda.synchronize(DEV)
        counts = [torch.empty(2 * world, dtype=torch.int32, device=DEV) for _ in range(world)]
        for r in range(world):
            p2p_probe.p2p_probe_read(addrs if r != 0 else table, words, r, nonce, counts[r])
        torch.cuda.synchronize(DEV)
        result[label] = [c.view(2, world).tolist() for c in counts]
    healthy_ok = all(v == 0 for c in result["healthy"] for row in c for v in row)
    broken_seen = any(v for c in result["broken"] for row in c for v in row)
    if not healthy_ok:
        failures.append(f"p2p probe: healthy mapping read wrong words {result['healthy']}")
    if not broken_seen:
        failures.append(f"p2p probe: a broken mapping went unnoticed {result['broken']}")
    tally["p2p_probe"] = result


def fused_gemm_case(world, failures, tally):
    """The fused GEMM + reduce-scatter (``kernels/matmul_reduce_scatter_fused.py``): fp32 with
    small-integer inputs, odd shapes and several rounds; bf16 at a prefill-like shape; then an
    all-reduce on the same group (regions left clean); all bitwise. Timing against torch.mm +
    the reduce-scatter kernel: indicative only."""
    g = Ranks(world, 8 << 20, timeout_s=5.0)
    gen = torch.Generator(device=DEV).manual_seed(world)
    res = {}
    for dtype, (M, K, N) in ((torch.float32, (world * 37, 96, 300)),
                             (torch.float32, (world * 700, 64, 1536)),
                             (torch.bfloat16, (world * 512, 1024, 2048))):
        a = [torch.randint(-2, 3, (M, K), generator=gen, device=DEV).to(dtype)
             for _ in range(world)]
        b = torch.randint(-2, 3, (K, N), generator=gen, device=DEV).to(dtype)
        outs = [torch.full((M // world, N), 5.0, dtype=dtype, device=DEV) for _ in range(world)]
        g.run(lambda r: g.backs[r].matmul_reduce_scatter(a[r], b, outs[r]))
        g.check()
        # each rank's product is an exact integer, rounded once to the dtype (as the GEMM's
        # epilogue and an unfused GEMM both do), then summed exactly: bitwise comparable
        full = sum((x.double() @ b.double()).to(dtype).double() for x in a)
        full = full.to(dtype).view(world, M // world, N)
        bad = [r for r in range(world) if not torch.equal(outs[r], full[r])]
        tally["checked"] += world
        if bad:
            failures.append(f"fused matmul_reduce_scatter {dtype} {(M, K, N)} ranks {bad}")
        res[f"{dtype}_{M}x{K}x{N}"] = f"wrong on ranks {bad}" if bad else "ok"
    x = [exact(5000, r, torch.bfloat16, 3, device=DEV) for r in range(world)]
    g.run(lambda r: g.backs[r].all_reduce(x[r], x[r], "one_shot_push"))
    g.check()
    if not all(torch.equal(v, _want_sum(5000, world, torch.bfloat16, 3)) for v in x):
        failures.append("all_reduce after the fused matmul_reduce_scatter")
    # indicative timing at M = 4096 rows in all, K = 1792, N = 8192 (a TP-4 down projection of
    # Llama-70B with a quarter of the rows): every rank's GEMM shares this one GPU
    M, K, N = 4096, 1792, 8192
    a = [torch.randn(M, K, generator=gen, device=DEV).to(torch.bfloat16) for _ in range(world)]
    b = torch.randn(K, N, generator=gen, device=DEV).to(torch.bfloat16)
    outs = [torch.empty(M // world, N, dtype=torch.bfloat16, device=DEV) for _ in range(world)]
    ys = [torch.empty(M, N, dtype=torch.bfloat16, device=DEV) for _ in range(world)]

    def fused(r):
        g.backs[r].matmul_reduce_scatter(a[r], b, outs[r])

    def unfused(r):
        torch.mm(a[r], b, out=ys[r])
        g.backs[r].reduce_scatter(ys[r].view(world, -1), outs[r].view(-1))

    for name, fn in (("fused", fused), ("unfused", unfused)):
        g.run(fn)
        g.check()
        times = []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(5):
                g.run(fn)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1000 / 5)
        res[f"{name}_{M}x{K}x{N}_us"] = round(sorted(times)[2], 1)
    g.check()
    tally[f"fused_matmul_rs_w{world}"] = res


def _small(shape, gen, dtype):
    return torch.randint(-2, 3, shape, generator=gen, device=DEV).to(dtype)


# the three fused GEMM + collective ops: (name, dtype, M rows per rank (all_gather: per shard),
# K, N, b = w.t()). Odd shapes: rows not a multiple of the 128-row tile, N odd (b through
# pointers), K not a multiple of BLOCK_K; 4200 rows of N = 2048 take several rounds of the 8 MiB
# buffer at every world (and are what the graph case replays).
FUSED_OPS_SHAPES = (
    ("fp32 odd", torch.float32, 37, 96, 301, False),
    ("bf16 b=w.t() rounds", torch.bfloat16, 4200, 1000, 2048, True),
    ("fp16 N odd", torch.float16, 129, 200, 1001, False),
)
FUSED_OPS_QUICK = FUSED_OPS_SHAPES[:2]   # scripts/gpu_fused.py: fewer kernels to compile


def fused_ops_want(op, a, b, world):
    """The unfused path's result: per-rank products rounded once, summed (or gathered) in
    rank order; exact integers, so float64 then one rounding is the same bits."""
    dtype = b.dtype
    prods = [(x.double() @ b.double()).to(dtype) for x in a]
    if op == "all_gather_matmul":
        return torch.cat(prods)
    full = sum(p.double() for p in prods).to(dtype)
    if op == "matmul_all_reduce":
        return [full] * world
    m = full.shape[0] // world
    return [full[r * m:(r + 1) * m] for r in range(world)]


def fused_ops_case(world, failures, tally, *, graph=True, shapes=FUSED_OPS_SHAPES):
    """matmul_reduce_scatter, all_gather_matmul and matmul_all_reduce (method "fused", the
    engine's kernels) on ``world`` emulated ranks: every shape and dtype bitwise against the
    unfused path, outputs poisoned first, an all-reduce on the same group afterwards (regions
    left clean); then the three ops captured in one CUDA graph and replayed with new inputs
    three times, each replay checked."""
    g = Ranks(world, 8 << 20, timeout_s=5.0)
    gen = torch.Generator(device=DEV).manual_seed(100 + world)
    res = {}
    ops = ("matmul_reduce_scatter", "all_gather_matmul", "matmul_all_reduce")

    def inputs(op, dtype, rows, K, N, b_t):
        M = rows if op == "all_gather_matmul" else rows * world + (op == "matmul_all_reduce")
        a = [_small((M, K), gen, dtype) for _ in range(world)]
        b = _small((N, K), gen, dtype).t() if b_t else _small((K, N), gen, dtype)
        return a, b

    def out_shape(op, a):
        M = a[0].shape[0]
        return {"matmul_reduce_scatter": M // world, "all_gather_matmul": M * world,
                "matmul_all_reduce": M}[op]

    def call(op, r, a, b, out):
        getattr(g.backs[r], op)(a[r], b, out[r])

    def warm(op, a, b, out):
        # every kernel compiled and loaded before any rank's runs: a module load waits for the
        # kernels running, and those wait for the ranks launched after this one
        for r in range(world):
            g.backs[r].warm_up_fused(op, a[r], b, out[r])

    def check(op, label, a, b, outs):
        want = fused_ops_want(op, a, b, world)
        bad = [r for r in range(world)
               if not torch.equal(outs[r], want if op == "all_gather_matmul" else want[r])]
        tally["checked"] += world
        if bad:
            failures.append(f"fused {op} {label} world {world}: wrong on ranks {bad}")
        return "ok" if not bad else f"wrong on ranks {bad}"

    for label, dtype, rows, K, N, b_t in shapes:
        for op in ops:
            a, b = inputs(op, dtype, rows, K, N, b_t)
            outs = [torch.full((out_shape(op, a), N), 5.0, dtype=dtype, device=DEV)
                    for _ in range(world)]
            warm(op, a, b, outs)
            g.run(lambda r: call(op, r, a, b, outs))
            g.check()
            res[f"{op} {label}"] = check(op, label, a, b, outs)
    x = [exact(5000, r, torch.bfloat16, 3, device=DEV) for r in range(world)]
    g.run(lambda r: g.backs[r].all_reduce(x[r], x[r], "one_shot_push"))
    g.check()
    if not all(torch.equal(v, _want_sum(5000, world, torch.bfloat16, 3)) for v in x):
        failures.append(f"all_reduce after the fused ops, world {world}")
    if graph:
        res["graph"] = fused_ops_graph(g, ops, inputs, out_shape, call, check, warm)
    tally[f"fused_ops_w{world}"] = res


def fused_ops_graph(g, ops, inputs, out_shape, call, check, warm):
    """The three ops (the bf16 shape with rounds) captured in one graph on every rank's stream,
    then three replays, each after new values were copied into the captured inputs."""
    _, dtype, rows, K, N, b_t = FUSED_OPS_SHAPES[1]
    world = g.world
    data = {op: inputs(op, dtype, rows, K, N, b_t) for op in ops}
    outs = {op: [torch.full((out_shape(op, data[op][0]), N), 5.0, dtype=dtype, device=DEV)
                 for _ in range(world)] for op in ops}

    def body():
        for op in ops:
            g.run(lambda r, op=op: call(op, r, *data[op], outs[op]))
    for op in ops:
        warm(op, *data[op], outs[op])
    body()                       # every kernel ran once outside the capture
    g.check()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    results = []
    for k in range(3):
        for op in ops:
            a, b = data[op]
            new_a, new_b = inputs(op, dtype, rows, K, N, b_t)
            for x, y in zip(a, new_a):
                x.copy_(y)
            b.copy_(new_b)
            for o in outs[op]:
                o.fill_(5.0)
        graph.replay()
        g.check()
        results.append([check(op, f"graph replay {k}", *data[op], outs[op]) for op in ops])
    return "ok" if all(v == "ok" for r in results for v in r) else results


def timeout_case(world, failures, tally):
    g = Ranks(world, 1 << 20, timeout_s=0.5)
    x = exact(4096, 0, torch.bfloat16, device=DEV)
    t0 = time.perf_counter()
    with torch.cuda.stream(g.streams[0]):
        g.backs[0].all_reduce(x, x.clone(), "one_shot_push")     # the peers never come
    try:
        g.backs[0].check(sync=True)
        failures.append("stalled peer: no PeerTimeoutError")
    except PeerTimeoutError as e:
        tally["timeout"] = {"raised_after_s": round(time.perf_counter() - t0, 3),
                            "timeout_s": 0.5, "message": str(e)[:200]}


def _mismatch_cases(world, push_max):
    """(name, odd call of the last rank, the others' call). A call is fn(back, rank) -> kept():
    whether its tensors still hold what they held before (the kernels write no output after
    a mismatch; all_gather may write its own row). ``push_max``: float32 elements of one
    one-shot push round."""
    f32, bf16 = torch.float32, torch.bfloat16

    def ar(n, algo, dtype=f32, in_place=True):
        def call(b, r):
            x = exact(n, r, dtype, device=DEV)
            out = x if in_place else torch.full((n,), 77.0, dtype=dtype, device=DEV)
            b.all_reduce(x, out, algo)
            return lambda: (torch.equal(x, exact(n, r, dtype, device=DEV))
                            and (in_place or bool(torch.all(out == 77))))
        return call

    def rs(c):
        def call(b, r):
            out = torch.full((c,), 5.0, dtype=f32, device=DEV)
            b.reduce_scatter(exact(world * c, r, f32, device=DEV).view(world, c), out)
            return lambda: bool(torch.all(out == 5))
        return call

    def ag(c):
        def call(b, r):
            out = torch.full((world, c), 5.0, dtype=f32, device=DEV)
            b.all_gather(exact(c, r, f32, device=DEV), out)
            return lambda: bool(torch.all(out[[p for p in range(world) if p != r]] == 5))
        return call

    def norm(rows, hidden=4096):
        def call(b, r):
            x = exact(rows * hidden, r, bf16, device=DEV).view(rows, hidden)
            res = exact(rows * hidden, 9, bf16, device=DEV).view(rows, hidden)
            normed = torch.full_like(x, 3.0)
            b.all_reduce_add_rms_norm(x, res, torch.ones(hidden, dtype=bf16, device=DEV), 1e-6,
                                      normed)
            return lambda: (torch.equal(x.view(-1), exact(rows * hidden, r, bf16, device=DEV))
                            and torch.equal(res.view(-1), exact(rows * hidden, 9, bf16,
                                                                device=DEV))
                            and bool(torch.all(normed == 3)))
        return call

    mib = (1 << 20) // 4
    return [
        ("one_shot_push 300 vs 600", ar(600, "one_shot_push"), ar(300, "one_shot_push")),
        ("1 MiB vs 2 MiB", ar(2 * mib, "one_shot", in_place=False), ar(mib, "one_shot")),
        ("1 round vs 2 rounds", ar(2 * push_max, "one_shot_push"),
         ar(push_max, "one_shot_push", in_place=False)),
        ("push vs pull", ar(4 * mib, "one_shot"), ar(4096, "one_shot")),
        ("two_shot dtype", ar(2 * mib, "two_shot", bf16), ar(mib, "two_shot")),
        ("op", rs(mib // world), ar(mib, "two_shot", in_place=False)),
        ("all_gather sizes", ag(4096), ag(8192)),
        ("fused norm rows", norm(5), norm(4)),
        ("ring sizes", ar(3 * mib, "ring"), ar(mib, "ring")),
    ]


AFTER_N = 4096         # bf16 elements of the calls after a recovery (every algorithm warmed)


def _after_calls(g: Ranks, ins, outs, salt: int, algos) -> int:
    """One call per algorithm of ``algos`` on every rank (new inputs each); wrong elements."""
    wrong = 0
    for i, algo in enumerate(algos):
        for r in range(g.world):
            ins[r].copy_(exact(AFTER_N, r, torch.bfloat16, salt + i, device=DEV))
            outs[r].fill_(77)
        g.run(lambda r: g.backs[r].all_reduce(ins[r], outs[r], algo))
        want = _want_sum(AFTER_N, g.world, torch.bfloat16, salt + i)
        wrong += sum(int((o != want).sum()) for o in outs)
    return wrong


def _graph_replays(g: Ranks, graph, ins, outs, salt: int, replays: int) -> int:
    """Replays of ``graph`` (one call per algorithm of ALGOS on every rank, captured over
    ``ins``/``outs``), new inputs before each; wrong elements of the last call's output."""
    wrong = 0
    for k in range(replays):
        for r in range(g.world):
            ins[r].copy_(exact(AFTER_N, r, torch.bfloat16, salt + k, device=DEV))
            outs[r].fill_(77)
        graph.replay()
        want = _want_sum(AFTER_N, g.world, torch.bfloat16, salt + k)
        wrong += sum(int((o != want).sum()) for o in outs)
    return wrong


def _capture(g: Ranks, ins, outs):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for algo in ALGOS:
            g.run(lambda r: g.backs[r].all_reduce(ins[r], outs[r], algo))
    return graph


def _next_call_each_thread(g: Ranks, ins, outs) -> list:
    """Every rank's next call (a one-shot push all-reduce), each from a thread of its own on
    its rank's stream (the ranks meet to reset their engines); what each raised, or None."""
    import threading
    seen: list = [None] * g.world

    def one(r):
        try:
            with torch.cuda.stream(g.streams[r]):
                g.backs[r].all_reduce(ins[r], outs[r], "one_shot_push")
        except BaseException as e:  # noqa: BLE001 - handed back
            seen[r] = e
    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in range(g.world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    torch.cuda.synchronize(DEV)
    return seen


def mismatch_case(world, failures, tally, eager_after: int = 100, replays_after: int = 25):
    """Every rank but the last calls one thing, the last another. Then every rank, each from
    a thread of its own (the ranks meet to reset their engines), makes its next call (every
    other case) or check(): each must raise MismatchError naming both calls, well before the
    5 s timeout. The mismatched call must have written no output (in-place inputs kept);
    then ``eager_after`` eager calls (every algorithm in turn, new inputs each), replays of a
    CUDA graph captured BEFORE the mismatch and of one captured after it must be exact on
    every rank. Each case warms every call up first, matched: a kernel's module load waits
    for running kernels, and a rank spinning on the call check would otherwise wait for a
    peer that is loading its module."""
    from tpcomm.cuda.emulated import check_ranks
    from tpcomm.cuda.p2p_collectives import Layout
    res = {}
    push_max = Layout.make(world, 8 << 20, GRID).one_shot_push_max(4)
    for i, (name, odd, common) in enumerate(_mismatch_cases(world, push_max)):
        g = Ranks(world, 8 << 20, timeout_s=5.0)
        try:
            for call in (odd, common):          # warm-up, matched: compiles and loads both
                g.run(lambda r: call(g.backs[r], r))
            ins = [torch.empty(AFTER_N, dtype=torch.bfloat16, device=DEV) for _ in range(world)]
            outs = [torch.empty_like(ins[0]) for _ in range(world)]
            warm_wrong = _after_calls(g, ins, outs, 1, ALGOS)   # and every algorithm after
            g.check()
            before = _capture(g, ins, outs)                     # a graph from before
            warm_wrong += _graph_replays(g, before, ins, outs, 10, 1)
            g.check()
            calls = [common] * (world - 1) + [odd]
            kept = [None] * world
            t0 = time.perf_counter()
            g.run(lambda r: kept.__setitem__(r, calls[r](g.backs[r], r)))
            torch.cuda.synchronize(DEV)
            waited = time.perf_counter() - t0
            t0 = time.perf_counter()
            kinds = []
            # every other case: the next call raises (the host-mapped error word), else check()
            by_call = i % 2 == 1
            seen = _next_call_each_thread(g, ins, outs) if by_call else check_ranks(g.backs, 30.0)
            for r, e in enumerate(seen):
                if isinstance(e, MismatchError):
                    ok = ("numel=" in str(e) and f"rank {r} called" in str(e)
                          and "stays usable" in str(e))
                    kinds.append("mismatch" if ok else f"mismatch without the calls: {e}")
                else:
                    kinds.append("none" if e is None else f"{type(e).__name__}: {str(e)[:120]}")
            recovery_s = time.perf_counter() - t0
            outputs_kept = all(k() for k in kept)
            eager_wrong = _after_calls(g, ins, outs, 100, ALGOS * (eager_after // len(ALGOS)))
            replay_wrong = _graph_replays(g, before, ins, outs, 200, replays_after)
            after = _capture(g, ins, outs)                      # and one captured after
            replay_wrong += _graph_replays(g, after, ins, outs, 300, replays_after)
            errors_after = [repr(e) for e in check_ranks(g.backs) if e is not None]
            res[name] = {"ranks": kinds, "raised_by": "next call" if by_call else "check()",
                         "gpu_s": round(waited, 3),
                         "recovery_s": round(recovery_s, 3), "outputs_kept": outputs_kept,
                         "warm_wrong": warm_wrong, "eager_calls_after": eager_after,
                         "eager_wrong_after": eager_wrong,
                         "graph_replays_after": 2 * replays_after,
                         "graph_wrong_after": replay_wrong, "errors_after": errors_after}
            tally["checked"] += world * (eager_after + 2 * replays_after * len(ALGOS))
            if (kinds != ["mismatch"] * world or waited > 2.5 or not outputs_kept or warm_wrong
                    or eager_wrong or replay_wrong or errors_after):
                failures.append(f"mismatch {name} world {world}: {res[name]}")
        except Exception as e:  # noqa: BLE001 - record it, go on with the next case
            failures.append(f"mismatch {name} world {world}: {type(e).__name__}: {str(e)[:200]}")
        print(f"mismatch {name} w{world}: {res.get(name)}", flush=True)
    tally[f"mismatch_w{world}"] = res


def _graph_us(fn, calls: int = 100, reps: int = 5) -> float:
    """Microseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, replayed once
    untimed, then ``reps`` timed replays (CUDA events; the median, rounded to 0.01 us)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize(DEV)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return round(sorted(times)[reps // 2], 2)


LATENCY_SIZES = (1024, 8192, 65536, 262144)   # bf16 elements: 2 KiB .. 512 KiB


def latency_case(world, failures, tally):
    """Microseconds per all-reduce, graph replays of 100 calls on every rank's stream (median
    of 5), bf16, after an exactness check. Emulated ranks share one GPU: compare only against
    the same case on another commit, on the same machine."""
    g = Ranks(world, 8 << 20, timeout_s=5.0)
    res = {}
    for algo in ("one_shot_push", "one_shot_pull", "two_shot"):
        for n in LATENCY_SIZES:
            xs = [exact(n, r, torch.bfloat16, 3, device=DEV) for r in range(world)]
            outs = [torch.empty_like(xs[0]) for _ in range(world)]

            def step():
                g.run(lambda r: g.backs[r].all_reduce(xs[r], outs[r], algo))

            step()
            g.check()
            want = _want_sum(n, world, torch.bfloat16, 3)
            if not all(torch.equal(o, want) for o in outs):
                failures.append(f"latency {algo} {n}: wrong sum")
            res[f"{algo}_{2 * n // 1024}KiB_us"] = _graph_us(step)
            g.check()
    tally[f"latency_w{world}_emulated"] = res
    print(f"latency w{world} (graph replays, us per call): {json.dumps(res)}", flush=True)


def fused_timing(g: Ranks, tally):
    """Indicative only (all ranks on one GPU): fused kernel vs all-reduce + torch add + norm,
    graph replays of 100 calls, microseconds per call."""
    world = g.world
    res = {}
    for rows in (1, 8, 64):
        hidden, dtype = 8192, torch.bfloat16
        xs = [exact(rows * hidden, r, dtype, 5, device=DEV).view(rows, hidden)
              for r in range(world)]
        ress = [exact(rows * hidden, 7, dtype, 6, device=DEV).view(rows, hidden)
                for _ in range(world)]
        w = torch.ones(hidden, dtype=dtype, device=DEV)
        normed = [torch.empty_like(xs[0]) for _ in range(world)]

        def fused():
            g.run(lambda r: g.backs[r].all_reduce_add_rms_norm(xs[r], ress[r], w, 1e-6,
                                                               normed[r]))

        def unfused():
            def one(r):
                g.backs[r].all_reduce(xs[r], xs[r], "one_shot_push")
                add_rms_norm(xs[r], ress[r], w, 1e-6)
            g.run(one)

        for name, fn in (("fused", fused), ("unfused", unfused)):
            fn()
            torch.cuda.synchronize(DEV)
            res[f"{name}_rows{rows}_us"] = _graph_us(fn)
        g.check()
    tally[f"fused_norm_timing_w{world}_emulated"] = res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--soak-ops", type=int, default=100_000, help="graph soak ops per algorithm")
    ap.add_argument("--eager-soak-ops", type=int, default=100_000,
                    help="eager soak ops per algorithm")
    ap.add_argument("--json")
    ap.add_argument("--only", help="comma list of cases to run alone: mismatch, latency, timeout")
    args = ap.parse_args()
    failures: list[str] = []
    tally: dict = {"checked": 0, "device": torch.cuda.get_device_name(DEV),
                   "torch": torch.__version__}
    import triton
    tally["triton"] = triton.__version__
    t_start = time.perf_counter()
    if args.only:
        return _only(args, failures, tally, t_start)
    for world in [int(w) for w in args.worlds.split(",")]:
        g = Ranks(world, 8 << 20, timeout_s=5.0)
        t0 = time.perf_counter()
        try:
            correctness(g, failures, tally)
        except PeerTimeoutError as e:
            failures.append(f"correctness world {world}: {str(e)[:200]}")
            continue
        print(f"world {world}: correctness {time.perf_counter() - t0:.1f}s, "
              f"{len(failures)} failures so far", flush=True)
        if world == max(int(w) for w in args.worlds.split(",")):
            for mode, ops in (("graph", args.soak_ops), ("eager", args.eager_soak_ops)):
                for i, algo in enumerate(ALGOS):
                    t0 = time.perf_counter()
                    soak(g, algo, ops, failures, tally, seed=10_000 * (i + 1),
                         graph_mode=mode == "graph")
                    print(f"world {world}: {mode} soak {algo}: "
                          f"{tally[f'soak_{mode}_{algo}_w{world}']} in "
                          f"{time.perf_counter() - t0:.1f}s", flush=True)
            fused_timing(Ranks(world, 8 << 20, timeout_s=5.0), tally)
            print(json.dumps(tally[f"fused_norm_timing_w{world}_emulated"]), flush=True)
        t0 = time.perf_counter()
        fused_suite(world, failures, tally)
        print(f"world {world}: fused suite {time.perf_counter() - t0:.1f}s, "
              f"{len(failures)} failures so far", flush=True)
        fused_after_other_ops(g, failures, tally)
        print(f"world {world}: fused after other ops: "
              f"{tally[f'fused_after_other_ops_w{world}']}", flush=True)
    for world in (2, 4):
        try:
            fused_gemm_case(world, failures, tally)
        except Exception as e:  # noqa: BLE001 - a compile error too: record it, go on
            failures.append(f"fused matmul_reduce_scatter world {world}: "
                            f"{type(e).__name__}: {str(e)[:300]}")
        print(f"fused matmul_reduce_scatter w{world}: {tally.get(f'fused_matmul_rs_w{world}')}",
              flush=True)
    # world 1 and the timing: scripts/gpu_fused.py; here every shape at world 2, the quick ones
    # at world 4 (each new shape, dtype and world compiles its own kernels)
    for world, shapes in ((2, FUSED_OPS_SHAPES), (4, FUSED_OPS_QUICK)):
        try:
            fused_ops_case(world, failures, tally, shapes=shapes)
        except Exception as e:  # noqa: BLE001 - a compile error too: record it, go on
            failures.append(f"fused ops world {world}: {type(e).__name__}: {str(e)[:300]}")
        print(f"fused ops w{world}: {tally.get(f'fused_ops_w{world}')}", flush=True)
    p2p_probe_case(4, failures, tally)
    timeout_case(2, failures, tally)
    mismatch_case(2, failures, tally)
    return _finish(args, failures, tally, t_start)


def _only(args, failures, tally, t_start) -> int:
    cases = {"mismatch": lambda: mismatch_case(2, failures, tally),
             "latency": lambda: latency_case(2, failures, tally),
             "timeout": lambda: timeout_case(2, failures, tally)}
    names = [c for c in args.only.split(",") if c]
    unknown = [c for c in names if c not in cases]
    if unknown or not names:
        print(f"--only takes a comma list of {sorted(cases)}, got {args.only!r}", file=sys.stderr)
        return 2
    for name in names:
        before = len(failures)
        cases[name]()
        print(f"{name}: {'FAIL' if len(failures) > before else 'PASS'}", flush=True)
    return _finish(args, failures, tally, t_start)


def _finish(args, failures, tally, t_start) -> int:
    tally["failures"] = failures
    tally["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps({k: v for k, v in tally.items() if k != "failures"}, indent=1))
    print(f"{len(failures)} failures", *failures[:20], sep="\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tally, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
