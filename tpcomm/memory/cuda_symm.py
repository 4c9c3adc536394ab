"""GPU symmetric buffers on torch's symmetric memory (the one module that knows the provider).

One allocation per rank, mapped by every peer through NVLink P2P, laid out as::

    +--------------------------+  <- base (same offset on every rank)
    | signal pad               |  signal_pad_nbytes, zeroed at set-up
    +--------------------------+  <- base + signal_pad_nbytes (4 KiB aligned)
    | data region              |  nbytes, filled with ``data_fill`` (a byte) at set-up
    +--------------------------+

The signal pad is carved from our own allocation rather than taken from torch's per-allocation
pad, so its size and contents are ours on every torch version and provider. Kernels get plain
integer addresses (``buffer_ptrs`` / ``signal_pad_ptrs``: rank -> address valid on this GPU) and
the device-side tables ``buffer_ptrs_dev`` / ``signal_pad_ptrs_dev`` (int64 tensors).

Provider: ``torch.distributed._symmetric_memory`` on its "CUDA" backend (cuMem* allocations
exchanged as POSIX file descriptors, peers mapped with cuMemMap: plain P2P pointers that Triton
loads from and stores to). If torch already brought symmetric memory up on another backend
(NVSHMEM) in this process, that backend is used as it is: its peer pointers are P2P-mapped too.
Multicast (NVLS) objects are never asked for; TORCH_SYMM_MEM_DISABLE_MULTICAST=1 keeps torch
from creating them behind our back.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ..errors import TpcommError
from ..groups.group import GroupInfo, GroupStore
from .base import SymmetricBuffer

PAD_ALIGN = 4096


def _symm_mem():
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError as e:  # a torch without symmetric memory
        raise TpcommError(f"torch {torch.__version__} has no symmetric memory: {e}") from e
    return symm_mem


def _select_cuda_backend(symm_mem, device: torch.device) -> str:
    """Ask for the CUDA (P2P) backend if nothing was allocated yet; return the one in use."""
    get_backend = getattr(symm_mem, "get_backend", None)
    set_backend = getattr(symm_mem, "set_backend", None)
    current = None
    if get_backend is not None:
        try:
            current = get_backend(device)
        except Exception:  # noqa: BLE001 - older torch: no backend registry per device
            current = None
    if current is None and set_backend is not None:
        try:
            set_backend("CUDA")
        except Exception:  # noqa: BLE001 - already fixed by an earlier allocation
            pass
    if get_backend is not None:
        try:
            return str(get_backend(device))
        except Exception:  # noqa: BLE001
            pass
    return "CUDA"


class TorchSymmetricBuffer(SymmetricBuffer):
    """A symmetric buffer of ``nbytes`` data bytes plus a ``signal_pad_nbytes`` pad per rank.

    Collective: every rank of ``info``'s group creates it with the same sizes, in the same
    order relative to other tpcomm objects on the group.
    """

    def __init__(self, info: GroupInfo, nbytes: int, signal_pad_nbytes: int,
                 device: torch.device, timeout_s: float = 60.0, data_fill: int | None = None):
        if device.type != "cuda":
            raise ValueError(f"TorchSymmetricBuffer needs a CUDA device, got {device}")
        symm_mem = _symm_mem()
        self.rank, self.world_size = info.rank, info.world_size
        self.device = device
        self.signal_pad_nbytes = -(-signal_pad_nbytes // PAD_ALIGN) * PAD_ALIGN
        self.nbytes = -(-nbytes // PAD_ALIGN) * PAD_ALIGN
        self._closed = False
        total = self.signal_pad_nbytes + self.nbytes
        with torch.cuda.device(device):
            self.provider = _select_cuda_backend(symm_mem, device)
            self._tensor = self._allocate(symm_mem, total, device)
            group_name = info.group.group_name
            enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
            if enable is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    enable(group_name)
            # pad zeroed, data filled, before any peer can see the memory
            self._tensor[: self.signal_pad_nbytes].zero_()
            if data_fill is not None:
                self._tensor[self.signal_pad_nbytes:].fill_(data_fill)
            torch.cuda.synchronize(device)
            self._handle = symm_mem.rendezvous(self._tensor, group_name)
            ptrs = [int(p) for p in self._handle.buffer_ptrs]
            # our tensor may sit at an offset inside the provider's block (pooled allocators);
            # every rank must see the same offset, or the peer addresses below would be wrong
            delta = self._tensor.data_ptr() - ptrs[self.rank]
            store = GroupStore(info, "cuda_symm", timeout_s)
            deltas = [int(v) for v in store.all_gather("delta", str(delta))]
            if len(set(deltas)) != 1 or delta < 0:
                raise TpcommError(f"symmetric buffer offsets differ across ranks ({deltas}); "
                                  f"cannot address peers' buffers")
            self.base_ptrs = [p + delta for p in ptrs]
            self.signal_pad_ptrs = list(self.base_ptrs)
            self.buffer_ptrs = [p + self.signal_pad_nbytes for p in self.base_ptrs]
            self.buffer_ptrs_dev = torch.tensor(self.buffer_ptrs, dtype=torch.int64, device=device)
            self.signal_pad_ptrs_dev = torch.tensor(self.signal_pad_ptrs, dtype=torch.int64,
                                                    device=device)
            self._peer_tensors: dict[int, torch.Tensor] = {}
            # everyone's memory is initialized before anyone uses it
            store.barrier("ready")

    @staticmethod
    def _allocate(symm_mem, total: int, device: torch.device) -> torch.Tensor:
        # Prefer a dedicated allocation (the tensor starts at the block's base); fall back to the
        # public ``empty`` (which may pool).
        raw = getattr(getattr(symm_mem, "_SymmetricMemory", None), "empty_strided_p2p", None)
        if raw is not None:
            try:
                return raw((total,), (1,), torch.uint8, device)
            except Exception:  # noqa: BLE001 - signature differs across torch versions
                pass
        return symm_mem.empty(total, dtype=torch.uint8, device=device)

    # ---------------------------------------------------------------- SymmetricBuffer
    def _peer(self, peer: int) -> torch.Tensor:
        t = self._peer_tensors.get(peer)
        if t is None:
            if peer == self.rank:
                t = self._tensor
            else:
                t = self._handle.get_buffer(peer, (self.signal_pad_nbytes + self.nbytes,),
                                            torch.uint8, 0)
                if t.data_ptr() != self.base_ptrs[peer]:
                    raise TpcommError("torch's get_buffer returned an unexpected address for "
                                      f"peer {peer}")
            self._peer_tensors[peer] = t
        return t

    def data(self, peer: int) -> torch.Tensor:
        self._check_open()
        return self._peer(peer)[self.signal_pad_nbytes:]

    def signal_pad(self, peer: int) -> torch.Tensor:
        self._check_open()
        return self._peer(peer)[: self.signal_pad_nbytes].view(torch.int64)

    def local_data(self) -> torch.Tensor:
        """This rank's data region (uint8), for views handed to users (zero-copy)."""
        self._check_open()
        return self._tensor[self.signal_pad_nbytes:]

    def _check_open(self):
        if self._closed:
            raise TpcommError("symmetric buffer is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Drop every reference to the allocation and the peers' mappings.

        Peers keep their own mappings (and the physical memory alive) until they close too, so
        no rank frees memory a peer still reads.
        """
        if self._closed:
            return
        self._closed = True
        try:
            torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - a failed context: nothing more we can do
            pass
        self._peer_tensors.clear()
        self.buffer_ptrs_dev = self.signal_pad_ptrs_dev = None
        self._handle = None
        self._tensor = None


def p2p_reason(info: GroupInfo, device: torch.device) -> str | None:
    """None when every pair of GPUs in the group can map each other's memory, else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not dist.is_available():
        return "torch.distributed is not available"
    local = torch.cuda.device_count()
    me = device.index if device.index is not None else torch.cuda.current_device()
    for other in range(local):
        if other != me and not torch.cuda.can_device_access_peer(me, other):
            return f"GPU {me} cannot access GPU {other} peer-to-peer"
    return None
