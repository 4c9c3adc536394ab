#!/usr/bin/env bash
# Everything that needs the 4 x H200 machine: the GPU tests, the collective benchmark (graph and
# eager), the end-to-end model benchmark, the emulated 2 x 2 two-level benchmark and the GPU
# soak. Each step has its own time limit, so a slow step cannot starve the others. Results go to
# $OUT (markdown/JSON), every log into $OUT/logs.tgz (the device tool brings back at most 8
# files). A device call is limited to 10 minutes: run the tests (up to 7 min) in one call and
# the other steps (about 6 min) in another.
#
#   OUT=/tmp/out bash scripts/gpu_session.sh tests
#   OUT=/tmp/out bash scripts/gpu_session.sh bench-graph bench-eager model hierarchical soak
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-session-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
# NVLink multicast (NVLS) stays off: never let NCCL, torch or NVSHMEM create multicast objects
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TPCOMM_QUIET=1
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
T0=$(date +%s)
STEPS=${*:-"tests bench-graph bench-eager model hierarchical soak"}
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $LOGS/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - T0 ))s)"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc"; tail -n 20 "$LOGS/$name.log"
  echo "$name rc=$rc" >> "$LOGS/steps.txt"
}
want() { [[ " $STEPS " == *" $1 "* ]]; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', '.'.join(map(str, torch.cuda.nccl.version())), 'cuda', torch.version.cuda)"
  git log -1 --format='commit %H %s' 2>/dev/null; } > "$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"

# --timeout: a test that hangs fails after 150 s and the others still run (a hung capture took
# a whole step twice on 2026-11-22)
want tests && step tests 420 python3 -m pytest -v --tb=short -rs --timeout 150 \
  tests/gpu/test_gpu_collectives.py tests/gpu/test_model_gpu.py tests/gpu/test_hierarchical_gpu.py
want bench-graph && step bench-graph 75 python3 -m tpcomm bench --device cuda -n "$NGPU" \
  --backends tpcomm,nccl,symm_mem --graph -b 2K -e 128M -f 2 --iters 20 --reps 5 --no-progress \
  --json "$OUT/bench-graph.json" --markdown "$OUT/bench-graph.md"
want bench-eager && step bench-eager 35 python3 -m tpcomm bench --device cuda -n "$NGPU" \
  --backends tpcomm,nccl -b 2K -e 8M -f 4 --iters 20 --reps 5 --no-progress \
  --json "$OUT/bench-eager.json" --markdown "$OUT/bench-eager.md"
want model && step model 75 python3 -m tpcomm bench model --device cuda -n "$NGPU" \
  --model llama3_70b --comm tpcomm,nccl --batch 1,8 --context 1024 --prompt-lens 1024 \
  --breakdown --no-progress --json "$OUT/model.json" --markdown "$OUT/model.md"
want hierarchical && step hierarchical 45 python3 -m tpcomm bench two-level --nproc 4 \
  --ranks-per-node 2 -b 4K -e 64M -f 4 --markdown "$OUT/hierarchical.md"
if want soak; then
  for algo in one_shot two_shot ring; do
    step "soak-graph-$algo" 26 python3 scripts/soak.py --device cuda -n "$NGPU" --op all_reduce \
      --algorithm "$algo" --graph --ops 100000 --seconds 12 --progress
  done
  step soak-eager 30 python3 scripts/soak.py --device cuda -n "$NGPU" --ops 300000 --seconds 18 \
    --algorithm one_shot,two_shot,ring --progress
fi
echo "== done in $(( $(date +%s) - T0 ))s"; cat "$LOGS/steps.txt"
tar czf "$OUT/logs.tgz" -C "$LOGS" .
