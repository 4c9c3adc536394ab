"""What every rank of ``tpcomm bench model`` does: build the TP model once, then for each
communication backend time decode (TPOT) and prefill (TTFT) and keep the greedy tokens.

Decode, per batch size and backend: prefill a random context of ``context`` tokens (eagerly),
run ``warmup_steps`` untimed decode steps (the first one compiles, compiled, and captures the
CUDA graph on the GPU), then ``decode_tokens`` timed steps. A step's time is taken between
consecutive steps (CUDA events around graph replays on the GPU, ``time.perf_counter`` on the
CPU); TPOT is the median step, the maximum over ranks. tokens/s = batch / TPOT.

Prefill, per prompt length and backend: the prompt to its first token (argmax included), ``reps``
timed runs after one untimed; TTFT is the median, the maximum over ranks. An eager variant runs
eagerly; a compiled one, on the GPU (``graph``), replays the prompt length's CUDA graph (captured
in the untimed run; :class:`Generator`), and its last graphed logits are checked bitwise against
a compiled prefill of the same prompt outside the graph (``graph_identical`` in the row).

With ``rounds`` > 1 every measurement is repeated in interleaved order (A, B, A, B, ...) and
the median round is reported: on a shared machine a burst of load then hits every backend alike.

With ``compile`` every backend runs twice: compiled (``<backend>+compile``, first, so it is the
one under test: LlamaTP.enable_compile, the decoder layer through torch.compile, then the same
CUDA graph) and eager, in the same run. ``first_call_s`` of a row is its first, untimed, call:
compilation (and graph capture) included.

Every backend runs the same weights on the same prompts, so greedy tokens must agree; where
they do not (possible in bfloat16 once reduction orders differ), the prefill logits are
compared instead (see ``compare``): within a few roundings of each other, or, where a deep
model's roundings add up to more (a compiled prefill against the eager one), each variant
against the prefill computed in float32 with the same weights, the one under test no further
from it than twice the baseline.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from ..groups.launch import init_rank, no_multicast, spawn, under_torchrun
from ..models.breakdown import decode_breakdown
from ..models.comm import make_comm
from ..models.generate import Generator
from ..models.llama import LlamaTP, get_config
from ..models.weights import build_model, load_config
from .timing import max_over_ranks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# logits of two backends agree "within tolerance" when max|a - b| <= TOL * max|a|: bfloat16
# keeps 8 significant bits (relative step 2^-8 = 0.4 %); a sum of two roundings and the
# rounding of the logits themselves stay under 4 steps
BREAKDOWN_STEPS = 5
LOGITS_TOL = {"bfloat16": 4 * 2.0 ** -8, "float16": 4 * 2.0 ** -11, "float32": 1e-4}
# Past LOGITS_TOL (32 layers of bfloat16 prefill: the compiled and the eager llama3_8b differed
# by 0.125 on logits of magnitude 4.6, 2.7 %, one H200, 2026-12-02; inductor keeps the norms and
# SwiGLU in float32 between roundings where eager rounds each op), both variants are measured
# against a float32 prefill of the same (rounded) weights: the one under test may be at most
# this many times further from it than the baseline (a wrong mask, RoPE or cache write puts
# it at the scale of the logits themselves).
REF_ERROR_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class ModelBenchConfig:
    model: str                  # a name of tpcomm.models.llama.CONFIGS (ignored with checkpoint)
    checkpoint: str | None
    device: str                 # "cpu" or "cuda"
    dtype: str
    world: int
    comms: tuple[str, ...]      # the first is under test, the others its baselines
    batches: tuple[int, ...]
    context: int
    decode_tokens: int
    warmup_steps: int
    prompt_lens: tuple[int, ...]
    ttft_batch: int
    reps: int
    graph: bool
    fused: bool
    breakdown: bool             # profile a few eager decode steps: GEMM / attention / comm
    compile: bool               # also run every backend compiled (torch.compile), first
    rounds: int                 # interleaved repetitions of every measurement (median)
    seed: int
    threads: int | None
    progress: bool
    command: str
    timeout_s: float
    prefill_graph: bool = True  # graph and compile: replay each prompt length's CUDA graph


def run(config: ModelBenchConfig) -> dict:
    """In this process under torchrun, else in ``config.world`` spawned ranks; rank 0's result."""
    if under_torchrun():
        return rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), config)
    return spawn(rank_main, config.world, config, timeout_s=config.timeout_s)[0]


