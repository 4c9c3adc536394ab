"""All-reduce cost model: latency and bandwidth terms per link and per algorithm.

Every algorithm's time is a sum of terms ``latency + bytes x (1 / bandwidth)`` over the links it
uses, in microseconds, for S bytes on N GPUs per node and M nodes:

    symm_mem_one_shot   a1 + S·((N-1)·b_nv + c1)        reads N-1 peer copies over NVLink
    symm_mem_two_shot   a2 + S·(2(N-1)/N·b_nv + c2)     reduce-scatter + all-gather over NVLink
    nccl/ring  min over protocols p of a_p + 2(N-1)·h_p + 2(N-1)/N·S·b_p     (LL and Simple)
    nic ring   2(M-1)·l_nic + 2(M-1)/M·s / B_nic        s = bytes each GPU sends over the network
    nic tree   2·ceil(log2 M)·l_nic + 2·s / B_nic       double binary tree: latency ~ log M
    two_level  RS(c) + X(c) + AG(c) + (k-1)·max(RS(c) + AG(c), X(c)),  k = ceil(S/c) chunks of c,
               RS = AG = half a two_shot, X = nic ring or tree on c/N bytes per GPU

``b_nv`` (NVLink, per byte a GPU moves through its port) is one constant shared by the one-shot
and two-shot terms (named for torch symm_mem's kernels, which they are fitted to); ``c1``, ``c2`` are the per-byte costs of each kernel's local work, ``a`` their fixed
costs (launch, barriers); NCCL's ring is fitted as two protocols whose minimum it takes (LL: low
latency, low bandwidth; Simple: the reverse), which is how NCCL's own tuner models it. All are
fitted to measured times (tpcomm.selection.cost_data) by least squares on the *relative* error, every
parameter kept >= 0. The network terms are not fitted (no NIC exists on our machines): the NIC's
bandwidth and latency are inputs, with an assumed efficiency.

tpcomm's own kernels (tpcomm/kernels/*.py) are modelled apart from the NCCL / symm_mem-style
terms above, because they move and wait differently; each is a + (N-1)·l + link bytes·b + local
bytes·c, with its own constants (S bytes, bf16). They carry tpcomm.algorithms' names, as stats,
errors and the benchmarks print them:

    one_shot/push  stores S into each of N-1 peers' slots (data carries its flag: one one-way
                   latency, no barrier); local: polls and sums N·S
    one_shot/pull  signal-pad barrier, reads N-1 peer buffers; local: S copied in
    two_shot       pushes slices into the owners' RS slots, then the owner pushes its reduced
                   slice to every peer: 2(N-1)/N·S on the link, two latencies
    ring           float32 partials in the reduce-scatter (2x the bf16 bytes), then the
                   all-gather: 3(N-1)/N·S on the link, 2(N-1) dependent steps
    shared         (k-1)·r for k > 1 rounds of the push region (tpcomm/cuda/p2p_collectives.py);
                   eager calls pay k·e_host (a host-launched round each; per host);
                   (chunks-1)·p for the chunked two-shot variants (two_shot_v2/v4)

Flat NCCL across nodes (for comparison): a ring over all N·M GPUs, N rings in parallel each
crossing nodes through its own NIC, so the ring's bus bandwidth is min(NCCL's intra-node one,
the node's total NIC bandwidth), and 2M of its 2(NM-1) steps pay the NIC latency.
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch

from . import cost_data, cost_data_tpcomm
from .cost_data import NCCL, PULL, PUSH, RING, SYMM_ONE_SHOT, SYMM_TWO_SHOT, TWO_SHOT

US_PER_BYTE_AT_1GBS = 1e-3          # 1 GB/s = 1e3 bytes per microsecond

# Assumed network constants (not measured here: no NIC on our machines). NCCL over InfiniBand
# NDR reaches about 85% of the line rate in all-reduce (busbw ~ 42 of 50 GB/s per 400 Gb/s NIC,
# published nccl-tests results); one network hop through NCCL's proxy costs a few microseconds.
NIC_EFFICIENCY = 0.85
NIC_LATENCY_US = 5.0
# PCIe 5.0 x16 peer-to-peer, assumed effective per direction (no PCIe-only machine measured).
PCIE_GBS = 40.0

K, M = 1 << 10, 1 << 20


# ---------------------------------------------------------------------------- description
@dataclasses.dataclass(frozen=True)
class Nic:
    """The network of one node: ``count`` NICs of ``gbit_s`` each."""
    count: int
    gbit_s: float
    latency_us: float = NIC_LATENCY_US
    efficiency: float = NIC_EFFICIENCY

    @property
    def node_gbs(self) -> float:
        """Usable GB/s per node, one direction."""
        return self.count * self.gbit_s / 8 * self.efficiency

    def __str__(self):
        return (f"{self.count}x{self.gbit_s:g}Gb/s@{self.latency_us:g}us "
                f"(x{self.efficiency:g} efficiency = {self.node_gbs:.0f} GB/s per node)")


_NIC_RE = re.compile(r"^(?:(\d+)\s*[xX]\s*)?([\d.]+)\s*(Gb/s|Gbit/s|Gbps|Gb|GB/s|GBps|GB)"
                     r"(?:\s*@\s*([\d.]+)\s*us)?$")


def parse_nic(text: str, efficiency: float = NIC_EFFICIENCY) -> Nic:
    """'8x400Gb/s' (8 NICs of 400 Gbit/s), '400Gb/s@3us' (latency per hop), '2x25GB/s'
    (gigabytes: capital B)."""
    m = _NIC_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"cannot read NIC {text!r}; examples: 8x400Gb/s, 1x200Gb/s@3us, "
                         f"2x25GB/s")
    count = int(m.group(1) or 1)
    value = float(m.group(2))
    gbit = value if m.group(3).startswith("Gb") else value * 8
    lat = float(m.group(4)) if m.group(4) else NIC_LATENCY_US
    if count < 1 or gbit <= 0 or lat < 0:
        raise ValueError(f"NIC {text!r}: count and bandwidth must be positive")
    return Nic(count, gbit, lat, efficiency)


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    params: "Params"
    nic: Nic | None = None
    link: str = "nvlink"            # intra-node: "nvlink" (fitted) or "pcie" (assumed)

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("nodes and gpus per node must be >= 1")
        if self.nodes > 1 and self.nic is None:
            raise ValueError("a cluster of several nodes needs a NIC (e.g. --nic 8x400Gb/s)")
        if self.link not in ("nvlink", "pcie"):
            raise ValueError(f"unknown intra-node link {self.link!r}: nvlink or pcie")


# ---------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class Params:
    """Fitted constants of one GPU type (times in us, per-byte costs in us per byte)."""
    b_nv: float                                  # NVLink, us per byte through a GPU's port
    one_shot: tuple[float, float]                # (a1, c1)
    two_shot: tuple[float, float]                # (a2, c2)
    nccl: dict                                   # protocol -> (a_p, h_p, b_p)
    source: str = ""

    def describe(self) -> str:
        gbs = lambda b: US_PER_BYTE_AT_1GBS / b if b > 0 else float("inf")  # noqa: E731
        lines = [f"NVLink: {gbs(self.b_nv):.0f} GB/s per GPU port",
                 f"{SYMM_ONE_SHOT}: {self.one_shot[0]:.2f} us + S / "
                 f"{gbs(self.one_shot[1]):.0f} GB/s local",
                 f"{SYMM_TWO_SHOT}: {self.two_shot[0]:.2f} us + S / "
                 f"{gbs(self.two_shot[1]):.0f} GB/s local"]
        for p, (a, h, b) in self.nccl.items():
            lines.append(f"nccl {p}: {a:.2f} us + {h:.2f} us per step, bus {gbs(b):.0f} GB/s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- intra-node terms
def _link_b(params: Params, link: str) -> float:
    return params.b_nv if link == "nvlink" else US_PER_BYTE_AT_1GBS / PCIE_GBS


def one_shot_us(S: float, N: int, p: Params, link: str = "nvlink") -> float:
    a, c = p.one_shot
    return a + S * ((N - 1) * _link_b(p, link) + c)


def two_shot_us(S: float, N: int, p: Params, link: str = "nvlink") -> float:
    a, c = p.two_shot
    return a + S * (2 * (N - 1) / N * _link_b(p, link) + c)


def half_two_shot_us(S: float, N: int, p: Params, link: str = "nvlink") -> float:
    """A reduce-scatter or an all-gather of S bytes: half a two_shot (assumed, not measured)."""
    return two_shot_us(S, N, p, link) / 2


def nccl_us(S: float, N: int, p: Params, link: str = "nvlink") -> tuple[float, str]:
    """(time, protocol) of NCCL's ring on one node."""
    best = None
    for proto, (a, h, b) in p.nccl.items():
        if link == "pcie":
            b = max(b, _link_b(p, link))
        t = a + 2 * (N - 1) * h + 2 * (N - 1) / N * S * b
        if best is None or t < best[0]:
            best = (t, proto)
    return best


