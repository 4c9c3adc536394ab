"""Several ranks' symmetric buffers in ONE process on ONE device: emulated ranks.

What the GPU backend needs from a buffer (``rank``, ``world_size``, ``device``, ``buffer_ptrs``,
``signal_pad_ptrs``, ``signal_pad(peer)``, ``local_data()``), over plain tensors of one device
instead of memory mapped from other processes. Each emulated rank gets its own
:class:`~tpcomm.cuda.p2p_collectives.P2PCollectives` over such a buffer, and the kernels reach the other
ranks' buffers through raw addresses exactly as they reach peers through NVLink.

Used by the protocol tests under Triton's CPU interpreter (ranks are threads over CPU tensors,
``tests/unit/gpu_protocol_sim.py``) and by ``scripts/gpu_emulated_ranks.py`` (ranks are CUDA
streams of one GPU: the kernels compiled for the GPU, its memory model between the SMs of one
chip, CUDA-graph replays; not NVLink, not separate processes, and no timing claim).
"""
from __future__ import annotations

import torch

PAD_ALIGN = 4096


class EmulatedBuffer:
    """Rank ``rank``'s view of ``tensors`` (one uint8 tensor per rank: pad, then data)."""

    def __init__(self, rank: int, tensors: list[torch.Tensor], pad_nbytes: int):
        self.rank, self.world_size = rank, len(tensors)
        self.device = tensors[0].device
        self.signal_pad_nbytes = pad_nbytes
        self._t = tensors
        self.signal_pad_ptrs = [t.data_ptr() for t in tensors]
        self.buffer_ptrs = [p + pad_nbytes for p in self.signal_pad_ptrs]

    def signal_pad(self, peer: int) -> torch.Tensor:
        return self._t[peer][: self.signal_pad_nbytes].view(torch.int64)

    def local_data(self) -> torch.Tensor:
        return self._t[self.rank][self.signal_pad_nbytes:]

    def close(self) -> None:
        pass


def make_emulated_group(world: int, max_bytes: int, grid: int, *, device="cpu",
                        timeout_s: float = 20.0, num_warps: int | None = None):
    """``world`` GPU backends over emulated buffers on ``device``; returns (backends, tensors).

    ``grid``: blocks of every kernel (keep ``world * grid`` small enough for all ranks' blocks
    to be resident at once on a GPU: the kernels wait for each other)."""
    from .p2p_collectives import NUM_WARPS, Layout, P2PCollectives
    layout = Layout.make(world, max_bytes, grid)
    pad = -(-layout.pad_bytes // PAD_ALIGN) * PAD_ALIGN
    tensors = []
    for _ in range(world):
        t = torch.empty(pad + layout.data_bytes, dtype=torch.uint8, device=device)
        t[:pad].zero_()
        t[pad:].fill_(0xFF)
        tensors.append(t)
    warps = num_warps if num_warps is not None else NUM_WARPS
    backs = [P2PCollectives(EmulatedBuffer(r, tensors, pad), layout, timeout_s, max_bytes,
                            num_warps=warps) for r in range(world)]
    return backs, tensors
