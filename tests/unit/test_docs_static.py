"""The docs, without running them: every Python example is complete (no name it does not
import or define), every file they cite exists, no machine's own paths anywhere, and the
README's install and test commands are exactly what CI (.ci/run) runs."""
import glob
import os
import re
import shlex

import pytest

from _docs import ROOT, all_examples, doc_files, parse_marker, undefined_names

EXAMPLES = all_examples()


def test_there_are_examples_and_few_are_skipped():
    assert len(EXAMPLES) >= 3
    skipped = [e for e in EXAMPLES if e.skip]
    assert len(skipped) <= len(EXAMPLES) // 3, [e.name for e in skipped]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_example_compiles_and_defines_every_name_it_uses(example):
    """Skipped (GPU-only) examples included: a missing import fails here even where the
    example cannot run."""
    compile(example.code, example.name, "exec")
    assert undefined_names(example.code, example.name) == []


def test_marker_grammar():
    assert parse_marker("ranks=4 env=A=1 env=B=x=y") == {"ranks": 4,
                                                          "env": [("A", "1"), ("B", "x=y")]}
    assert parse_marker("skip GPU only: NCCL") == {"skip": "GPU only: NCCL"}
    with pytest.raises(ValueError, match="cannot read"):
        parse_marker("ranks=two")


def test_undefined_names_finds_what_a_reader_would_miss():
    code = "import torch\nr = int(os.environ['R'])\ny = torch.ones(2) + x\n" \
           "def f():\n    return q + r\n"
    assert undefined_names(code) == ["os", "q", "x"]


# ---------------------------------------------------------------- files cited, machine paths
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:benchmarks|docs|tpcomm|tests|scripts|\.ci)/[\w./*-]*[\w*/])")
RESULT_NAME = re.compile(r"`([\w.-]*20\d\d-\d\d-\d\d[\w.-]*\.(?:md|json|png|txt))`")


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.name)
def test_every_file_a_doc_cites_is_in_the_repository(doc):
    text, missing = doc.read_text(), []
    for path in REPO_PATH.findall(text):
        found = glob.glob(str(ROOT / path)) if "*" in path else (ROOT / path).exists()
        if not found:
            missing.append(path)
    for name in RESULT_NAME.findall(text):
        if not (ROOT / "benchmarks" / "results" / name).exists():
            missing.append(name)
    assert not missing, f"{doc.name} cites files that are not in the repository: {missing}"


# a backticked path: `tpcomm/cuda/emulated.py`, `cuda/fused_gemm.py` (package-relative, as the
# docs write them inside tpcomm), `kernels/*_fused.py`, `_shm_core.c`, `benchmarks/results/`
BACKTICKED = re.compile(r"`([\w*.-]+(?:/[\w*.-]+)*/?)`")
CODE_FILE = re.compile(r"\.(?:py|c|sh|toml)$")


def _exists(path: str, *bases) -> bool:
    return any(glob.glob(str(base / path)) if "*" in path else (base / path).exists()
               for base in bases)


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.name)
def test_every_backticked_path_a_doc_names_exists(doc):
    """A path in backticks (one with a folder, or a code file's name) names a file of the
    repository: from its root, from tpcomm/ (``cuda/fused_gemm.py``) or, a bare code file's
    name, anywhere in the package, the scripts or the tests."""
    everywhere = [ROOT / "tpcomm", *(ROOT / "tpcomm").glob("*/"), ROOT / "scripts",
                  *(ROOT / "tests").glob("*/")]
    missing = []
    for path in BACKTICKED.findall(doc.read_text()):
        if "/" in path.rstrip("/") and ("." in path.rsplit("/", 1)[-1] or path.endswith("/")):
            if not _exists(path, ROOT, ROOT / "tpcomm"):
                missing.append(path)
        elif "/" not in path and CODE_FILE.search(path):
            if not _exists(path, ROOT, *everywhere):
                missing.append(path)
    assert not missing, f"{doc.name} names paths that are not in the repository: {missing}"