def predict_intra(algorithm: str, S: float, N: int, p: Params, link: str = "nvlink") -> float:
    """A baseline's time: ``algorithm`` one of "nccl", "symm_mem_one_shot", "symm_mem_two_shot"."""
    if algorithm == SYMM_ONE_SHOT:
        return one_shot_us(S, N, p, link)
    if algorithm == SYMM_TWO_SHOT:
        return two_shot_us(S, N, p, link)
    if algorithm == NCCL:
        return nccl_us(S, N, p, link)[0]
    raise ValueError(f"unknown baseline {algorithm!r}; the model has {NCCL}, {SYMM_ONE_SHOT}, "
                     f"{SYMM_TWO_SHOT} (tpcomm's kernels: tpcomm_us)")


# ---------------------------------------------------------------------------- network terms
def nic_ring_us(s: float, Mn: int, nic: Nic, gpus_sharing: int) -> float:
    """All-reduce of s bytes per GPU over Mn nodes, ring; ``gpus_sharing`` GPUs of a node run
    their own rings at once and share the node's NICs."""
    if Mn == 1:
        return 0.0
    b = US_PER_BYTE_AT_1GBS / (nic.node_gbs / gpus_sharing)
    return 2 * (Mn - 1) * nic.latency_us + 2 * (Mn - 1) / Mn * s * b


