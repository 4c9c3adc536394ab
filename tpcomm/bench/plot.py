"""``--plot``: latency (log-log) and bus bandwidth against size, one line per contender.

matplotlib is optional (``pip install tpcomm[plot]``) and imported only here, only when asked.
"""
from __future__ import annotations

from .report import Row, busbw_gbs, human_size


def require_matplotlib():
    """The pyplot module, or a clear error telling how to install it."""
    from ..cli.command import UsageError
    try:
        import matplotlib
        matplotlib.use("Agg")   # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'tpcomm[plot]' "
                         "(or pip install matplotlib)") from None
    return plt


def plot(meta: dict, rows: list[Row], backends: list[str], path: str) -> None:
    plt = require_matplotlib()
    from matplotlib.ticker import FuncFormatter, LogLocator
    world = meta["world_size"]
    fig, (ax_t, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for b in backends:
        mine = [r for r in rows if r.backend == b]
        sizes = [r.nbytes for r in mine]
        ax_t.plot(sizes, [r.time_us for r in mine], marker="o", ms=4, label=b)
        ax_bw.plot(sizes, [busbw_gbs(r.op, world, r.nbytes, r.time_us) for r in mine],
                   marker="o", ms=4, label=b)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time per call (us, log scale)")
    ax_t.set_title("latency (lower is better)")
    ax_bw.set_ylabel("bus bandwidth (GB/s)")
    ax_bw.set_title("bus bandwidth (higher is better)")
    for ax in (ax_t, ax_bw):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(LogLocator(base=4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_size(int(x))))
        ax.set_xlabel("size (bytes)")
        ax.grid(True, which="major", alpha=0.4)
        ax.legend()
    fig.suptitle(f"tpcomm bench: {meta['op']} {meta['dtype']}, {world} ranks, "
                 f"{meta['hardware'].split(';')[0]} ({meta['date'][:10]})")
    fig.savefig(path, dpi=110)
    plt.close(fig)
