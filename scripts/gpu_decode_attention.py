"""Decode attention of one Llama-3-8B layer (world 1: 32 q heads, 8 KV heads, D 128, bf16), per
layer, on one GPU: the model's old path against the kernel that replaced it.

- ``old``: RoPE of q and k as torch ops, two ``index_copy_`` cache writes, masked SDPA (GQA)
  over the whole preallocated cache (what the model did before: static shapes, graph-safe);
- ``kernel``: ``tpcomm.models.attention`` (one Triton kernel: RoPE, cache write, attention
  up to the position read on the device, the splits combined by the last program of each
  (sequence, head); graph-safe; the layer's zeroed counters, as in the model);
- ``kernel_2k``: the same with the combine as a second kernel (``fold_combine=False``, the
  kernel until 2026-12-03): kernel_2k - kernel is what the fold saves per layer;
- ``sdpa_filled``: SDPA over exactly the filled positions, no mask (the length is a host value:
  not graph-safe, eager; a yardstick for the attention kernel torch would pick);
- ``floor``: the filled K and V read once at 4.3 TB/s.

``--sweep``: also the kernel at other tuning points (positions per block, programs per SM,
warps), to pick the constants of ``tpcomm/kernels/decode_attention.py``.

32 layers (32 separate caches, so L2 does not hold them) per CUDA graph replay (``sdpa_filled``:
eager launches, timed by CUDA events), microseconds per layer, median of 10 replays; context
--context tokens in a cache of --context + 64 positions. Results are checked against each other
first (relative to the largest output value).

    python scripts/gpu_decode_attention.py [--batch 1,8] [--context 1024] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tpcomm.kernels.decode_attention import decode_attention_rope  # noqa: E402
from tpcomm.models.attention import _launch, apply_rope, decode_attention  # noqa: E402

HQ, HK, D, LAYERS = 32, 8, 128, 32
DEV = torch.device("cuda", 0)


def old_path(qkv, cos, sin, k_cache, v_cache, pos):
    B = qkv.shape[0]
    q, k, v = qkv.view(B, 1, HQ + 2 * HK, D).split([HQ, HK, HK], dim=2)
    q = apply_rope(q, cos[None], sin[None]).transpose(1, 2)
    k_cache[:B].index_copy_(2, pos, apply_rope(k, cos[None], sin[None]).transpose(1, 2))
    v_cache[:B].index_copy_(2, pos, v.transpose(1, 2))
    S = k_cache.shape[2]
    mask = torch.arange(S, device=qkv.device)[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, k_cache[:B], v_cache[:B], attn_mask=mask,
                                          enable_gqa=True).view(B, HQ, D)


def filled_path(qkv, cos, sin, k_cache, v_cache, pos, n):
    B = qkv.shape[0]
    q = qkv.view(B, 1, HQ + 2 * HK, D)[:, :, :HQ]
    q = apply_rope(q, cos[None], sin[None]).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k_cache[:B, :, :n], v_cache[:B, :, :n],
                                          enable_gqa=True).view(B, HQ, D)


def _median_us(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / LAYERS)
    return statistics.median(times)


def _graph(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


SWEEP = [(32, 2, 4), (64, 1, 4), (64, 4, 4), (128, 2, 4), (128, 2, 8), (64, 2, 8)]


def _tuned(block_n, programs_per_sm, num_warps):
    def fn(qkv, cos, sin, k_cache, v_cache, pos, counters=None):
        out = torch.empty(qkv.shape[0], HQ, D, dtype=qkv.dtype, device=qkv.device)
        decode_attention_rope(qkv, cos, sin, k_cache, v_cache, pos, out, D ** -0.5,
                              counters=counters, block_n=block_n,
                              programs_per_sm=programs_per_sm, num_warps=num_warps)
        return out
    return fn


def measure(batch: int, context: int, sweep: bool = False) -> dict:
    S = context + 64
    gen = torch.Generator(device=DEV).manual_seed(batch)
    qkv = [torch.randn(batch, (HQ + 2 * HK) * D, generator=gen, device=DEV).bfloat16()
           for _ in range(LAYERS)]
    caches = [(torch.randn(batch, HK, S, D, generator=gen, device=DEV).bfloat16(),
               torch.randn(batch, HK, S, D, generator=gen, device=DEV).bfloat16())
              for _ in range(LAYERS)]
    counters = [torch.zeros(batch * HK, dtype=torch.int32, device=DEV) for _ in range(LAYERS)]
    cos = torch.randn(D, generator=gen, device=DEV).bfloat16()
    sin = torch.randn(D, generator=gen, device=DEV).bfloat16()
    pos = torch.tensor([context - 1], device=DEV)
    # agreement first (one layer)
    a = old_path(qkv[0], cos, sin, *caches[0], pos).float()
    b = decode_attention(qkv[0], cos, sin, *caches[0], pos, counters[0]).float()
    b2 = _launch(qkv[0], cos, sin, *caches[0], pos, fold_combine=False).float()
    c = filled_path(qkv[0], cos, sin, *caches[0], pos, context).float()
    err = max(float((a - b).abs().max()), float((a - c).abs().max())) / float(a.abs().max())
    # the folded combine computes what the combine kernel did, bit for bit
    out = {"batch": batch, "context": context, "max_rel_diff": err,
           "fold_bitwise": torch.equal(b, b2)}
    runs = {
        "old": _graph(lambda: [old_path(qkv[i], cos, sin, *caches[i], pos) for i in range(LAYERS)]),
        "kernel": _graph(lambda: [decode_attention(qkv[i], cos, sin, *caches[i], pos,
                                                   counters[i]) for i in range(LAYERS)]),
        "kernel_2k": _graph(lambda: [_launch(qkv[i], cos, sin, *caches[i], pos,
                                             fold_combine=False) for i in range(LAYERS)]),
        "sdpa_filled": lambda: [filled_path(qkv[i], cos, sin, *caches[i], pos, context)
                                for i in range(LAYERS)],
    }
    for point in SWEEP if sweep else ():
        name, fn = "kernel_n{}_p{}_w{}".format(*point), _tuned(*point)
        try:   # a tuning point may not fit (shared memory): say so, go on
            got = fn(qkv[0], cos, sin, *caches[0], pos).float()
        except Exception as e:  # noqa: BLE001
            out[f"{name}_us"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            continue
        if float((got - a).abs().max()) > 0.02 * float(a.abs().max()):
            out[f"{name}_us"] = "WRONG"
            continue
        runs[name] = _graph(lambda fn=fn: [fn(qkv[i], cos, sin, *caches[i], pos, counters[i])
                                           for i in range(LAYERS)])
    for name, fn in runs.items():
        out[f"{name}_us"] = round(_median_us(fn), 2)
    out["floor_us"] = round(2 * batch * HK * context * D * 2 / 4.3e12 * 1e6, 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--sweep", action="store_true", help="the kernel at other tuning points too")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [measure(int(b), args.context, args.sweep) for b in args.batch.split(",")]
    print(f"# {torch.cuda.get_device_name(DEV)}, torch {torch.__version__}: decode attention, "
          f"us per layer (x{LAYERS} layers per step)")
    keys = ("old_us", "kernel_us", "kernel_2k_us", "sdpa_filled_us", "floor_us", "max_rel_diff")
    print("batch " + " ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(f"{r['batch']:>5} " + " ".join(f"{r[k]:>14.4g}" if isinstance(r[k], float)
                                             else f"{r[k]:>14}" for k in keys))
    for r in rows:
        swept = {k: v for k, v in r.items() if k.startswith("kernel_") and k not in keys}
        if swept:
            print(f"batch {r['batch']} sweep (block_n, programs/SM, warps): "
                  + ", ".join(f"{k[7:]} {v}" for k, v in swept.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(DEV), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    wrong = [k for r in rows for k, v in r.items() if v == "WRONG"]
    folds = [r["fold_bitwise"] for r in rows]
    print(f"folded combine bitwise the combine kernel's: {'PASS' if all(folds) else 'FAIL'}")
    return 0 if all(r["max_rel_diff"] < 2e-2 for r in rows) and not wrong and all(folds) else 1


if __name__ == "__main__":
    sys.exit(main())