class _Clock:
    """Wall time of steps: CUDA events on the GPU (no sync between steps), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Progress:
    """One line per step on stderr (rank 0): readable in a log, unlike a redrawn bar."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            print(f"[{self.done}/{self.total} {time.monotonic() - self.t0:6.1f}s] {what}",
                  file=sys.stderr, flush=True)


def _prompt(seed: int, batch: int, length: int, vocab: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + batch * 131 + length)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def _decode(model, comm_name, batch, config, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    steps = config.warmup_steps + config.decode_tokens
    extra = BREAKDOWN_STEPS + 1 if config.breakdown else 0
    gen = Generator(model, batch, config.context + steps + 1 + extra, graph=config.graph)
    prompt = _prompt(config.seed, batch, config.context, model.cfg.vocab_size, device)
    try:
        # the context is filled eagerly in every variant: this phase times decode (and a
        # compiled variant compiles one decode graph per batch, no prefill graph per batch)
        compiled, model.compiled = model.compiled, False
        try:
            tokens = [gen.prefill(prompt).clone()]
        finally:
            model.compiled = compiled
        logits = gen.logits.float().cpu()
        t0 = time.perf_counter()
        tokens.append(gen.decode_step().clone())   # compiles (compiled) and captures (graph)
        _sync(device)
        first_call_s = time.perf_counter() - t0
        for _ in range(config.warmup_steps - 1):
            tokens.append(gen.decode_step().clone())
        dist.barrier()
        _sync(device)
        clock = _Clock(device)
        clock.mark()
        for _ in range(config.decode_tokens):
            tokens.append(gen.decode_step().clone())
            clock.mark()
        ms = max_over_ranks(statistics.median(clock.intervals_ms()))
        parts = decode_breakdown(gen, BREAKDOWN_STEPS) if config.breakdown else None
    finally:
        gen.close()
    row = {"phase": "decode", "comm": comm_name, "batch": batch, "tokens": config.context,
           "ms": ms, "tokens_per_s": batch * 1e3 / ms, "samples": config.decode_tokens,
           "first_call_s": first_call_s}
    if parts is not None:
        row["kernels"] = parts.pop("kernels")
        row["breakdown_ms"] = parts
    return row, torch.stack(tokens, 1).cpu(), logits


def _prefill(model, comm_name, length, config, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    batch = config.ttft_batch
    gen = Generator(model, batch, length + 1, graph=config.graph,
                    prefill_graph=config.prefill_graph)
    prompt = _prompt(config.seed + 1, batch, length, model.cfg.vocab_size, device)
    times = []
    try:
        for i in range(config.reps + 1):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            first = gen.prefill(prompt)
            _sync(device)
            if i:   # the first run is a warm-up (and compiles, compiled)
                times.append((time.perf_counter() - t0) * 1e3)
            else:
                first_call_s = time.perf_counter() - t0
        logits = gen.logits.float().cpu()
        graphed = gen.graphs_prefill()
        if graphed:   # the graph replays what the compiled prefill computes, bit for bit
            same_token = torch.equal(gen.prefill(prompt, graph=False), first)
            identical = same_token and torch.equal(gen.logits.float().cpu(), logits)
    finally:
        gen.close()
    ms = max_over_ranks(statistics.median(times))
    row = {"phase": "prefill", "comm": comm_name, "batch": batch, "tokens": length, "ms": ms,
           "tokens_per_s": batch * length * 1e3 / ms, "samples": config.reps,
           "first_call_s": first_call_s, "graph": graphed}
    if graphed:
        row["graph_identical"] = identical
    return row, first[:, None].cpu(), logits


def compare(tokens: dict, logits: dict, base: str, other: str, dtype: str,
            reference: torch.Tensor | None = None) -> dict:
    """Greedy tokens of ``other`` against ``base``; where they differ, the logits they started
    from, against the tolerance of ``dtype``; past it, with ``reference`` (the same logits
    computed in float32), ``base``'s distance to it against ``other``'s (``REF_ERROR_FACTOR``)."""
    a, b = tokens[base], tokens[other]
    same = torch.equal(a, b)
    la, lb = logits[base], logits[other]
    diff = float((la - lb).abs().max())
    scale = float(la.abs().max()) or 1.0
    out = {"base": base, "other": other, "identical_tokens": same, "logits_max_abs_diff": diff,
           "logits_tolerance": LOGITS_TOL[dtype] * scale}
    out["ok"] = same or diff <= out["logits_tolerance"]
    if same:
        out["verdict"] = "identical"
        return out
    col = int((a != b).any(0).nonzero()[0])
    out["first_difference_step"] = col
    if out["ok"]:
        out["verdict"] = (f"tokens differ from step {col}, logits within {dtype} tolerance "
                          f"(max|diff| {diff:.3g} <= {out['logits_tolerance']:.3g}): a "
                          f"near-tie argmax flipped by a different reduction order")
        return out
    if reference is None:
        out["verdict"] = (f"WRONG: tokens differ from step {col} and logits differ by "
                          f"{diff:.3g} > {out['logits_tolerance']:.3g}")
        return out
    err_a = float((la - reference).abs().max())
    err_b = float((lb - reference).abs().max())
    out["float32_error"] = {base: err_a, other: err_b}
    out["ok"] = err_a <= REF_ERROR_FACTOR * err_b
    rel = (f"against the float32 prefill, {base} is off by {err_a:.3g} and {other} by "
           f"{err_b:.3g}")
    if out["ok"]:
        out["verdict"] = (f"tokens differ from step {col}, logits by {diff:.3g} (> "
                          f"{out['logits_tolerance']:.3g}); {rel}: {dtype} rounding, "
                          f"{base} within {REF_ERROR_FACTOR:g}x {other}'s error")
    else:
        out["verdict"] = (f"WRONG: tokens differ from step {col}, logits by {diff:.3g}; {rel}: "
                          f"more than {REF_ERROR_FACTOR:g}x {other}'s error")
    return out


def _reference_logits(model, length: int, config: ModelBenchConfig, device) -> torch.Tensor:
    """The prefill logits of ``_prefill`` computed in float32: ``model``'s weights (as rounded
    to its dtype) copied into a float32 model, run eagerly (every rank, collectively). Costs
    twice the weights' memory for a moment (llama3_8b: 32 GB)."""
    ref = LlamaTP(model.cfg, model.comm, dtype=torch.float32, device=device, fused=model.fused)
    ref.load_state_dict(model.state_dict())
    gen = Generator(ref.eval(), config.ttft_batch, length + 1, graph=False)
    prompt = _prompt(config.seed + 1, config.ttft_batch, length, model.cfg.vocab_size, device)
    try:
        gen.prefill(prompt)
        return gen.logits.float().cpu()
    finally:
        gen.close()
        del gen, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()


def rank_main(rank: int, world: int, config: ModelBenchConfig) -> dict:
    no_multicast()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    threads = config.threads or max(1, (os.cpu_count() or 1) // local_world)
    device = init_rank(config.device, rank, threads)
    comms = {}
    try:
        for name in config.comms:
            comms[name] = make_comm(name, device)
        cfg = load_config(config.checkpoint) if config.checkpoint else get_config(config.model)
        model = build_model(cfg, comms[config.comms[0]], checkpoint=config.checkpoint,
                            seed=config.seed, dtype=DTYPES[config.dtype], device=device,
                            fused=config.fused)
        if config.compile:
            model.enable_compile()
        return _measure(model, comms, config, device, rank)
    finally:
        for c in comms.values():
            c.close()
        dist.destroy_process_group()


def contenders(config: ModelBenchConfig) -> list[tuple[str, str, bool]]:
    """(label, backend, compiled) of every measured variant, the one under test first."""
    if not config.compile:
        return [(name, name, False) for name in config.comms]
    return [v for name in config.comms
            for v in ((f"{name}+compile", name, True), (name, name, False))]


def _measure(model, comms: dict, config: ModelBenchConfig, device, rank: int) -> dict:
    """Every (phase, size) for every backend, ``rounds`` times in interleaved order (backend
    A, B, A, B, ...), so that a burst of load from elsewhere hits every backend alike; a row's
    time is the median of its rounds. Tokens and logits are checked in every round."""
    variants = contenders(config)
    progress = _Progress(config.rounds * len(variants) * (len(config.batches) +
                                                          len(config.prompt_lens)),
                         config.progress and rank == 0)
    rows, checks = [], []
    base = variants[0][0]
    for what, sizes, fn in (("decode", config.batches, _decode),
                            ("prefill", config.prompt_lens, _prefill)):
        for size in sizes:
            per_comm = {label: [] for label, _, _ in variants}
            for rnd in range(config.rounds):
                tokens, logits = {}, {}
                for name, backend, compiled in variants:
                    model.set_comm(comms[backend])
                    model.compiled = compiled
                    row, tokens[name], logits[name] = fn(model, name, size, config, device)
                    per_comm[name].append(row)
                    progress.step(f"{what} {'batch' if what == 'decode' else 'prompt'} {size}, "
                                  f"{name}, round {rnd + 1}: {row['ms']:.3f} ms, "
                                  f"{row['tokens_per_s']:.1f} tok/s")
                found = [compare(tokens, logits, base, other, config.dtype)
                         for other, _, _ in variants[1:]]
                if (what == "prefill" and config.dtype != "float32"
                        and not all(c["ok"] for c in found)):
                    # the same on every rank (gathered logits): every rank builds the reference
                    ref = _reference_logits(model, size, config, device)
                    found = [compare(tokens, logits, base, other, config.dtype, ref)
                             for other, _, _ in variants[1:]]
                found += [_graph_check(what, name, per_comm[name][-1]) for name, _, _ in variants
                          if "graph_identical" in per_comm[name][-1]]
                for check in found:
                    if rnd == 0 or not check["ok"]:   # keep the first, and any failure
                        checks.append({"phase": what, "size": size, "round": rnd, **check})
            rows += [_median_row(rs) for rs in per_comm.values()]
    model.set_comm(comms[variants[0][1]])
    model.compiled = variants[0][2]
    result = {"rows": rows, "checks": checks, "meta": None}
    if rank == 0:
        result["meta"] = _meta(model, comms, config, device)
    return result


def _graph_check(what: str, name: str, row: dict) -> dict:
    """The check of a graphed prefill: its replay against the compiled prefill outside the
    graph, bitwise (logits and token)."""
    ok = row["graph_identical"]
    return {"base": name, "other": f"{name} outside the CUDA graph", "ok": ok,
            "identical_tokens": ok,
            "verdict": (f"{name}: the CUDA graph's {what} bitwise the compiled {what} outside it"
                        if ok else f"WRONG: {name}'s CUDA graph {what} differs from the compiled "
                                   f"{what} outside it")}


def _median_row(rounds: list[dict]) -> dict:
    """The row of the median round (by time), with every round's time kept."""
    ordered = sorted(rounds, key=lambda r: r["ms"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["rounds_ms"] = [r["ms"] for r in rounds]
    return row


def _graph_breaks() -> int:
    """Graph breaks torch.compile reported in this process (0: every layer one graph)."""
    from torch._dynamo.utils import counters
    return int(sum(counters["graph_break"].values()))


def _meta(model, comms, config: ModelBenchConfig, device) -> dict:
    from .meta import system_info
    cfg = model.cfg
    meta = system_info(device, torch.get_num_threads())
    meta.update({
        "benchmark": "model", "command": config.command,
        "model": config.checkpoint or config.model, "params": cfg.num_params(),
        "world_size": config.world, "dtype": config.dtype, "device": config.device,
        "graph": config.graph, "fused": config.fused, "compile": config.compile,
        "graph_breaks": _graph_breaks(),
        "comm_backends": {n: getattr(c, "backend_name", n) for n, c in comms.items()},
        "config": dataclasses.asdict(config), "model_config": dataclasses.asdict(cfg)})
    return meta
