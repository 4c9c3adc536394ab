#!/usr/bin/env bash
# One-shot/two-shot latency inside CUDA graphs (2 emulated ranks on one GPU) of several source
# trees of tpcomm, alternated round by round in one device call, so the trees share the machine's
# state: each tree's own `scripts/gpu_emulated_ranks.py --only latency --worlds 2` (us per call,
# graph replays of 100 all-reduces, median of 5). Trees are directories holding tpcomm/ and
# scripts/ (e.g. `git archive REV tpcomm scripts tests | tar -x -C _lat_REV`).
# Usage: bash scripts/gpu_latency_trees.sh BUDGET_S TREE...   (rounds until BUDGET_S is spent)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
budget=$1; shift
start=$SECONDS
round=0
while :; do
  for t in "$@"; do
    left=$(( budget - (SECONDS - start) ))
    [ "$left" -lt 25 ] && exit 0
    line=$(cd "$t" && PYTHONPATH="$PWD" timeout "$left" python3 scripts/gpu_emulated_ranks.py \
           --only latency --worlds 2 2>&1 | grep -E "^latency w2|Error|error" | tail -n 2)
    echo "round $round $(basename "$t") [$((SECONDS - start))s]: $line"
  done
  round=$((round + 1))
done
