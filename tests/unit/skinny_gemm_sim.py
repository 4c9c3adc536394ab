"""The skinny GEMM (tpcomm/kernels/skinny_gemm.py) under Triton's interpreter. Prints ALL OK.

- exact: small-integer inputs (every sum exact in float32 and representable in the dtype), so
  every config must give float64's result bitwise: M = 1..16, odd N, K not a multiple of
  BLOCK_K, split_k 1 to 4, the dot and the sum paths, with and without the SwiGLU epilogue;
- the folded split-K sum is deterministic: random inputs (rounding everywhere), the programs
  of each column block arriving in the other order (``reverse_splits``) and the split-K sum as
  a second kernel (``fold=False``) give the same bits; the counters are back to 0 after every
  call and a second call gives the same bits;
- errors: too many rows, a bad block, wrong counters raise ValueError.

float32 and float16 on the dot path; bfloat16 on the sum path only (the interpreter's bfloat16
dot is wrong; bfloat16 dots run on the GPU test).
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _interp import patch_scalar_index  # noqa: E402

from tpcomm.kernels.skinny_gemm import SkinnyConfig as C, counters_for, skinny_gemm  # noqa: E402

patch_scalar_index()   # numpy >= 2.4 and the interpreter's scalars (tests/_interp.py)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EXACT = [  # M, N_out, K, config, swiglu, dtype
    (1, 37, 100, C(16, 32, 1, 4, 2, False), False, BF16),
    (1, 37, 100, C(16, 32, 3, 4, 2, False), False, BF16),
    (2, 50, 96, C(32, 16, 4, 4, 1, False), True, BF16),
    (4, 19, 70, C(16, 32, 2, 4, 2, False), False, F32),
    (1, 37, 100, C(16, 32, 2, 4, 2, True), False, F16),
    (3, 50, 200, C(16, 32, 3, 4, 2, True), False, F16),
    (8, 33, 96, C(16, 16, 2, 4, 2, True), True, F16),
    (13, 64, 130, C(32, 64, 1, 4, 2, True), False, F32),
    (16, 41, 150, C(16, 32, 4, 4, 2, True), False, F16),
    (16, 20, 64, C(32, 16, 3, 4, 1, True), True, F32),
]
LIMIT = {F16: 2048, BF16: 256, F32: 1 << 24}     # integers each dtype holds exactly


def swiglu_ref(y: torch.Tensor, n: int, dt) -> torch.Tensor:
    """silu(gate) * up of a float64 product, gate and up rounded to ``dt`` first."""
    g, u = y[:, :n].to(dt).double(), y[:, n:].to(dt).double()
    return F.silu(g) * u


def exact_cases():
    g = torch.Generator().manual_seed(0)
    for M, N, K, cfg, sw, dt in EXACT:
        hi = 2 if dt == BF16 else 4
        x = torch.randint(-hi, hi, (M, K), generator=g).to(dt)
        w = torch.randint(-hi, hi, (N * (2 if sw else 1), K), generator=g).to(dt)
        y = x.double() @ w.double().t()
        assert y.abs().max() <= LIMIT[dt], "inputs too large for an exact check"
        out = torch.full((M, N), float("nan"), dtype=dt)
        counters = counters_for(N, "cpu")
        skinny_gemm(x, w, out, cfg, swiglu=sw, counters=counters)
        assert not counters.any(), counters
        if sw:   # silu rounds: the same bits as the unsplit kernel, near the reference
            one = skinny_gemm(x, w, torch.empty_like(out), C(16, 16, 1, 4, 1, cfg.use_dot),
                              swiglu=True)
            assert torch.equal(out, one), (cfg, (out.double() - one.double()).abs().max())
            ref = swiglu_ref(y, N, dt)
            tol = 2e-6 if dt == F32 else 1e-2
            err = ((out.double() - ref).abs() / ref.abs().clamp_min(1)).max().item()
            assert err <= tol, (M, N, K, cfg, dt, err)
        else:
            assert torch.equal(out.double(), y), (M, N, K, cfg, dt,
                                                  (out.double() - y).abs().max())
    print("exact OK")


def deterministic_cases():
    g = torch.Generator().manual_seed(1)
    for M, N, K, cfg, sw, dt in [(3, 45, 300, C(16, 32, 4, 4, 2, True), False, F16),
                                 (1, 45, 300, C(16, 64, 3, 4, 2, False), False, BF16),
                                 (5, 30, 257, C(16, 32, 4, 4, 2, True), True, F32)]:
        x = torch.randn(M, K, generator=g).to(dt)
        w = torch.randn(N * (2 if sw else 1), K, generator=g).to(dt)
        counters = counters_for(N, "cpu")
        runs = [skinny_gemm(x, w, torch.empty(M, N, dtype=dt), cfg, swiglu=sw,
                            counters=counters, reverse_splits=rev)
                for rev in (False, True, False)]
        assert not counters.any(), counters
        two = skinny_gemm(x, w, torch.empty(M, N, dtype=dt), cfg, swiglu=sw, fold=False)
        for r in runs[1:] + [two]:
            assert torch.equal(r, runs[0]), (cfg, (r.double() - runs[0].double()).abs().max())
        ref = x.double() @ w.double().t()
        ref = swiglu_ref(ref, N, dt) if sw else ref
        err = ((runs[0].double() - ref).abs().max() / ref.abs().max()).item()
        assert err < (1e-5 if dt == F32 else 1e-2), (cfg, err)
    print("deterministic OK")


def error_cases():
    x, w = torch.zeros(17, 32, dtype=F16), torch.zeros(16, 32, dtype=F16)
    bad = [lambda: skinny_gemm(x, w, torch.empty(17, 16, dtype=F16), C()),
           lambda: skinny_gemm(x[:5], w, torch.empty(5, 16, dtype=F16), C(use_dot=False)),
           lambda: skinny_gemm(x[:1], w, torch.empty(1, 16, dtype=F16), C(block_n=24)),
           lambda: skinny_gemm(x[:1], w, torch.empty(1, 8, dtype=F16), C()),
           lambda: skinny_gemm(x[:1], w, torch.empty(1, 16, dtype=F16), C(16, 16, 2),
                               counters=torch.zeros(1, dtype=torch.int64))]
    for fn in bad:
        try:
            fn()
        except ValueError:
            continue
        raise AssertionError("no ValueError")
    print("errors OK")


def tiny_table():
    """Entries for every linear of the tiny model (H 256, I 768, 8 q / 4 KV heads of 32,
    vocab 512): split and unsplit, dot and sum paths, SwiGLU; configs as TUNED holds them."""
    return {(512, 256, ""): ((1, (32, 64, 2, 4, 2, False)), (16, (32, 64, 1, 4, 2, True))),
            (256, 256, ""): ((16, (16, 64, 3, 4, 2, True)),),
            (1536, 256, "swiglu"): ((16, (64, 64, 2, 4, 2, True)),),
            (256, 768, ""): ((1, (16, 128, 4, 4, 2, False)), (16, None))}


def model_case():
    """The tiny model in float16, batch 2: decoding through the skinny GEMM gives the tokens
    of cuBLAS's path, and the kernel runs where the table says; its linears compiled with
    fullgraph=True run it through the registered op, with the eager bits."""
    import tpcomm.kernels.skinny_gemm as kernel
    from tpcomm.models import skinny_linear
    from tpcomm.models.comm import TorchDistComm
    from tpcomm.models.generate import Generator
    from tpcomm.models.llama import get_config
    from tpcomm.models.weights import build_model
    model = build_model(get_config("tiny"), TorchDistComm(), seed=3, dtype=F16)
    prompt = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    want = Generator(model, 2, 16).generate(prompt, 2)     # TUNED empty: F.linear
    launches = []
    real = kernel.skinny_gemm

    def counted(x, w, out, cfg, **kw):
        launches.append((tuple(w.shape), x.shape[0], cfg.split_k, kw.get("swiglu")))
        return real(x, w, out, cfg, **kw)

    kernel.skinny_gemm = counted
    saved = dict(skinny_linear.TUNED)
    skinny_linear.TUNED.clear()
    skinny_linear.TUNED.update(tiny_table())
    try:
        got = Generator(model, 2, 16).generate(prompt, 2)
        assert torch.equal(got, want), (got, want)
        # a decode step of 4 layers x (qkv, o, gate_up+swiglu) and the head, and the
        # prefill's head (its last row per sequence: M = 2); down at M = 2 is (16, None): cuBLAS
        shapes = {(s, m, sw) for s, m, _, sw in launches}
        assert shapes == {((512, 256), 2, False), ((256, 256), 2, False),
                          ((1536, 256), 2, True)}, shapes
        assert len(launches) == 4 * 3 + 1 + 1, len(launches)
        # compiled (fullgraph): the op, the same bits as eagerly
        layer = model.layers[0]

        def fn(x):
            return model.lm_head(x), layer.mlp(x), layer.self_attn.o_proj._linear(x)

        x = torch.randn(2, 1, 256, generator=torch.Generator().manual_seed(2)).to(F16)
        eager = fn(x)
        launches.clear()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
        assert len(launches) == 3, launches
        assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
        assert eager[1].shape == (2, 1, 768)
    finally:
        kernel.skinny_gemm = real
        skinny_linear.TUNED.clear()
        skinny_linear.TUNED.update(saved)
    print("model tokens", got.tolist(), flush=True)


if __name__ == "__main__":
    import time
    t0 = time.monotonic()
    exact_cases()
    deterministic_cases()
    error_cases()
    print(f"kernel cases {time.monotonic() - t0:.1f}s", flush=True)
    model_case()
    print(f"ALL OK ({time.monotonic() - t0:.1f}s)")
