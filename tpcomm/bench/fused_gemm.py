"""The fused GEMM + collective kernels at world 1 on one GPU: what the fusion costs when the
communication is free (``tpcomm bench overlap --fused-gemm``, ``scripts/gpu_fused.py``).

For every M, one GEMM ``a`` [M, K] x ``b`` [K, N] (bf16 by default; the issue's shape is
K = 7168, N = 8192), in one run:

- ``torch_mm``: torch.mm (cuBLAS), the baseline of every ratio;
- per op (matmul_reduce_scatter, all_gather_matmul, matmul_all_reduce): ``fused``, the GPU
  engine's fused op over ONE emulated rank (``tpcomm.cuda.emulated``, the Communicator's
  default 32 MiB buffer, the grid of every SM): the whole protocol runs (rounds, epochs, the
  pushes into its own receive slots, the receive and the clearing; at world 1 the all-gather
  pushes nothing), and ``core``, the same GEMM core with the same tile config storing to a local
  C (``_gemm.matmul``: the fused kernel without its communication);
- ``inductor`` (optional, minutes of autotuning): ``torch.compile(mode=
  "max-autotune-no-cudagraphs")`` of torch.mm with Triton templates only (persistent TMA on),
  inductor's best Triton GEMM for the shape.

Checked before timing: ``fused`` bitwise equal to ``core`` (same config, same arithmetic: one
rounding of the same float32 tile), ``core`` within 2e-2 of max |torch.mm| (another summation
order). Times (``interleaved_us``): at each M every call is timed in 7 round-robin passes, one
sample of back-to-back calls (about 25 ms, CUDA events) per call per pass, the median per call:
the same clock and thermal drift fall on every column (on 2026-12-03 samples of one call in one
run spread 4-37 %, as much as the configurations differ). Inputs not rotated (b alone is
117 MB at the issue's shape, twice the L2).
"""
from __future__ import annotations

import statistics
import time

import torch

OPS = ("matmul_reduce_scatter", "all_gather_matmul", "matmul_all_reduce")
MAX_BYTES = 32 << 20     # the Communicator's default buffer (settings.max_bytes)
TOL = 2e-2               # core against torch.mm, relative to max |torch.mm|


def time_us(fn, *, target_ms: float = 25.0, reps: int = 7) -> float:
    """Median over ``reps`` of the mean time per call of back-to-back calls (us)."""
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    e1.synchronize()
    iters = max(2, min(200, int(target_ms / max(e0.elapsed_time(e1), 1e-3))))
    samples = []
    for _ in range(reps):
        e0.record()
        for _ in range(iters):
            fn()
        e1.record()
        e1.synchronize()
        samples.append(e0.elapsed_time(e1) * 1e3 / iters)
    return round(statistics.median(samples), 1)


def world1_engine(device: torch.device, timeout_s: float = 20.0):
    """The GPU engine of one emulated rank with the Communicator's default buffer, on every SM."""
    from ..cuda.emulated import make_emulated_group
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    backs, _ = make_emulated_group(1, MAX_BYTES, sms, device=device, timeout_s=timeout_s)
    return backs[0]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.float().abs().max()) or 1.0
    err = float((got.float() - ref.float()).abs().max()) / scale
    return float("inf") if err != err else err


