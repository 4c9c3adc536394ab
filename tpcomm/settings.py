"""The one place that reads ``TPCOMM_*`` environment variables (and NCCL_P2P_DISABLE).

Every switch is read once into a frozen :class:`Settings`; the rest of the package asks
:func:`get_settings` and never touches ``os.environ`` itself. The algorithm is never an
environment variable: it is an argument of each call (``algorithm="one_shot"``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# The smallest TPCOMM_MAX_BYTES (and Communicator max_bytes) accepted: one 4 KiB page.
MIN_MAX_BYTES = 4096


class SettingsError(ValueError):
    """A TPCOMM_* variable (or NCCL_P2P_DISABLE) with a value tpcomm cannot use. The message is
    one line: the variable, its value and the values accepted (the CLI prints just that)."""


def _bad(name: str, raw: str, expected: str) -> SettingsError:
    return SettingsError(f"{name}={raw!r}: expected {expected}")


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    val = raw.strip().lower()
    if val in _TRUE:
        return True
    if val in _FALSE:
        return False
    raise _bad(name, raw, "one of 1/0, true/false, yes/no, on/off")


def _parsed(name: str, default, parse, ok, expected: str):
    """The variable ``name`` read by ``parse``, ``default`` where it is unset or blank;
    SettingsError naming ``expected`` where ``parse`` raises ValueError or ``ok`` refuses the
    value."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        val = parse(raw)
    except ValueError:
        raise _bad(name, raw, expected) from None
    if not ok(val):
        raise _bad(name, raw, expected)
    return val


def _float(name: str, default: float) -> float:
    return _parsed(name, default, float, lambda v: 0 < v < math.inf,
                   "a number of seconds > 0, such as 60 or 2.5")


def parse_size(text: str) -> int:
    """'64M' -> 67108864, '4K' -> 4096, '8' -> 8 (nccl-tests style, powers of 1024)."""
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if s.endswith(suffix):
            s, mult = s[:-1], m
            break
    try:
        val = int(float(s) * mult)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (examples: 8, 4K, 64M, 1G)") from None
    if val < 0:
        raise ValueError(f"size {text!r} is negative")
    return val


def _size(name: str, default: int, minimum: int) -> int:
    return _parsed(name, default, parse_size, lambda v: v >= minimum,
                   f"a size of at least {minimum // 1024}K in bytes, with K, M or G for powers "
                   f"of 1024, such as 64M or 1G")


def _int_or_none(name: str) -> int | None:
    return _parsed(name, None, int, lambda v: v > 0, "a positive integer (ranks per node)")


@dataclasses.dataclass(frozen=True)
class Settings:
    # TPCOMM_DISABLE=1: send every call to torch.distributed, as if tpcomm were not there
    # (the first switch to flip when tpcomm is suspected of a wrong answer).
    disable: bool = False
    # TPCOMM_DEBUG=1: extra cross-rank checks on every call (sizes, dtypes, op agree on all
    # ranks) and debug logging; costs a little latency.
    debug: bool = False
    # TPCOMM_QUIET=1: do not log fallbacks to torch.distributed (they are still counted in
    # comm.stats()).
    quiet: bool = False
    # TPCOMM_TIMEOUT_S: default bound on every wait for a peer, in seconds; a Communicator's
    # timeout_s argument overrides it.
    timeout_s: float = 60.0
    # TPCOMM_MAX_BYTES: default size of the registered buffer per rank; larger tensors are
    # processed in chunks of this size. A Communicator's max_bytes argument overrides it.
    max_bytes: int = 32 << 20
    # TPCOMM_LOCAL_WORLD_SIZE: ranks per node, to emulate several nodes on one host; default
    # from torchrun's LOCAL_WORLD_SIZE.
    local_world_size: int | None = None
    # NCCL_P2P_DISABLE=1 (NCCL's own switch, honoured here too): no peer-to-peer access on the
    # GPU, so the GPU fast path is vetoed and every GPU call goes to torch.distributed.
    nccl_p2p_disable: bool = False
    # TPCOMM_P2P_CHECK=0: skip the data-moving P2P check at GPU Communicator start (every pair
    # writes and reads back through the peer mapping). The check can only veto the fast path,
    # never enable one; 0 also ignores a cached failure (to retry after fixing the machine).
    p2p_check: bool = True
    # TPCOMM_CACHE_DIR: where per-machine verdicts are kept (the P2P check's), so a machine
    # whose P2P is known broken falls back at once instead of probing again at every start.
    cache_dir: str = "~/.cache/tpcomm"
    # TPCOMM_FUSED_NORM=1: let all_reduce_add_rms_norm run as one fused kernel where the
    # all-reduce would run on the GPU kernels. Off by default until it has passed on several
    # GPUs: it has run only with emulated ranks on one GPU so far
    # (benchmarks/results/gpu-h200x1-emulated-2026-12-02.md).
    fused_norm: bool = False
    # TPCOMM_CPU_NATIVE=0: run the CPU collectives on the pure-Python path instead of the
    # native core (tpcomm/cpu/_shm_core.c, built at first use with the system compiler); the
    # Python path is also what runs where no compiler exists.
    cpu_native: bool = True
    # TPCOMM_SKINNY_GEMM=0: the TP model's linears always run F.linear (cuBLAS), never the
    # skinny GEMM of their measured table (tpcomm/models/skinny_linear.py); read when a layer
    # is made. The A/B switch of that table.
    skinny_gemm: bool = True


def _read() -> Settings:
    return Settings(
        disable=_bool("TPCOMM_DISABLE", False),
        debug=_bool("TPCOMM_DEBUG", False),
        quiet=_bool("TPCOMM_QUIET", False),
        timeout_s=_float("TPCOMM_TIMEOUT_S", 60.0),
        max_bytes=_size("TPCOMM_MAX_BYTES", 32 << 20, MIN_MAX_BYTES),
        local_world_size=_int_or_none("TPCOMM_LOCAL_WORLD_SIZE"),
        nccl_p2p_disable=_bool("NCCL_P2P_DISABLE", False),
        p2p_check=_bool("TPCOMM_P2P_CHECK", True),
        fused_norm=_bool("TPCOMM_FUSED_NORM", False),
        cpu_native=_bool("TPCOMM_CPU_NATIVE", True),
        skinny_gemm=_bool("TPCOMM_SKINNY_GEMM", True),
        cache_dir=os.path.expanduser(os.environ.get("TPCOMM_CACHE_DIR") or "~/.cache/tpcomm"),
    )


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read from the environment on first use; a value that
    cannot be used raises :class:`SettingsError` (a ValueError) naming the variable."""
    return _read()


def reload_settings() -> Settings:
    """Read the environment again (for tests and for tools that set variables late)."""
    get_settings.cache_clear()
    return get_settings()
