"""Start N ranks on this machine when not launched by torchrun (benchmark CLI, tests).

Each rank is a fresh ``spawn`` process with the torchrun environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set, so code run by :func:`spawn`
behaves exactly as under torchrun. Results come back in rank order; a rank that raises, dies or
outlives ``timeout_s`` makes :func:`spawn` kill the others and raise.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback


class RankFailed(RuntimeError):
    def __init__(self, msg: str, results: dict):
        super().__init__(msg)
        self.results = results  # rank -> ("ok", value) | ("error", traceback text)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), which is what its ranks share."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# Flag of every command that starts CPU ranks (bench, bench model, bench overlap, check,
# hierarchical_bench) to start more of them than there are cores.
OVERSUBSCRIBE_FLAG = "--oversubscribe"


def check_cpu_ranks(world: int, what: str = "-n") -> None:
    """Refuse (ValueError) to start more CPU ranks than this process has usable cores.

    Ranks that share a core wait for each other at every collective, so such a run crawls while
    it loads the machine, and every rank holds a Python interpreter with torch (about 150 MB;
    99 ranks took 15 GB on a 2-core machine). Commands pass ``--oversubscribe`` to skip this.
    """
    cores = usable_cores()
    if world > cores:
        raise ValueError(f"{what} {world} would start {world} ranks on {cores} usable core(s): "
                         f"ranks that share a core wait for each other and each takes about "
                         f"150 MB; use {what} {cores} or fewer, or add {OVERSUBSCRIBE_FLAG} to "
                         f"start them anyway")


# NVLink multicast (NVLS) stays off, in NCCL, in torch's symmetric memory and in NVSHMEM: set in
# every rank :func:`spawn` starts, and by every benchmark rank under torchrun
# (:func:`no_multicast`), before torch.distributed starts.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}


def no_multicast() -> None:
    """Set :data:`NO_MULTICAST_ENV` in this process (before torch.distributed starts)."""
    os.environ.update(NO_MULTICAST_ENV)


def _entry(fn, rank, world, port, env, args, q):
    no_multicast()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    try:
        value = fn(rank, world, *args)
        pickle.dumps(value)  # fail here, with a message, rather than in the queue's thread
        q.put((rank, "ok", value))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise SystemExit(1)


def spawn(fn, world: int, *args, env: dict | None = None, timeout_s: float = 300.0,
          allow_failure: bool = False) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; return the values in rank order.

    ``fn`` must be importable (a module-level function). With ``allow_failure`` the per-rank
    outcomes ("ok", value) / ("error", text) / ("died", exitcode) are returned instead of raising.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, env, args, q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            try:
                rank, status, value = q.get(timeout=0.2)
                results[rank] = (status, value)
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in results and p.exitcode is not None:
                    # give its queued message a moment to arrive
                    try:
                        rank, status, value = q.get(timeout=1.0)
                        results[rank] = (status, value)
                    except queue.Empty:
                        results[r] = ("died", p.exitcode)
            if time.monotonic() > deadline:
                for r in range(world):
                    results.setdefault(r, ("error", f"timed out after {timeout_s:g} s"))
                break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    ordered = [results[r] for r in range(world)]
    if allow_failure:
        return ordered
    bad = {r: v for r, v in enumerate(ordered) if v[0] != "ok"}
    if bad:
        first = min(bad)
        raise RankFailed(f"rank {first} failed: {bad[first][1]}", dict(enumerate(ordered)))
    return [v for _, v in ordered]


def init_rank(device_type: str, rank: int, threads: int = 1):
    """Join the default process group as this rank; return the rank's device.

    CUDA: the GPU of LOCAL_RANK (``rank`` when unset), NCCL initialized eagerly on it. CPU: gloo,
    with ``threads`` torch threads (ranks sharing a machine should not fight for its cores).
    """
    import torch
    import torch.distributed as dist
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    return torch.device("cpu")
