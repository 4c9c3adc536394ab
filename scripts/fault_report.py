"""Inject faults into collectives and report how each ended (benchmarks/results/reliability.md).

    python scripts/fault_report.py [-n 3] [--timeout-s 2]
    python scripts/fault_report.py --device cuda -n 4 --timeout-s 2   # one rank per GPU

On the GPU a timed-out kernel gives up and the error is raised by the rank's next call
(tests/gpu/test_gpu_collectives.py, the stalled peer), so there every rank makes a second call
after synchronizing; the outcome is the first error either call raised.

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


def _worker(rank, world, scenario, timeout_s, device="cpu"):
    torch.set_num_threads(1)
    if device == "cuda":
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    comm = tpcomm.Communicator(device=dev, timeout_s=timeout_s)
    x = exact(1000, rank, torch.float32, device=dev)
    comm.all_reduce(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
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
        x = exact(999, rank, torch.float32, device=dev)
    t0 = time.monotonic()
    try:
        comm.all_reduce(x)
        if dev.type == "cuda":     # a kernel that timed out is reported by the next call
            torch.cuda.synchronize(dev)
            comm.all_reduce(x)
            torch.cuda.synchronize(dev)
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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one rank per GPU, NCCL as torch.distributed's backend")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    args = p.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        p.error(f"unknown scenario(s) {', '.join(bad)}; choose from {', '.join(SCENARIOS)}")
    if args.device == "cuda" and args.nranks > torch.cuda.device_count():
        p.error(f"-n {args.nranks} needs {args.nranks} GPUs; {torch.cuda.device_count()} visible")
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    print(f"| fault | rank | outcome | seconds to it | /dev/shm after |")
    print(f"|---|---:|---|---:|---|")
    for scenario in scenarios:
        results = spawn(_worker, args.nranks, scenario, args.timeout_s, args.device,
                        allow_failure=True, timeout_s=60 + args.timeout_s * 5,
                        env=env if args.device == "cuda" else None)
        left = glob.glob("/dev/shm/tpcomm-*")
        for rank, (status, value) in enumerate(results):
            if status == "ok":
                outcome, secs = value
            else:
                outcome, secs = f"rank process: {status} {str(value)[:60]}", ""
            print(f"| {scenario} | {rank} | {outcome} | {secs} | {'clean' if not left else left} |")


if __name__ == "__main__":
    main()
