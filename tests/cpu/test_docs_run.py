"""Every Python example of README.md and docs/*.md runs as written, on 1-2 CPU ranks (gloo +
shared memory), a few seconds each (markers: tests/_docs.py). GPU-only examples carry a skip
marker and are reported as skipped with their reason."""
import pytest
import torch

from _dist import run
from _docs import all_examples

pytestmark = pytest.mark.cpu


def _exec_example(rank, world, code, name):
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return rank


@pytest.mark.parametrize("example", all_examples(), ids=lambda e: e.name)
def test_example_runs(example):
    if example.skip:
        pytest.skip(f"{example.name}: {example.skip}")
    assert run(_exec_example, example.ranks, example.code, example.name,
               env=dict(example.env), timeout_s=120) == list(range(example.ranks))
