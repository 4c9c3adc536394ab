"""Write tpcomm/selection/select_table.py from scripts/gpu_timing.py measurements.

    python scripts/make_select_table.py timing-w2.json timing-w4.json \
        [-o tpcomm/selection/select_table.py]

Rule, per world size and measured size s (sorted): the fastest of tpcomm's algorithms wins if it
is under 0.97 x NCCL's time there (a 3 % margin against noise), else "torch". A size n uses the
decision of the smallest measured size >= n (above the largest, the largest's). Each range of
the written table carries the measured times behind it as a comment.
"""
from __future__ import annotations

import argparse
import json
import os

MARGIN = 0.97
# Above this size only the NCCL baseline is chosen: gpu_timing.py times sizes up to 32 MiB as
# graph replays of one L2-resident input (the H200's L2 is 50 MiB), and the benchmark's eager
# run of 16 MiB on 2 GPUs (inputs rotating through 64 MiB) gave two_shot 172 us against NCCL's
# 81 us (benchmarks/results/gpu-h200x2-2026-11-22.md): a graph win there does not carry over.
GRAPH_DECISION_MAX = 8 << 20
AR_CANDIDATES = {"one_shot": "one_shot_push", "two_shot": "two_shot", "ring": "ring"}


def _human(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _ranges(decisions):
    """[(size, algo, note)] sorted by size -> [(bound exclusive or None, algo, notes)]."""
    out = []
    for i, (size, algo, note) in enumerate(decisions):
        last = i == len(decisions) - 1
        bound = None if last else size + 1
        if out and out[-1][1] == algo:
            out[-1] = (bound, algo, out[-1][2] + [note])
        else:
            out.append((bound, algo, [note]))
    return out


def all_reduce_decisions(rows):
    dec = []
    for r in sorted((r for r in rows if "op" not in r), key=lambda r: r["bytes"]):
        nccl = r.get("nccl")
        ours = {name: r[key] for name, key in AR_CANDIDATES.items() if r.get(key) is not None}
        best = min(ours, key=ours.get) if ours else None
        times = ", ".join(f"{k} {v:.1f}" for k, v in sorted(ours.items(), key=lambda kv: kv[1]))
        note = f"{_human(r['bytes'])} ({r['mode']}): {times}, nccl {nccl:.1f} us"
        algo = best if best and nccl and ours[best] < MARGIN * nccl else "torch"
        if r["bytes"] > GRAPH_DECISION_MAX and algo != "torch":
            algo, note = "torch", note + f" (above {_human(GRAPH_DECISION_MAX)}: NCCL, see top)"
        dec.append((r["bytes"], algo, note))
    return dec


def rs_ag_decisions(rows, op, world):
    """Keyed by the input bytes of one rank, as the Communicator passes them to selection
    (gpu_timing.py names all_gather sizes by their output, world x the input)."""
    dec = []
    for r in sorted((r for r in rows if r.get("op") == op), key=lambda r: r["bytes"]):
        d, c = r.get("direct"), r.get("nccl")
        size = r["bytes"] // world if op == "all_gather" else r["bytes"]
        what = (f"{_human(size)} in ({_human(r['bytes'])} out)" if op == "all_gather"
                else _human(size))
        note = f"{what}: direct {d if d is None else f'{d:.1f}'}, nccl {c:.1f} us"
        algo = "direct" if d is not None and d < MARGIN * c else "torch"
        if r["bytes"] > GRAPH_DECISION_MAX and algo != "torch":
            algo, note = "torch", note + f" (above {_human(GRAPH_DECISION_MAX)}: NCCL, see top)"
        dec.append((size, algo, note))
    return dec


# The lookup, the eager column's switch and select_cuda, as written below the tables.
TAIL = '''
def _lookup(table, nbytes: int, graph: bool) -> str:
    for bound, in_graph, eager in table:
        if bound is None or nbytes < bound:
            if graph:
                return in_graph
            if eager is None:   # not measured eagerly
                return in_graph if EAGER_UNMEASURED == "graph" else EAGER_UNMEASURED
            return eager
    return "torch"


# The eager column (calls outside CUDA-graph capture). Eager calls are host-bound: before
# issue 16 the Communicator, the backend and the Triton launch cost more host time per call
# than NCCL's eager path. tpcomm bench, world 2, eager, 2026-11-22
# (benchmarks/results/gpu-h200x2-2026-11-22.md): tpcomm 53.8 / 56.5 / 52.9 / 54.6 / 60.6 /
# 78.2 / 80.0 us against NCCL 33.8 / 27.9 / 25.4 / 35.1 / 29.5 / 42.1 / 50.1 us at 2K / 8K /
# 32K / 128K / 512K / 2M / 8M. The lean launch path (kernels/launch.py) and the Communicator's
# GPU hot path cut that host time; until eager timings on several GPUs exist (the multi-GPU
# issue), every eager entry is None (not measured) and goes where EAGER_UNMEASURED says.
# THE SWITCH, one line: EAGER_UNMEASURED = "graph" runs eager calls on the graph column's
# algorithm (tpcomm's kernels wherever they won in graphs); "torch" keeps them on NCCL.
# Measured eager entries (a third element other than None) are used as they are.
EAGER_UNMEASURED = "torch"


def select_cuda(op: str, nbytes: int, dtype: torch.dtype, world_size: int,
                graph: bool = True) -> str:
    """The GPU algorithm for one call; ``"torch"`` (NCCL) wherever ours was not measured
    faster. ``graph``: whether the call is being captured into a CUDA graph (the graph
    column; False: the eager column)."""
    tables = {"all_reduce": ALL_REDUCE, "reduce_scatter": REDUCE_SCATTER,
              "all_gather": ALL_GATHER}[op]
    table = tables.get(world_size)
    return "torch" if table is None else _lookup(table, nbytes, graph)
'''


def render(measurements) -> str:
    lines = ['"""Measured algorithm table for the GPU backend (pure: no CUDA, no Triton).',
             "",
             "Written by scripts/make_select_table.py from scripts/gpu_timing.py runs (bf16, us per",
             "call: CUDA-graph replays up to 32 MiB, eager above; tpcomm and NCCL in the same run):"]
    for m in measurements:
        lines.append(f"    world {m['world']}: {m['device']}, {m.get('date', '?')} ({m['file']})")
    lines += ["A size uses the decision of the smallest measured size at or above it; tpcomm's",
              f"algorithm wins only where it was under {MARGIN} x NCCL's time, else \"torch\" (NCCL);",
              f"above {_human(GRAPH_DECISION_MAX)} always NCCL: the graph timings there ran from an",
              "L2-resident input and the benchmark's eager 16 MiB run (world 2) lost to NCCL.",
              "Thresholds are in bytes and apply to every dtype (measured in bf16; the kernels move",
              "bytes, so float32/float16 behave alike). World sizes not measured go to NCCL.",
              '"""', "from __future__ import annotations", "", "import torch", ""]

    def table(name, per_world):
        lines.append("# world -> [(upper bound in bytes, exclusive; None = no limit, graph algorithm, "
                     "eager algorithm)]")
        lines.append(f"{name} = {{")
        for world, ranges in per_world.items():
            lines.append(f"    {world}: [")
            for bound, algo, notes in ranges:
                for note in notes:
                    lines.append(f"        # {note}")
                lines.append(f"        ({bound}, {algo!r}, None),")   # eager: not measured
            lines.append("    ],")
        lines.append("}")
        lines.append("")

    table("ALL_REDUCE", {m["world"]: _ranges(all_reduce_decisions(m["rows"]))
                         for m in measurements})
    table("REDUCE_SCATTER", {m["world"]: _ranges(rs_ag_decisions(m["rows"], "reduce_scatter",
                                                                 m["world"]))
                             for m in measurements if any(r.get("op") for r in m["rows"])})
    table("ALL_GATHER", {m["world"]: _ranges(rs_ag_decisions(m["rows"], "all_gather", m["world"]))
                         for m in measurements if any(r.get("op") for r in m["rows"])})
    lines += ["", *TAIL.splitlines()]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--output",
                   default=os.path.join(os.path.dirname(__file__), "..", "tpcomm", "cuda",
                                        "select_table.py"))
    p.add_argument("--date", default="2026-11-22")
    args = p.parse_args()
    ms = []
    for f in args.files:
        with open(f) as fh:
            m = json.load(fh)
        m["file"] = os.path.basename(f)
        m.setdefault("date", args.date)
        ms.append(m)
    ms.sort(key=lambda m: m["world"])
    with open(args.output, "w") as fh:
        fh.write(render(ms))
    print(open(args.output).read())


if __name__ == "__main__":
    main()
