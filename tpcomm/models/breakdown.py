"""Where a decode step's time goes, measured: GEMMs, attention, communication, the rest.

Runs a few eager decode steps under ``torch.profiler`` with the communicator wrapped so that
every collective is a named range (``comm::<op>``):

- CPU: GEMM = self time of ``aten::mm/addmm/bmm``; attention = total time of
  ``aten::scaled_dot_product_attention``; communication = total time of the ``comm::`` ranges
  (the shared-memory copies, the waits for the peer, the fused epilogue); other = the step's
  wall time minus those (norms, RoPE, embedding, Python).
- GPU: the kernels' device time by name (GEMM: cuBLAS/CUTLASS names; attention: flash / fmha /
  efficient-attention names and tpcomm's decode attention kernels; communication: NCCL and
  tpcomm kernels by name); other = the step's wall time minus those kernels (the small kernels,
  and the launch gaps of an eager step, which a CUDA graph removes). Only kernel events count:
  the CPU op around a registered op (``tpcomm::decode_attention`` in the compiled model) carries
  its kernels' time too, and counting it doubled the compiled attention.

The profiler adds a few microseconds per op, which lands in "other" on the CPU.
"""
from __future__ import annotations

import re
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm"}
GEMM_KERNEL = re.compile(r"gemm|gemv|cutlass|cublas|xmma|nvjet|sm\d+_|matmul", re.I)
ATTN_KERNEL = re.compile(r"flash|fmha|attention|sdpa", re.I)
COMM_KERNEL = re.compile(r"nccl|all_reduce|allreduce|all_gather|allgather|reduce_scatter|"
                         r"lamport|barrier|one_shot|two_shot", re.I)


class RecordedComm:
    """A communicator whose every call is a ``comm::<op>`` profiler range."""

    def __init__(self, comm):
        self._comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kwargs):
            with record_function(f"comm::{name}"):
                return attr(*args, **kwargs)
        return call


def decode_breakdown(gen, steps: int = 5) -> dict:
    """Milliseconds per step of ``gen`` (a Generator after prefill) by category; eager steps."""
    model = gen.model
    comm = model.comm
    cuda = model.device.type == "cuda"
    if not cuda and not model.compiled:   # (compiled: the ops are profiled as tpcomm::<op>)
        model.set_comm(RecordedComm(comm))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with torch.inference_mode():
            gen._step(gen.kv_len())    # warm-up outside the profile
            gen.host_pos += 1
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                for _ in range(steps):
                    gen._step(gen.kv_len())
                    gen.host_pos += 1
                if cuda:
                    torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) * 1e3
    finally:
        model.set_comm(comm)
    cats = categorize(prof.key_averages(), cuda)
    out = {k: v / steps for k, v in cats.items()}
    out["step"] = wall / steps
    out["other"] = max(out["step"] - sum(cats.values()) / steps, 0.0)
    return out


def categorize(events, cuda: bool) -> dict:
    """Milliseconds by category ("gemm", "attention", "comm") of profiler averages ``events``
    (``prof.key_averages()``); rules: the module docstring."""
    cats = {"gemm": 0.0, "attention": 0.0, "comm": 0.0}
    for e in events:
        if cuda:
            # kernels only: a CPU op's "self device time" is the time of the kernels launched
            # under it, so a registered op named like a category (tpcomm::decode_attention, the
            # compiled model's path; tpcomm::all_reduce_add_rms_norm) would count its kernels
            # twice (the compiled attention read 2x the eager one, 0.71 against 0.35 ms)
            if e.device_type == DeviceType.CPU:
                continue
            dev = getattr(e, "self_device_time_total", 0.0) / 1e3
            if dev <= 0:
                continue
            if COMM_KERNEL.search(e.key):
                cats["comm"] += dev
            elif ATTN_KERNEL.search(e.key):
                cats["attention"] += dev
            elif GEMM_KERNEL.search(e.key):
                cats["gemm"] += dev
        else:
            if e.key in GEMM_OPS:
                cats["gemm"] += e.self_cpu_time_total / 1e3
            elif e.key == "aten::scaled_dot_product_attention":
                cats["attention"] += e.cpu_time_total / 1e3
            elif e.key.startswith(("comm::", "_c10d_functional::")) or (
                    e.key.startswith("tpcomm::") and "attention" not in e.key):
                cats["comm"] += e.cpu_time_total / 1e3
    return cats
