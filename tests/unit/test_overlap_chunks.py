"""overlap_chunks (a pure function of the shape) and the overlap ops at world 1 (no processes)."""
import pytest
import torch
import torch.nn.functional as F

import tpcomm
from tpcomm.models.layers import ColumnParallelLinear, RowParallelLinear
from tpcomm.models.comm import TorchDistComm
from tpcomm.ops.overlap import MAX_CHUNKS, MIN_CHUNK_ROWS, OPS, overlap_chunks

LLAMA70B_TP4 = (7168, 8192)   # down projection: K = 28672 / 4, N = hidden


@pytest.mark.parametrize("op", OPS)
def test_no_overlap_without_communication_or_streams(op):
    assert overlap_chunks(op, 8192, *LLAMA70B_TP4, 1, torch.bfloat16, "cuda") == 1   # world 1
    assert overlap_chunks(op, 8192, *LLAMA70B_TP4, 4, torch.bfloat16, "cpu") == 1    # no streams
    assert overlap_chunks(op, 0, *LLAMA70B_TP4, 4, torch.bfloat16, "cuda") == 1


@pytest.mark.parametrize("op", OPS)
def test_decode_sizes_run_unchunked(op):
    for m in (1, 8, 64, 128):
        assert overlap_chunks(op, m, *LLAMA70B_TP4, 4, torch.bfloat16, "cuda") == 1


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("world", [2, 4, 8])
def test_prefill_sizes_chunk_in_powers_of_two(op, world):
    prev = 1
    for m in (256, 512, 1024, 2048, 4096, 8192, 65536):
        c = overlap_chunks(op, m, *LLAMA70B_TP4, world, "bfloat16", "cuda")
        assert 1 <= c <= MAX_CHUNKS and c & (c - 1) == 0
        rows = m if op == "all_reduce" else m // world
        assert c == 1 or rows // c >= MIN_CHUNK_ROWS   # every chunk holds a whole GEMM tile
        assert c >= prev                               # more rows never fewer chunks
        prev = c
    assert overlap_chunks(op, 8192, *LLAMA70B_TP4, world, torch.bfloat16, "cuda") > 1


def test_slower_gemm_allows_more_chunks():
    bf16 = overlap_chunks("all_reduce", 512, *LLAMA70B_TP4, 4, torch.bfloat16, "cuda")
    fp32 = overlap_chunks("all_reduce", 512, *LLAMA70B_TP4, 4, torch.float32, "cuda")
    assert fp32 >= bf16 >= 1
    # a thin GEMM (small K, N) is too short to hide a collective: no chunks
    assert overlap_chunks("all_reduce", 4096, 128, 128, 4, torch.bfloat16, "cuda") == 1


def test_unknown_op():
    with pytest.raises(ValueError, match="op must be one of"):
        overlap_chunks("all_to_all", 4096, 1, 1, 4)


def test_world_one_ops_are_plain_gemm():
    comm = TorchDistComm()   # no process group: a world of one
    a, b = torch.randn(13, 6), torch.randn(6, 5)
    for c in (None, 1, 4, 100):
        torch.testing.assert_close(tpcomm.matmul_all_reduce(a, b, comm, chunks=c), a @ b)
        torch.testing.assert_close(tpcomm.matmul_reduce_scatter(a, b, comm, chunks=c), a @ b)
        torch.testing.assert_close(tpcomm.all_gather_matmul(a, b, comm, chunks=c), a @ b)


def test_row_parallel_overlap_option():
    with pytest.raises(ValueError, match="overlap must be 'auto', 'off' or a positive int"):
        RowParallelLinear(6, 5, None, rank=0, world=1, overlap="yes")
    row = RowParallelLinear(6, 5, TorchDistComm(), rank=0, world=1, overlap=3)
    torch.nn.init.normal_(row.weight)
    x = torch.randn(2, 7, 6)
    torch.testing.assert_close(row(x), F.linear(x, row.weight))
    col = ColumnParallelLinear(6, 4, rank=0, world=1, comm=TorchDistComm())
    torch.nn.init.normal_(col.weight)
    torch.testing.assert_close(col.forward_all_gather(x, chunks=2), col(x))