def nic_tree_us(s: float, Mn: int, nic: Nic, gpus_sharing: int) -> float:
    if Mn == 1:
        return 0.0
    b = US_PER_BYTE_AT_1GBS / (nic.node_gbs / gpus_sharing)
    return 2 * math.ceil(math.log2(Mn)) * nic.latency_us + 2 * s * b


@dataclasses.dataclass(frozen=True)
class Choice:
    algorithm: str
    time_us: float
    chunk_bytes: int | None = None
    detail: str = ""


def _intra_rs_ag_us(ch: float, c: Cluster) -> float:
    """Reduce-scatter + all-gather of ch bytes inside a node: the faster of symm_mem-style
    two-shot and tpcomm's two-shot push (NVLink only: tpcomm's terms are fitted on NVLink)."""
    N, p = c.gpus_per_node, c.params
    t = 2 * half_two_shot_us(ch, N, p, c.link)
    if c.link == "nvlink":
        t = min(t, tpcomm_us(TWO_SHOT, ch, N))
    return t


def two_level_us(S: int, c: Cluster, inter: str = "ring") -> Choice:
    """Best pipelined two-level time over power-of-two chunk sizes from 256 KiB to S."""
    N, Mn = c.gpus_per_node, c.nodes
    cross = nic_ring_us if inter == "ring" else nic_tree_us
    best = None
    chunk = 256 * K
    sizes = []
    while chunk < S:
        sizes.append(chunk)
        chunk *= 2
    sizes.append(S)
    for ch in sizes:
        k = math.ceil(S / ch)
        intra = _intra_rs_ag_us(ch, c) if N > 1 else 0.0
        x = cross(ch / N, Mn, c.nic, N)
        t = intra + x + (k - 1) * max(intra, x)
        if best is None or t < best.time_us - 1e-9:
            best = Choice(f"two_level_{inter}", t, ch if k > 1 else None,
                          f"{k} chunk(s); per chunk: intra {intra:.1f} us, network {x:.1f} us")
    return best


