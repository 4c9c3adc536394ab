"""Where a decode step's time goes, measured: GEMMs, attention, communication, the rest.

Runs a few eager decode steps under ``torch.profiler`` with the communicator wrapped so that
every collective is a named range (``comm::<op>``):

- CPU: GEMM = self time of ``aten::mm/addmm/bmm`` (and the total of ``tpcomm::skinny_linear``,
  the skinny GEMM under the interpreter); attention = total time of
  ``aten::scaled_dot_product_attention``; communication = total time of the ``comm::`` ranges
  (the shared-memory copies, the waits for the peer, the fused epilogue); other = the step's
  wall time minus those (norms, RoPE, embedding, Python).
- GPU: the kernels' device time by name (GEMM: cuBLAS/CUTLASS names and tpcomm's skinny GEMM;
  attention: flash / fmha / efficient-attention names and tpcomm's decode attention kernels;
  communication: NCCL and tpcomm kernels by name); other = the step's wall time minus those kernels (the small kernels,
  and the launch gaps of an eager step, which a CUDA graph removes). Only kernel events count:
  the CPU op around a registered op (``tpcomm::decode_attention`` in the compiled model) carries
  its kernels' time too, and counting it doubled the compiled attention.

The profiler adds a few microseconds per op, which lands in "other" on the CPU.

The kernel listing (``kernels``): every kernel of the profiled steps by name, with its launches
and device time per step and its category, the largest ``top`` first, and a first row
``(all kernels)`` with the totals: which small kernels a step still runs, and how many (on the
CPU: the ops by self time instead, there being no kernels).
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
TOP_KERNELS = 15   # rows of the kernel listing: the small kernels that are left show up here


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


def decode_breakdown(gen, steps: int = 5, top: int = TOP_KERNELS) -> dict:
    """Milliseconds per step of ``gen`` (a Generator after prefill) by category; eager steps.
    Also "kernels": :func:`kernel_listing` of the same steps (``top`` rows)."""
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
    out["kernels"] = kernel_listing(prof.key_averages(), cuda, steps, top)
    return out


def kernel_category(name: str) -> str:
    """"comm", "attention", "gemm" or "other" for a kernel name (the GPU rules of
    :func:`categorize`)."""
    if COMM_KERNEL.search(name):
        return "comm"
    if ATTN_KERNEL.search(name):
        return "attention"
    if GEMM_KERNEL.search(name):
        return "gemm"
    return "other"


def kernel_listing(events, cuda: bool, steps: int, top: int = TOP_KERNELS) -> list[dict]:
    """Rows {"name", "category", "per_step", "ms_per_step"} of profiler averages ``events``
    over ``steps`` steps, by device time (CPU: the ops by self CPU time), the ``top`` largest;
    the first row, named ``(all kernels)``, sums every kernel (launches and ms per step)."""
    rows = []
    for e in events:
        if cuda:
            if e.device_type == DeviceType.CPU:
                continue
            ms = getattr(e, "self_device_time_total", 0.0) / 1e3
        else:
            ms = e.self_cpu_time_total / 1e3
        if ms <= 0 and not e.count:
            continue
        rows.append({"name": e.key, "category": kernel_category(e.key) if cuda else "cpu op",
                     "per_step": e.count / steps, "ms_per_step": ms / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = {"name": "(all kernels)" if cuda else "(all ops)", "category": "-",
             "per_step": sum(r["per_step"] for r in rows),
             "ms_per_step": sum(r["ms_per_step"] for r in rows)}
    return [total] + rows[:top]


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
            cat = kernel_category(e.key)
            if dev > 0 and cat != "other":
                cats[cat] += dev
        else:
            if e.key in GEMM_OPS:
                cats["gemm"] += e.self_cpu_time_total / 1e3
            elif e.key == "tpcomm::skinny_linear":      # the skinny GEMM (models/skinny_linear)
                cats["gemm"] += e.cpu_time_total / 1e3
            elif e.key == "aten::scaled_dot_product_attention":
                cats["attention"] += e.cpu_time_total / 1e3
            elif e.key.startswith(("comm::", "_c10d_functional::")) or (
                    e.key.startswith("tpcomm::") and "attention" not in e.key):
                cats["comm"] += e.cpu_time_total / 1e3
    return cats
