"""tpcomm bench without processes: figures, tables, sizes, argument errors."""
import io
import json
import sys

import pytest

from tpcomm.bench import cli as bench_cli
from tpcomm.bench import plot, report
from tpcomm.bench.contenders import resolve_contenders
from tpcomm.cli.progress import Progress
from tpcomm.bench.report import Row
from tpcomm.cli import UsageError, build_parser, main

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def not_under_torchrun(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


def _rows():
    rows = []
    for nbytes, t_tp, t_gloo in ((4096, 20.0, 2000.0), (1 << 20, 500.0, 1000.0)):
        for backend, t in (("tpcomm", t_tp), ("gloo", t_gloo)):
            rows.append(Row(backend, "all_reduce", "float32", nbytes, nbytes // 4, "eager",
                            "one_shot" if backend == "tpcomm" else "-", t, 0))
    return rows


def _meta(world=2):
    return {"op": "all_reduce", "dtype": "float32", "world_size": world, "device": "cpu",
            "date": "2026-11-22T12:00:00+00:00", "command": "tpcomm bench -b 4K",
            "hardware": "AMD EPYC, 2 cores (2 usable); 1 torch thread(s) per rank",
            "versions": {"torch": "2.13.0", "tpcomm": "0.1.0", "python": "3.11"},
            "os": "Linux", "load_avg_1m": 2.0, "timing": {"method": "perf_counter"},
            "backends": {"tpcomm": "shm", "gloo": "torch.distributed gloo"}}


# ---------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("op,world,factor", [
    ("all_reduce", 2, 1.0), ("all_reduce", 4, 1.5), ("all_reduce", 8, 1.75),
    ("reduce_scatter", 2, 0.5), ("all_gather", 4, 0.75), ("all_reduce", 1, 0.0)])
def test_bus_factor(op, world, factor):
    assert report.bus_factor(op, world) == pytest.approx(factor)


def test_bandwidths():
    # 1 MiB in 100 us: 10.49 GB/s of algorithm bandwidth; all_reduce on 4 ranks moves 1.5x
    assert report.algbw_gbs(1 << 20, 100.0) == pytest.approx(10.48576)
    assert report.busbw_gbs("all_reduce", 4, 1 << 20, 100.0) == pytest.approx(15.72864)
    assert report.busbw_gbs("all_gather", 2, 1 << 20, 100.0) == pytest.approx(5.24288)
    assert report.algbw_gbs(4096, 0.0) == 0.0


@pytest.mark.parametrize("nbytes,text", [(4, "4"), (1023, "1023"), (4096, "4K"), (1536, "1.5K"),
                                         (16 << 20, "16M"), (1 << 30, "1G")])
def test_human_size(nbytes, text):
    assert report.human_size(nbytes) == text


def test_speedups_are_against_the_first_backend():
    ratio = report.speedups(_rows(), ["tpcomm", "gloo"])
    assert ratio == {("gloo", 4096): 100.0, ("gloo", 1 << 20): 2.0}


# ---------------------------------------------------------------- tables
def test_backend_table_nccl_tests_layout():
    text = report.backend_table(_rows(), ["tpcomm", "gloo"], "tpcomm", world=2)
    lines = text.splitlines()
    assert lines[0].startswith("#") and lines[1].startswith("#")
    for word in ("size", "count", "type", "redop", "time", "algbw", "busbw", "#wrong", "x gloo"):
        assert word in lines[0]
    assert "(us)" in lines[1] and "(GB/s)" in lines[1]
    assert len({len(line) for line in lines}) == 1, "columns must line up"
    first = lines[2].split()
    assert first == ["4096", "1024", "float32", "sum", "eager", "one_shot", "20.00", "0.20",
                     "0.20", "0", "100.00"]
    # the baseline's table has no speed-up column
    gloo = report.backend_table(_rows(), ["tpcomm", "gloo"], "gloo", world=2)
    assert "x " not in gloo.splitlines()[0]
    assert gloo.splitlines()[3].split()[6] == "1000.00"


def test_summary_and_text_report():
    text = report.format_text(_meta(), _rows(), ["tpcomm", "gloo"])
    assert "# command: tpcomm bench -b 4K" in text
    assert "AMD EPYC" in text and "torch 2.13.0" in text
    summary = text.split("# summary")[1].splitlines()
    assert summary[2].split() == ["4K", "20.00", "2000.00", "100.00"]
    assert summary[3].split() == ["1M", "500.00", "1000.00", "2.00"]


def test_markdown_report():
    md = report.format_markdown(_meta(), _rows(), ["tpcomm", "gloo"], plot_name="run.png")
    assert "```\ntpcomm bench -b 4K\n```" in md
    assert "![latency and bus bandwidth](run.png)" in md
    assert "| size | tpcomm (us) | gloo (us) | x gloo |" in md
    assert "| 4K | 20.00 | 2000.00 | 100.00 |" in md
    assert "## gloo" in md