def _layout() -> dict[str, str]:
    """The README's Layout block: entry of tpcomm/ (``bench/``, ``settings.py``) -> its role."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```\ntpcomm/\n", text.index("## Layout")) + len("```\ntpcomm/\n")
    block = text[start:text.index("\n```", start)]
    entries, name = {}, None
    for line in block.splitlines():
        m = re.match(r"  (\S+)\s+(.*)$", line)
        if m and not line.startswith("   "):
            name = m.group(1)
            entries[name] = m.group(2).strip()
        elif line.startswith(" " * 4) and name is not None:
            entries[name] += " " + line.strip()
        else:
            name = None     # tests/unit ...: not the package
    return entries


def test_readme_layout_lists_every_folder_and_module_of_the_package_with_its_role():
    entries = _layout()
    pkg = ROOT / "tpcomm"
    folders = {f"{d.name}/" for d in pkg.iterdir() if (d / "__init__.py").exists()}
    modules = {f.name for f in pkg.glob("*.py") if f.name not in ("__init__.py", "__main__.py")}
    assert set(entries) == folders | modules, (
        f"README Layout: missing {sorted((folders | modules) - set(entries))}, "
        f"not in tpcomm/ {sorted(set(entries) - folders - modules)}")
    assert all(len(role.split()) >= 3 for role in entries.values()), entries


def test_readme_layout_names_only_files_that_exist():
    """``select.py`` under ``selection/`` is tpcomm/selection/select.py; ``cuda/fused_gemm.py``
    anywhere is tpcomm/cuda/fused_gemm.py."""
    missing = []
    for entry, role in _layout().items():
        for name in re.findall(r"[\w*./-]+\.(?:py|c)\b", role):
            base = ROOT / "tpcomm" / (entry if entry.endswith("/") else "")
            if not _exists(name, ROOT / "tpcomm" if "/" in name else base):
                missing.append(f"{entry}: {name}")
    assert not missing, missing


# this machine's paths (and the team's notes beside the repository): never in the repository
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root)/|\.\./shared\b|BASELINES\.md")
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "build", "dist"}


def _repo_text_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(folder, name)
            if name == ".git" or name.endswith((".png", ".pyc", ".so")):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, ROOT), f.read()
            except UnicodeDecodeError:
                continue


def test_no_machine_paths_in_code_output_or_docs():
    me = os.path.relpath(__file__, ROOT)
    found = [f"{path}: {m.group(0)}" for path, text in _repo_text_files() if path != me
             for m in MACHINE_PATH.finditer(text)]
    assert not found, found


# ---------------------------------------------------------------- README commands == CI
def _normalize(cmd: str) -> list[str]:
    """One command as words, with what differs only in form removed: ``python3 -m pip`` vs
    ``pip``, ``python3`` vs ``python``, and pip's -q."""
    words = shlex.split(cmd)
    if words[:3] in (["python3", "-m", "pip"], ["python", "-m", "pip"]):
        words = ["pip", *words[3:]]
    if words and words[0] == "python3":
        words[0] = "python"
    return [w for w in words if w != "-q"]


def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Set up and run"):text.index("## Use")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    cmds = [c.strip() for b in blocks for line in b.splitlines() for c in line.split("&&")]
    return [_normalize(c.split("#")[0]) for c in cmds if c and not c.startswith("#")]


def _ci_commands() -> list[list[str]]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [_normalize(line) for line in lines
            if re.match(r"\s*python3? -m (pip install|pytest)", line)]


def test_readme_install_and_test_commands_are_what_ci_runs():
    readme = _readme_commands()
    installs = [c for c in readme if c[:2] == ["pip", "install"]]
    tests = [c for c in readme if c[:3] == ["python", "-m", "pytest"]]
    assert installs and tests == [["python", "-m", "pytest"]]
    assert _ci_commands() == installs + tests
    torch = next(c for c in installs if any(w.startswith("torch==") for w in c))
    assert "--index-url" in torch and "https://download.pytorch.org/whl/cpu" in torch


# ---------------------------------------------------------------- documented command lines
def _documented_commands():
    """(doc, argv after the program, parser kind) of every tpcomm command line in a bash block."""
    out = []
    for doc in doc_files():
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split(" #")[0], comments=True)
                for i, w in enumerate(words):
                    if w == "tpcomm" and (i == 0 or "=" in words[i - 1] or words[i - 1] == "-m"):
                        out.append((doc.name, words[i + 1:], "tpcomm"))
                        break
                    if w == "tpcomm.bench.two_level" and words[i - 1] == "-m":
                        out.append((doc.name, words[i + 1:], "hierarchical_bench"))
                        break
    return out


@pytest.mark.parametrize("doc,argv,kind", _documented_commands(),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_documented_command_lines_parse(doc, argv, kind):
    """Every flag a doc shows exists (parsed only: nothing runs)."""
    from tpcomm.bench import two_level as hierarchical_bench
    from tpcomm.cli import build_parser
    parser = build_parser() if kind == "tpcomm" else hierarchical_bench.build_parser()
    parser.parse_args(argv)


def test_the_documented_command_lines_were_found():
    kinds = {(doc, argv[0] if argv else "") for doc, argv, _ in _documented_commands()}
    assert {("README.md", "bench"), ("README.md", "check"), ("README.md", "plan"),
            ("multinode.md", "plan"), ("overlap.md", "bench")} <= kinds


def test_license_file_is_the_license_pyproject_names():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = {text = "Apache-2.0"}' in pyproject
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190   # full text
