"""Compile every GPU kernel for sm_90 on a machine without a GPU (development aid).

    python scripts/compile_check.py [-v]

Installs a stand-in Triton driver that reports an sm_90 target, "warms up" (compiles without
launching) each kernel for each dtype and for aligned and unaligned sizes, and prints per kernel:
16-byte global accesses in the PTX, registers and spills from the cubin. Needs only `triton`
(pip install --no-deps triton==3.6.0) and a CPU torch.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


class _Sm90Driver:
    def __init__(self):
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _report(name, k, verbose):
    ptx = k.asm["ptx"]
    v4 = len(re.findall(r"(ld|st)\.[a-z.]*v4", ptx))
    scalar16 = len(re.findall(r"(ld|st)\.global[a-z.]*\.b16", ptx))
    regs = spill = "?"
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                             text=True).stdout
        m = re.search(r"REG:(\d+)", out)
        regs = m.group(1) if m else "?"
        m = re.search(r"STACK:(\d+)", out)
        spill = m.group(1) if m else "?"
    print(f"  {name:58s} v4 accesses {v4:4d}  b16 accesses {scalar16:4d}  regs {regs:>4}  "
          f"stack {spill}")
    if verbose:
        for line in ptx.splitlines():
            if any(s in line for s in ("atom", "globaltimer", "ld.volatile", "st.global.v4")):
                print("     ", line.strip())


def main():
    verbose = "-v" in sys.argv
    driver.set_active(_Sm90Driver())
    from tpcomm.kernels import (all_gather, all_reduce_one_shot, all_reduce_ring,
                                all_reduce_two_shot, barrier, reduce_scatter)
    R = 4
    addrs = tuple(0x7F0000000000 + i * (1 << 30) for i in range(R))
    mine, nxt = addrs[1], addrs[2]
    cnt = torch.zeros(256, dtype=torch.int64)
    err = torch.zeros(1, dtype=torch.int64)
    host = 0x7E0000000000
    itypes = {torch.bfloat16: (tl.int16, 0x7FC0), torch.float16: (tl.int16, 0x7E00),
              torch.float32: (tl.int32, 0x7FC00000)}
    for dtype, (itype, canon) in itypes.items():
        item = torch.tensor([], dtype=dtype).element_size()
        block = 8 * 32 * (16 // item)
        for n in (4096, 4097):
            inp = torch.empty(n + 8, dtype=dtype)
            out = torch.empty(n + 8, dtype=dtype)
            print(f"{dtype} n={n}:")
            common = dict(grid=(132,), num_warps=8)
            k = all_reduce_one_shot._all_reduce_one_shot_push_kernel.warmup(
                inp, out, n, addrs, mine, 1 << 24, 1 << 20, cnt, err, host, 1, 10**9,
                R=R, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item, **common)
            _report("all_reduce_one_shot_push", k, verbose)
            for mode in (0, 1, 2):
                k = all_reduce_one_shot._all_reduce_one_shot_pull_kernel.warmup(
                    inp, out, n, addrs, mine, 1 << 22, addrs, mine, cnt, err, host, 1, 10**9,
                    MODE=mode, R=R, RP=8, BLOCK=block, **common)
                _report(f"all_reduce_one_shot_pull MODE={mode}", k, verbose)
            sl = -(-(-(-n // R)) // 16) * 16
            k = all_reduce_two_shot._all_reduce_two_shot_push_kernel.warmup(
                inp, out, n, sl, addrs, mine, 1 << 24, 1 << 20, 1 << 23, cnt, err, host, 1, 10**9,
                R=R, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item, **common)
            _report("all_reduce_two_shot_push", k, verbose)
            k = all_reduce_ring._all_reduce_ring_push_kernel.warmup(
                inp, out, n, sl, nxt, mine, 1 << 24, 1 << 23, cnt, err, host, 1, 10**9,
                R=R, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item, **common)
            _report("all_reduce_ring_push", k, verbose)
            k = reduce_scatter._reduce_scatter_push_kernel.warmup(
                inp, out, n // R, n // R, addrs, mine, 1 << 24, 1 << 20, cnt, err, host, 1, 10**9,
                R=R, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item, **common)
            _report("reduce_scatter_push", k, verbose)
            k = all_gather._all_gather_push_kernel.warmup(
                inp, out, n // R, n // R, addrs, mine, 1 << 24, 1 << 20, cnt, err, host, 1, 10**9,
                R=R, BLOCK=block, ITYPE=itype, CANON=canon, ITEM=item, **common)
            _report("all_gather_push", k, verbose)
    k = barrier._barrier_kernel.warmup(addrs, mine, cnt, err, host, 1, 10**9, SLOT=512, R=R,
                                       RP=8, grid=(1,), num_warps=1)
    _report("barrier", k, verbose)
    k = barrier._write_word_kernel.warmup(host, 5, grid=(1,), num_warps=1)
    _report("write_word", k, verbose)


if __name__ == "__main__":
    main()
