"""CUDA graphs and torch.compile with R emulated ranks on ONE GPU (tests/_emulated.py): the
capture styles of the compilers, where users of other Lamport-style all-reduces report hangs.

- Several CUDA graphs hold calls of the same Communicators (all-reduce at two algorithms,
  in place, reduce-scatter, all-gather, the sublayer end, and a torch.compile'd function of the
  registered ops); they are replayed in a random order, interleaved with eager calls (forced
  kernel algorithms) and eager calls of the compiled function, with new inputs before every
  step; every output is checked exactly (sums of small integers) on every rank: 0 wrong, and
  no hang (every wait is bounded: a timeout fails the test, it does not hang it).
- A Communicator created during a capture, or a buffer registered with ``comm.empty``, raises
  a clear TpcommError at once, and the capture, the buffers and later calls are unharmed.

The tests run in ONE fresh process started with CUDA_MODULE_LOADING=EAGER in its environment
(set in this process around the start: the child imports this module, which asks torch whether
CUDA is there, so CUDA starts before the child could set it; the child checks what the driver
uses and skips, saying so, if it is not EAGER). A module load may wait for the running kernels,
and an emulated rank's kernel spins until the next rank's kernel (launched after it) runs; so
before any call that chains several ops, every kernel is warmed up at every size and algorithm
the test later runs or captures (what "auto" picks in a capture included), one op per run of
the ranks (tests/_emulated.py). The compiled function uses backend="aot_eager" here (inductor's
kernels would be loaded per rank on first use, that same wait), and it compiles once per rank's
Communicator: that warm-up runs with a longer timeout. Inductor inside CUDA graphs is tested at
world 1 (tests/gpu/test_compile_gpu.py) and on 2 GPUs. Skipped, visibly, without a GPU.
"""
from __future__ import annotations

import contextlib
import os
import random

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 1 CUDA GPU, found 0")
ENV = {"CUDA_MODULE_LOADING": "EAGER", "NCCL_NVLS_ENABLE": "0",
       "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1"}
HIDDEN = 4096


