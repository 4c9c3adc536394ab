"""Write tpcomm/selection/select_table.py from scripts/gpu_timing.py measurements.

    python scripts/make_select_table.py timing-w2.json timing-w4.json \
        [--eager bench-eager-w4-one_shot.json ...] [-o tpcomm/selection/select_table.py]

The graph column comes from the gpu_timing.py files (one per world size). The eager column
comes from ``--eager`` files: ``tpcomm bench --json`` runs without --graph, ``--backends
tpcomm,nccl`` with tpcomm's algorithm forced (``--algorithm one_shot``, ``two_shot``, ``ring``
for all_reduce; ``direct`` for reduce_scatter / all_gather), any world sizes, one file per run;
the algorithm of each row is the one the run reports it used (rows where tpcomm fell back to
torch are skipped). Without --eager, or for a world or op no eager file covers, every eager
entry is None (not measured: the table's EAGER_UNMEASURED switch decides).

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


def _lookup(decisions, size):
    """The decision of the smallest measured size >= size (above the largest, the largest's)."""
    for d in decisions:
        if d[0] >= size:
            return d
    return decisions[-1]


def merge_columns(graph, eager):
    """Graph and eager decisions [(size, algo, note)] -> [(size, (graph algo, eager algo or
    None), note)] over every size either measured, each looked up as the table will be."""
    if not eager:
        return [(size, (algo, None), note) for size, algo, note in graph]
    out = []
    for size in sorted({d[0] for d in graph} | {d[0] for d in eager}):
        g, e = _lookup(graph, size), _lookup(eager, size)
        notes = [n for d, kind in ((g, ""), (e, "eager ")) if d[0] == size for n in [kind + d[2]]]
        out.append((size, (g[1], e[1]), "; ".join(notes)))
    return out


# tpcomm bench's "algo" column (the algorithm(s) a row used) -> the table's names
BENCH_ALGOS = {"one_shot": "one_shot", "one_shot_push": "one_shot", "one_shot_pull": "one_shot",
               "two_shot": "two_shot", "ring": "ring", "direct": "direct"}


def eager_decisions(bench_runs, op, world):
    """Eager decisions [(size, algo, note)] for ``op`` at ``world`` from tpcomm bench JSON runs:
    per size the fastest forced tpcomm algorithm wins where it is under MARGIN x the fastest
    NCCL time of those runs, else "torch". Sizes keyed as the Communicator's selection sees
    them (all_gather: the input of one rank; the bench names an all_gather by its output)."""
    ours, nccl = {}, {}
    for run in bench_runs:
        meta = run["meta"]
        if meta.get("op") != op or meta.get("world_size") != world:
            continue
        for r in run["rows"]:
            if r.get("mode") != "eager" or r.get("wrong"):
                continue
            size = r["nbytes"] // world if op == "all_gather" else r["nbytes"]
            if r["backend"] == "nccl":
                nccl[size] = min(nccl.get(size, r["time_us"]), r["time_us"])
            elif r["backend"] == "tpcomm":
                algo = BENCH_ALGOS.get(r.get("algo", "-").split("/")[0])
                if algo is not None:
                    mine = ours.setdefault(size, {})
                    mine[algo] = min(mine.get(algo, r["time_us"]), r["time_us"])
    dec = []
    for size in sorted(set(ours) & set(nccl)):
        times = ours[size]
        best = min(times, key=times.get)
        listed = ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
        note = f"{_human(size)}: {listed}, nccl {nccl[size]:.1f} us"
        algo = best if times[best] < MARGIN * nccl[size] else "torch"
        if size > GRAPH_DECISION_MAX and algo != "torch":
            algo, note = "torch", note + f" (above {_human(GRAPH_DECISION_MAX)}: NCCL)"
        dec.append((size, algo, note))
    return dec


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


# The lookup, the eager column's switch and select_cuda, as written below the tables: the
# current module's own text from its lookup on (one copy of that code, kept by the module)
def _tail() -> str:
    import tpcomm.selection.select_table as current
    with open(current.__file__) as f:
        src = f.read()
    return "\n" + src[src.index("def _lookup("):]


TAIL = _tail()


def render(measurements, eager_runs=()) -> str:
    lines = ['"""Measured algorithm table for the GPU backend (pure: no CUDA, no Triton).',
             "",
             "Written by scripts/make_select_table.py from scripts/gpu_timing.py runs (bf16, us per",
             "call: CUDA-graph replays up to 32 MiB, eager above; tpcomm and NCCL in the same run):"]
    for m in measurements:
        lines.append(f"    world {m['world']}: {m['device']}, {m.get('date', '?')} ({m['file']})")
    for run in eager_runs:
        m = run["meta"]
        lines.append(f"    eager: {m.get('op')}, world {m.get('world_size')}, "
                     f"{m.get('date', '?')[:10]} ({run['file']}: {m.get('command', '?')})")
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
            for bound, (algo, eager), notes in ranges:
                for note in notes:
                    lines.append(f"        # {note}")
                lines.append(f"        ({bound}, {algo!r}, {eager!r}),")   # None: not measured
            lines.append("    ],")
        lines.append("}")
        lines.append("")

    def both(graph, op, world):
        return _ranges(merge_columns(graph, eager_decisions(eager_runs, op, world)))

    table("ALL_REDUCE", {m["world"]: both(all_reduce_decisions(m["rows"]), "all_reduce",
                                          m["world"])
                         for m in measurements})
    for name, op in (("REDUCE_SCATTER", "reduce_scatter"), ("ALL_GATHER", "all_gather")):
        table(name, {m["world"]: both(rs_ag_decisions(m["rows"], op, m["world"]), op, m["world"])
                     for m in measurements if any(r.get("op") for r in m["rows"])})
    lines += ["", *TAIL.splitlines()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="scripts/gpu_timing.py --json files (graph column)")
    p.add_argument("--eager", nargs="+", default=[], metavar="BENCH.json",
                   help="tpcomm bench --json files of eager runs, algorithm forced (eager column)")
    p.add_argument("-o", "--output",
                   default=os.path.join(os.path.dirname(__file__), "..", "tpcomm", "selection",
                                        "select_table.py"))
    p.add_argument("--date", default="2026-11-22")
    args = p.parse_args(argv)
    ms = []
    for f in args.files:
        with open(f) as fh:
            m = json.load(fh)
        m["file"] = os.path.basename(f)
        m.setdefault("date", args.date)
        ms.append(m)
    ms.sort(key=lambda m: m["world"])
    eager_runs = []
    for f in args.eager:
        with open(f) as fh:
            run = json.load(fh)
        if any(r.get("mode") != "eager" for r in run["rows"]):
            p.error(f"--eager {f}: has graph rows; give runs without --graph")
        run["file"] = os.path.basename(f)
        eager_runs.append(run)
    with open(args.output, "w") as fh:
        fh.write(render(ms, eager_runs))
    print(open(args.output).read())


if __name__ == "__main__":
    main()
