"""Tables (text and markdown) and the plot of ``tpcomm bench model``.

One table per phase: a row per batch size (decode) or prompt length (prefill), a time and a
tokens/s column per backend, the speed-up of the first backend over each other one, and the
agreement of the greedy tokens.
"""
from __future__ import annotations

from .output import columns, markdown_table


def _backends(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["comm"] for r in rows))


def _table(meta: dict, rows: list[dict], checks: list[dict], phase: str) -> tuple[list, list]:
    """(header cells, body rows) of one phase; empty when the phase did not run."""
    mine = [r for r in rows if r["phase"] == phase]
    if not mine:
        return [], []
    comms = _backends(mine)
    base = comms[0]
    key = "batch" if phase == "decode" else "prompt"
    head = [key] + [f"{c} (ms)" for c in comms] + [f"{c} tok/s" for c in comms]
    head += [f"x {c}" for c in comms[1:]] + ["tokens"]
    body = []
    for size in dict.fromkeys(r["batch"] if phase == "decode" else r["tokens"] for r in mine):
        by = {r["comm"]: r for r in mine
              if (r["batch"] if phase == "decode" else r["tokens"]) == size}
        cells = [str(size)] + [f"{by[c]['ms']:.3f}" for c in comms]
        cells += [f"{by[c]['tokens_per_s']:.1f}" for c in comms]
        cells += [f"{by[c]['ms'] / by[base]['ms']:.2f}" for c in comms[1:]]
        verdicts = [c["verdict"] for c in checks if c["phase"] == phase and c["size"] == size]
        cells.append("; ".join(verdicts) if verdicts else "-")
        body.append(cells)
    return head, body


def _breakdown(rows: list[dict]) -> tuple[list, list]:
    """(header, body) of the measured decode-step breakdown; empty without --breakdown."""
    mine = [r for r in rows if r["phase"] == "decode" and "breakdown_ms" in r]
    if not mine:
        return [], []
    keys = ("gemm", "attention", "comm", "other", "step")
    head = ["batch", "backend", "GEMM ms", "attention ms", "communication ms", "other ms",
            "step ms (profiled)", "comm share"]
    body = [[str(r["batch"]), r["comm"]] + [f"{r['breakdown_ms'][k]:.3f}" for k in keys]
            + [f"{100 * r['breakdown_ms']['comm'] / r['breakdown_ms']['step']:.0f}%"]
            for r in mine]
    return head, body


def _kernels(rows: list[dict]) -> tuple[list, list]:
    """(header, body): the kernel listing of each profiled decode step (the largest kernels by
    device time, after a row of totals); empty without --breakdown."""
    mine = [r for r in rows if r["phase"] == "decode" and r.get("kernels")]
    if not mine:
        return [], []
    head = ["batch", "backend", "per step", "us per step", "category", "kernel"]
    body = [[str(r["batch"]), r["comm"], f"{k['per_step']:.1f}",
             f"{1e3 * k['ms_per_step']:.1f}", k["category"], k["name"][:100].replace("|", "/")]
            for r in mine for k in r["kernels"]]
    return head, body


def _first_calls(rows: list[dict]) -> tuple[list, list]:
    """(header, body): seconds of each variant's first call (compilation and CUDA-graph capture
    included) per phase and size; empty unless the run compiled."""
    mine = [r for r in rows if "first_call_s" in r]
    if not mine or not any(r["comm"].endswith("+compile") for r in mine):
        return [], []
    labels = list(dict.fromkeys(r["comm"] for r in mine))
    head = ["phase", "size"] + [f"{c} (s)" for c in labels]
    body = []
    for phase, key in (("decode", "batch"), ("prefill", "tokens")):
        for size in dict.fromkeys(r[key] for r in mine if r["phase"] == phase):
            by = {r["comm"]: r for r in mine if r["phase"] == phase and r[key] == size}
            body.append([phase, str(size)] + [f"{by[c]['first_call_s']:.1f}" if c in by else "-"
                                              for c in labels])
    return head, body


def _section(meta, rows, checks, phase):
    if phase == "breakdown":
        return _breakdown(rows)
    if phase == "first_calls":
        return _first_calls(rows)
    if phase == "kernels":
        return _kernels(rows)
    return _table(meta, rows, checks, phase)


