"""The data-moving P2P probe: every rank stores a known pattern into every peer's buffer through
the peer mapping, then checks what arrived and what it can load back.

Probe area (the same offset in every rank's data region; int32 words)::

    rank r's probe area:  | slot 0 | slot 1 | ... | slot R-1 |     slot_words words each
                             ^ written by rank 0 (remote store), ..., slot r by r itself

    word i of slot w in rank r's area = pattern(w, r, i, nonce)

- :func:`p2p_probe_write` (rank w): for every rank q, slot w of q's area <- pattern(w, q, i,
  nonce), through w's mapping of q.
- :func:`p2p_probe_read` (rank r): counts[0][w] = words of slot w of r's own area that differ
  from pattern(w, r, ., nonce) (did w's remote stores land here?); counts[1][q] = words of slot q
  of q's area, loaded through r's mapping of q, that differ from pattern(q, q, ., nonce) (do r's
  remote loads reach q's memory? q wrote that slot itself, so a mapping that reaches the wrong
  buffer cannot agree with itself).

The pattern is 31 bits, never the all-ones fill of the data region (a store that never landed is
seen), distinct for every (writer, reader) pair and every word (a store that landed in another
rank's area or at another offset is seen), and changes with the nonce (stale data from an earlier
probe is seen). No kernel waits for a peer: the caller separates the write and read phases with a
host-side barrier after both kernels completed, so nothing here can hang.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._lamport import typed

BLOCK = 1024     # int32 words per program: 4 KiB
NUM_WARPS = 4


@triton.jit
def pattern(writer, reader, idx, nonce):
    """31-bit word ``idx`` that ``writer`` stores for ``reader`` (int32, never -1).

    (writer * 256 + reader) * odd and idx * odd are injective mod 2^31 for ranks < 256 and
    idx < 2^31; the xor-shift-multiply mix is a bijection on 31 bits, so distinct inputs stay
    distinct."""
    pair = (writer.to(tl.int64) * 256 + reader) * 0x10001
    x = (pair + idx.to(tl.int64) * 0x61C88647 + nonce) & 0x7FFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & 0x7FFFFFFF
    x = x ^ (x >> 16)
    return x.to(tl.int32)


@triton.jit(do_not_specialize=["rank"])
def _p2p_probe_write_kernel(probe_addrs, slot_words, rank, nonce, R: tl.constexpr,
                            BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < slot_words
    for q in tl.static_range(R):
        dst = typed(probe_addrs[q], tl.int32) + rank * slot_words + offs
        tl.store(dst, pattern(offs * 0 + rank, q, offs, nonce), mask=mask)


@triton.jit(do_not_specialize=["rank"])
def _p2p_probe_read_kernel(probe_addrs, my_probe_addr, slot_words, rank, nonce, counts_ptr,
                           R: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < slot_words
    mine = typed(my_probe_addr, tl.int32)
    for q in tl.static_range(R):
        # what rank q stored into this rank's area
        got = tl.load(mine + q * slot_words + offs, mask=mask, other=0, volatile=True)
        want = pattern(offs * 0 + q, offs * 0 + rank, offs, nonce)
        bad = tl.sum(((got != want) & mask).to(tl.int32), 0)
        tl.atomic_add(counts_ptr + q, bad, sem="relaxed")
        # what rank q stored into its own area, loaded through this rank's mapping of q
        got = tl.load(typed(probe_addrs[q], tl.int32) + q * slot_words + offs, mask=mask,
                      other=0, volatile=True)
        want = pattern(offs * 0 + q, offs * 0 + q, offs, nonce)
        bad = tl.sum(((got != want) & mask).to(tl.int32), 0)
        tl.atomic_add(counts_ptr + R + q, bad, sem="relaxed")


def slot_words(probe_nbytes: int, world: int) -> int:
    """int32 words per slot of a probe area of ``probe_nbytes`` (a multiple of 4 words, so every
    slot starts 16-byte aligned)."""
    return probe_nbytes // world // 16 * 4


def p2p_probe_write(probe_addrs: tuple, slot_words: int, rank: int, nonce: int, *,
                    block: int = BLOCK, num_warps: int = NUM_WARPS) -> None:
    """Store this rank's pattern into slot ``rank`` of every rank's probe area.

    ``probe_addrs``: rank -> address of its probe area as mapped on this device (16-byte
    aligned); ``nonce``: the same 31-bit value on every rank."""
    grid = (triton.cdiv(slot_words, block),)
    _p2p_probe_write_kernel[grid](tuple(probe_addrs), slot_words, rank, nonce,
                                  R=len(probe_addrs), BLOCK=block, num_warps=num_warps)


def p2p_probe_read(probe_addrs: tuple, slot_words: int, rank: int, nonce: int,
                   counts: torch.Tensor, *, block: int = BLOCK,
                   num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Count wrong words per source rank into ``counts`` (int32, 2 x R, zeroed here): row 0 the
    words each rank stored into this rank's area, row 1 the words loaded from each rank's own
    slot through this rank's mapping. Returns ``counts``; read it after the kernel completed."""
    R = len(probe_addrs)
    if counts.dtype != torch.int32 or counts.numel() != 2 * R or not counts.is_contiguous():
        raise ValueError(f"counts must be a contiguous int32 tensor of 2 x {R} elements")
    counts.zero_()
    grid = (triton.cdiv(slot_words, block),)
    _p2p_probe_read_kernel[grid](tuple(probe_addrs), probe_addrs[rank], slot_words, rank, nonce,
                                 counts, R=R, BLOCK=block, num_warps=num_warps)
    return counts
