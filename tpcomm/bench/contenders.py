"""The contenders ``tpcomm bench`` compares, behind one small interface (:class:`Contender`).
("Backend" keeps torch.distributed's meaning: the ``gloo`` and ``nccl`` contenders are calls
through those backends.)

- ``tpcomm``: :class:`tpcomm.Communicator` (CPU shared memory or the GPU kernels), with
  ``--algorithm`` passed to every call.
- ``gloo`` (CPU), ``nccl`` (GPU): torch.distributed through :mod:`tpcomm.reference`, the same
  calls tpcomm falls back to.
- ``symm_mem_one_shot``, ``symm_mem_two_shot`` (GPU, all_reduce only): torch's symmetric-memory
  ops ``torch.ops.symm_mem.one_shot_all_reduce_out`` and ``two_shot_all_reduce_`` on a buffer
  from ``torch.distributed._symmetric_memory.empty`` + ``rendezvous``. ``symm_mem`` names both:
  they are reported as two columns rather than a best-of, so the table shows where each wins.
- ``nccl_symm`` (GPU, all_reduce only): NCCL's symmetric-memory kernels (NCCL 2.27+), reached
  through torch: ``symm_mem.set_backend("NCCL")``, a buffer from ``symm_mem.empty`` +
  ``rendezvous`` (NCCL window registration), then ``dist.all_reduce`` on it in place. The
  symmetric-memory backend is fixed for the whole process by the first allocation, and
  tpcomm's own buffers and ``symm_mem_*`` need the CUDA one: ``nccl_symm`` runs only with
  ``nccl`` (``--contenders nccl_symm,nccl``), in a run of its own; elsewhere it is refused
  before any rank starts, as it is without NCCL >= 2.27 or a torch whose ``set_backend``
  takes "NCCL". Whether NCCL really ran its symmetric kernels shows in NCCL_DEBUG=INFO.
- ``deepspeed_shm``, ``mpi_openmpi``, ``mpi_mpich`` (CPU, all_reduce only; ``mpi`` names both
  MPIs): the CPU contenders of :mod:`tpcomm.bench.contenders_cpu`, where installed. The MPI
  ones run as their own MPI job after the ranks' sweep (see ``MPI_CONTENDERS``).
- ``_broken`` (test only, not advertised): gloo/nccl with one element of rank 0's result
  changed, to show that a wrong result is caught and makes the run fail.

all_reduce runs in place on every contender but ``symm_mem_one_shot`` (whose op has no in-place
form): ``comm.all_reduce_(x)``, ``dist.all_reduce(x)``, ``two_shot_all_reduce_(buf)``.

``all_reduce_add_rms_norm`` (tpcomm, gloo, nccl): the end of a TP sublayer on [size / H, H]
rows (H = ``Context.hidden``): ``comm.all_reduce_add_rms_norm`` against
``tpcomm.reference.all_reduce_add_rms_norm`` (all-reduce, then add and norm as torch ops). x is
reduced in place, so the check of x is the all-reduce's; the norm's arithmetic is checked by the
tests (``tests/gpu/test_fused_norm_gpu.py``, the interpreter and emulated-rank runs).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch
import torch.distributed as dist

from .. import reference
from ..communicator import Communicator
from . import contenders_cpu
from .meta import nccl_version


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device
    algorithm: str      # tpcomm's --algorithm ("auto" unless forced)
    hidden: int = 8192  # H of all_reduce_add_rms_norm's rows (Llama-3-70B)


NORM_OP = "all_reduce_add_rms_norm"
IN_PLACE = ("all_reduce", NORM_OP)
NORM_EPS = 1e-5


def _norm_call(inp: torch.Tensor, hidden: int, fn) -> Callable[[], object]:
    """A call of ``fn(x, residual, weight)`` over ``inp`` as [numel / H, H] rows."""
    x = inp.view(-1, hidden)
    residual = torch.zeros_like(x)
    weight = torch.ones(hidden, dtype=inp.dtype, device=inp.device)
    return lambda: fn(x, residual, weight)


class Contender:
    """One way of running a collective. Every method is collective: all ranks call it alike."""

    name = ""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def describe(self) -> str:
        """One line for the report header: what this contender is, as set up in this run."""
        raise NotImplementedError

    def buffers(self, op: str, numel_in: int, numel_out: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) for one call; the same tensor twice for an in-place all_reduce."""
        inp = torch.empty(numel_in, dtype=dtype, device=self.ctx.device)
        if op in IN_PLACE:
            return inp, inp
        return inp, torch.empty(numel_out, dtype=dtype, device=self.ctx.device)

    def make_call(self, op: str, inp: torch.Tensor, out: torch.Tensor) -> Callable[[], object]:
        """A function that runs ``op`` once from ``inp`` into ``out``."""
        raise NotImplementedError

    def run_once(self, call: Callable[[], object]) -> str:
        """Run ``call`` once; return the algorithm it used ('-' when the contender does not say)."""
        call()
        return "-"

    def close(self) -> None:
        pass


