"""The benchmark's figures and how they are printed: nccl-tests tables, a side-by-side summary,
a markdown results file and a JSON document. Pure functions of the measured rows.

Conventions, as in nccl-tests:

- ``size`` is the whole buffer: the tensor of all_reduce, the input of reduce_scatter ([R*m]),
  the output of all_gather ([R*m]); ``count`` is its number of elements.
- algbw = size / time; busbw = algbw * 2(R-1)/R for all_reduce and algbw * (R-1)/R for
  reduce_scatter and all_gather (the bytes each rank must move, whatever the algorithm).
- ``time`` is per call in microseconds: the median over repetitions on each rank, then the
  maximum over ranks.

The first contender named is the one under test: its table and the summary carry one speed-up
column per other contender, ``x gloo`` = time(gloo) / time(first), so 12.5 reads "12.5 times
faster than gloo".
"""
from __future__ import annotations

import dataclasses

from .output import markdown_table, text_table


@dataclasses.dataclass(frozen=True)
class Row:
    backend: str     # the contender (the JSON key stays "backend": results files, plan --fit)
    op: str
    dtype: str
    nbytes: int
    count: int
    mode: str        # "eager", or "graph" (CUDA-graph replays of many calls)
    algo: str        # the algorithm that ran ("-" when the contender does not say)
    time_us: float   # per call, max over ranks of the per-rank median
    wrong: int       # elements that differed from the expected result, summed over ranks


def bus_factor(op: str, world: int) -> float:
    """busbw / algbw: the share of the buffer each rank must send (nccl-tests' PERFORMANCE.md)."""
    if op in ("all_reduce", "all_reduce_add_rms_norm"):
        return 2 * (world - 1) / world
    if op in ("reduce_scatter", "all_gather"):
        return (world - 1) / world
    raise ValueError(f"unknown op {op!r}")


def algbw_gbs(nbytes: int, time_us: float) -> float:
    return nbytes / (time_us * 1e3) if time_us > 0 else 0.0


def busbw_gbs(op: str, world: int, nbytes: int, time_us: float) -> float:
    return algbw_gbs(nbytes, time_us) * bus_factor(op, world)


def human_size(nbytes: int) -> str:
    """4096 -> '4K', 1536 -> '1.5K', 16777216 -> '16M' (powers of 1024, as in -b/-e)."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g}{unit}"
    return str(nbytes)


def speedups(rows: list[Row], backends: list[str]) -> dict[tuple[str, int], float]:
    """(other contender, nbytes) -> time(other) / time(first contender)."""
    times = {(r.backend, r.nbytes): r.time_us for r in rows}
    first = backends[0]
    return {(b, n): t / times[(first, n)]
            for (b, n), t in times.items()
            if b != first and times.get((first, n), 0) > 0}


# ---------------------------------------------------------------- tables
_COLUMNS = (("size", "(B)"), ("count", "(elements)"), ("type", ""), ("redop", ""), ("mode", ""),
            ("algo", ""), ("time", "(us)"), ("algbw", "(GB/s)"), ("busbw", "(GB/s)"),
            ("#wrong", ""))


def _backend_cells(rows: list[Row], world: int, others: list[str],
                   ratio: dict[tuple[str, int], float]) -> list[list[str]]:
    cells = []
    for r in rows:
        line = [str(r.nbytes), str(r.count), r.dtype, "sum", r.mode, r.algo, f"{r.time_us:.2f}",
                f"{algbw_gbs(r.nbytes, r.time_us):.2f}",
                f"{busbw_gbs(r.op, world, r.nbytes, r.time_us):.2f}", str(r.wrong)]
        line += [f"{ratio[(b, r.nbytes)]:.2f}" if (b, r.nbytes) in ratio else "-" for b in others]
        cells.append(line)
    return cells


def _by_backend(rows: list[Row], backend: str) -> list[Row]:
    return [r for r in rows if r.backend == backend]


def backend_table(rows: list[Row], backends: list[str], backend: str, world: int,
                  markdown: bool = False) -> str:
    """The nccl-tests table of one contender; the first one's has the speed-up columns."""
    others = list(backends[1:]) if backend == backends[0] else []
    cells = _backend_cells(_by_backend(rows, backend), world, others, speedups(rows, backends))
    titles = [t for t, _ in _COLUMNS] + [f"x {b}" for b in others]
    if markdown:
        return markdown_table([f"{t} {u}".strip() for t, u in _COLUMNS] + titles[len(_COLUMNS):],
                               cells)
    return text_table(titles, [u for _, u in _COLUMNS] + [""] * len(others), cells)


