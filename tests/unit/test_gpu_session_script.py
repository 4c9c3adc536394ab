"""scripts/gpu_session.sh cannot rot silently: it parses (bash -n); its header's call plan names
exactly the steps each call runs, with their limits, under the device's 600 s per call; the two
test steps cover every file of tests/gpu; every command it would run (DRY_RUN=1 prints them) is
accepted by the parser it goes to: tpcomm's own CLI (argparse, then the backend / algorithm
checks that run before any rank starts), a script's add_argument flags, pytest's files."""
import os
import re
import shlex
import subprocess

import pytest

from tpcomm.bench import contenders
from tpcomm.cli.main import build_parser
from tpcomm.selection.select import check_algorithm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_session.sh")
CALL_LIMIT_S = 600      # one device call
CALL_BUDGET_S = 570     # what the header promises for the sum of one call's step limits


def _dry_run(*steps: str) -> tuple[int, list[tuple[str, int, int, list[str]]]]:
    """(exit code, [(step, limit s, GPUs, argv)]) of the script in DRY_RUN mode."""
    res = subprocess.run(["bash", SCRIPT, *steps], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DRY_RUN": "1", "OUT": "/tmp/gpu-session-dry"})
    rows = []
    for line in res.stdout.splitlines():
        head, _, cmd = line.partition(" : ")
        _, name, limit, gpus = head.split()
        rows.append((name, int(limit), int(gpus), shlex.split(cmd)))
    return res.returncode, rows


def _header_calls() -> dict[str, tuple[list[str], list[int], int]]:
    """call -> (steps, limits, stated sum) from the header's CALLS block."""
    text = open(SCRIPT).read()
    block = text.split("# CALLS", 1)[1].split("\n#\n", 1)[0]
    calls, name = {}, None
    for line in block.splitlines()[1:]:
        body = line.lstrip("#").strip()
        m = re.match(r"(\w+): (.*)", body)
        if m:
            name = m.group(1)
            calls[name] = [m.group(2).split(), [], 0]
        elif body.startswith("("):
            nums = re.match(r"\(([\d +]+)= (\d+);", body)
            calls[name][1] = [int(v) for v in nums.group(1).split("+")]
            calls[name][2] = int(nums.group(2))
        elif name:
            calls[name][0] += body.split()
    return {k: tuple(v) for k, v in calls.items()}


def test_the_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True, timeout=30)


def test_the_header_plan_is_what_each_call_runs():
    calls = _header_calls()
    assert set(calls) == {"call1", "call2", "call3", "extra"}
    seen = []
    for call, (steps, limits, total) in calls.items():
        rc, rows = _dry_run(call)
        assert rc == 0, call
        assert [r[0] for r in rows] == steps, call
        assert [r[1] for r in rows] == limits, f"{call}: header limits differ from the script's"
        assert sum(limits) == total <= CALL_BUDGET_S < CALL_LIMIT_S, call
        seen += steps
    assert len(seen) == len(set(seen)), "a step is in two calls"


def test_an_unknown_step_fails_the_run():
    rc, _ = _dry_run("call1", "no-such-step")
    assert rc == 2


def test_the_test_steps_cover_every_gpu_test_file():
    _, rows = _dry_run("tests-a", "tests-b")
    files = [a for _, _, _, argv in rows for a in argv if a.startswith("tests/gpu/")]
    assert len(files) == len(set(files))
    on_disk = {f"tests/gpu/{f}" for f in os.listdir(os.path.join(ROOT, "tests", "gpu"))
               if f.startswith("test_") and f.endswith(".py")}
    assert set(files) == on_disk
    for _, _, _, argv in rows:
        assert "--timeout" in argv      # each test bounded (pytest-timeout)
    pytest.importorskip("pytest_timeout")


def _script_flags(path: str) -> set[str]:
    src = open(os.path.join(ROOT, path)).read()
    return set(re.findall(r"add_argument\(\s*(?:\"-\w\", )?\"(--[\w-]+)\"", src))


def test_every_command_is_accepted_by_its_parser(monkeypatch):
    monkeypatch.setattr(contenders, "_nccl_tuple", lambda: (2, 27, 7))   # as on the H200 host
    monkeypatch.setattr(contenders, "_symm_mem_takes_nccl", lambda: True)
    rc, rows = _dry_run("call1", "call2", "call3", "extra")
    assert rc == 0 and rows
    parser = build_parser()
    for name, limit, gpus, argv in rows:
        assert 0 < limit <= CALL_BUDGET_S and gpus in (0, 1, 2, 4), name
        while argv[0] == "env" or re.match(r"\w+=", argv[0]):
            argv = argv[1:]
        assert argv[0] == "python3", name
        if argv[1:3] == ["-m", "tpcomm"]:
            args = parser.parse_args(argv[3:])          # SystemExit (a failure) if refused
            assert "-n" not in argv or int(argv[argv.index("-n") + 1]) == gpus, name
            if getattr(args, "kind", None) is None and args.command == "bench":
                names = contenders.resolve_contenders(args.contenders, "cuda", args.op)
                if args.algorithm != "auto":
                    assert "tpcomm" in names
                    check_algorithm(args.op, args.algorithm, "cuda")
                assert 1 <= int(args.iters) and args.timeout < limit, name
        elif argv[1:3] == ["-m", "pytest"]:
            assert all(os.path.exists(os.path.join(ROOT, a)) for a in argv if a.endswith(".py"))
        else:
            script = argv[1]
            assert script.startswith("scripts/") and os.path.exists(os.path.join(ROOT, script))
            used = {a for a in argv[2:] if a.startswith("--")}
            missing = used - _script_flags(script)
            assert not missing, f"{name}: {script} has no {sorted(missing)}"
            for a in argv[2:]:      # input files the script reads from the repository
                if a.startswith("benchmarks/"):
                    assert os.path.exists(os.path.join(ROOT, a)), f"{name}: {a} is missing"