class TpcommContender(Contender):
    name = "tpcomm"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.comm = Communicator(device=ctx.device)

    def describe(self) -> str:
        c = self.comm
        text = f"tpcomm.Communicator, engine {c.backend_name!r}, algorithm {self.ctx.algorithm}"
        if c.disabled_reason:
            text += f" (fast path off: {c.disabled_reason}; every call went to torch.distributed)"
        return text

    def make_call(self, op, inp, out):
        comm, algorithm = self.comm, self.ctx.algorithm
        if op == "all_reduce":
            return lambda: comm.all_reduce_(inp, algorithm=algorithm)
        if op == NORM_OP:
            return _norm_call(inp, self.ctx.hidden, lambda x, r, w: comm.all_reduce_add_rms_norm(
                x, r, w, NORM_EPS, algorithm=algorithm))
        fn = getattr(comm, op)
        return lambda: fn(inp, out=out, algorithm=algorithm)

    def run_once(self, call):
        before = self._calls()
        call()
        after = self._calls()
        used = sorted(algo for algo, n in after.items() if n > before.get(algo, 0))
        return "+".join(used) or "-"

    def _calls(self) -> dict[str, int]:
        ops = self.comm.stats()["ops"]
        return {algo: s["calls"] for per_op in ops.values() for algo, s in per_op.items()}

    def close(self):
        self.comm.close()


class TorchContender(Contender):
    """torch.distributed on the default group: gloo for CPU tensors, NCCL for CUDA ones."""

    def __init__(self, ctx: Context, name: str):
        super().__init__(ctx)
        self.name = name

    def describe(self) -> str:
        version = f" {nccl_version()}" if self.name == "nccl" else ""
        return f"torch.distributed {self.name}{version} (tpcomm.reference, tpcomm's fallback)"

    def make_call(self, op, inp, out):
        fn, group = getattr(reference, op), dist.group.WORLD
        if op == NORM_OP:
            return _norm_call(inp, self.ctx.hidden, lambda x, r, w: fn(x, r, w, NORM_EPS, group))
        return lambda: fn(inp, out, group)


class BrokenContender(TorchContender):
    """torch.distributed with one wrong element on rank 0: for the tests of the check."""

    def __init__(self, ctx: Context):
        super().__init__(ctx, "gloo" if ctx.device.type == "cpu" else "nccl")
        self.name = "_broken"

    def describe(self) -> str:
        return "test only: torch.distributed with element 0 of rank 0's result off by one"

    def make_call(self, op, inp, out):
        call = super().make_call(op, inp, out)
        flat = out.view(-1)

        def broken():
            call()
            if self.ctx.rank == 0:
                flat[0] += 1
        return broken