def flat_nccl_us(S: int, c: Cluster, algo: str = "ring") -> Choice:
    """NCCL over every GPU of every node: ring, or tree across nodes."""
    N, Mn, p = c.gpus_per_node, c.nodes, c.params
    if Mn == 1:
        t, proto = nccl_us(S, N, p, c.link)
        return Choice(NCCL, t, detail=f"NCCL ring, {proto}")
    G = N * Mn
    b_net = US_PER_BYTE_AT_1GBS / c.nic.node_gbs
    best = None
    for proto, (a, h, b) in p.nccl.items():
        b = max(b, _link_b(p, c.link)) if c.link == "pcie" else b
        if algo == "ring":
            t = (a + 2 * (G - Mn) * h + 2 * Mn * c.nic.latency_us
                 + 2 * (G - 1) / G * S * max(b, b_net))
        else:
            t = (a + 2 * (N - 1) * h + 2 * math.ceil(math.log2(Mn)) * c.nic.latency_us
                 + S * max(2 * (N - 1) / N * b, 2 * b_net))
        if best is None or t < best[0]:
            best = (t, proto)
    return Choice(f"nccl_{algo}", best[0], detail=f"NCCL {algo} across nodes, {best[1]}")


def candidates(S: int, c: Cluster) -> list[Choice]:
    """Every algorithm's predicted time for one all-reduce of S bytes, fastest first."""
    N, p = c.gpus_per_node, c.params
    out = []
    if c.nodes == 1:
        if N == 1:
            return [Choice("local", 0.0)]
        out.append(Choice(SYMM_ONE_SHOT, one_shot_us(S, N, p, c.link)))
        out.append(Choice(SYMM_TWO_SHOT, two_shot_us(S, N, p, c.link)))
        out.append(flat_nccl_us(S, c))
        if c.link == "nvlink":
            out += [Choice(a, tpcomm_us(a, S, N)) for a in TPCOMM_ALGORITHMS]
    else:
        out.append(two_level_us(S, c, "ring"))
        out.append(two_level_us(S, c, "tree"))
        out.append(flat_nccl_us(S, c, "ring"))
        out.append(flat_nccl_us(S, c, "tree"))
    return sorted(out, key=lambda ch: ch.time_us)


def plan(S: int, c: Cluster) -> Choice:
    """The fastest algorithm for S bytes (and its chunk size, for the two-level ones)."""
    return candidates(S, c)[0]


# ---------------------------------------------------------------------------- fitting
@dataclasses.dataclass(frozen=True)
class Point:
    gpus: int
    algorithm: str
    mode: str
    nbytes: int
    time_us: float


def fit_points(rows=None) -> list[Point]:
    """The measurements the fit uses: graph rows, and eager rows from 32 MiB on (see
    tpcomm.selection.cost_data for why)."""
    rows = cost_data.H200_ALLREDUCE if rows is None else canonical_baseline_rows(rows)
    pts = [Point(*r) for r in rows]
    return [q for q in pts if q.mode == "graph" or q.nbytes >= 32 * M]


