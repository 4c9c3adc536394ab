"""``tpcomm plan``: which all-reduce algorithm (and pipeline chunk) the cost model picks for a
topology you describe, and how well the model fits the measurements it was fitted to.

    tpcomm plan --nodes 8 --gpus-per-node 8 --gpu h200 --nic 8x400Gb/s
    tpcomm plan --gpus-per-node 4 --measured    # predictions next to the measurements
                                                # (the H200 baselines and tpcomm's kernels)
    tpcomm plan --gpus-per-node 4 --measured --fit benchmarks/results/gpu-h200x4.json
"""
from __future__ import annotations

import json
import math

from ..selection import cost_data, cost_model
from ..settings import parse_size

DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,256M"


def add_plan_parser(subparsers):
    p = subparsers.add_parser(
        "plan", help="predict all-reduce times for a topology and pick the algorithm",
        description="Predict all-reduce time per algorithm from the cost model (tpcomm.selection.cost_model: "
                    "latency + bandwidth terms per link, fitted to measured H200 times) for the "
                    "topology described, and say which algorithm and pipeline chunk it picks.")
    p.add_argument("--nodes", type=_positive, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=_positive, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu", choices=sorted(cost_model.GPUS), default="h200",
                   help="GPU whose fitted constants to use (h100: the H200 fit, unvalidated)")
    p.add_argument("--link", choices=("nvlink", "pcie"), default="nvlink",
                   help="intra-node link (pcie: assumed bandwidth, not fitted)")
    p.add_argument("--nic", help="network of one node, e.g. 8x400Gb/s, 8x400Gb/s@3us (latency "
                                 "per hop, default %g us), 2x25GB/s; needed with --nodes > 1"
                                 % cost_model.NIC_LATENCY_US)
    p.add_argument("--nic-efficiency", type=float, default=cost_model.NIC_EFFICIENCY,
                   help="share of the line rate an all-reduce reaches (default %(default)s, "
                        "assumed)")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"message sizes in bytes, comma-separated (default {DEFAULT_SIZES})")
    p.add_argument("--measured", action="store_true",
                   help="also print the model's predictions next to every measurement it was "
                        "fitted to, with the error")
    p.add_argument("--fit", metavar="FILE.json", action="append", default=[],
                   help="refit on `tpcomm bench --json` results: all_reduce rows of runs on "
                        "--gpu GPUs (others are dropped, and said so); they replace the "
                        "built-in rows of the same GPU count and algorithm")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr while --measured refits (a few seconds)")
    p.set_defaults(func=run_plan, parser=p)
    return p


add_parser = add_plan_parser        # the name tpcomm/cli/main.py looks for


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError(f"expected a positive integer, got {text}")
    return v


def _usage_error(msg: str):
    try:
        from .command import UsageError
    except ImportError:          # tpcomm.cli not there: plain ValueError
        UsageError = ValueError  # noqa: N806
    return UsageError(msg)


# ---------------------------------------------------------------------------- bench results
# the baselines are named as `tpcomm bench` names its contenders (cost_model.BASELINES); tpcomm's
# own one_shot / two_shot rows are fitted as the one-shot / two-shot terms, in the place of
# torch symm_mem's (whose names those terms carry)
_OWN_TO_TERM = {"one_shot": cost_model.SYMM_ONE_SHOT, "two_shot": cost_model.SYMM_TWO_SHOT}


def _run_device(meta: dict, gpu: str) -> str | None:
    """Why a ``tpcomm bench --json`` run is not of the GPU ``gpu`` the model is fitted for
    (None: it is). The GPU is read from the header's hardware line ("4 x NVIDIA H200 ...")."""
    device, hardware = meta.get("device"), meta.get("hardware") or ""
    if device != "cuda":
        return f"it ran on {device or 'an unnamed device'} ({hardware.split(';')[0] or '?'})"
    gpus = hardware.split(";")[0]
    if gpu.upper() not in gpus.upper():
        return f"it ran on {gpus or 'GPUs it does not name'}"
    return None


