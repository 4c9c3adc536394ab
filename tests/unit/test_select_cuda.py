"""The GPU selection table: pure, total, and NCCL wherever it is not measured."""
import torch

from tpcomm.selection import select_table
from tpcomm.selection.select_table import select_cuda
from tpcomm.selection.select import ALGORITHMS

SIZES = [0, 4, 2 << 10, 256 << 10, 1 << 20, 8 << 20, 64 << 20, 1 << 30]


def test_every_answer_is_a_known_algorithm():
    for op in ("all_reduce", "reduce_scatter", "all_gather"):
        for world in range(2, 9):
            for nbytes in SIZES:
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    algo = select_cuda(op, nbytes, dtype, world)
                    assert algo == "torch" or algo in ALGORITHMS["cuda"][op], (op, world, algo)


def test_unmeasured_world_sizes_go_to_nccl():
    measured = set(select_table.ALL_REDUCE)
    for world in range(2, 9):
        if world not in measured:
            assert select_cuda("all_reduce", 4096, torch.bfloat16, world) == "torch"


def test_tables_are_sorted_and_end_unbounded():
    for world, table in select_table.ALL_REDUCE.items():
        bounds = [b for b, _, _ in table]
        assert bounds[-1] is None
        assert bounds[:-1] == sorted(bounds[:-1])


def test_eager_calls_go_to_nccl():
    # measured: eager tpcomm calls are host-bound and slower than NCCL's eager path
    for world in (2, 4):
        for nbytes in SIZES:
            assert select_cuda("all_reduce", nbytes, torch.bfloat16, world, graph=False) == "torch"


def test_eager_column_is_unmeasured_and_one_switch_moves_it(monkeypatch):
    """Every eager entry is None (not measured) today, so eager calls follow EAGER_UNMEASURED:
    "torch" now; the one-line switch "graph" gives eager calls the graph column's answer."""
    for tables in (select_table.ALL_REDUCE, select_table.REDUCE_SCATTER,
                   select_table.ALL_GATHER):
        for table in tables.values():
            assert all(eager is None for _, _, eager in table)
    monkeypatch.setattr(select_table, "EAGER_UNMEASURED", "graph")
    for op in ("all_reduce", "reduce_scatter", "all_gather"):
        for world in (2, 3, 4):
            for nbytes in SIZES:
                assert select_cuda(op, nbytes, torch.bfloat16, world, graph=False) == \
                    select_cuda(op, nbytes, torch.bfloat16, world, graph=True)
    assert select_cuda("all_reduce", 4096, torch.bfloat16, 2, graph=False) == "one_shot"


def test_a_measured_eager_entry_wins(monkeypatch):
    monkeypatch.setitem(select_table.ALL_REDUCE, 2, [(1 << 20, "one_shot", "two_shot"),
                                                     (None, "torch", None)])
    assert select_cuda("all_reduce", 4096, torch.bfloat16, 2, graph=False) == "two_shot"
    assert select_cuda("all_reduce", 4096, torch.bfloat16, 2, graph=True) == "one_shot"
    assert select_cuda("all_reduce", 2 << 20, torch.bfloat16, 2, graph=False) == "torch"