# The names before tpcomm.algorithms, for rows written then: tpcomm's kernels were
# "tpcomm_one_shot_push", ..., and torch symm_mem's kernels "one_shot", "two_shot" (which today
# name tpcomm's own algorithms).
LEGACY_NAMES = {"tpcomm_one_shot_push": PUSH, "tpcomm_one_shot_pull": PULL,
                "tpcomm_two_shot": TWO_SHOT, "tpcomm_ring": RING}
LEGACY_BASELINES = {"one_shot": SYMM_ONE_SHOT, "two_shot": SYMM_TWO_SHOT}
BASELINES = (NCCL, SYMM_ONE_SHOT, SYMM_TWO_SHOT)


def canonical_baseline_rows(rows) -> list[tuple]:
    """(gpus, algorithm, mode, nbytes, time_us) rows with today's names: a baseline row's
    "one_shot" / "two_shot" is torch symm_mem's kernel (no baseline row names tpcomm's)."""
    return [(r[0], LEGACY_BASELINES.get(r[1], r[1]), *r[2:]) for r in rows]


def canonical_tpcomm_rows(rows) -> list[tuple]:
    """(file, gpus, algorithm, ...) rows of tpcomm's kernels with today's names. Rows in the old
    names (any "tpcomm_*" among them) also get symm_mem's "one_shot" / "two_shot" renamed; rows
    in today's names are kept as they are ("two_shot" there is tpcomm's kernel)."""
    rows = list(rows)
    if not any(str(r[2]).startswith("tpcomm_") for r in rows):
        return rows
    old = {**LEGACY_NAMES, **LEGACY_BASELINES}
    return [(r[0], r[1], old.get(r[2], r[2]), *r[3:]) for r in rows]