def summary_table(rows: list[Row], backends: list[str], markdown: bool = False) -> str:
    """size | time per contender (us) | speed-up of the first contender over each other one."""
    times = {(r.backend, r.nbytes): r.time_us for r in rows}
    ratio = speedups(rows, backends)
    others = backends[1:]
    titles = ["size"] + [f"{b} (us)" for b in backends] + [f"x {b}" for b in others]
    cells = []
    for r in _by_backend(rows, backends[0]):
        n = r.nbytes
        cells.append([human_size(n)]
                     + [f"{times[(b, n)]:.2f}" if (b, n) in times else "-" for b in backends]
                     + [f"{ratio[(b, n)]:.2f}" if (b, n) in ratio else "-" for b in others])
    if markdown:
        return markdown_table(titles, cells)
    return text_table(titles, None, cells)


# ---------------------------------------------------------------- header and documents
def header_lines(meta: dict) -> list[str]:
    """What ran, where and how: the lines printed above the tables."""
    v = meta["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "tpcomm", "triton", "nccl", "python")
                         if v.get(k))
    t = meta["timing"]
    lines = [
        f"tpcomm bench: {meta['op']}, {meta['dtype']}, {meta['world_size']} ranks on "
        f"{meta['device']}, {meta['date']}",
        f"command: {meta['command']}",
        f"hardware: {meta['hardware']}",
        f"versions: {versions}",
        f"os: {meta['os']}; load average (1 min) at the end: {meta['load_avg_1m']}, this "
        f"run's ranks included",
        f"timing: {t['method']}",
        "check: every size of every contender is checked once before timing (exact-sum inputs, "
        "output poisoned with NaN); #wrong counts wrong elements over all ranks",
    ]
    lines += [f"contender {name}: {desc}" for name, desc in meta["backends"].items()]
    return lines


def format_text(meta: dict, rows: list[Row], backends: list[str]) -> str:
    """Everything printed on stdout: header, one table per contender, the summary."""
    world = meta["world_size"]
    parts = ["\n".join("# " + line for line in header_lines(meta))]
    for b in backends:
        parts.append(f"#\n# {b}\n" + backend_table(rows, backends, b, world))
    parts.append("#\n# summary: time per call (us)"
                 + (f", speed-up of {backends[0]} over each other contender" if len(backends) > 1
                    else "") + "\n" + summary_table(rows, backends))
    return "\n".join(parts) + "\n"


def format_markdown(meta: dict, rows: list[Row], backends: list[str],
                    plot_name: str | None = None) -> str:
    """A results file for benchmarks/results/: header, summary, one table per contender."""
    world = meta["world_size"]
    head = header_lines(meta)
    out = [f"# {head[0]}", "", "```", meta["command"], "```", ""]
    out += [f"- {line}" for line in head[2:]]
    out += ["", "## Summary", "", "Time per call in microseconds"
            + (f"; `x B` = time(B) / time({backends[0]})." if len(backends) > 1 else "."), "",
            summary_table(rows, backends, markdown=True), ""]
    if plot_name:
        out += [f"![latency and bus bandwidth]({plot_name})", ""]
    for b in backends:
        out += [f"## {b}", "", backend_table(rows, backends, b, world, markdown=True), ""]
    return "\n".join(out)


def to_json(meta: dict, rows: list[Row], backends: list[str]) -> dict:
    """Every figure of the run with the header metadata (for --json)."""
    world = meta["world_size"]
    ratio = speedups(rows, backends)
    out_rows = []
    for r in rows:
        d = dataclasses.asdict(r)
        d["algbw_gbs"] = algbw_gbs(r.nbytes, r.time_us)
        d["busbw_gbs"] = busbw_gbs(r.op, world, r.nbytes, r.time_us)
        if r.backend == backends[0]:
            d["speedup"] = {b: ratio[(b, r.nbytes)] for b in backends[1:]
                            if (b, r.nbytes) in ratio}
        out_rows.append(d)
    return {"meta": meta, "backends": backends, "rows": out_rows,
            "wrong": sum(r.wrong for r in rows)}
