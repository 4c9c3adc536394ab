"""Unit tests, no devices: settings, sizes, selection, reduction order."""
import pytest
import torch

from tpcomm.selection import select
from tpcomm.cpu.shm_collectives import sum_in_rank_order
from tpcomm.settings import parse_size, reload_settings
from tpcomm.selection.select import Topology, check_algorithm, select_algorithm


@pytest.fixture
def env(monkeypatch):
    yield monkeypatch
    monkeypatch.undo()
    reload_settings()


def test_parse_size():
    assert parse_size("8") == 8
    assert parse_size("4K") == 4096
    assert parse_size("64M") == 64 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("2KiB") == 2048
    assert parse_size("1.5K") == 1536
    for bad in ("x", "-4", "4Q"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_settings_defaults_and_env(env):
    for k in ("TPCOMM_DISABLE", "TPCOMM_DEBUG", "TPCOMM_TIMEOUT_S", "TPCOMM_MAX_BYTES"):
        env.delenv(k, raising=False)
    s = reload_settings()
    assert (s.disable, s.debug, s.timeout_s, s.max_bytes) == (False, False, 60.0, 32 << 20)
    env.setenv("TPCOMM_DISABLE", "1")
    env.setenv("TPCOMM_TIMEOUT_S", "2.5")
    env.setenv("TPCOMM_MAX_BYTES", "1M")
    env.setenv("NCCL_P2P_DISABLE", "1")
    s = reload_settings()
    assert (s.disable, s.timeout_s, s.max_bytes) == (True, 2.5, 1 << 20)
    assert s.nccl_p2p_disable


@pytest.mark.parametrize("name,value", [("TPCOMM_DISABLE", "maybe"), ("TPCOMM_TIMEOUT_S", "0"),
                                        ("TPCOMM_TIMEOUT_S", "soon"), ("TPCOMM_MAX_BYTES", "lots"),
                                        ("TPCOMM_LOCAL_WORLD_SIZE", "-2")])
def test_settings_bad_values_name_the_variable(env, name, value):
    env.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        reload_settings()


def test_only_settings_reads_tpcomm_env():
    """All TPCOMM_* variables are read in tpcomm/settings.py and nowhere else."""
    import pathlib
    import re
    root = pathlib.Path(select.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "settings.py":
            continue
        text = path.read_text()
        if re.search(r"environ[^\n]*TPCOMM_|getenv\([^)]*TPCOMM_", text):
            offenders.append(str(path))
    assert not offenders, f"TPCOMM_* read outside settings.py: {offenders}"


CPU = Topology("cpu")


def test_select_cpu_all_reduce_threshold():
    t = select.CPU_TWO_SHOT_MIN_BYTES
    assert select_algorithm("all_reduce", t - 1, torch.float32, 4, CPU) == "one_shot"
    assert select_algorithm("all_reduce", t, torch.float32, 4, CPU) == "two_shot"
    assert select_algorithm("all_reduce", 0, torch.bfloat16, 4, CPU) == "one_shot"
    # two ranks: two_shot only adds a round
    assert select_algorithm("all_reduce", 64 << 20, torch.float32, 2, CPU) == "one_shot"


@pytest.mark.parametrize("op", ["reduce_scatter", "all_gather"])
def test_select_cpu_other_ops(op):
    assert select_algorithm(op, 1 << 20, torch.float16, 3, CPU) == "direct"


def test_select_falls_back_where_tpcomm_cannot():
    assert select_algorithm("all_reduce", 64, torch.float64, 2, CPU) == "torch"
    assert select_algorithm("all_reduce", 64, torch.int32, 2, CPU) == "torch"
    two = Topology("cpu", nnodes=2)
    assert select_algorithm("all_reduce", 64, torch.float32, 4, two) == "torch"
    assert select_algorithm("all_reduce", select.TWO_LEVEL_MIN_BYTES, torch.float32, 4, two) == "two_level"
    assert select_algorithm("all_reduce", select.TWO_LEVEL_MAX_BYTES + 2, torch.float32, 4, two) == "torch"
    assert select_algorithm("reduce_scatter", 64, torch.float32, 4, two) == "torch"
    assert select_algorithm("all_reduce", 64, torch.float64, 4, two) == "torch"
    assert select_algorithm("all_reduce", 64, torch.float32, 2, Topology("cuda", p2p=False)) == "torch"
    assert select_algorithm("all_reduce", 64, torch.float32, 1, CPU) == "local"
    assert "float64" in select.fallback_reason("all_reduce", torch.float64, 2, CPU)


def test_select_rejects_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        select_algorithm("broadcast", 8, torch.float32, 2, CPU)


def test_select_is_deterministic_over_sizes():
    # the same inputs give the same answer: all ranks of a call must agree
    for nbytes in [0, 4, 8196, 1 << 20, 1 << 26]:
        for dt in select.FAST_DTYPES:
            a = select_algorithm("all_reduce", nbytes, dt, 2, CPU)
            assert a == select_algorithm("all_reduce", nbytes, dt, 2, CPU)
            assert a in select.ALGORITHMS["cpu"]["all_reduce"]


def test_check_algorithm():
    check_algorithm("all_reduce", "two_shot", "cpu")
    check_algorithm("all_gather", "auto", "cpu")
    with pytest.raises(ValueError, match="no algorithm 'ring'"):
        check_algorithm("all_reduce", "ring", "cpu")
    with pytest.raises(ValueError, match="choose one of"):
        check_algorithm("reduce_scatter", "one_shot", "cpu")
    # a qualified name forces one_shot's mechanism where the device has two (the GPU)
    check_algorithm("all_reduce", "one_shot/push", "cuda")
    check_algorithm("all_reduce", "one_shot/pull", "cuda")
    for bad, device in (("one_shot/push", "cpu"), ("one_shot/sideways", "cuda"),
                        ("two_shot/pull", "cuda"), ("direct/push", "cuda")):
        with pytest.raises(ValueError, match="no algorithm"):
            check_algorithm("all_reduce", bad, device)


def test_vocabulary_names_agree():
    """One name per thing: a qualified name splits back into its parts, every supported
    algorithm is an Algorithm, and the kernels' error codes name qualified algorithms that
    exist (or the fused/barrier ones)."""
    from tpcomm import algorithms as A
    from tpcomm.kernels import barrier
    assert A.split(A.qualified("one_shot", "push")) == ("one_shot", "push")
    assert A.split("two_shot") == ("two_shot", None)
    assert A.qualified(A.Algorithm.ONE_SHOT, A.Mechanism.PULL) == "one_shot/pull"
    for ops in A.SUPPORTED.values():
        assert set(ops) == set(A.OPS)
        for algos in ops.values():
            assert {A.Algorithm(a) for a in algos}
    names = set(A.choices("all_reduce", "cuda"))
    for op, name in A.OP_NAMES.values():
        if op == "all_reduce":
            assert name in names, name
    # the kernels record the codes the names map from
    assert int(barrier.ERR_ONE_SHOT_PUSH.value) == A.OP_ONE_SHOT_PUSH
    assert int(barrier.ERR_ADD_RMS_NORM.value) == A.OP_ADD_RMS_NORM
    assert A.OP_NAMES[A.OP_ADD_RMS_NORM][1] == A.FUSED_NORM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nsrc", [1, 2, 3, 5])
def test_sum_in_rank_order_matches_float32_accumulation(dtype, nsrc):
    g = torch.Generator().manual_seed(nsrc)
    srcs = [torch.randn(1001, generator=g).to(dtype) for _ in range(nsrc)]
    out = torch.full((1001,), float("nan"), dtype=dtype)
    sum_in_rank_order(srcs, out, torch.empty(1001, dtype=torch.float32))
    ref = srcs[0].float()
    for s in srcs[1:]:
        ref = ref + s.float()
    if dtype == torch.float32:
        assert torch.equal(out, ref)
    else:
        assert torch.equal(out, ref.to(dtype)), "16-bit sums must be accumulated in float32"


def test_two_shot_split_covers_everything():
    from tpcomm.cpu.shm_collectives import ShmCollectives
    for world in (2, 3, 4, 8):
        fake = ShmCollectives.__new__(ShmCollectives)
        fake.world = world
        for n in (0, 1, 15, 16, 17, 1000, 4097):
            b = fake._split(n)
            assert b[0] == 0 and b[-1] == n and len(b) == world + 1
            assert all(b[i] <= b[i + 1] for i in range(world))
            assert all(x % 16 == 0 or x == n for x in b), "slice starts stay 64-byte aligned"


def test_select_cuda_eager_goes_to_nccl_graph_uses_the_table():
    gpu = Topology("cuda")
    assert select_algorithm("all_reduce", 2048, torch.bfloat16, 4, gpu, graph=True) == "one_shot"
    assert select_algorithm("all_reduce", 2048, torch.bfloat16, 4, gpu, graph=False) == "torch"
    assert select_algorithm("all_reduce", 2048, torch.bfloat16, 4, gpu) == "one_shot"
    # the CPU backend has no graphs: the flag changes nothing there
    assert select_algorithm("all_reduce", 2048, torch.float32, 2, CPU, graph=False) == "one_shot"


def test_exact_inputs_tell_ranks_apart_and_sum_exactly():
    from tpcomm.testing import exact, expected_all_reduce
    rows = [exact(64, r, torch.float32).tolist() for r in range(16)]
    assert len({tuple(r) for r in rows}) == 16
    for dtype in (torch.bfloat16, torch.float16):
        ref = sum(exact(500, r, torch.float64) for r in range(32))
        assert torch.equal(expected_all_reduce(500, 32, dtype).double(), ref)
