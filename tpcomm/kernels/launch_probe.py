"""Kernels that do nothing, for ``tpcomm bench host``: the host cost of a Triton launch alone.

``_empty1_kernel`` takes one pointer; ``_args16_kernel`` takes what a collective kernel takes
(4 pointers, 8 int64 addresses, 4 ints: 16 arguments) and stores nothing unless FLAG is 1
(never, in the benchmark), so that no argument is optimized away.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _empty1_kernel(x_ptr):
    pass


@triton.jit(do_not_specialize=["rank"])
def _args16_kernel(p0, p1, p2, p3, a0, a1, a2, a3, a4, a5, a6, a7, n, stride, rank, flag):
    if flag == 1:
        s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + n + stride + rank
        tl.store(p0, s.to(p0.dtype.element_ty))
        tl.store(p1, tl.load(p2) + tl.load(p3))


def args16(p: tuple, addrs: tuple, n: int, stride: int, rank: int):
    """The 16-argument kernel through Triton's dispatcher; returns its CompiledKernel."""
    return _args16_kernel[(1,)](*p, *addrs, n, stride, rank, 0, num_warps=1)


def empty1(x):
    """The one-argument kernel through Triton's dispatcher; returns its CompiledKernel."""
    return _empty1_kernel[(1,)](x, num_warps=1)
