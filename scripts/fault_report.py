"""Inject faults into CPU collectives and report how each ended (benchmarks/results/reliability.md).

    python scripts/fault_report.py [-n 3] [--timeout-s 2]

Every scenario runs on fresh ranks; the table gives, per rank that survived, the exception and
the seconds from the faulty call to it, and whether anything was left in /dev/shm.
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import time

import torch
import torch.distributed as dist

import tpcomm
from tpcomm.groups.launch import spawn
from tpcomm.testing import exact

SCENARIOS = ("stall", "straggler", "kill", "sigstop", "close", "mismatch")


def _worker(rank, world, scenario, timeout_s):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    comm = tpcomm.Communicator(timeout_s=timeout_s)
    x = exact(1000, rank, torch.float32)
    comm.all_reduce(x)
    last = rank == world - 1
    if last and scenario == "stall":
        time.sleep(timeout_s * 3)
    elif last and scenario == "straggler":
        time.sleep(timeout_s / 2)
    elif last and scenario == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif last and scenario == "sigstop":
        # stopped, not dead: the peers must time out; a helper resumes it afterwards
        if os.fork() == 0:
            time.sleep(timeout_s * 2)
            os.kill(os.getppid(), signal.SIGCONT)
            os._exit(0)
        os.kill(os.getpid(), signal.SIGSTOP)
    elif last and scenario == "close":
        comm.close()
        return ("closed itself", 0.0)
    if scenario == "mismatch" and last:
        x = exact(999, rank, torch.float32)
    t0 = time.monotonic()
    try:
        comm.all_reduce(x)
        outcome = "ok"
    except tpcomm.TpcommError as e:
        outcome = f"{type(e).__name__}: {str(e)[:110]}"
    finally:
        comm.close()
    return (outcome, round(time.monotonic() - t0, 2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", "--nranks", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=2.0)
    args = p.parse_args(argv)
    print(f"| fault | rank | outcome | seconds to it | /dev/shm after |")
    print(f"|---|---:|---|---:|---|")
    for scenario in SCENARIOS:
        results = spawn(_worker, args.nranks, scenario, args.timeout_s, allow_failure=True,
                        timeout_s=60 + args.timeout_s * 5)
        left = glob.glob("/dev/shm/tpcomm-*")
        for rank, (status, value) in enumerate(results):
            if status == "ok":
                outcome, secs = value
            else:
                outcome, secs = f"rank process: {status} {str(value)[:60]}", ""
            print(f"| {scenario} | {rank} | {outcome} | {secs} | {'clean' if not left else left} |")


if __name__ == "__main__":
    main()