def test_json_document():
    doc = report.to_json(_meta(), _rows(), ["tpcomm", "gloo"])
    doc = json.loads(json.dumps(doc))
    assert doc["wrong"] == 0 and doc["backends"] == ["tpcomm", "gloo"]
    first = doc["rows"][0]
    assert first["backend"] == "tpcomm" and first["speedup"] == {"gloo": 100.0}
    assert first["busbw_gbs"] == pytest.approx(4096 / 20e3)
    assert doc["meta"]["hardware"].startswith("AMD EPYC")


# ---------------------------------------------------------------- sizes
def test_sweep_by_factor_and_by_step():
    assert bench_cli.sweep_sizes(8, 64 << 20, 2) == [8 << k for k in range(24)]
    assert bench_cli.sweep_sizes(4, 64 << 10, 4) == [4 << (2 * k) for k in range(8)]
    assert bench_cli.sweep_sizes(4096, 4096) == [4096]
    assert bench_cli.sweep_sizes(1000, 4000, step=1000) == [1000, 2000, 3000, 4000]


@pytest.mark.parametrize("args,msg", [((64, 8, 2), "larger than -e"), ((0, 8, 2), "at least 1"),
                                      ((8, 64, 1), "-f must be at least 2")])
def test_sweep_errors(args, msg):
    with pytest.raises(UsageError, match=msg):
        bench_cli.sweep_sizes(*args)


def test_align_sizes_to_elements_and_ranks():
    # reduce_scatter of float32 on 4 ranks: multiples of 16 bytes
    assert bench_cli.align_sizes([4, 8, 20, 40, 41, 80], 16) == [16, 32, 80]
    with pytest.raises(UsageError, match="smallest size"):
        bench_cli.align_sizes([4, 8], 16)


# ---------------------------------------------------------------- arguments
def _config(argv):
    args = build_parser().parse_args(["bench", *argv])
    args.argv = ["bench", *argv]
    return bench_cli.config_from_args(args)


def test_cpu_defaults():
    c = _config(["--device", "cpu"])
    assert c.contenders == ("tpcomm", "gloo") and c.dtype == "float32" and c.world == 2
    assert c.sizes[0] == 8 and c.sizes[-1] == 16 << 20 and c.algorithm == "auto"
    assert c.command == "tpcomm bench --device cpu"


def test_sizes_follow_op_and_world():
    c = _config(["--device", "cpu", "-n", "4", "--oversubscribe", "--op", "all_gather", "-b", "4",
                 "-e", "64"])
    assert c.sizes == (16, 32, 64)   # one float32 per rank at least


def test_contenders_flag_and_its_former_name():
    """--contenders names what is compared; --backends, its documented former name, still
    works and means the same."""
    new = _config(["--device", "cpu", "--contenders", "gloo,tpcomm"])
    old = _config(["--device", "cpu", "--backends", "gloo,tpcomm"])
    assert new.contenders == old.contenders == ("gloo", "tpcomm")


def test_symm_mem_names_both_variants():
    assert resolve_contenders("tpcomm,nccl,symm_mem", "cuda", "all_reduce") == [
        "tpcomm", "nccl", "symm_mem_one_shot", "symm_mem_two_shot"]


@pytest.mark.parametrize("argv,msg", [
    (["--backends", "tpcomm,openmp"], "unknown contender 'openmp'"),
    (["--backends", "tpcomm,nccl"], "nccl does not run on cpu"),
    (["--backends", "tpcomm,symm_mem"], "symm_mem_one_shot does not run on cpu"),
    (["--backends", "tpcomm,gloo,tpcomm"], "named twice"),
    (["-b", "64K", "-e", "4K"], "larger than -e"),
    (["-b", "12X"], "cannot read '12X' as a size"),
    (["-b", "1", "-e", "2"], "smallest size"),
    (["--graph"], "needs --device cuda"),
    (["--backends", "gloo", "--algorithm", "one_shot"], "not in --contenders"),
    (["--algorithm", "ring"], "no algorithm 'ring'"),
    (["--op", "all_gather", "--algorithm", "two_shot"], "no algorithm 'two_shot'"),
    (["-f", "2", "-i", "4K"], "not allowed with argument"),
    (["--iters", "0"], "expected an integer >= 1"),
    (["--device", "tpu"], "invalid choice"),
])
def test_argument_errors(argv, msg, capsys):
    if "--device" not in argv:
        argv = ["--device", "cpu", *argv]
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match=r"pip install 'tpcomm\[plot\]'"):
        plot.require_matplotlib()


# ---------------------------------------------------------------- progress bar
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_tty_and_erases_itself():
    tty = _Tty()
    bar = Progress(4, stream=tty)
    bar.advance()
    bar.show("64K gloo")
    assert "[######..................]   1/4 64K gloo" in tty.getvalue()
    bar.close()
    assert tty.getvalue().endswith("\r")


def test_progress_bar_silent_off_a_tty_or_when_disabled():
    pipe, tty = io.StringIO(), _Tty()
    for bar in (Progress(3, stream=pipe), Progress(3, enabled=False, stream=tty)):
        bar.show("x")
        bar.advance()
        bar.close()
    assert pipe.getvalue() == "" and tty.getvalue() == ""
