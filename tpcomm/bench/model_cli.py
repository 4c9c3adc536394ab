"""``tpcomm bench model``: the TP Llama model end to end, tpcomm against NCCL / gloo.

    tpcomm bench model                                   # CPU: tiny model, 2 ranks, tpcomm vs gloo
    tpcomm bench model --batch 1,4 --context 64 --prompt-lens 64,256 --json out.json --plot out.png
    torchrun --nproc-per-node 4 -m tpcomm bench model --model llama3_70b   # GPU: vs nccl, graphs
    tpcomm bench model --device cuda -n 1 --model llama3_8b --comm tpcomm --compile --breakdown

Measures TPOT (decode, per batch size, with a context of --context tokens), TTFT (prefill of
each --prompt-lens prompt) and tokens/s for every --comm backend, and checks that the backends
produce the same greedy tokens. Not under torchrun it starts its own ranks on this machine.
Exit code: 0 when every backend agreed, 1 when one did not (or a rank failed), 2 for bad
arguments.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from .args import (add_outputs, add_ranks, add_sub_benchmark, int_list, positive_int,
                   resolve_ranks)
from .output import write_outputs
from ..cli.command import UsageError, execute
from .model import DTYPES, ModelBenchConfig, run
from ..models.comm import COMM_CHOICES
from ..models.llama import CONFIGS

DEFAULTS = {
    "cpu": {"model": "tiny", "dtype": "float32", "batch": "1,4", "context": 64,
            "decode_tokens": 32, "prompt_lens": "64,256"},
    "cuda": {"model": "llama3_70b", "dtype": "bfloat16", "batch": "1,8,32,64", "context": 1024,
             "decode_tokens": 64, "prompt_lens": "1024,4096"},
}




def add_model_bench_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``tpcomm bench model`` (defaults depend on the device: see --help)."""
    d_cpu, d_gpu = DEFAULTS["cpu"], DEFAULTS["cuda"]
    what = p.add_argument_group("model")
    what.add_argument("--model", choices=tuple(CONFIGS),
                      help=f"architecture, random weights (default {d_cpu['model']} on cpu, "
                           f"{d_gpu['model']} on cuda)")
    what.add_argument("--checkpoint", metavar="DIR",
                      help="a Hugging Face style checkpoint (config.json + *.safetensors); "
                           "overrides --model")
    what.add_argument("--dtype", choices=tuple(DTYPES),
                      help="default float32 on cpu, bfloat16 on cuda")
    what.add_argument("--seed", type=int, default=0, help="weights and prompts")
    what.add_argument("--no-fused", action="store_true",
                      help="end sublayers with all-reduce, add, norm instead of the fused "
                           "all_reduce_add_rms_norm")
    where = p.add_argument_group("ranks and backends")
    add_ranks(where, "TP ranks")
    where.add_argument("--comm", help="comma-separated backends, the first under test: "
                                      "tpcomm,nccl on cuda, tpcomm,gloo on cpu (the default)")
    where.add_argument("--threads", type=positive_int,
                       help="cpu: torch threads per rank (default cores / ranks)")
    where.add_argument("--no-graph", action="store_true",
                       help="cuda: decode eagerly instead of replaying a CUDA graph")
    where.add_argument("--no-prefill-graph", action="store_true",
                       help="cuda, --compile: time the compiled prefill outside a CUDA graph "
                            "(by default each prompt length's is captured once and replayed)")
    where.add_argument("--compile", action="store_true",
                       help="also run every backend with its decoder layers compiled "
                            "(torch.compile, inductor; then the same CUDA graph), first, "
                            "against the eager model in the same run; prints compile seconds")
    where.add_argument("--breakdown", action="store_true",
                       help="also profile a few eager decode steps per batch and backend: ms "
                            "in GEMMs, attention, communication, other (rank 0)")
    sizes = p.add_argument_group("workload")
    sizes.add_argument("--batch", type=int_list,
                       help=f"decode batch sizes (default {d_cpu['batch']} on cpu, "
                            f"{d_gpu['batch']} on cuda)")
    sizes.add_argument("--context", type=positive_int,
                       help=f"tokens in the KV cache before decoding (default {d_cpu['context']} "
                            f"on cpu, {d_gpu['context']} on cuda)")
    sizes.add_argument("--decode-tokens", type=positive_int,
                       help=f"timed decode steps (default {d_cpu['decode_tokens']} on cpu, "
                            f"{d_gpu['decode_tokens']} on cuda)")
    sizes.add_argument("--warmup-steps", type=positive_int, default=3,
                       help="untimed decode steps first (the first captures the graph)")
    sizes.add_argument("--prompt-lens", type=lambda s: int_list(s) if s.strip() else (),
                       help=f"TTFT prompt lengths, '' for none (default {d_cpu['prompt_lens']} "
                            f"on cpu, {d_gpu['prompt_lens']} on cuda)")
    sizes.add_argument("--ttft-batch", type=positive_int, default=1, help="sequences per prefill")
    sizes.add_argument("--reps", type=positive_int, default=3, help="timed prefills (median)")
    sizes.add_argument("--rounds", type=positive_int, default=1,
                       help="repeat every measurement this many times, backends interleaved, "
                            "and report the median round (use 3-5 on a shared machine)")
    sizes.add_argument("--timeout", type=float, default=3600.0,
                       help="seconds the whole run may take when it starts its own ranks")
    add_outputs(p.add_argument_group("output"), plot="TPOT and TTFT charts (needs matplotlib)")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``model`` under ``tpcomm bench`` (the bench parser's sub-benchmarks)."""
    return add_model_bench_args(add_sub_benchmark(
        subparsers, "model",
        help="the TP Llama model end to end: TPOT, TTFT, tokens/s per --comm backend",
        description=__doc__, func=run_model_bench))


def config_from_args(args) -> ModelBenchConfig:
    """Check the arguments and resolve the defaults; UsageError says what is wrong."""
    device, world = resolve_ranks(args)
    d = DEFAULTS[device]
    text = ",".join(COMM_CHOICES[device]) if args.comm is None else args.comm
    comms = tuple(c.strip() for c in text.split(","))
    bad = [c for c in comms if c not in COMM_CHOICES[device]]
    if bad:
        raise UsageError(f"--comm {args.comm!r}: {bad[0] or repr(bad[0])} is not a backend on "
                         f"{device}; choose among {', '.join(COMM_CHOICES[device])}")
    if len(set(comms)) != len(comms):
        raise UsageError(f"--comm {args.comm!r}: name each backend once")
    if args.checkpoint and args.model:
        raise UsageError("give --model or --checkpoint, not both")
    if args.checkpoint and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        raise UsageError(f"--checkpoint {args.checkpoint}: no config.json there")
    if args.plot:
        from .plot import require_matplotlib
        require_matplotlib()
    prompt_lens = int_list(d["prompt_lens"]) if args.prompt_lens is None else args.prompt_lens
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    return ModelBenchConfig(
        model=args.model or (None if args.checkpoint else d["model"]),
        checkpoint=args.checkpoint, device=device, dtype=args.dtype or d["dtype"], world=world,
        comms=comms, batches=args.batch or int_list(d["batch"]),
        context=args.context or d["context"],
        decode_tokens=args.decode_tokens or d["decode_tokens"], warmup_steps=args.warmup_steps,
        prompt_lens=prompt_lens, ttft_batch=args.ttft_batch, reps=args.reps,
        graph=device == "cuda" and not args.no_graph, fused=not args.no_fused,
        prefill_graph=not args.no_prefill_graph,
        breakdown=args.breakdown, compile=args.compile, rounds=args.rounds, seed=args.seed,
        threads=args.threads, progress=not args.no_progress,
        command=shlex.join(["tpcomm", *getattr(args, "argv", ["bench", "model"])]),
        timeout_s=args.timeout)


def run_model_bench(args) -> int:
    """Entry point of ``tpcomm bench model``; returns the exit code."""
    result = run(config_from_args(args))   # a failed rank: execute says so, exit code 1
    if result["meta"] is None:   # ranks other than 0 under torchrun
        return 0 if all(c["ok"] for c in result["checks"]) else 1
    from . import model_report as report
    meta, rows, checks = result["meta"], result["rows"], result["checks"]
    write_outputs(args, report.format_text(meta, rows, checks),
                  doc={"meta": meta, "rows": rows, "checks": checks},
                  plot=lambda path: report.plot(meta, rows, path),
                  markdown=lambda name: report.format_markdown(meta, rows, checks, name))
    wrong = [c for c in checks if not c["ok"]]
    for c in wrong:
        print(f"tpcomm bench model: {c['phase']} {c['size']}: {c['other']} vs {c['base']}: "
              f"{c['verdict']}", file=sys.stderr)
    return 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tpcomm.bench.model_cli``: the same as ``tpcomm bench model``."""
    p = argparse.ArgumentParser(prog="tpcomm bench model", description=__doc__.split("\n\n")[0])
    add_model_bench_args(p)
    p.set_defaults(func=run_model_bench, parser=p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.argv = ["bench", "model", *argv]
    return execute(args, prog="tpcomm bench model")


if __name__ == "__main__":
    sys.exit(main())