class SymmMemContender(Contender):
    """torch's symmetric-memory all_reduce, one variant ('one_shot' or 'two_shot')."""

    def __init__(self, ctx: Context, variant: str):
        super().__init__(ctx)
        import torch.distributed._symmetric_memory as symm_mem
        self.symm_mem, self.variant = symm_mem, variant
        self.name = f"symm_mem_{variant}"
        self.group_name = dist.group.WORLD.group_name
        with warnings.catch_warnings():
            # torch < 2.8 needs this call before rendezvous; later torch deprecates it
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(self.group_name)

    def describe(self) -> str:
        op = "one_shot_all_reduce_out" if self.variant == "one_shot" else "two_shot_all_reduce_"
        return f"torch.ops.symm_mem.{op} on a rendezvoused symmetric-memory buffer"

    def buffers(self, op, numel_in, numel_out, dtype):
        buf = self.symm_mem.empty(numel_in, dtype=dtype, device=self.ctx.device)
        self.symm_mem.rendezvous(buf, self.group_name)
        return buf, (torch.empty_like(buf) if self.variant == "one_shot" else buf)

    def make_call(self, op, inp, out):
        ops, group = torch.ops.symm_mem, self.group_name
        if self.variant == "one_shot":
            return lambda: ops.one_shot_all_reduce_out(inp, "sum", group, out)
        return lambda: ops.two_shot_all_reduce_(inp, "sum", group)

    def run_once(self, call):
        call()
        return self.variant


NCCL_SYMM_MIN = (2, 27)
NCCL_SYMM_PARTNERS = ("nccl",)   # the contenders nccl_symm can share a process with


def _nccl_tuple() -> tuple[int, ...] | None:
    """NCCL's version as torch was built with it; None where torch has no NCCL (a CPU build)."""
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - CPU-only torch: no _nccl_version
        return None
    return tuple(v) if isinstance(v, tuple) else None


