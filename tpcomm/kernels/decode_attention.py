"""Decode attention over a static KV cache, up to the filled length read on the device (flash
decoding), with the step's RoPE and cache write folded in.

Problem: a decode step that is captured in a CUDA graph must have static shapes, so the model
cannot slice its preallocated cache to the filled length on the host; attending over the whole
cache with a mask reads every position, and torch's masked attention with grouped KV heads
(GQA) runs its slower paths: at batch 8 and a 1k context that cost 1.0 ms per Llama-3-8B step
on an H200 where reading the cache once takes about 0.25 ms. Around it, RoPE of q and k and the
two cache writes are small kernels of their own, one launch each per layer.

Algorithm: one kernel (the split kernel, whose last program per (sequence, head) combines);
the position ``pos`` of this step's token is read on the device, so one graph serves every step.

1. ``_decode_attention_split_kernel``, grid (B * HK, SPLITS): program (b, h, s) takes the G =
   HQ / HK query heads that share KV head h (GQA: K and V are read once for all of them, never
   repeated) from the fused q|k|v projection row of sequence b, applies RoPE to them, and
   attends over the cache positions ``[s * split_len, (s + 1) * split_len)`` below ``pos`` in
   blocks of BLOCK_N: scores = q K^T * scale (float32), online softmax (running max m, sum l),
   acc += p V. The program whose range holds ``pos`` also ropes this step's k, stores it and v
   into the cache at ``pos``, and adds that position from registers (no read after its own
   write). It writes its unnormalized acc [G, D] and (m, l); a split past ``pos`` writes
   (-inf, 0, 0) at once: only the filled part of the cache is read.
2. The combine, by the last split program of (b, h) to finish: out = sum_s e^(m_s - M) acc_s /
   sum_s e^(m_s - M) l_s with M = max_s m_s (splits that saw nothing weigh 0). Until
   2026-12-03 it was a second kernel, grid (B * HK,), one launch per layer and step (32 per
   Llama-3-8B step); ``fold_combine=False`` still runs it that way (the sweep's yardstick).
   The combine loads COMBINE_CHUNK splits' partials as one tile (their loads in flight
   together: one L2 latency per chunk, not one per split). With one split per (b, h)
   (programs per SM 0) there is nothing to combine: the program writes out itself (DIRECT),
   no partials, no counter.

   Who combines (the last-block pattern of CUDA's threadFenceReduction sample and CUTLASS's
   semaphore): ``counters`` is an int32 per (b, h) in GPU memory, 0 between launches::

       every program:  store its partials (acc, m, l)
                       barrier (all its threads' stores before the next line)
                       done = atomic_add(counters[b, h], 1)   # acq_rel, gpu scope, one thread
                       if done == splits - 1:                 # the last one: all partials
                           counters[b, h] = 0                 # written and visible (acquire)
                           combine (partials read past L1: .cg)

   The last program resets its counter, which nobody touches again in this launch, so the
   next launch (or graph replay) starts from 0 again with no memset; a launch that runs to its
   end always resets every counter it used. Two launches must not share ``counters`` at the
   same time (the model gives each layer its own; launches on one stream run one after
   another).

RoPE (rotate-half layout, as Hugging Face): x' = x * cos + rotate_half(x) * sin, computed in
float32 and rounded once. The split count is fixed by the launcher from the cache length and
the SM count (a few programs per SM), so one grid serves every step of a graph; the block
size, programs per SM, warps, pipeline stages (K and V tiles in flight per program) and
combine chunk come from a small table by batch size (``TUNED``, measured).

Shapes: qkv [B, (HQ + 2 HK) * D] (rows contiguous: q heads, then k, then v); cos, sin [D] (this
step's position); k_cache, v_cache [>= B, HK, S, D] (D contiguous), written at ``pos``; pos:
int64 [1] on the device; out [B, HQ, D], the dtype of qkv; counters int32 [>= B * HK], zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tile_sync import last_to_arrive

BLOCK_N = 64          # cache positions per step of a program (64 x 128 bf16 = 16 KiB of K)
PROGRAMS_PER_SM = 2   # enough split programs to keep every SM reading the cache
NUM_STAGES = 3        # K and V tiles in flight per program (Triton's software pipeline; its default)
COMBINE_CHUNK = 1     # partials the combining program loads before it adds them (1: one by one)
MAX_SPLITS = 64
# (block_n, programs per SM, warps, pipeline stages, combine chunk) by batch size: the entry of
# the largest batch <= B. Measured on one H200, 2026-12-03 (scripts/gpu_decode_attention.py
# --sweep, first round; Llama-3-8B layer at world 1, 32 q / 8 KV heads, D 128,
# bf16, the bench's cache of 1092 positions filled to 1028..1085, us per layer, median of 10
# graph replays of 32 layers): batch 1 best at (128, 2, 8, 3, 1), 7.5 us; batches 2, 4 and 8
# at (64, 1, 4, 3, 1): 10.3, 11.8 and 15.7 us (batch 1's point, which batches 2-7 took
# before: 12.6, 18.1, 21.4 us); batch 16 at one split per (sequence, head), (128, 0, 8, 3, 1),
# 22.8 us (23.7 at (64, 1, 4, 3, 1)). Past batch 16 one split is all there is at any point
# (more (sequence, head) pairs than SMs); the 64-block point keeps three programs per SM
# (70 KiB of shared memory each, against 136 KiB at 128 positions), not measured there.
# Neither pipeline depth (2 to 6 stages) nor a combine chunk > 1 helped at any batch: a
# chunk of 8 cost 1.5 to 9 us (more with 8 warps), so the combine adds partials one by one.
# 16-bit caches only: a float32 tile of 128 positions x 128 is twice the shared memory of the
# measured ones (three pipeline stages of K and V tiles: 384 KiB, more than an SM has), so
# float32 keeps (BLOCK_N, PROGRAMS_PER_SM, 4, NUM_STAGES, COMBINE_CHUNK), 192 KiB.
TUNED = ((1, (128, 2, 8, 3, 1)), (2, (64, 1, 4, 3, 1)), (16, (128, 0, 8, 3, 1)),
         (17, (64, 1, 4, 3, 1)))


def tuned_constants(batch: int, element_size: int = 2) -> tuple[int, int, int, int, int]:
    """(block_n, programs_per_sm, num_warps, num_stages, combine_chunk) for ``batch``
    sequences of a cache of ``element_size``-byte values (the table ``TUNED``; 4-byte values:
    the defaults)."""
    if element_size > 2:
        return BLOCK_N, PROGRAMS_PER_SM, 4, NUM_STAGES, COMBINE_CHUNK
    point = TUNED[0][1]
    for b, p in TUNED:
        if batch >= b:
            point = p
    return point


@triton.jit
def _rope(ptr, d, dm, cos, sin, HALF: tl.constexpr, D: tl.constexpr):
    """x * cos + rotate_half(x) * sin for the D values at ``ptr`` (float32)."""
    x = tl.load(ptr + d, mask=dm, other=0.0).to(tl.float32)
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    xp = tl.load(ptr + partner, mask=dm, other=0.0).to(tl.float32)
    return x * cos + tl.where(d < HALF, -xp, xp) * sin


@triton.jit
def _decode_attention_split_kernel(
        qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, pos_ptr, part_o_ptr, part_ml_ptr, out_ptr,
        count_ptr, sm_scale, split_len, splits, stride_qkv, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, HQ: tl.constexpr,
        HK: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, G_C: tl.constexpr,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
        CHUNK: tl.constexpr, COMBINE: tl.constexpr,
        DIRECT: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = (bh // HK).to(tl.int64)      # 64-bit offsets: a cache may pass 2^31 elements
    h = bh % HK
    HALF: tl.constexpr = D // 2
    pos = tl.load(pos_ptr).to(tl.int32)
    start = sp * split_len
    end = tl.minimum(start + split_len, pos)          # cached positions of this split
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    gd_mask = gm[:, None] & dm[None, :]
    cos = tl.load(cos_ptr + d, mask=dm, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + d, mask=dm, other=0.0).to(tl.float32)
    row = qkv_ptr + b * stride_qkv
    # q of the G heads of this KV head, roped, in the input dtype (what attention multiplies)
    q_cols = (h * G + g)[:, None] * D
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    qx = tl.load(row + q_cols + d[None, :], mask=gd_mask, other=0.0).to(tl.float32)
    qp = tl.load(row + q_cols + partner[None, :], mask=gd_mask, other=0.0).to(tl.float32)
    q = qx * cos[None, :] + tl.where((d < HALF)[None, :], -qp, qp) * sin[None, :]
    q = q.to(qkv_ptr.dtype.element_ty)
    # this step's k and v, read before the loop (their latency hidden behind it) by the one
    # program whose range holds pos
    mine = (pos >= start) & (pos < start + split_len)
    k_new = _rope(row + (HQ + h) * D, d, dm & mine, cos, sin, HALF, D).to(k_ptr.dtype.element_ty)
    v_new = tl.load(row + (HQ + HK + h) * D + d, mask=dm & mine, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):     # blocks past the length: nothing is read
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < end
        kv_mask = nm[:, None] & dm[None, :]
        k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        s = tl.where(nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if mine:   # this step's token: store, attend
        tl.store(k_base + pos * stride_ks + d, k_new, mask=dm)
        tl.store(v_base + pos * stride_vs + d, v_new.to(v_ptr.dtype.element_ty), mask=dm)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * sm_scale
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp(m_i - m_new)
        p_new = tl.exp(s_new - m_new)
        l_i = l_i * alpha + p_new
        p_new = p_new.to(v_ptr.dtype.element_ty).to(tl.float32)   # as the tiles' p V
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
    if DIRECT:   # one split: no partials, no combine (the same bits: its weight is exp(0) = 1)
        out = acc / tl.where(gm, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + (h * G + g)[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        prow = bh * splits + sp
        tl.store(part_o_ptr + (prow * G + g)[:, None] * D + d[None, :], acc, mask=gd_mask)
        tl.store(part_ml_ptr + (prow * 2) * G + g, m_i, mask=gm)
        tl.store(part_ml_ptr + (prow * 2 + 1) * G + g, l_i, mask=gm)
    if COMBINE:   # the last program of (b, h) to get here combines (module docstring)
        if last_to_arrive(count_ptr + bh, splits):      # and has reset the counter
            _combine(part_o_ptr, part_ml_ptr, out_ptr, bh, splits, stride_ob, stride_oh,
                     HK, G, G_C, D, BLOCK_D, CHUNK)


@triton.jit
def _combine(part_o_ptr, part_ml_ptr, out_ptr, bh, splits, stride_ob, stride_oh,
             HK: tl.constexpr, G: tl.constexpr, G_C: tl.constexpr, D: tl.constexpr,
             BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """out[b, h * G:(h + 1) * G] of the ``splits`` partials of (b, h) = ``bh`` (G_C: G to a
    power of two, rows of the tiles here). The partials are loaded with .cg (from L2, never a
    line this SM's L1 kept from an earlier launch), CHUNK splits at a time as one tile
    ([CHUNK, G_C, D]: the loads of a chunk are in flight together, one latency per chunk
    instead of one per split; with splits <= CHUNK the whole combine waits on one). The
    chunks are added with a running maximum (a later chunk with a larger m rescales what is
    summed); split 0 always holds position 0, so the first chunk's maximum is finite. A
    chunk's splits are summed by ``tl.sum`` (its order follows the tile's layout: the same
    code at the same warps gives the same bits, so the launcher runs the two-kernel form's
    combine at the split kernel's warps)."""
    b = bh // HK
    h = bh % HK
    g = tl.arange(0, G_C)
    d = tl.arange(0, BLOCK_D)
    j = tl.arange(0, CHUNK)
    gm = g < G
    dm = d < D
    big = tl.full([G_C], float("-inf"), tl.float32)
    acc = tl.zeros([G_C, BLOCK_D], tl.float32)
    l_sum = tl.zeros([G_C], tl.float32)
    for c in range(0, splits, CHUNK):
        rows = bh * splits + c + j                                       # [CHUNK]
        ok = ((c + j) < splits)[:, None] & gm[None, :]                   # [CHUNK, G_C]
        m_c = tl.load(part_ml_ptr + (rows * 2)[:, None] * G + g[None, :], mask=ok,
                      other=float("-inf"), cache_modifier=".cg")
        l_c = tl.load(part_ml_ptr + (rows * 2 + 1)[:, None] * G + g[None, :], mask=ok,
                      other=0.0, cache_modifier=".cg")
        o_c = tl.load(part_o_ptr + ((rows[:, None] * G + g[None, :]) * D)[:, :, None]
                      + d[None, None, :], mask=ok[:, :, None] & dm[None, None, :], other=0.0,
                      cache_modifier=".cg")                             # [CHUNK, G_C, BLOCK_D]
        new = tl.where(gm, tl.maximum(big, tl.max(m_c, 0)), 0.0)        # finite (see above)
        scale = tl.exp(big - new)              # 0 at the first chunk (big -inf), else <= 1
        w_c = tl.where(ok, tl.exp(m_c - new[None, :]), 0.0)
        acc = acc * scale[:, None] + tl.sum(w_c[:, :, None] * o_c, 0)
        l_sum = l_sum * scale + tl.sum(w_c * l_c, 0)
        big = new
    out = acc / tl.where(gm, l_sum, 1.0)[:, None]
    tl.store(out_ptr + b * stride_ob + (h * G + g)[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])


@triton.jit
def _decode_attention_combine_kernel(
        part_o_ptr, part_ml_ptr, out_ptr, splits, stride_ob, stride_oh,
        HK: tl.constexpr, G: tl.constexpr, G_C: tl.constexpr, D: tl.constexpr,
        BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """The combine as a kernel of its own, grid (B * HK,) (``fold_combine=False``)."""
    _combine(part_o_ptr, part_ml_ptr, out_ptr, tl.program_id(0), splits, stride_ob, stride_oh,
             HK, G, G_C, D, BLOCK_D, CHUNK)


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    n = _SMS.get(device)
    if n is None:
        n = _SMS[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                            if device.type == "cuda" else 8)
    return n


def plan_splits(batch: int, kv_heads: int, cache_len: int, sms: int, *,
                block_n: int = BLOCK_N, programs_per_sm: int = PROGRAMS_PER_SM
                ) -> tuple[int, int]:
    """(splits, split_len): about ``programs_per_sm`` programs per SM over the batch *
    kv_heads (sequence, head) pairs, each split a whole number of ``block_n`` blocks;
    ``programs_per_sm`` 0: one split per pair (the kernel then writes out directly)."""
    if programs_per_sm < 0:
        raise ValueError(f"programs_per_sm must be >= 0, got {programs_per_sm}")
    want = max(1, -(-programs_per_sm * sms // max(batch * kv_heads, 1)))
    splits = min(want, MAX_SPLITS, max(1, -(-cache_len // block_n)))
    split_len = -(-(-(-cache_len // splits)) // block_n) * block_n
    return -(-cache_len // split_len), split_len


def decode_attention_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          out: torch.Tensor, sm_scale: float, *,
                          counters: torch.Tensor | None = None, fold_combine: bool = True,
                          block_n: int | None = None, programs_per_sm: int | None = None,
                          num_warps: int | None = None, num_stages: int | None = None,
                          combine_chunk: int | None = None) -> None:
    """RoPE of this step's q and k, k and v into the cache at ``pos``, out = softmax(q K^T *
    sm_scale) V over cache positions [0, pos] (shapes: the module docstring).

    ``counters``: int32 zeros [>= B * HK] on qkv's device, kept by the caller and left zero
    by every launch (one set per concurrent launch; the model keeps one per layer); None
    allocates zeros per call (one memset more). ``fold_combine=False``: the combine as a second
    kernel (what the kernel did before 2026-12-03; launched with the same warps, it gives the
    same bits). The other keywords override the tuning constants, which otherwise come from
    ``TUNED`` by batch size (``scripts/gpu_decode_attention.py --sweep`` measures them):
    ``num_stages`` K and V tiles in flight per program, ``combine_chunk`` partials loaded at
    once by the combine (a power of two)."""
    B = qkv.shape[0]
    t_block_n, t_programs, t_warps, t_stages, t_chunk = tuned_constants(
        B, k_cache.element_size())
    block_n = t_block_n if block_n is None else block_n
    programs_per_sm = t_programs if programs_per_sm is None else programs_per_sm
    num_warps = t_warps if num_warps is None else num_warps
    num_stages = t_stages if num_stages is None else num_stages
    combine_chunk = t_chunk if combine_chunk is None else combine_chunk
    if combine_chunk < 1 or combine_chunk & (combine_chunk - 1) or num_stages < 1:
        raise ValueError(f"decode attention: combine_chunk must be a power of two and "
                         f"num_stages >= 1, got {combine_chunk} and {num_stages}")
    HK, S, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    HQ = qkv.shape[1] // D - 2 * HK
    G = HQ // HK
    splits, split_len = plan_splits(B, HK, S, _sm_count(qkv.device), block_n=block_n,
                                    programs_per_sm=programs_per_sm)
    if not fold_combine:
        counters = pos    # not read (COMBINE off): any pointer
    elif counters is None:
        counters = torch.zeros(B * HK, dtype=torch.int32, device=qkv.device)
    elif (counters.dtype != torch.int32 or counters.device != qkv.device
          or counters.numel() < B * HK):
        raise ValueError(f"decode attention: counters must be int32 [>= {B * HK}] on "
                         f"{qkv.device}, got {counters.dtype} [{counters.numel()}] on "
                         f"{counters.device}")
    part_o = torch.empty(B * HK * splits * G * D, dtype=torch.float32, device=qkv.device)
    part_ml = torch.empty(B * HK * splits * 2 * G, dtype=torch.float32, device=qkv.device)
    G_PAD = max(16, triton.next_power_of_2(G))     # rows of tl.dot
    G_C = triton.next_power_of_2(G)                # rows of the combine
    BLOCK_D = max(16, triton.next_power_of_2(D))
    precision = "ieee" if qkv.dtype == torch.float32 else "tf32"
    _decode_attention_split_kernel[(B * HK, splits)](
        qkv, cos, sin, k_cache, v_cache, pos, part_o, part_ml, out, counters, sm_scale,
        split_len, splits, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), HQ=HQ, HK=HK, G=G, G_PAD=G_PAD, G_C=G_C, D=D,
        BLOCK_D=BLOCK_D, BLOCK_N=block_n, PRECISION=precision,
        CHUNK=combine_chunk, COMBINE=fold_combine and splits > 1,
        DIRECT=fold_combine and splits == 1, num_warps=num_warps, num_stages=num_stages)
    if not fold_combine:
        _decode_attention_combine_kernel[(B * HK,)](
            part_o, part_ml, out, splits, out.stride(0), out.stride(1),
            HK=HK, G=G, G_C=G_C, D=D, BLOCK_D=BLOCK_D,
            CHUNK=combine_chunk, num_warps=num_warps)