def _nnls(A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """min |A x - y| with x >= 0 (Lawson-Hanson active set; columns are few)."""
    n = A.shape[1]
    scale = A.abs().amax(0).clamp_min(1e-30)
    A = A / scale
    x = torch.zeros(n, dtype=A.dtype)
    passive: list[int] = []
    for _ in range(10 * n):
        w = A.T @ (y - A @ x)
        cand = [j for j in range(n) if j not in passive and w[j] > 1e-12]
        if not cand:
            break
        passive.append(max(cand, key=lambda j: float(w[j])))
        while True:
            z = torch.zeros(n, dtype=A.dtype)
            z[passive] = torch.linalg.lstsq(A[:, passive], y.unsqueeze(1)).solution.squeeze(1)
            if all(z[j] > 0 for j in passive):
                x = z
                break
            ratios = [float(x[j] / (x[j] - z[j])) for j in passive if z[j] <= 0]
            alpha = min(ratios)
            x = x + alpha * (z - x)
            passive = [j for j in passive if x[j] > 1e-15]
    return x / scale


def _fit_linear(rows: list[tuple[list[float], float]]) -> list[float]:
    """Non-negative least squares on the relative error: min sum ((f.x - t) / t)^2."""
    A = torch.tensor([[v / t for v in f] for f, t in rows], dtype=torch.float64)
    y = torch.ones(len(rows), dtype=torch.float64)
    return _nnls(A, y).tolist()


def _shot_features(q: Point) -> list[float]:
    """Columns: a1, c1, a2, c2, b_nv."""
    N, S = q.gpus, q.nbytes
    if q.algorithm == SYMM_ONE_SHOT:
        return [1, S, 0, 0, (N - 1) * S]
    return [0, 0, 1, S, 2 * (N - 1) / N * S]


def _nccl_features(q: Point) -> list[float]:
    N, S = q.gpus, q.nbytes
    return [1, 2 * (N - 1), 2 * (N - 1) / N * S]


def fit(rows=None, source: str = cost_data.SOURCE) -> Params:
    """Fit every constant to the measured rows (see :func:`fit_points`)."""
    pts = fit_points(rows)
    shots = [q for q in pts if q.algorithm in (SYMM_ONE_SHOT, SYMM_TWO_SHOT)]
    if not shots:
        raise ValueError(f"no {SYMM_ONE_SHOT}/{SYMM_TWO_SHOT} measurements to fit")
    a1, c1, a2, c2, b_nv = _fit_linear([(_shot_features(q), q.time_us) for q in shots])
    nccl = [q for q in pts if q.algorithm == NCCL]
    protos = _fit_protocols(nccl) if nccl else {}
    return Params(b_nv=b_nv, one_shot=(a1, c1), two_shot=(a2, c2), nccl=protos, source=source)


def _fit_protocols(pts: list[Point]) -> dict:
    """NCCL = min(LL, Simple): assign each point to a protocol, fit each, reassign, repeat."""
    big = sorted(q.nbytes for q in pts)
    split = big[len(big) // 2]
    assign = {i: ("LL" if q.nbytes < split else "Simple") for i, q in enumerate(pts)}
    protos: dict = {}
    for _ in range(20):
        new = {}
        for proto in ("LL", "Simple"):
            mine = [q for i, q in enumerate(pts) if assign[i] == proto]
            if len(mine) < 2:
                mine = pts
            new[proto] = tuple(_fit_linear([(_nccl_features(q), q.time_us) for q in mine]))
        protos = new
        params = Params(0.0, (0, 0), (0, 0), protos)
        reassign = {i: nccl_us(q.nbytes, q.gpus, params)[1] for i, q in enumerate(pts)}
        if reassign == assign:
            break
        assign = reassign
    return protos


_fitted: Params | None = None


def h200() -> Params:
    """The constants fitted to the H200 baselines (cost_data; computed once per process)."""
    global _fitted
    if _fitted is None:
        _fitted = fit()
    return _fitted


GPUS = {"h200": h200, "h100": h200}     # h100: same NVLink 4 generation; unvalidated


def predict_point(q: Point, p: Params) -> float:
    return predict_intra(q.algorithm, q.nbytes, q.gpus, p)


def error_table(rows=None, *, leave_one_out: bool = True) -> list[dict]:
    """Prediction next to measurement for every fitted row: error of the fit on all rows, and
    (``leave_one_out``) the error when that row was left out of the fit."""
    pts = fit_points(rows)
    p = fit(rows) if rows is not None else h200()
    out = []
    for i, q in enumerate(pts):
        pred = predict_point(q, p)
        row = {"gpus": q.gpus, "algorithm": q.algorithm, "mode": q.mode, "nbytes": q.nbytes,
               "measured_us": q.time_us, "predicted_us": pred,
               "error": (pred - q.time_us) / q.time_us}
        if leave_one_out:
            rest = [(r.gpus, r.algorithm, r.mode, r.nbytes, r.time_us)
                    for j, r in enumerate(pts) if j != i]
            try:
                row["loo_error"] = (predict_point(q, fit(rest)) - q.time_us) / q.time_us
            except ValueError:
                row["loo_error"] = float("nan")
        out.append(row)
    return out


# ---------------------------------------------------------------------------- tpcomm's kernels
TPCOMM_ALGORITHMS = (PUSH, PULL, TWO_SHOT, RING)
# Bytes one launch round covers (tpcomm/cuda/p2p_collectives.py, Layout.make with PUSH_ROUND_BYTES =
# 8 MiB: rs_slot = 8 MiB / N, push_buf = 2 N rs_slot = 16 MiB): two-shot N·rs_slot = 8 MiB;
# one-shot push push_buf / N = 4 MiB at N = 4 (kept for every N); ring push_buf / (4 + 2 bytes)
# elements of bf16 = 16/3 MiB. Larger calls run in ceil(S / round) rounds.
TPCOMM_ROUND_BYTES = {PUSH: 4 * M, PULL: 4 * M, TWO_SHOT: 8 * M, RING: 16 * M // 3}
_SHARED = ("chunk_us", "round_us", "eager_round_us[x2]", "eager_round_us[x4]")


def _tpcomm_bytes(algorithm: str, S: float, N: int) -> tuple[float, float]:
    """(bytes a GPU stores over NVLink, bytes it polls / reduces / copies locally)."""
    if algorithm == PUSH:
        return (N - 1) * S, N * S
    if algorithm == PULL:
        return (N - 1) * S, S
    if algorithm == TWO_SHOT:
        return 2 * (N - 1) / N * S, S
    if algorithm == RING:
        return 3 * (N - 1) / N * S, S
    raise ValueError(f"unknown tpcomm algorithm {algorithm!r}; the model has "
                     f"{', '.join(TPCOMM_ALGORITHMS)}")


def host_of(config: str) -> str:
    """'x2' for a file measured on the 2-GPU machine, else 'x4' (the 4-GPU machine)."""
    return "x2" if "h200x2" in config else "x4"


def _tpcomm_features(algorithm: str, N: int, S: float, mode: str = "graph", chunks: int = 1,
                     host: str = "x4") -> list[float]:
    """Columns: (a, l, b, c) per algorithm in TPCOMM_ALGORITHMS order, then _SHARED."""
    algorithm = LEGACY_NAMES.get(algorithm, algorithm)
    link, local = _tpcomm_bytes(algorithm, S, N)
    i = TPCOMM_ALGORITHMS.index(algorithm)
    f = [0.0] * (4 * len(TPCOMM_ALGORITHMS))
    f[4 * i: 4 * i + 4] = [1.0, N - 1, link, local]
    k = max(1, math.ceil(S / TPCOMM_ROUND_BYTES[algorithm]))
    eager = mode == "eager"
    return f + [chunks - 1, 0 if eager else k - 1, k if eager and host == "x2" else 0,
                k if eager and host == "x4" else 0]


def tpcomm_points(rows=None) -> list[tuple]:
    """(file, gpus, algorithm, mode, nbytes, time_us, variant) of tpcomm's kernels that the fit
    uses: graph rows, and eager rows from 32 MiB on (as for the baselines)."""
    rows = cost_data_tpcomm.ROWS if rows is None else canonical_tpcomm_rows(rows)
    return [r for r in rows if r[2] in TPCOMM_ALGORITHMS and (r[3] == "graph" or r[4] >= 32 * M)]


def _chunks(variant: str) -> int:
    return int(variant.rsplit("_v", 1)[1]) if "_v" in (variant or "") else 1


def fit_tpcomm(rows=None) -> list[float]:
    """Every tpcomm constant, by non-negative least squares on the relative error."""
    pts = tpcomm_points(rows)
    if not pts:
        raise ValueError("no tpcomm measurements to fit")
    return _fit_linear([(_tpcomm_features(r[2], r[1], r[4], r[3], _chunks(r[6]), host_of(r[0])),
                         r[5]) for r in pts])


# Fitted by fit_tpcomm() to tpcomm/selection/cost_data_tpcomm.py, i.e. benchmarks/results/
# timing-h200x2-w2-2026-11-22.json, timing-h200x4-w2-2026-11-22.json,
# timing-h200x4-w4-2026-11-22.json, gpu-h200x2-2026-11-22.json, gpu-h200x4-2026-11-22.json and
# gpu-h200x4-2026-11-22-graph-final.json (test_cost_model checks that a refit gives these).
# (a us, l us per peer, b us per link byte, c us per local byte); GB/s = 1e-3 / b.
TPCOMM_H200 = {
    PUSH: (2.58, 0.858, 2.73e-06, 4.36e-07),
    PULL: (5.01, 0.593, 3.13e-06, 1.41e-07),
    TWO_SHOT: (3.15, 1.39, 3.32e-06, 0.0),
    RING: (2.08, 2.69, 1.27e-06, 2.43e-06),
    "shared": (0.566, 8.52, 9.49, 25.0),        # _SHARED, in us
}


def tpcomm_vector(table: dict = TPCOMM_H200) -> list[float]:
    return [v for a in TPCOMM_ALGORITHMS for v in table[a]] + list(table["shared"])


def tpcomm_table(x: list[float]) -> dict:
    n = len(TPCOMM_ALGORITHMS)
    out = {a: tuple(x[4 * i: 4 * i + 4]) for i, a in enumerate(TPCOMM_ALGORITHMS)}
    out["shared"] = tuple(x[4 * n:])
    return out


def tpcomm_us(algorithm: str, S: float, N: int, x: list[float] | None = None,
              mode: str = "graph", chunks: int = 1, host: str = "x4") -> float:
    """Predicted time of one of tpcomm's kernels (graph replays unless ``mode="eager"``)."""
    x = tpcomm_vector() if x is None else x
    f = _tpcomm_features(algorithm, N, S, mode, chunks, host)
    return sum(a * b for a, b in zip(f, x))


def describe_tpcomm(x: list[float] | None = None) -> str:
    t = tpcomm_table(tpcomm_vector() if x is None else x)
    gbs = lambda b: US_PER_BYTE_AT_1GBS / b if b > 0 else float("inf")  # noqa: E731
    lines = [f"{a}: {v[0]:.2f} us + {v[1]:.2f} us per peer, link {gbs(v[2]):.0f} GB/s, local "
             f"{gbs(v[3]):.0f} GB/s" for a, v in t.items() if a != "shared"]
    lines.append("shared: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(_SHARED, t["shared"])))
    return "\n".join(lines)


def _tp_pred(r: tuple, x: list[float]) -> float:
    return tpcomm_us(r[2], r[4], r[1], x, r[3], _chunks(r[6]), host_of(r[0]))


def tpcomm_error_table(rows=None, *, held_out: bool = True) -> list[dict]:
    """tpcomm's measurements with the prediction and error; ``held_out`` adds ``loso_error``
    (every row of that size left out of the fit) and ``world_error`` (fitted on the other world
    size only)."""
    pts = tpcomm_points(rows)
    x = fit_tpcomm(rows) if rows is not None else tpcomm_vector()
    loso, world = {}, {}
    if held_out:
        for S in sorted({r[4] for r in pts}):
            loso[S] = fit_tpcomm([r for r in pts if r[4] != S])
        for g in sorted({r[1] for r in pts}):
            world[g] = fit_tpcomm([r for r in pts if r[1] != g])
    out = []
    for r in pts:
        pred = _tp_pred(r, x)
        row = {"config": r[0], "gpus": r[1], "algorithm": r[2] + (f"[{r[6][-2:]}]" if r[6] else
                                                                   ""),
               "mode": r[3], "nbytes": r[4], "measured_us": r[5], "predicted_us": pred,
               "error": (pred - r[5]) / r[5]}
        if held_out:
            row["loso_error"] = (_tp_pred(r, loso[r[4]]) - r[5]) / r[5]
            row["world_error"] = (_tp_pred(r, world[r[1]]) - r[5]) / r[5]
        out.append(row)
    return out


def crosscheck_table(p: Params | None = None) -> list[dict]:
    """NCCL and torch symm_mem rows measured next to tpcomm's (tpcomm/selection/cost_data_tpcomm.py),
    predicted by the baseline terms fitted to the H200 baselines: not fitted, a check on them."""
    p = h200() if p is None else p
    out = []
    for f, g, a, mode, n, t, _v in cost_data_tpcomm.ROWS:
        if a not in BASELINES or (mode == "eager" and n < 32 * M):
            continue
        pred = predict_intra(a, n, g, p)
        out.append({"config": f, "gpus": g, "algorithm": a, "mode": mode, "nbytes": n,
                    "measured_us": t, "predicted_us": pred, "error": (pred - t) / t})
    return out
