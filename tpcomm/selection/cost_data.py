"""Measured all-reduce times the cost model is fitted to (tpcomm.selection.cost_model).

Source: benchmarks/results/baselines-h200x4-2026-11-22.md (the baselines measured on the
4 x H200 test machine, 2026-11-22): 4 NVIDIA H200, all pairs NV18 through NVSwitch, driver
580.159.04, torch 2.11.0+cu130, NCCL 2.28.9, NVLS off. bf16, sum, microseconds per call.
Produced by torchrun probe scripts (not kept in this repository).

The torch symm_mem one_shot / two_shot kernels stand in for tpcomm's own until tpcomm's GPU
measurements exist (benchmarks/results/gpu-h200x*.md, refit with ``tpcomm plan --fit FILE.json``).

Rows: (gpus, algorithm, mode, nbytes, time_us); algorithms named as ``tpcomm bench`` names its
contenders: "nccl", "symm_mem_one_shot", "symm_mem_two_shot" (before tpcomm.algorithms, the
symm_mem ones were "one_shot", "two_shot": cost_model.canonical_baseline_rows reads those).
``mode`` is "graph" (CUDA-graph replays) or "eager". The model predicts graph times; eager rows are fitted only from 32 MiB on, where the
~5 us of host time per eager launch is under 3% of the call (the NCCL eager rows below 32 MiB,
42-69 us, are dominated by that launch overhead and are kept only for the record).
"""
from __future__ import annotations

from ..algorithms import Algorithm, Mechanism, qualified

K, M = 1 << 10, 1 << 20

# The names the cost model's rows and predictions use. tpcomm's kernels: tpcomm.algorithms'
# names, so that `tpcomm plan` prints what stats and errors print; the baselines: the names of
# `tpcomm bench`'s contenders (tpcomm/bench/contenders.py).
PUSH = qualified(Algorithm.ONE_SHOT, Mechanism.PUSH)          # "one_shot/push"
PULL = qualified(Algorithm.ONE_SHOT, Mechanism.PULL)          # "one_shot/pull"
TWO_SHOT, RING = Algorithm.TWO_SHOT.value, Algorithm.RING.value
NCCL, SYMM_ONE_SHOT, SYMM_TWO_SHOT = "nccl", "symm_mem_one_shot", "symm_mem_two_shot"

SOURCE = ("benchmarks/results/baselines-h200x4-2026-11-22.md: 4 x H200 (NV18, NVSwitch), "
          "NCCL 2.28.9, torch 2.11, 2026-11-22, bf16 sum")

H200_ALLREDUCE = [
    # 4 GPUs
    (4, NCCL, "eager", 2 * K, 42.7), (4, NCCL, "eager", 32 * K, 41.6),
    (4, NCCL, "eager", 128 * K, 69.3), (4, NCCL, "eager", 512 * K, 45.9),
    (4, NCCL, "eager", 2 * M, 43.0), (4, NCCL, "eager", 8 * M, 59.3),
    (4, NCCL, "eager", 32 * M, 174.0), (4, NCCL, "eager", 128 * M, 617.0),
    (4, NCCL, "graph", 2 * K, 15.5), (4, NCCL, "graph", 32 * K, 16.1),
    (4, NCCL, "graph", 128 * K, 16.5), (4, NCCL, "graph", 512 * K, 19.4),
    (4, NCCL, "graph", 2 * M, 31.4), (4, NCCL, "graph", 8 * M, 63.9),
    (4, SYMM_ONE_SHOT, "graph", 2 * K, 6.7), (4, SYMM_ONE_SHOT, "graph", 32 * K, 7.6),
    (4, SYMM_ONE_SHOT, "graph", 128 * K, 9.1), (4, SYMM_ONE_SHOT, "graph", 512 * K, 13.3),
    (4, SYMM_ONE_SHOT, "graph", 2 * M, 28.9), (4, SYMM_ONE_SHOT, "graph", 8 * M, 87.4),
    (4, SYMM_ONE_SHOT, "eager", 32 * M, 337.0), (4, SYMM_ONE_SHOT, "eager", 128 * M, 1317.0),
    (4, SYMM_TWO_SHOT, "graph", 2 * K, 6.7), (4, SYMM_TWO_SHOT, "graph", 32 * K, 7.6),
    (4, SYMM_TWO_SHOT, "graph", 128 * K, 9.2), (4, SYMM_TWO_SHOT, "graph", 512 * K, 9.8),
    (4, SYMM_TWO_SHOT, "graph", 2 * M, 18.4), (4, SYMM_TWO_SHOT, "graph", 8 * M, 50.0),
    (4, SYMM_TWO_SHOT, "eager", 32 * M, 173.0), (4, SYMM_TWO_SHOT, "eager", 128 * M, 657.0),
    # 2 GPUs
    (2, NCCL, "graph", 2 * K, 11.4), (2, NCCL, "graph", 128 * K, 13.0),
    (2, NCCL, "graph", 512 * K, 16.2), (2, NCCL, "graph", 2 * M, 31.5),
    (2, NCCL, "graph", 8 * M, 49.4),
    (2, SYMM_ONE_SHOT, "graph", 2 * K, 6.2), (2, SYMM_ONE_SHOT, "graph", 128 * K, 7.7),
    (2, SYMM_ONE_SHOT, "graph", 512 * K, 9.8), (2, SYMM_ONE_SHOT, "graph", 2 * M, 18.8),
    (2, SYMM_ONE_SHOT, "graph", 8 * M, 52.4),
    (2, SYMM_TWO_SHOT, "graph", 2 * K, 6.1), (2, SYMM_TWO_SHOT, "graph", 128 * K, 7.2),
    (2, SYMM_TWO_SHOT, "graph", 512 * K, 7.6), (2, SYMM_TWO_SHOT, "graph", 2 * M, 13.0),
    (2, SYMM_TWO_SHOT, "graph", 8 * M, 32.2),
]

# Emulated 2 nodes x 2 H200 on one host, NCCL over loopback sockets (NCCL_HOSTID per "node",
# NCCL_SOCKET_IFNAME=lo): flat NCCL all-reduce, fp32 (baselines-h200x4-2026-11-22.md, "Facts for
# planning tests").
# Not fitted: a check that the network terms behave for a slow "NIC" (about 2.7 GB/s).
H200_EMULATED_SOCKETS = [(2, 2, 1 * M, 1200.0), (2, 2, 64 * M, 24000.0)]
