#!/usr/bin/env bash
# What ONE GPU can check (device kind nvidia-h200), in one device call:
#   emulated  R ranks as streams of one GPU: every kernel (incl. the fused add + RMSNorm), exact
#             sums, bitwise across ranks, CUDA-graph soak with changed inputs, a stalled rank
#   gputests  tests/gpu (the multi-GPU ones skip, visibly; the world-1 ones run; the compile
#             ones run in the compile step)
#   overlap   tpcomm bench overlap at world 1: GEMM alone against the chunked GEMM
#   check     tpcomm check
#   fused     the fused GEMM + collective ops (issue 14): bitwise at world 1 and with 2 / 4
#             emulated ranks, graph replays, their GEMM at world 1 against the core, torch.mm and
#             inductor (scripts/gpu_fused.py: at most 240 s, every item under a hard limit)
#   compile   torch.compile (issue 13), about 4 minutes (limits add up to 530 s): the decode
#             attention kernel against the old attention path and its two-kernel form (the
#             combine folded into the split kernel: kernel_2k_us - kernel_us per layer, checked
#             bitwise; decode_attention.json); tpcomm bench model at world 1, llama3_8b,
#             compiled against eager in the same run, decode batch 1 and 8, prefill 1024 (the
#             compiled prefill replayed from its CUDA graph, checked bitwise against the compiled
#             prefill outside it), with the breakdown, the kernels per step and the compile
#             seconds (compile_bench.json/.md); the compiled prefill outside the graph in a
#             second, short run (compile_prefill_nograph.json/.md: the graph's saving); the
#             compile and graph-safety tests (emulated ranks: several graphs of the same
#             Communicators in any order with eager calls; set-up during a capture refused)
#   host      the lean launch path (issue 16): bitwise against Triton's dispatcher for every
#             kernel (emulated ranks 1/2/4, eager and CUDA graphs with inputs changed after
#             capture), no allocation per call, then tpcomm bench host (host.json/.md, at most
#             240 s: scripts/gpu_host_path.py)
#   skinny    the skinny GEMM of the decode step against F.linear on the llama3_8b world-1
#             shapes, M 1 and 8: checked, timed in CUDA graphs, winners printed as the model's
#             table (scripts/gpu_skinny_gemm.py --budget-s 150; skinny_gemm.json)
#   breakdown where the host us of an eager all_reduce go: each piece of the hot path timed alone
#             (torch queries, the engine's pieces, the lean launch, engine and Communicator
#             calls) at world 1 and 2 emulated ranks (host_breakdown.json/.md, at most 60 s:
#             scripts/gpu_host_breakdown.py; not in the default steps)
# Usage: OUT=/tmp/out bash scripts/gpu_single.sh [step ...]
#        (default: every step but compile, skinny and breakdown)
# Logs go to $OUT/<step>.log; JSON where a step writes one. Multicast stays off.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
export OUT=${OUT:-/tmp/tpcomm-gpu-single}   # scripts/gpu_fused.py writes under it too
mkdir -p "$OUT"
STEPS=${*:-"emulated gputests overlap check fused host"}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, 'nccl', torch.cuda.nccl.version(), 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  local verdict=PASS
  if [ "$rc" -eq 124 ]; then verdict="FAIL (over its ${limit}s limit)"
  elif [ "$rc" -ne 0 ]; then verdict=FAIL; fi
  echo "== $name $verdict rc=$rc $((SECONDS - t0))s"
}
for s in $STEPS; do
  case $s in
    emulated) step emulated 300 python3 scripts/gpu_emulated_ranks.py --json "$OUT/emulated.json" ;;
    gputests) step gputests 200 python3 -m pytest -q -rs -p no:cacheprovider --timeout 200 tests/gpu \
                --ignore tests/gpu/test_compile_gpu.py --ignore tests/gpu/test_graph_safety_gpu.py ;;
    overlap) step overlap 240 python3 -m tpcomm bench overlap --device cuda -n 1 --chunks 4 --json "$OUT/overlap.json" \
               --markdown "$OUT/overlap.md" ;;
    check) step check 60 python3 -m tpcomm check ;;
    fused) step fused 250 python3 scripts/gpu_fused.py --budget-s 240 ;;
    host) step host 250 python3 scripts/gpu_host_path.py --budget-s 240 ;;
    breakdown) step breakdown 90 python3 scripts/gpu_host_breakdown.py --budget-s 60 --out "$OUT" ;;
    compile)
      step compile_attention 60 python3 scripts/gpu_decode_attention.py --sweep --json "$OUT/decode_attention.json"
      step compile_bench 180 python3 -m tpcomm bench model --device cuda -n 1 --model llama3_8b \
        --comm tpcomm --compile --breakdown --batch 1,8 --context 1024 --prompt-lens 1024 \
        --decode-tokens 32 --warmup-steps 2 --reps 3 --timeout 170 \
        --json "$OUT/compile_bench.json" --markdown "$OUT/compile_bench.md"
      step compile_prefill_nograph 90 python3 -m tpcomm bench model --device cuda -n 1 \
        --model llama3_8b --comm tpcomm --compile --no-prefill-graph --batch 1 --context 64 \
        --decode-tokens 4 --warmup-steps 1 --prompt-lens 1024 --reps 3 --timeout 80 \
        --json "$OUT/compile_prefill_nograph.json" --markdown "$OUT/compile_prefill_nograph.md"
      step compile_tests 200 python3 -m pytest -q -rs -p no:cacheprovider --timeout 190 \
        tests/gpu/test_compile_gpu.py tests/gpu/test_graph_safety_gpu.py ;;
    skinny) step skinny 240 python3 scripts/gpu_skinny_gemm.py --budget-s 150 \
              --json "$OUT/skinny_gemm.json" ;;
    *) echo "unknown step $s" ;;
  esac
done
