"""tpcomm's vocabulary: ops, algorithms and mechanisms, which device supports which, and the codes
the GPU kernels record in their error word. Every other module takes its names from here, so
stats, the flight recorder, errors, ``tpcomm plan`` and the benchmarks print the same ones.

Names (a leaf module: it imports nothing of tpcomm, and nothing heavy)::

    op          all_reduce | reduce_scatter | all_gather
    algorithm   one_shot | two_shot | ring | direct | two_level | local | torch   (+ fused)
    mechanism   push | pull  (how the GPU's one_shot moves the data: into the peers' receive
                slots, or read from the peers' buffers)
    qualified   "one_shot/push": an algorithm with the mechanism that ran it

A call asks for ``"auto"``, an algorithm (``"one_shot"``: selection picks the mechanism) or a
qualified name (``"one_shot/push"``: the mechanism forced, where the device has both).

One call, one :class:`Choice`: selection decides the algorithm, the mechanism and the round
size once (``Communicator._decide``, cached per op, size, dtype, request and capture), and
everything below acts on it: the Communicator runs the one chunk loop
(:func:`tpcomm.engine.run_rounds`), the engine runs each round as ``choice.name`` without
deciding again, and the stats, the flight recorder and the errors print ``choice.name``.

Algorithms:

- ``one_shot``  every rank reads every peer's input and reduces all of it: one round.
- ``two_shot``  rank r reduces slice r of every input, then every rank gathers the slices: two
                rounds, a 1/world share of the reduction work and of the bytes read per rank.
- ``ring``      chunked, pipelined reduce-scatter + all-gather (GPU, bandwidth-bound sizes).
- ``direct``    the only algorithm of reduce_scatter and all_gather: one round.
- ``two_level`` groups that span nodes: intra-node reduce-scatter, inter-node all-reduce,
                intra-node all-gather (``tpcomm.multinode``).
- ``local``     world size 1: a copy.
- ``torch``     torch.distributed (NCCL / gloo): the fallback, and the choice wherever it is faster.
- ``fused``     a GEMM + collective in one kernel (``tpcomm.ops.overlap``, method="fused").
"""
from __future__ import annotations

import enum
from typing import NamedTuple


class _Name(str, enum.Enum):
    """A name of the vocabulary: equal to its string, and printed as it."""

    def __str__(self) -> str:
        return self.value


class Op(_Name):
    ALL_REDUCE = "all_reduce"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_GATHER = "all_gather"


class Algorithm(_Name):
    ONE_SHOT = "one_shot"
    TWO_SHOT = "two_shot"
    RING = "ring"
    DIRECT = "direct"
    TWO_LEVEL = "two_level"
    LOCAL = "local"
    TORCH = "torch"
    FUSED = "fused"


class Mechanism(_Name):
    PUSH = "push"
    PULL = "pull"


AUTO = "auto"
OPS: tuple[str, ...] = tuple(o.value for o in Op)

# device -> op -> the algorithms a caller may ask for ("auto" and "torch" always)
SUPPORTED: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {"all_reduce": ("one_shot", "two_shot", "two_level"), "reduce_scatter": ("direct",),
            "all_gather": ("direct",)},
    "cuda": {"all_reduce": ("one_shot", "two_shot", "ring", "two_level"),
             "reduce_scatter": ("direct",), "all_gather": ("direct",)},
}
# (device, op, algorithm) -> the mechanisms a caller may force
MECHANISMS: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("cuda", "all_reduce", "one_shot"): ("push", "pull"),
}

# stats / flight-recorder name of all_reduce_add_rms_norm's fused kernel (one_shot, pushed,
# with the add + RMSNorm epilogue)
FUSED_NORM = "one_shot/push+norm"


class Choice(NamedTuple):
    """The whole decision of one call (immutable; made once per call shape, then reused).

    ``name`` is what runs and what every report prints: the qualified name (``"one_shot/push"``)
    where the device has several mechanisms, else the algorithm (``"two_shot"``, ``"torch"``).
    ``chunk``: elements of one engine round (all_reduce and all_gather: of the input;
    reduce_scatter: of the output, i.e. per rank), the step of the one chunk loop; 0 where no
    engine of tpcomm runs the call (``torch``, ``local``, ``two_level``). ``reason``: why
    torch.distributed takes the call ("" otherwise)."""
    name: str
    algorithm: str
    mechanism: str | None
    chunk: int
    reason: str


def choice(algorithm: str, mechanism: str | None = None, chunk: int = 0,
           reason: str = "") -> Choice:
    """A :class:`Choice`, its ``name`` qualified from the algorithm and the mechanism."""
    return Choice(qualified(algorithm, mechanism), str(algorithm), mechanism, chunk, reason)


def qualified(algorithm: str, mechanism: str | None) -> str:
    """``"one_shot/push"`` for an algorithm and its mechanism; the algorithm alone without one."""
    return f"{algorithm}/{mechanism}" if mechanism else str(algorithm)


def split(name: str) -> tuple[str, str | None]:
    """``"one_shot/push"`` -> ("one_shot", "push"); ``"one_shot"`` -> ("one_shot", None)."""
    algorithm, _, mechanism = name.partition("/")
    return algorithm, (mechanism or None)


def choices(op: str, device_type: str) -> tuple[str, ...]:
    """Every name a caller may pass as ``algorithm=`` for ``op`` on ``device_type``."""
    out = [AUTO, "torch"]
    for a in SUPPORTED.get(device_type, {}).get(op, ()):
        out.append(a)
        out += [qualified(a, m) for m in MECHANISMS.get((device_type, op, a), ())]
    return tuple(out)


def check(op: str, name: str, device_type: str) -> None:
    """Raise a clear ValueError for a name that is not an algorithm of ``op`` on this device."""
    if name in (AUTO, "torch"):
        return
    known = choices(op, device_type)
    if name not in known:
        raise ValueError(f"{op} on {device_type} has no algorithm {name!r}; choose one of "
                         f"{known}")


# ---------------------------------------------------------------- codes the GPU kernels record
# op codes in the kernels' error word (kernels/barrier.py record_error): which kernel waited
OP_ONE_SHOT_PUSH, OP_ONE_SHOT_PULL, OP_TWO_SHOT, OP_RING = 1, 2, 3, 4
OP_REDUCE_SCATTER, OP_ALL_GATHER, OP_BARRIER, OP_ADD_RMS_NORM = 5, 6, 7, 8
OP_MATMUL_RS, OP_ALL_GATHER_MATMUL, OP_MATMUL_AR = 9, 10, 11
# code -> (op, qualified algorithm), as errors print them
OP_NAMES: dict[int, tuple[str, str]] = {
    OP_ONE_SHOT_PUSH: ("all_reduce", "one_shot/push"),
    OP_ONE_SHOT_PULL: ("all_reduce", "one_shot/pull"),
    OP_TWO_SHOT: ("all_reduce", "two_shot"), OP_RING: ("all_reduce", "ring"),
    OP_REDUCE_SCATTER: ("reduce_scatter", "direct"),
    OP_ALL_GATHER: ("all_gather", "direct"), OP_BARRIER: ("barrier", "barrier"),
    OP_ADD_RMS_NORM: ("all_reduce_add_rms_norm", FUSED_NORM),
    OP_MATMUL_RS: ("matmul_reduce_scatter", "fused"),
    OP_ALL_GATHER_MATMUL: ("all_gather_matmul", "fused"),
    OP_MATMUL_AR: ("matmul_all_reduce", "fused"),
}