def rows_from_bench_json(doc: dict, gpu: str = "h200") -> tuple[list[tuple], list[str]]:
    """(gpus, algorithm, mode, nbytes, time_us) rows of a ``tpcomm bench --json`` document,
    and what was dropped, as phrases.

    Only a run on ``gpu`` GPUs counts (the model is of that GPU: CPU or other-GPU rows would
    change its predictions and picks); of it, all_reduce rows without wrong elements of the
    backends the model has terms for (nccl, symm_mem, tpcomm's one_shot / two_shot); tpcomm's
    own one_shot/two_shot rows take the place of torch symm_mem's where both are there."""
    meta = doc.get("meta", {})
    gpus = int(meta.get("world_size", 0))
    if not gpus:
        raise ValueError("bench JSON without meta.world_size")
    all_rows = doc.get("rows", [])
    why = _run_device(meta, gpu)
    if why is not None:
        return [], [f"all {len(all_rows)} rows: {why}, the model is of {gpu.upper()} GPUs"]
    rows, own = [], set()
    dropped = {"wrong elements": 0, "not all_reduce": 0,
               "a backend or algorithm without terms in the model": 0,
               "torch symm_mem where tpcomm's own kernel was measured": 0}
    for r in all_rows:
        if r.get("op") != "all_reduce":
            dropped["not all_reduce"] += 1
            continue
        if r.get("wrong", 0) or r.get("time_us", 0) <= 0:
            dropped["wrong elements"] += 1
            continue
        backend, algo = r.get("backend"), r.get("algo", "-")
        if backend == "tpcomm" and algo in _OWN_TO_TERM:
            name = _OWN_TO_TERM[algo]
            own.add(name)
        elif backend in cost_model.BASELINES:
            name = backend
        else:
            dropped["a backend or algorithm without terms in the model"] += 1
            continue
        rows.append((gpus, name, r.get("mode", "eager"), int(r["nbytes"]), float(r["time_us"]),
                     backend))
    kept = [r[:5] for r in rows if not (r[1] in own and r[5] != "tpcomm")]
    dropped["torch symm_mem where tpcomm's own kernel was measured"] = len(rows) - len(kept)
    return kept, [f"{n} row(s): {what}" for what, n in dropped.items() if n]


def merged_rows(paths: list[str], gpu: str = "h200") -> tuple[list[tuple], str, list[str]]:
    """Built-in rows, with those of every (gpus, algorithm) that a file covers replaced; and
    one line per file that lost rows, saying which and why. ValueError when no file gives a
    row the model can use."""
    if not paths:
        return list(cost_data.H200_ALLREDUCE), cost_data.SOURCE, []
    new, notes = [], []
    for path in paths:
        with open(path) as f:
            rows, dropped = rows_from_bench_json(json.load(f), gpu)
        new += rows
        if dropped:
            notes.append(f"--fit {path}: {len(rows)} row(s) used; dropped " + "; ".join(dropped))
    if not new:
        raise ValueError("--fit: no row to fit: " + " / ".join(notes))
    covered = {(r[0], r[1]) for r in new}
    kept = [r for r in cost_data.H200_ALLREDUCE if (r[0], r[1]) not in covered]
    return kept + new, f"{', '.join(paths)} + {cost_data.SOURCE} (rows not covered)", notes


