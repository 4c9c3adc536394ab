"""poll_sum_call's packed verdict word (``kernels/_lamport._block_verdicts``), under Triton's
interpreter: the int32 of 8-bit fields (WP <= 8) and the int64 of 16-bit fields (WP 16) give
the same (bits, hbits, dbits, nbits) as a plain reference, top bits included (nbits bit 7 is the
int32's sign bit). The interpreter has no warps: this checks the packing, not warp agreement
(scripts/gpu_emulated_ranks.py checks that on a GPU)."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent('''
    import random
    import torch
    import triton
    import triton.language as tl
    from tpcomm.kernels._lamport import _block_verdicts

    @triton.jit
    def k(miss_ptr, hb_ptr, d_ptr, n_ptr, out_ptr, BLOCK: tl.constexpr, WP: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        idx = tl.arange(0, WP)
        missing = tl.load(miss_ptr + offs)
        hbits = tl.load(hb_ptr)
        dmask = tl.load(d_ptr + idx) != 0
        nmask = tl.load(n_ptr + idx) != 0
        bits, hb, db, nb = _block_verdicts(missing, hbits, dmask, nmask, idx, WP)
        tl.store(out_ptr, bits)
        tl.store(out_ptr + 1, hb)
        tl.store(out_ptr + 2, db)
        tl.store(out_ptr + 3, nb)

    rng = random.Random(7)
    for wp in (2, 4, 8, 16):
        for case in range(40):
            r = rng.randint(2, wp) if wp > 2 else 2
            full = (1 << r) - 1
            if case == 0:    # every field's top bit
                miss = [1 << (r - 1)] * 4 + [0] * 12
                hb, d, n = 1 << (wp - 1), [0] * (wp - 1) + [1], [0] * (wp - 1) + [1]
            else:
                miss = [rng.choice([0, 0, rng.randint(0, full)]) for _ in range(16)]
                hb = rng.choice([0, rng.randint(0, (1 << wp) - 1)])
                d = [rng.random() < 0.2 for _ in range(wp)]
                n = [rng.random() < 0.2 for _ in range(wp)]
            out = torch.zeros(4, dtype=torch.int32)
            k[(1,)](torch.tensor(miss, dtype=torch.int32), torch.tensor([hb], dtype=torch.int32),
                    torch.tensor(d, dtype=torch.int32), torch.tensor(n, dtype=torch.int32), out,
                    BLOCK=16, WP=wp)
            m = 0
            for x in miss:
                m |= x
            want = [m | hb, hb, sum(1 << i for i in range(wp) if d[i]),
                    sum(1 << i for i in range(wp) if n[i])]
            assert out.tolist() == want, (wp, case, out.tolist(), want)
    print("ALL OK")
''')


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs triton (pip install --no-deps triton) to interpret the kernels")
def test_block_verdicts_fields_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "ALL OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