PHASES = ("decode", "prefill", "breakdown", "kernels", "first_calls")


def _title(meta: dict, phase: str) -> str:
    if phase == "first_calls":
        return (f"first call of each variant, seconds (untimed: compilation and CUDA-graph "
                f"capture included); graph breaks: {meta.get('graph_breaks', 0)}")
    if phase == "kernels":
        return ("decode step kernels, the same profiled steps: launches and device time per "
                "step by kernel, the largest first after the totals (CPU: ops by self time)")
    if phase == "breakdown":
        return ("decode step breakdown, measured on rank 0 with torch.profiler over 5 steps "
                "outside CUDA graphs (compiled variants compiled; see "
                "tpcomm/models/breakdown.py for what each column counts)")
    c = meta["config"]
    rounds = f", median of {c['rounds']} interleaved rounds" if c.get("rounds", 1) > 1 else ""
    if phase == "decode":
        how = "CUDA graph" if meta["graph"] else "eager"
        return (f"decode: TPOT = median time per step ({c['decode_tokens']} timed steps, {how}), "
                f"context {c['context']} tokens{rounds}; tok/s = batch / TPOT")
    how = ("compiled variants replay a CUDA graph per prompt length, eager ones run eagerly"
           if meta["graph"] and meta.get("compile") and c.get("prefill_graph", True)
           else "no CUDA graph")
    return (f"prefill: TTFT = prompt to first token (batch {c['ttft_batch']}, {how}, "
            f"median of {c['reps']}{rounds}); tok/s = prompt tokens / TTFT")


def _header_lines(meta: dict) -> list[str]:
    v = meta["versions"]
    comms = ", ".join(f"{k} ({b})" for k, b in meta["comm_backends"].items())
    return [
        f"tpcomm bench model: {meta['model']} ({meta['params'] / 1e6:.1f} M params), "
        f"TP {meta['world_size']}, {meta['device']} {meta['dtype']}, "
        f"{'fused' if meta['fused'] else 'unfused'} all_reduce + add + RMSNorm",
        f"backends: {comms}",
        f"hardware: {meta['hardware']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"date: {meta['date']}",
        f"command: {meta['command']}",
    ]


def format_text(meta: dict, rows: list[dict], checks: list[dict]) -> str:
    lines = [f"# {s}" for s in _header_lines(meta)]
    for phase in PHASES:
        head, body = _section(meta, rows, checks, phase)
        if not head:
            continue
        lines += ["#", f"# {_title(meta, phase)}",
                  *columns(head, body, lead=("# ", "  "), free_last=True)]
    return "\n".join(lines) + "\n"


def format_markdown(meta: dict, rows: list[dict], checks: list[dict],
                    plot_name: str | None = None) -> str:
    out = [f"# {_header_lines(meta)[0]}", ""]
    out += [f"- {s}" for s in _header_lines(meta)[1:5]]
    out += ["", "Command:", "", "```", meta["command"], "```"]
    for phase in PHASES:
        head, body = _section(meta, rows, checks, phase)
        if not head:
            continue
        out += ["", f"## {_title(meta, phase)}", "", markdown_table(head, body, free_last=True)]
    if plot_name:
        out += ["", f"![TPOT and TTFT]({plot_name})"]
    return "\n".join(out) + "\n"


def plot(meta: dict, rows: list[dict], path: str) -> None:
    """TPOT per batch size and TTFT per prompt length, one line per backend."""
    from .plot import require_matplotlib
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    for ax, phase, key, xlabel, ylabel in (
            (axes[0], "decode", "batch", "batch size", "TPOT (ms per step)"),
            (axes[1], "prefill", "tokens", "prompt tokens", "TTFT (ms)")):
        for comm in _backends(rows):
            mine = [r for r in rows if r["phase"] == phase and r["comm"] == comm]
            ax.plot([r[key] for r in mine], [r["ms"] for r in mine], marker="o", label=comm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{phase} (lower is better)")
        ax.grid(True, alpha=0.4)
        ax.legend()
    fig.suptitle(f"tpcomm bench model: {meta['model']}, TP {meta['world_size']}, "
                 f"{meta['device']} {meta['dtype']} ({meta['date'][:10]})")
    fig.savefig(path, dpi=110)
    plt.close(fig)
