"""The decode attention kernel (tpcomm/kernels/decode_attention.py) under Triton's interpreter:
RoPE, the cache write at the position read on the device, attention up to it, against torch
ops; then the tiny TP model decoding through it against the model's torch path. Prints ALL OK.

float32 and float16 (the interpreter's bfloat16 dot is wrong: bfloat16 runs on the GPU test).
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _interp import patch_scalar_index  # noqa: E402

from tpcomm.models.attention import _launch, decode_attention_reference  # noqa: E402

patch_scalar_index()   # numpy >= 2.4 and the interpreter's scalars (tests/_interp.py)

CASES = [  # B, HQ, HK, D, S, pos, dtype
    (2, 8, 4, 32, 100, 37, torch.float32), (1, 4, 1, 16, 200, 199, torch.float32),
    (3, 6, 2, 24, 70, 0, torch.float32), (1, 8, 8, 32, 130, 64, torch.float32),
    (1, 8, 8, 32, 130, 63, torch.float32), (2, 8, 2, 64, 300, 150, torch.float16),
    (4, 8, 4, 32, 64, 20, torch.float32)]   # the last: one split per (sequence, head)


def kernel_cases():
    g = torch.Generator().manual_seed(0)
    for B, HQ, HK, D, S, pos, dt in CASES:
        qkv = torch.randn(B, (HQ + 2 * HK) * D, generator=g).to(dt)
        cos, sin = torch.randn(D, generator=g).to(dt), torch.randn(D, generator=g).to(dt)
        kc = torch.randn(B + 1, HK, S, D, generator=g).to(dt)
        vc = torch.randn(B + 1, HK, S, D, generator=g).to(dt)
        kr, vr = kc.double(), vc.double()          # the reference's copies
        kc[:, :, pos + 1:] = float("nan")          # never read by the kernel: NaN changes nothing
        vc[:, :, pos + 1:] = float("nan")
        p = torch.tensor([pos])
        kc0, vc0 = kc.clone(), vc.clone()
        # the combine as a kernel of its own (before 2026-12-03): the yardstick of the fold
        two = _launch(qkv, cos, sin, kc0, vc0, p, fold_combine=False)
        counters = torch.zeros(B * HK + 3, dtype=torch.int32)
        for _ in range(2):   # the counters are left zero: a second launch combines again
            out = _launch(qkv, cos, sin, kc, vc, p, counters)
            assert not counters.any(), counters
        # the last program to finish combines: the same arithmetic as the combine kernel
        assert torch.equal(out, two), float((out.double() - two.double()).abs().max())
        assert torch.equal(kc.nan_to_num(), kc0.nan_to_num())   # NaN: past pos
        assert torch.equal(vc.nan_to_num(), vc0.nan_to_num())
        want = decode_attention_reference(qkv.double(), cos.double(), sin.double(), kr, vr, p)
        tol = 1e-5 if dt == torch.float32 else 2e-3
        err = float((out.double() - want).abs().max())
        assert err <= tol, (B, HQ, HK, D, S, pos, dt, err)
        # the cache: this step's k (roped) and v at pos, everything before untouched
        assert torch.equal(vc[:B, :, pos], vr[:B, :, pos].to(dt)), (B, HQ, HK, D, S, pos)
        kerr = float((kc[:B, :, pos].double() - kr[:B, :, pos]).abs().max())
        assert kerr <= tol * 10, kerr
        assert torch.equal(kc[:, :, :pos], kr[:, :, :pos].to(dt))
        assert torch.equal(kc[B:, :, :pos + 1], kr[B:, :, :pos + 1].to(dt))  # other rows
        print("kernel", (B, HQ, HK, D, S, pos, dt), f"max err {err:.2e}", flush=True)
        tuned_points(qkv, cos, sin, kc, vc, p, out, want, tol)


# the sweep's tunables (scripts/gpu_decode_attention.py --sweep): many splits per (sequence,
# head) so that the combine runs whole and partial chunks, a chunk past the split count, other
# warps and stages (which the interpreter ignores; the GPU sweep checks them), one split
TUNINGS = [dict(block_n=16, programs_per_sm=8, combine_chunk=2, num_stages=2),
           dict(block_n=32, programs_per_sm=3, combine_chunk=4, num_warps=2, num_stages=4),
           dict(block_n=32, programs_per_sm=0)]   # one split: out written directly


def tuned_points(qkv, cos, sin, kc, vc, p, default_out, want, tol):
    """Every tuning point: the reference's result, the folded combine bitwise the combine
    kernel's, counters left zero, and the chunked combine the one-by-one one's up to
    rounding (a chunk is summed as a tile, then added)."""
    B, HK = qkv.shape[0], kc.shape[1]
    for tuning in TUNINGS:
        one = _launch(qkv, cos, sin, kc, vc, p, fold_combine=False,
                      **dict(tuning, combine_chunk=1))
        two = _launch(qkv, cos, sin, kc, vc, p, fold_combine=False, **tuning)
        counters = torch.zeros(B * HK, dtype=torch.int32)
        out = _launch(qkv, cos, sin, kc, vc, p, counters, **tuning)
        assert not counters.any(), (tuning, counters)
        assert torch.equal(out, two), (tuning, float((out.double() - two.double()).abs().max()))
        assert float((two.double() - one.double()).abs().max()) <= tol, tuning
        err = float((out.double() - want).abs().max())
        assert err <= tol, (tuning, err)
        # a different split of the cache: the same result up to rounding, never the same call
        assert float((out.double() - default_out.double()).abs().max()) <= 2 * tol, tuning


def model_case():
    """The tiny model (GQA 8/4 heads, D 32), batch 2: decode through the kernel gives the
    tokens of the torch path."""
    from tpcomm.models.comm import TorchDistComm
    from tpcomm.models.generate import Generator
    from tpcomm.models.llama import get_config
    from tpcomm.models.weights import build_model
    model = build_model(get_config("tiny"), TorchDistComm(), seed=3)
    prompt = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    got = Generator(model, 2, 16).generate(prompt, 3)
    os.environ["TRITON_INTERPRET"] = "0"     # the torch path (masked attention)
    want = Generator(model, 2, 16).generate(prompt, 3)
    os.environ["TRITON_INTERPRET"] = "1"
    assert torch.equal(got, want), (got, want)
    print("model tokens", got.tolist(), flush=True)


if __name__ == "__main__":
    kernel_cases()
    model_case()
    print("ALL OK")
