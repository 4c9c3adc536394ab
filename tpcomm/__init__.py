"""tpcomm: tensor-parallel communication for LLM inference.

Collectives that bypass NCCL on the latency-bound hot path of TP inference (GPU: Triton kernels
over NVLink peer memory; CPU: POSIX shared memory), with torch.distributed as the fallback.

    import torch.distributed as dist, tpcomm
    dist.init_process_group("gloo")            # or "nccl"; launched by torchrun
    with tpcomm.Communicator() as comm:
        y = comm.all_reduce(x)
"""
from .communicator import Communicator, HierarchicalAllReduce
from .errors import (CommunicatorBrokenError, CommunicatorClosedError, MismatchError,
                     PeerDiedError, PeerTimeoutError, TpcommError)
from .ops.overlap import all_gather_matmul, matmul_all_reduce, matmul_reduce_scatter, overlap_chunks
from .selection.select import Topology, select_algorithm
from .settings import Settings, SettingsError, get_settings

__version__ = "0.1.0"

__all__ = [
    "Communicator", "HierarchicalAllReduce", "CommunicatorBrokenError", "CommunicatorClosedError", "MismatchError",
    "PeerDiedError", "PeerTimeoutError", "TpcommError", "Topology", "select_algorithm",
    "Settings", "get_settings", "__version__", "matmul_all_reduce", "matmul_reduce_scatter",
    "all_gather_matmul", "overlap_chunks", "SettingsError",
]
