"""Build and load the native core of the CPU collectives (``_shm_core.c``), once per process.

The core is a small CPython extension in C. It is compiled at first use with the system C
compiler (``$CC``, else ``cc`` or ``gcc``) and ``-O3`` without ``-march``: the wider kernels are
picked at run time inside the library, so a build is valid on every x86-64 machine and may live
in a cache shared between machines. The cache key hashes the source, the compiler's identity,
the flags and the Python ABI; the file goes to ``<TPCOMM_CACHE_DIR>/native/`` (default
``~/.cache/tpcomm/native``). Ranks that build at the same time each write a temporary file and
rename it into place, so a reader never sees half a library.

Where the core cannot be had (no compiler, no Python headers, a failed build) :func:`load`
returns None, logs why once, and the collectives take the pure-Python path, which speaks the
same protocol. ``TPCOMM_CPU_NATIVE=0`` asks for the Python path without trying.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

from ..settings import get_settings

log = logging.getLogger("tpcomm")
SOURCE = Path(__file__).with_name("_shm_core.c")
FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall")
BUILD_TIMEOUT_S = 120.0
ABI = 1                      # must match the ABI constant of the C module

_lock = threading.Lock()
_loaded: dict[str, object] = {}     # cache dir -> module (or None after a failure)
_why_not: dict[str, str] = {}


def compiler() -> str | None:
    """The C compiler to use, or None when there is none."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc.split()[0]) and cc
    return shutil.which("cc") or shutil.which("gcc")


def _compiler_id(cc: str) -> str:
    out = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return out.splitlines()[0] if out else cc


def _cache_path(cache_dir: str, cc: str) -> Path:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _compiler_id(cc).encode(), " ".join(FLAGS).encode(),
                 sys.version.encode(), str(sysconfig.get_config_var("EXT_SUFFIX")).encode()):
        h.update(part)
        h.update(b"\0")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return Path(cache_dir) / "native" / f"_shm_core-{h.hexdigest()[:20]}{suffix}"


def _build(cc: str, target: Path) -> None:
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        raise RuntimeError(f"the Python headers are missing ({include}/Python.h); install the "
                           f"python3-dev package of this Python")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [*cc.split(), *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): "
                               f"{(res.stderr or res.stdout).strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _import(path: Path):
    name = "tpcomm.cpu._shm_core"
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    if getattr(mod, "ABI", None) != ABI:
        raise RuntimeError(f"{path} has ABI {getattr(mod, 'ABI', None)}, expected {ABI}")
    return mod


def load():
    """The native core module, or None (the reason is in :func:`why_not` and logged once)."""
    settings = get_settings()
    if not settings.cpu_native:
        return None
    key = settings.cache_dir
    if key in _loaded:
        return _loaded[key]
    with _lock:
        if key not in _loaded:
            _loaded[key] = _try_load(key)
    return _loaded[key]


def _try_load(cache_dir: str):
    try:
        cc = compiler()
        if cc is None:
            raise RuntimeError("no C compiler (set CC, or install gcc)")
        path = _cache_path(cache_dir, cc)
        if not path.exists():
            _build(cc, path)
        return _import(path)
    except Exception as e:  # no compiler, no headers, a failed build: the Python path runs
        why = f"{type(e).__name__}: {e}"
        _why_not[cache_dir] = why
        log.warning("tpcomm: the CPU collectives' native core is unavailable (%s); using the "
                    "Python path, which is slower for small messages (logged once; "
                    "TPCOMM_CPU_NATIVE=0 chooses the Python path without trying)", why)
        return None


def why_not() -> str | None:
    """Why :func:`load` returned None in this process (None if it did not, or was not asked)."""
    if not get_settings().cpu_native:
        return "TPCOMM_CPU_NATIVE=0"
    return _why_not.get(get_settings().cache_dir)


def reset() -> None:
    """Forget what was loaded (for tests that change the environment)."""
    with _lock:
        _loaded.clear()
        _why_not.clear()