# ---------------------------------------------------------------------------- output
def _fmt_size(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def plan_rows(cluster: cost_model.Cluster, sizes: list[int]) -> list[dict]:
    out = []
    for S in sizes:
        cands = cost_model.candidates(S, cluster)
        out.append({"nbytes": S, "pick": cands[0].algorithm, "time_us": cands[0].time_us,
                    "chunk_bytes": cands[0].chunk_bytes, "detail": cands[0].detail,
                    "candidates": {c.algorithm: {"time_us": c.time_us,
                                                 "chunk_bytes": c.chunk_bytes}
                                   for c in cands}})
    return out


def format_plan(cluster: cost_model.Cluster, rows: list[dict], gpu: str) -> str:
    N, Mn = cluster.gpus_per_node, cluster.nodes
    names = list(rows[0]["candidates"]) if rows else []
    names = sorted(names)
    lines = [f"# tpcomm plan: {Mn} node(s) x {N} {gpu} ({cluster.link})"
             + (f", NIC {cluster.nic}" if cluster.nic else ""),
             f"# intra-node constants fitted to: {cluster.params.source}"]
    if cluster.link == "pcie":
        lines.append(f"# PCIe: assumed {cost_model.PCIE_GBS:g} GB/s per direction, not fitted")
    if cluster.nic:
        lines.append("# network: the NIC given, efficiency and latency assumed (no NIC was "
                     "measured)")
    lines.append("# predicted microseconds per all-reduce (CUDA graph); [chunk]: the two-level "
                 "pipeline's chunk, none: one chunk")
    width = max([17] + [len(n) + 2 for n in names])
    pw = max([15] + [len(r["pick"]) for r in rows])
    head = f"{'size':>8}  {'pick':<{pw}} {'time':>9} {'chunk':>6}" + "".join(
        f"{n:>{width}}" for n in names)
    lines.append("#" + head[1:])
    for r in rows:
        cells = []
        for n in names:
            c = r["candidates"][n]
            chunk = f" [{_fmt_size(c['chunk_bytes'])}]" if c["chunk_bytes"] else ""
            cells.append(f"{c['time_us']:.1f}{chunk}")
        lines.append(f"{_fmt_size(r['nbytes']):>8}  {r['pick']:<{pw}} {r['time_us']:>9.1f} "
                     f"{_fmt_size(r['chunk_bytes']) if r['chunk_bytes'] else '-':>6}"
                     + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def format_fit(params: cost_model.Params, table: list[dict]) -> str:
    lines = [f"# cost model fit: {params.source}",
             *("#   " + s for s in params.describe().splitlines()),
             "# error = (predicted - measured) / measured; loo = the same with that row left "
             "out of the fit",
             f"# {'gpus':>4} {'algorithm':<17} {'mode':<5} {'size':>6} {'measured':>9} "
             f"{'predicted':>9} {'error':>7} {'loo':>7}"]
    for r in table:
        lines.append(f"  {r['gpus']:>4} {r['algorithm']:<17} {r['mode']:<5} "
                     f"{_fmt_size(r['nbytes']):>6} {r['measured_us']:>9.1f} "
                     f"{r['predicted_us']:>9.1f} {100 * r['error']:>+6.1f}% "
                     f"{100 * r.get('loo_error', math.nan):>+6.1f}%")
    big = [r for r in table if r["nbytes"] >= 64 << 10]
    if big:
        worst = max(big, key=lambda r: abs(r["error"]))
        worst_loo = max(abs(r.get("loo_error", 0.0)) for r in big)
        lines.append(f"# sizes >= 64K: {len(big)} rows, largest |error| "
                     f"{100 * abs(worst['error']):.1f}% ({worst['gpus']} GPUs {worst['algorithm']} "
                     f"{_fmt_size(worst['nbytes'])}), largest |loo error| {100 * worst_loo:.1f}% "
                     f"(target: 25%)")
    return "\n".join(lines)


def _worst(rows: list[dict], key: str) -> str:
    big = [r for r in rows if r["nbytes"] >= 64 << 10 and key in r]
    if not big:
        return "-"
    w = max(big, key=lambda r: abs(r[key]))
    return (f"{100 * abs(w[key]):.1f}% ({w['config']}, {w['gpus']} GPUs {w['algorithm']} "
            f"{_fmt_size(w['nbytes'])})")


def format_tpcomm_fit(table: list[dict], cross: list[dict]) -> str:
    """tpcomm's own kernels: prediction next to every measurement; then the NCCL / symm_mem
    rows of the same runs against the baseline terms (not fitted to them)."""
    lines = ["# tpcomm kernels: fitted to tpcomm/selection/cost_data_tpcomm.py (from benchmarks/"
             "results/timing-h200x*.json, gpu-h200x*.json)",
             *("#   " + s for s in cost_model.describe_tpcomm().splitlines()),
             "# loso: that size left out of the fit; world: fitted on the other world size only",
             f"# {'config':<38} {'gpus':>4} {'algorithm':<24} {'mode':<5} {'size':>6} "
             f"{'measured':>9} {'predicted':>9} {'error':>7} {'loso':>7} {'world':>7}"]
    for r in table:
        lines.append(f"  {r['config']:<38} {r['gpus']:>4} {r['algorithm']:<24} {r['mode']:<5} "
                     f"{_fmt_size(r['nbytes']):>6} {r['measured_us']:>9.2f} "
                     f"{r['predicted_us']:>9.2f} {100 * r['error']:>+6.1f}% "
                     f"{100 * r.get('loso_error', math.nan):>+6.1f}% "
                     f"{100 * r.get('world_error', math.nan):>+6.1f}%")
    lines.append(f"# tpcomm, sizes >= 64K: largest |error| {_worst(table, 'error')}; "
                 f"largest |loso| {_worst(table, 'loso_error')}; largest |world| "
                 f"{_worst(table, 'world_error')} (target: 25%)")
    lines.append("# cross-check, not fitted: NCCL / symm_mem rows of the same runs, predicted by "
                 "the terms fitted to benchmarks/results/baselines-h200x4-2026-11-22.md")
    for fam in cost_model.BASELINES:
        rows = [r for r in cross if r["algorithm"] == fam]
        lines.append(f"#   {fam}: {len(rows)} rows, largest |error| >= 64K "
                     f"{_worst(rows, 'error')}")
    return "\n".join(lines)


def _measured_tables(rows_in, show_progress: bool) -> tuple[list, list, list]:
    """The fit tables of --measured (a few seconds: every row is also left out and refitted),
    with a progress bar on a terminal."""
    from .progress import Progress
    steps = (("baseline rows, each left out", lambda: cost_model.error_table(rows_in)),
             ("tpcomm kernels, each size left out", cost_model.tpcomm_error_table),
             ("cross-check", cost_model.crosscheck_table))
    progress = Progress(len(steps), show_progress)
    out = []
    try:
        for label, fn in steps:
            progress.show(f"fitting: {label}")
            out.append(fn())
            progress.advance()
    finally:
        progress.close()
    return tuple(out)


def run_plan(args) -> int:
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        if not sizes:
            raise ValueError(f"--sizes {args.sizes!r}: give at least one size (e.g. 4K,1M)")
        nic = (cost_model.parse_nic(args.nic, args.nic_efficiency) if args.nic else None)
        if args.nodes > 1 and nic is None:
            raise ValueError("--nodes > 1 needs --nic (e.g. --nic 8x400Gb/s)")
        if not 0 < args.nic_efficiency <= 1:
            raise ValueError("--nic-efficiency must be in (0, 1]")
        rows_in, source, notes = merged_rows(args.fit, args.gpu)
    except (ValueError, OSError) as e:
        raise _usage_error(str(e)) from None
    if args.fit:
        params = cost_model.fit(rows_in, source=source)
    else:
        params = cost_model.GPUS[args.gpu]()
    cluster = cost_model.Cluster(args.nodes, args.gpus_per_node, params, nic, args.link)
    rows = plan_rows(cluster, sizes)
    tables = (_measured_tables(rows_in if args.fit else None, not args.no_progress)
              if args.measured else None)
    if args.json:
        doc = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "gpu": args.gpu,
               "link": args.link, "nic": str(nic) if nic else None, "source": params.source,
               "plan": rows}
        if args.fit:
            doc["fit_dropped"] = notes
        if tables is not None:
            doc["fit"], doc["tpcomm_fit"], doc["crosscheck"] = tables
        print(json.dumps(doc, indent=1))
        return 0
    print("\n".join([format_plan(cluster, rows, args.gpu)] + [f"# {n}" for n in notes]))
    if tables is not None:
        print()
        print(format_fit(params, tables[0]))
        print()
        print(format_tpcomm_fit(tables[1], tables[2]))
    return 0