def inputs(M: int, k: int, n: int, dtype, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed + M)
    a = (torch.randn(M, k, generator=g, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(k, n, generator=g, device=device).to(dtype)
    return a, b


def op_calls(eng, op: str, a: torch.Tensor, b: torch.Tensor, mm_out: torch.Tensor):
    """One op at one M, checked: (row, fused call, core call); the calls are None where the
    check failed (the row says why)."""
    from ..cuda import fused_gemm
    from ..kernels import _gemm
    M, N = a.shape[0], b.shape[1]
    cfg = fused_gemm.gemm_config(eng, op, a, b)
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    core = torch.empty_like(out)
    p = _gemm.plan(a, b, cfg)
    fused = getattr(eng, op)
    row = {"op": op, "M": M, "K": a.shape[1], "N": N, "config": cfg.name()}
    fused(a, b, out)
    _gemm.matmul(p, core)
    eng.check(sync=True)
    row["bitwise_fused_vs_core"] = bool(torch.equal(out, core))
    row["core_err_vs_torch_mm"] = rel_err(core, mm_out)
    row["ok"] = row["bitwise_fused_vs_core"] and row["core_err_vs_torch_mm"] <= TOL
    if not row["ok"]:
        return row, None, None
    return row, (lambda: fused(a, b, out)), (lambda: _gemm.matmul(p, core))


def interleaved_us(calls: dict, *, rounds: int = 7, target_ms: float = 25.0) -> dict:
    """Median us per call of every callable in ``calls``, timed round-robin: ``rounds`` passes,
    the order rotated each pass, one ~``target_ms`` sample of back-to-back calls per callable
    per pass (``time_us`` with one repetition), so clock and thermal drift fall on all alike."""
    keys = list(calls)
    samples: dict = {k: [] for k in keys}
    for r in range(rounds):
        j = r % max(1, len(keys))
        for k in keys[j:] + keys[:j]:
            samples[k].append(time_us(calls[k], target_ms=target_ms, reps=1))
    return {k: round(statistics.median(v), 1) for k, v in samples.items()}


def inductor_mm():
    """torch.mm compiled by inductor with max-autotune over its Triton templates only
    (persistent TMA templates on): its best Triton GEMM, chosen at the first call of a shape."""
    import torch._inductor.config as icfg
    icfg.max_autotune_gemm_backends = "TRITON"     # Triton templates only: not cuBLAS
    if hasattr(icfg.triton, "enable_persistent_tma_matmul"):
        icfg.triton.enable_persistent_tma_matmul = True
    torch._dynamo.reset()

    def mm(x, y):
        return torch.mm(x, y)
    return torch.compile(mm, mode="max-autotune-no-cudagraphs", dynamic=False)


def graph_of(fn):
    """A CUDA graph of one call of ``fn`` (already run: compiled and loaded), or None where the
    call cannot be captured (the table then has no graph time for it)."""
    try:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        return g
    except Exception:  # noqa: BLE001 - graphs are the second column, the events the first
        return None


def world1_table(ms, k: int, n: int, dtype=torch.bfloat16, *, device=None, ops=OPS,
                 inductor_ms=(), deadline: float | None = None, progress=None,
                 on_row=None, rounds: int = 7, target_ms: float = 25.0) -> dict:
    """Every M of ``ms``: torch.mm, each op's fused and core calls (checked first) and, at the
    Ms of ``inductor_ms`` (skipped once ``time.perf_counter()`` passes ``deadline``), inductor's
    best Triton GEMM, all timed together by ``interleaved_us`` (``rounds`` passes).
    ``progress(line)`` and ``on_row(result)`` after each M (a script that may be stopped keeps
    what was measured). Returns {"torch_mm_us", "rows", "inductor", "method"}."""
    device = torch.device(device or "cuda")
    eng = world1_engine(device)
    res = {"torch_mm_us": {}, "rows": [], "inductor": {},
           "method": f"interleaved: {rounds} round-robin passes, one ~{target_ms:g} ms sample "
                     "per call per pass (CUDA events), median"}
    say = progress or (lambda line: None)
    try:
        for M in ms:
            t0 = time.perf_counter()
            a, b = inputs(M, k, n, dtype, device)
            mm_out = torch.mm(a, b)
            calls = {"torch_mm": lambda: torch.mm(a, b)}
            rows = []
            for op in ops:
                try:
                    row, fused, core = op_calls(eng, op, a, b, mm_out)
                except Exception as e:  # noqa: BLE001 - a compile or launch failure: say so
                    row, fused, core = ({"op": op, "M": M, "K": k, "N": n, "config": "-",
                                         "ok": False, "bitwise_fused_vs_core": None,
                                         "core_err_vs_torch_mm": float("nan"),
                                         "error": f"{type(e).__name__}: {str(e)[:300]}"},
                                        None, None)
                rows.append(row)
                if fused is not None:
                    calls[(op, "fused")], calls[(op, "core")] = fused, core
            if M in inductor_ms:
                if deadline is not None and time.perf_counter() > deadline:
                    res["inductor"][M] = {"skipped": "past the deadline"}
                else:
                    try:
                        f = inductor_mm()
                        t1 = time.perf_counter()
                        y = f(a, b)
                        torch.cuda.synchronize()
                        res["inductor"][M] = {"compile_s": round(time.perf_counter() - t1, 1),
                                              "err_vs_torch_mm": rel_err(y, mm_out)}
                        calls["inductor"] = lambda: f(a, b)
                    except Exception as e:  # noqa: BLE001 - reported in the table
                        res["inductor"][M] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            times = interleaved_us(calls, rounds=rounds, target_ms=target_ms)
            graphs = {key: graph_of(fn) for key, fn in calls.items()}
            gtimes = interleaved_us({key: g.replay for key, g in graphs.items() if g},
                                    rounds=rounds, target_ms=target_ms)
            eng.check(sync=True)
            res["torch_mm_us"][M] = times["torch_mm"]
            res.setdefault("torch_mm_graph_us", {})[M] = gtimes.get("torch_mm")
            if "inductor" in times:
                res["inductor"][M]["us"] = times["inductor"]
                res["inductor"][M]["graph_us"] = gtimes.get("inductor")
            for row in rows:
                if (row["op"], "fused") in times:
                    row["fused_us"] = times[(row["op"], "fused")]
                    row["core_us"] = times[(row["op"], "core")]
                    row["fused_graph_us"] = gtimes.get((row["op"], "fused"))
                    row["core_graph_us"] = gtimes.get((row["op"], "core"))
                res["rows"].append(row)
                say(f"{row['op']} M={M}: fused {row.get('fused_us', 'WRONG')} us, core "
                    f"{row.get('core_us', '-')} us ({row['config']}; bitwise = core: "
                    f"{row['bitwise_fused_vs_core']}"
                    f"{'; ' + row['error'] if 'error' in row else ''})")
            say(f"M={M}: torch.mm {times['torch_mm']} us, inductor "
                f"{res['inductor'].get(M, {}).get('us', '-')} us [{time.perf_counter() - t0:.1f} s]")
            if on_row:
                on_row(res)
            del a, b, mm_out, calls, graphs
            torch.cuda.empty_cache()
    finally:
        eng.close()
    return res


def table_lines(res: dict) -> list[str]:
    """The markdown table: per op and M, us per call and the ratios the issue's targets use
    (fused / inductor <= 1.0, fused / torch.mm <= 1.05 the goal), from back-to-back calls and
    from CUDA-graph replays of one call (no host launch cost: the kernels alone)."""
    # keyed by M; a result read back from JSON has string keys
    mm = {int(k): v for k, v in res["torch_mm_us"].items()}
    mm_g = {int(k): v for k, v in res.get("torch_mm_graph_us", {}).items()}
    ind = {int(k): v for k, v in res.get("inductor", {}).items()}

    def ratio(x, y):
        return f"{x / y:.3f}" if x and y else "-"
    lines = ["| op | M | K | N | torch.mm | inductor | core | fused | fused/core | "
             "fused/inductor | fused/torch.mm | graph: torch.mm | inductor | fused | "
             "fused/inductor | fused/torch.mm | config |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
             "---|"]
    for r in res["rows"]:
        M = r["M"]
        i_us, i_g = ind.get(M, {}).get("us"), ind.get(M, {}).get("graph_us")
        f_us, c_us, f_g = r.get("fused_us"), r.get("core_us"), r.get("fused_graph_us")
        lines.append(
            f"| {r['op']} | {M} | {r['K']} | {r['N']} | {mm.get(M, '-')} | {i_us or '-'} | "
            f"{c_us or '-'} | {f_us if f_us else 'WRONG'} | {ratio(f_us, c_us)} | "
            f"{ratio(f_us, i_us)} | {ratio(f_us, mm.get(M))} | {mm_g.get(M) or '-'} | "
            f"{i_g or '-'} | {f_g or '-'} | {ratio(f_g, i_g)} | {ratio(f_g, mm_g.get(M))} | "
            f"{r['config']} |")
    for M, v in ind.items():
        if "us" not in v:
            lines.append(f"- inductor M={M}: {v}")
    return lines