@contextlib.contextmanager
def _environ(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _in_fresh_process(fn, *args):
    """fn(0, 1, *args) in a new process whose environment has ENV from its start; skips the
    test (saying why) where the child's CUDA driver does not load eagerly."""
    from tpcomm.groups.launch import spawn
    with _environ(ENV):   # inherited by the child at its start, before CUDA starts there
        out = spawn(fn, 1, *args, env=ENV, timeout_s=220)[0]
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


def _eager_loading_or_skip() -> dict | None:
    """None where the driver loads every kernel at once (CUDA_MODULE_LOADING=EAGER took), else
    a {"skip": reason} for the test to return."""
    from _emulated import module_loading_mode
    torch.zeros(1, device="cuda")   # CUDA started
    mode = module_loading_mode()
    if mode == "LAZY":
        return {"skip": "the CUDA driver of the test process loads modules lazily although "
                        "CUDA_MODULE_LOADING=EAGER was set before the process started: emulated "
                        "ranks would stall on a kernel's first load while their peers spin"}
    return None


def _sum(numel, world, dtype, salt, device):
    from tpcomm.testing import exact
    return sum(exact(numel, r, torch.float64, salt, device=device)
               for r in range(world)).to(dtype)


def _graphs_body(rank, world_size, world, steps, seed, sizes=((3000 + 7, (1 << 19) + 5), 8)):
    from _emulated import EmulatedRanks
    from tpcomm.reference import add_rms_norm
    from tpcomm.selection.select import select_algorithm
    from tpcomm.testing import exact
    g = EmulatedRanks(world)
    dev, R, comms = g.device, world, g.comms
    bf = torch.bfloat16
    # static buffers of every graph, per rank (graphs hold their addresses); all-reduce sizes:
    # one_shot, and two_shot (over 512 KiB at 2 ranks, 256 KiB at 4)
    (n_small, n_big), rows = sizes
    shapes = {"a": (n_small,), "a_out": (n_small,), "b": (n_big,), "b_out": (n_big,),
              "c": (777,),                                            # reduced in place
              "rs": (R * 64, 33), "rs_out": (64, 33), "ag": (50, 9), "ag_out": (R * 50, 9),
              "x": (rows, HIDDEN), "res": (rows, HIDDEN), "normed": (rows, HIDDEN),
              "cx": (rows, HIDDEN), "cres": (rows, HIDDEN), "cnormed": (rows, HIDDEN),
              "cy": (rows, 40), "cy_out": (rows, 40)}
    bufs = [{k: torch.empty(s, dtype=bf, device=dev) for k, s in shapes.items()}
            for _ in range(R)]
    w = (exact(HIDDEN, 3, torch.float32, 1, device=dev) / 8 + 1).to(bf)

    def fill(salt):
        for r, b in enumerate(bufs):
            for k in ("a", "b", "c", "rs", "ag", "x", "cx", "cy"):
                b[k].copy_(exact(b[k].numel(), r, bf, salt + len(k) * 31 + ord(k[0]),
                                 device=dev).view_as(b[k]))
            for k in ("res", "cres"):
                b[k].copy_(exact(b[k].numel(), 11, bf, salt + ord(k[0]), device=dev).view_as(b[k]))
            for k in ("a_out", "b_out", "rs_out", "ag_out", "normed", "cnormed", "cy_out"):
                b[k].fill_(float("nan"))

    def compiled_body(comm, x, res, y, algorithm):
        normed, _ = comm.all_reduce_add_rms_norm(x, res, w, 1e-5, algorithm=algorithm)
        return normed, comm.all_reduce(y * 2, algorithm=algorithm)

    # one compiled graph per (rank, algorithm): the algorithm is a constant of the graph
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(compiled_body, backend="aot_eager", fullgraph=True)

    def ar(r, algorithm="auto"):
        c, b = comms[r], bufs[r]
        c.all_reduce(b["a"], out=b["a_out"], algorithm=algorithm)
        c.all_reduce(b["b"], out=b["b_out"],
                     algorithm="two_shot" if algorithm != "auto" else algorithm)
        c.all_reduce_(b["c"], algorithm=algorithm)

    def rs_ag(r, algorithm="auto"):
        c, b = comms[r], bufs[r]
        algorithm = "direct" if algorithm != "auto" else algorithm
        c.reduce_scatter(b["rs"], out=b["rs_out"], algorithm=algorithm)
        c.all_gather(b["ag"], out=b["ag_out"], algorithm=algorithm)

    def norm(r, algorithm="auto"):
        c, b = comms[r], bufs[r]
        normed, _ = c.all_reduce_add_rms_norm(b["x"], b["res"], w, 1e-5, algorithm=algorithm)
        b["normed"].copy_(normed)

    def comp(r, algorithm="auto"):
        b = bufs[r]
        normed, y = compiled(comms[r], b["cx"], b["cres"], b["cy"], algorithm)
        b["cnormed"].copy_(normed)
        b["cy_out"].copy_(y)

    parts = {"ar": ar, "rs_ag": rs_ag, "norm": norm, "comp": comp}
    wrong, checked = [], [0]

    def verify(what, salt):
        g.check(f"{what} (salt {salt})")
        for r, b in enumerate(bufs):
            exp = {}
            if what in ("ar", "eager_ar"):
                exp["a_out"] = _sum(n_small, R, bf, salt + 31 + ord("a"), dev)
                exp["b_out"] = _sum(n_big, R, bf, salt + 31 + ord("b"), dev)
                exp["c"] = _sum(777, R, bf, salt + 31 + ord("c"), dev)
            if what in ("rs_ag", "eager_rs_ag"):
                full = _sum(R * 64 * 33, R, bf, salt + 62 + ord("r"), dev).view(R, 64, 33)
                exp["rs_out"] = full[r]
                exp["ag_out"] = torch.cat([exact(50 * 9, p, bf, salt + 62 + ord("a"), device=dev)
                                           for p in range(R)]).view(R * 50, 9)
            if what in ("norm", "eager_norm"):
                xs = _sum(rows * HIDDEN, R, bf, salt + 31 + ord("x"), dev).view(rows, HIDDEN)
                res0 = exact(rows * HIDDEN, 11, bf, salt + ord("r"), device=dev).view(rows, HIDDEN)
                want_n, want_r = add_rms_norm(xs.clone(), res0.clone(), w, 1e-5)
                exp["x"], exp["res"] = xs, want_r
                exp["normed~"] = want_n
            if what in ("comp", "eager_comp"):
                xs = _sum(rows * HIDDEN, R, bf, salt + 62 + ord("c"), dev).view(rows, HIDDEN)
                res0 = exact(rows * HIDDEN, 11, bf, salt + ord("c"), device=dev).view(rows, HIDDEN)
                want_n, want_r = add_rms_norm(xs.clone(), res0.clone(), w, 1e-5)
                exp["cx"], exp["cres"], exp["cnormed~"] = xs, want_r, want_n
                exp["cy_out"] = (_sum(rows * 40, R, torch.float64, salt + 62 + ord("c"), dev)
                                 * 2).to(bf).view(rows, 40)
            for k, want in exp.items():
                checked[0] += 1
                if k.endswith("~"):   # normed: the same formula, maybe another summation order
                    got = b[k[:-1]].float()
                    ok = bool(torch.isfinite(got).all()) and float(
                        (got - want.float()).abs().max()) <= 2e-2 * float(want.float().abs().max())
                else:
                    ok = torch.equal(b[k], want.view_as(b[k]))
                if not ok:
                    wrong.append(f"{what} rank {r} {k} (salt {salt})")

    # warm-up, one op per run of the ranks: every kernel at every size, with the algorithm the
    # eager parts force and the one "auto" picks in a capture (eagerly "auto" would go to
    # torch.distributed), so that no kernel is compiled or loaded while a rank's kernel spins
    def captured(op, t):
        return select_algorithm(op, t.numel() * t.element_size(), t.dtype, R,
                                comms[0]._topology, graph=True)

    def algos(forced, op, t):
        picked = captured(op, t)
        return [forced] + ([picked] if picked not in (forced, "torch") else [])

    fill(0)
    b0 = bufs[0]
    for alg in algos("one_shot", "all_reduce", b0["a"]):
        g.warm(lambda r: comms[r].all_reduce(bufs[r]["a"], out=bufs[r]["a_out"], algorithm=alg))
    for alg in algos("two_shot", "all_reduce", b0["b"]):
        g.warm(lambda r: comms[r].all_reduce(bufs[r]["b"], out=bufs[r]["b_out"], algorithm=alg))
    for alg in algos("one_shot", "all_reduce", b0["c"]):
        g.warm(lambda r: comms[r].all_reduce_(bufs[r]["c"], algorithm=alg))
    for alg in algos("direct", "reduce_scatter", b0["rs"]):
        g.warm(lambda r: comms[r].reduce_scatter(bufs[r]["rs"], out=bufs[r]["rs_out"],
                                                 algorithm=alg))
    for alg in algos("direct", "all_gather", b0["ag"]):
        g.warm(lambda r: comms[r].all_gather(bufs[r]["ag"], out=bufs[r]["ag_out"],
                                             algorithm=alg))
    for alg in algos("one_shot", "all_reduce", b0["x"]):   # norm: an all_reduce with epilogue
        g.warm(lambda r: comms[r].all_reduce_add_rms_norm(bufs[r]["x"], bufs[r]["res"], w, 1e-5,
                                                          algorithm=alg))
        g.warm(lambda r: comms[r].all_reduce_add_rms_norm(bufs[r]["cx"], bufs[r]["cres"], w,
                                                          1e-5, algorithm=alg))
    for alg in algos("one_shot", "all_reduce", b0["cy"]):
        g.warm(lambda r: comms[r].all_reduce(bufs[r]["cy"], out=bufs[r]["cy_out"],
                                             algorithm=alg))
    # torch.compile traces once per (rank's Communicator, algorithm), on the host between the
    # ranks' launches: the ranks already launched wait longer than usual, once. The "auto"
    # variant compiles here too, before its capture (as an engine's warm-up compiles before
    # capturing; dynamo cannot compile during a capture), eager "auto" picking the kernels
    with g.patient(120.0):
        g.run(lambda r: comp(r, "one_shot"))
        g.check("the first call of the compiled function (it compiles for every rank)")
        with g.eager_auto_as_captured():
            g.run(lambda r: comp(r, "auto"))
            g.check("the compiled function's first call on 'auto' (compiles for every rank)")
    # then every part eagerly once, checked (the "auto" parts as eager calls go to kernels
    # forced per part)
    fill(0)
    g.run(lambda r: ar(r, "one_shot"))
    verify("eager_ar", 0)
    g.run(lambda r: rs_ag(r, "direct"))
    verify("eager_rs_ag", 0)
    g.run(lambda r: norm(r, "one_shot"))
    verify("eager_norm", 0)
    g.run(lambda r: comp(r, "one_shot"))
    verify("eager_comp", 0)
    # captured, "auto" picks the kernels (eagerly it would pick torch.distributed); the
    # compiled function's "auto" variant was compiled in the warm-up
    graphs = {}
    for name, fn in parts.items():
        graph = torch.cuda.CUDAGraph()
        fill(1)
        g.check(f"before capturing {name}")
        with torch.cuda.graph(graph):
            g.run(fn)
        graphs[name] = graph
    eager_parts = {"eager_ar": lambda r: ar(r, "one_shot"),
                   "eager_rs_ag": lambda r: rs_ag(r, "direct"),
                   "eager_norm": lambda r: norm(r, "one_shot"),
                   "eager_comp": lambda r: comp(r, "one_shot")}
    kinds = list(graphs) + list(eager_parts)
    order = kinds * -(-steps // len(kinds))
    random.Random(seed).shuffle(order)
    for step, what in enumerate(order):
        salt = 1000 + 97 * step
        fill(salt)
        if what in graphs:
            graphs[what].replay()
        else:
            g.run(eager_parts[what])
        verify(what, salt)
    stats = {c.rank: c.stats()["ops"] for c in comms}
    g.close()
    return {"wrong": wrong, "checked": checked[0], "order": order, "stats": stats}


def _all_body(rank, world_size):
    """Every test's body in ONE fresh process (each start loads all of torch's kernels, which
    CUDA_MODULE_LOADING=EAGER makes seconds long): {name: result or {"error": text}}."""
    import traceback
    skip = _eager_loading_or_skip()
    if skip:
        return skip
    out = {}
    for name, fn, args in (("graphs_2", _graphs_body, (2, 64, 2)),
                           ("graphs_4", _graphs_body, (4, 64, 4)),
                           ("capture_errors", _capture_errors_body, ())):
        try:
            out[name] = fn(rank, world_size, *args)
        except Exception as e:  # noqa: BLE001 - the test of that part reports it
            out[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    return out


@pytest.fixture(scope="module")
def results():
    return _in_fresh_process(_all_body)


def _part(results, name) -> dict:
    out = results[name]
    if "error" in out:
        pytest.fail(out["error"], pytrace=False)
    return out


@needs_gpu
@pytest.mark.parametrize("world", [2, 4])
def test_graphs_replayed_in_any_order_with_eager_calls(results, world):
    out = _part(results, f"graphs_{world}")
    assert not out["wrong"], out["wrong"][:10]
    assert out["checked"] > 64 * world * 2
    assert len(set(out["order"])) == 8      # every graph and every eager part ran
    for ops in out["stats"].values():       # the captured calls ran on the kernels
        assert set(ops["all_reduce"]) >= {"one_shot/push", "two_shot"}, ops["all_reduce"]
        assert "direct" in ops["reduce_scatter"] and "direct" in ops["all_gather"]


def _capture_errors_body(rank, world_size):
    from _emulated import EmulatedRanks
    import tpcomm
    from tpcomm.errors import TpcommError
    from tpcomm.testing import exact
    g = EmulatedRanks(2)
    dev = g.device
    out = {}
    before = [c.empty((1000,), torch.bfloat16) for c in g.comms]
    side = torch.cuda.Stream(dev)
    graph = torch.cuda.CUDAGraph()
    probe = torch.ones(4, device=dev)
    with torch.cuda.graph(graph, stream=side):
        probe.add_(1)
        try:
            tpcomm.Communicator(device=dev)
            out["create"] = "no error"
        except TpcommError as e:
            out["create"] = str(e)
        try:
            g.comms[0].empty((1000,), torch.bfloat16)
            out["empty"] = "no error"
        except TpcommError as e:
            out["empty"] = str(e)
    # the buffers are unharmed: the next registrations land where they would have, on every
    # rank alike, and an all-reduce of them is exact
    after = [c.empty((1000,), torch.bfloat16) for c in g.comms]
    out["offsets"] = [t.data_ptr() - b.data_ptr() for t, b in zip(after, before)]
    for r, t in enumerate(after):
        t.copy_(exact(1000, r, torch.bfloat16, 5, device=dev))
    g.run(lambda r: g.comms[r].all_reduce_(after[r], algorithm="one_shot"))
    g.check("the all-reduce after the refused set-up")
    want = _sum(1000, 2, torch.bfloat16, 5, dev)
    out["exact_after"] = all(torch.equal(t, want) for t in after)
    graph.replay()          # the capture ended cleanly and holds what it recorded
    torch.cuda.synchronize()
    out["probe"] = probe.tolist()
    g.close()
    return out


@needs_gpu
def test_setup_during_capture_is_a_clear_error(results):
    out = _part(results, "capture_errors")
    assert "creating a Communicator during CUDA graph capture" in out["create"], out["create"]
    assert "comm.empty" in out["empty"] and "during CUDA graph capture" in out["empty"]
    assert out["offsets"][0] == out["offsets"][1] == 2048   # 1000 bf16, rounded up to 256 B
    assert out["exact_after"] and out["probe"] == [2.0] * 4
