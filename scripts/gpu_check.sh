#!/usr/bin/env bash
# The whole GPU check in one command, under 10 minutes (each step has its own time limit, at
# most 360 + 2 x 100 s; on the H200 machines, 2026-11-22, the world-4 tests took 137 s, the
# world-2 tests 81 s, each benchmark about a minute): the GPU tests, then
# `tpcomm bench` (tpcomm vs NCCL and torch symm_mem, graph replays up to 8 MiB, eager above)
# on every GPU and, with 4 or more, on 2 of them too. Logs and JSON go to $OUT (default
# ./gpu-check-out). Exit code: the tests' (the benchmark's failures are in its log).
#
#   OUT=/tmp/out bash scripts/gpu_check.sh [--quick]      # --quick: tests only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
# NVLink multicast (NVLS) stays off: never let NCCL, torch or NVSHMEM create multicast objects
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TPCOMM_QUIET=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi topo -m
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', '.'.join(map(str, torch.cuda.nccl.version())), 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")

timeout 360 python3 -m pytest -q -rs tests/gpu 2>&1 | tee "$OUT/pytest-gpu.log"
rc=${PIPESTATUS[0]}
[ "${1:-}" = "--quick" ] && exit "$rc"

bench() {  # bench WORLD
  timeout 100 python3 -m tpcomm bench --device cuda -n "$1" --backends tpcomm,nccl,symm_mem \
    --graph -b 2K -e 128M -f 2 --iters 20 --reps 5 --no-progress \
    --json "$OUT/bench-w$1.json" --markdown "$OUT/bench-w$1.md" 2>&1 | tee "$OUT/bench-w$1.txt"
}
[ "$NGPU" -ge 2 ] && bench "$NGPU"
[ "$NGPU" -ge 4 ] && bench 2
exit "$rc"
