"""Where a benchmark ran: hardware, driver, versions, date (for the report header)."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess

import torch

from ..groups.launch import usable_cores


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def nccl_version() -> str:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def tpcomm_version() -> str:
    """The package version, and the git commit when running from a checkout (a results file
    must say which code it measured)."""
    from .. import __version__
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):   # a file in a git worktree
        return __version__

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} (git {rev}{', with uncommitted changes' if dirty else ''})"


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _gpus() -> str:
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mib = [torch.cuda.get_device_properties(i).total_memory >> 20
           for i in range(torch.cuda.device_count())]
    kinds = sorted({(n, m) for n, m in zip(names, mib)})
    gpus = ", ".join(f"{names.count(n)} x {n} ({m} MiB)" for n, m in kinds)
    return f"{gpus}, driver {_nvidia_driver()}, CUDA {torch.version.cuda}"


def system_info(device: torch.device, threads_per_rank: int) -> dict:
    """Hardware, versions and date, as a JSON-ready dict."""
    cores = os.cpu_count() or 1
    cpu = f"{cpu_model()}, {cores} cores ({usable_cores()} usable)"
    if device.type == "cuda":
        hardware = f"{_gpus()}; host CPU {cpu}"
    else:
        hardware = f"{cpu}; {threads_per_rank} torch thread(s) per rank"
    versions = {"torch": torch.__version__, "tpcomm": tpcomm_version(),
                "python": platform.python_version()}
    if device.type == "cuda":
        versions["triton"] = _package_version("triton") or "not installed"
        versions["nccl"] = nccl_version()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hardware": hardware,
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "threads_per_rank": threads_per_rank,
        "versions": versions,
        "os": platform.platform(),
        # CPU timings are only as good as the machine is quiet: this benchmark's own ranks
        # account for about one each
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
