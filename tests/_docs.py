"""The Python examples of README.md and docs/*.md, as the docs tests see them.

Every fenced block opened by ```python is an example. It runs as written; the only thing a doc
may add is a marker, an HTML comment (invisible on the rendered page) on the line just above the
fence:

    <!-- docs-test: ranks=2 env=TPCOMM_LOCAL_WORLD_SIZE=1 -->   how to run it
    <!-- docs-test: skip GPU only: needs one GPU per rank -->     not run here; reported skipped

``ranks=N``: run it on N processes with the torchrun environment (default: 2 when the block calls
``init_process_group``, else 1). ``env=NAME=VALUE``: set for every rank (repeatable).
``skip REASON``: a block that cannot run on a CPU; keep them few, the reason is printed.
"""
from __future__ import annotations

import builtins
import dataclasses
import pathlib
import re
import symtable
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


@dataclasses.dataclass(frozen=True)
class Example:
    path: str               # relative to the repository root
    line: int               # of the first code line, 1-based
    code: str
    ranks: int
    env: tuple = ()         # (name, value) pairs
    skip: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line}"


def doc_files() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def parse_marker(text: str) -> dict:
    """'ranks=2 env=A=1' -> {"ranks": 2, "env": [("A", "1")]}; 'skip why' -> {"skip": "why"}."""
    if text == "skip" or text.startswith("skip "):
        return {"skip": text[4:].strip() or "no reason given"}
    out: dict = {"env": []}
    for word in text.split():
        key, _, value = word.partition("=")
        if key == "ranks" and value.isdigit() and int(value) >= 1:
            out["ranks"] = int(value)
        elif key == "env" and "=" in value:
            out["env"].append(tuple(value.split("=", 1)))
        else:
            raise ValueError(f"docs-test marker: cannot read {word!r} in {text!r}")
    return out


def examples(path: pathlib.Path) -> list[Example]:
    """The ```python blocks of one markdown file, with their markers."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(2):
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        end = i + 1
        while end < len(lines) and not re.match(rf"^{indent}```\s*$", lines[end]):
            end += 1
        if lang in ("python", "py"):
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.match(prev)
            opts = parse_marker(marker.group(1)) if marker else {"env": []}
            code = textwrap.dedent("\n".join(lines[i + 1:end])) + "\n"
            ranks = opts.get("ranks", 2 if "init_process_group" in code else 1)
            out.append(Example(str(path.relative_to(ROOT)), i + 2, code, ranks,
                               tuple(opts.get("env", ())), opts.get("skip")))
        i = end + 1
    return out


def all_examples() -> list[Example]:
    return [e for path in doc_files() for e in examples(path)]


def undefined_names(code: str, filename: str = "<doc>") -> list[str]:
    """Names the code reads but never binds (imports, assignments, defs) and that are not
    builtins: what a reader who copies the block would see fail with NameError."""
    top = symtable.symtable(code, filename, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    missing = set()

    def visit(table):
        for s in table.get_symbols():
            at_top = table is top and not (s.is_assigned() or s.is_imported())
            if s.is_referenced() and (at_top or s.is_global()):
                missing.add(s.get_name())
        for child in table.get_children():
            visit(child)
    visit(top)
    return sorted(n for n in missing - bound if not hasattr(builtins, n))