def _symm_mem_takes_nccl() -> bool:
    """Whether this torch's ``symm_mem.set_backend`` accepts "NCCL" (named in its signature)."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return False
    fn = getattr(symm_mem, "set_backend", None)
    if fn is None:
        return False
    import inspect
    try:
        sig = str(inspect.signature(fn))
    except (TypeError, ValueError):
        sig = ""
    return "NCCL" in sig or "NCCL" in (fn.__doc__ or "")


def why_nccl_symm_unavailable(nccl: tuple[int, ...] | None = None,
                              takes_nccl: bool | None = None) -> str | None:
    """None where ``nccl_symm`` can run; else why not and what it needs (checked before any rank
    starts; ``nccl`` / ``takes_nccl`` default to this torch's)."""
    nccl = _nccl_tuple() if nccl is None else nccl
    takes_nccl = _symm_mem_takes_nccl() if takes_nccl is None else takes_nccl
    need = f"NCCL >= {'.'.join(map(str, NCCL_SYMM_MIN))}"
    if nccl is None:
        return (f"contender nccl_symm needs torch built with NCCL ({need}); torch "
                f"{torch.__version__} has no NCCL")
    if tuple(nccl[:2]) < NCCL_SYMM_MIN:
        return (f"contender nccl_symm needs {need} (symmetric kernels); torch {torch.__version__} "
                f"has NCCL {'.'.join(map(str, nccl))}")
    if not takes_nccl:
        return (f"contender nccl_symm needs a torch whose symm_mem.set_backend takes \"NCCL\" "
                f"(torch >= 2.9); torch {torch.__version__} does not")
    return None


class NcclSymmContender(Contender):
    """torch.distributed NCCL all_reduce on a buffer of NCCL's symmetric memory (a registered
    window), where NCCL 2.27+ may run its symmetric kernels."""

    name = "nccl_symm"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        import torch.distributed._symmetric_memory as symm_mem
        self.symm_mem = symm_mem
        self.group_name = dist.group.WORLD.group_name
        try:
            symm_mem.set_backend("NCCL")
        except Exception as e:  # noqa: BLE001 - say which step failed, on every rank alike
            raise RuntimeError(f"nccl_symm: symm_mem.set_backend('NCCL') failed (torch "
                               f"{torch.__version__}, NCCL {nccl_version()}): {e}") from e

    def describe(self) -> str:
        return (f"torch.distributed nccl {nccl_version()} all_reduce on a symm_mem buffer of the "
                f"NCCL backend (symmetric kernels where NCCL picks them; see NCCL_DEBUG=INFO)")

    def buffers(self, op, numel_in, numel_out, dtype):
        buf = self.symm_mem.empty(numel_in, dtype=dtype, device=self.ctx.device)
        self.symm_mem.rendezvous(buf, self.group_name)
        return buf, buf

    def make_call(self, op, inp, out):
        return lambda: dist.all_reduce(inp)


@dataclasses.dataclass(frozen=True)
class Spec:
    make: Callable[[Context], Contender]
    devices: tuple[str, ...]
    ops: tuple[str, ...] = ("all_reduce", "reduce_scatter", "all_gather", NORM_OP)


CONTENDERS = {
    "tpcomm": Spec(TpcommContender, ("cpu", "cuda")),
    "gloo": Spec(lambda ctx: TorchContender(ctx, "gloo"), ("cpu",)),
    "nccl": Spec(lambda ctx: TorchContender(ctx, "nccl"), ("cuda",)),
    "symm_mem_one_shot": Spec(lambda ctx: SymmMemContender(ctx, "one_shot"), ("cuda",),
                              ("all_reduce",)),
    "symm_mem_two_shot": Spec(lambda ctx: SymmMemContender(ctx, "two_shot"), ("cuda",),
                              ("all_reduce",)),
    "nccl_symm": Spec(NcclSymmContender, ("cuda",), ("all_reduce",)),
    "deepspeed_shm": Spec(contenders_cpu.DeepSpeedShmContender, ("cpu",), ("all_reduce",)),
    "mpi_openmpi": Spec(None, ("cpu",), ("all_reduce",)),
    "mpi_mpich": Spec(None, ("cpu",), ("all_reduce",)),
    "_broken": Spec(BrokenContender, ("cpu", "cuda")),
}
# Run by the process that starts the ranks, as MPI jobs of their own (Spec.make is None).
MPI_CONTENDERS = tuple(contenders_cpu.MPI_IMPLS)
EXTERNAL = ("deepspeed_shm",) + MPI_CONTENDERS   # other packages' contenders, where installed
ALIASES = {"symm_mem": ("symm_mem_one_shot", "symm_mem_two_shot"), "mpi": MPI_CONTENDERS}
DEFAULTS = {"cpu": "tpcomm,gloo", "cuda": "tpcomm,nccl,symm_mem"}
PUBLIC = [n for n in CONTENDERS if not n.startswith("_")] + list(ALIASES)
_ON_OTHER_DEVICE = {"cpu": "nccl and symm_mem need --device cuda; on cpu compare with gloo",
                    "cuda": "gloo times CPU tensors; on cuda compare with nccl or symm_mem"}


def resolve_contenders(text: str, device: str, op: str) -> list[str]:
    """'tpcomm,symm_mem' -> ['tpcomm', 'symm_mem_one_shot', 'symm_mem_two_shot'], or a
    ValueError that says what is wrong and what to use instead."""
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            raise ValueError(f"--contenders {text!r}: an empty name; give comma-separated names "
                             f"from {', '.join(PUBLIC)}")
        if name not in CONTENDERS and name not in ALIASES:
            raise ValueError(f"unknown contender {name!r}; choose from {', '.join(PUBLIC)}")
        for n in ALIASES.get(name, (name,)):
            spec = CONTENDERS[n]
            if device not in spec.devices:
                raise ValueError(f"contender {n} does not run on {device}: "
                                 f"{_ON_OTHER_DEVICE[device]}")
            if op not in spec.ops:
                raise ValueError(f"contender {n} times {' and '.join(spec.ops)} only, not {op}")
            why = contenders_cpu.why_unavailable(n) if n in EXTERNAL else None
            if n == "nccl_symm":
                why = why_nccl_symm_unavailable()
            if why:
                raise ValueError(why)
            if n in names:
                raise ValueError(f"contender {n} is named twice in --contenders {text}")
            names.append(n)
    others = [n for n in names if n not in ("nccl_symm",) + NCCL_SYMM_PARTNERS]
    if "nccl_symm" in names and others:
        raise ValueError(f"contender nccl_symm fixes torch's symmetric-memory backend to NCCL for "
                         f"the whole run, and {', '.join(others)} need(s) the CUDA one: time it "
                         f"in a run of its own, --contenders nccl_symm,nccl")
    return names


def make_contender(name: str, ctx: Context) -> Contender:
    return CONTENDERS[name].make(ctx)
