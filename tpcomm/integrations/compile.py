"""torch.compile with tpcomm: a fusion pass that turns all-reduce -> residual add -> RMSNorm
into one ``torch.ops.tpcomm.all_reduce_add_rms_norm``, in a model that does not call it.

    import tpcomm.integrations.compile as tpcomm_compile
    tpcomm_compile.install()                      # every later inductor compile runs the pass
    model = torch.compile(model)                  # the model all-reduces with comm.all_reduce_

or, for one compile only: ``torch.compile(model, options=tpcomm_compile.options())``.

Problem: a tensor-parallel model that ends its sublayers with ``comm.all_reduce_`` (the
Hugging Face Llama sharded by :func:`tpcomm.integrations.hf.apply_tp`: a forward hook on o_proj
and down_proj) then adds the residual and normalizes in its own code; the collective and its
epilogue are three separate steps, where tpcomm has one op for them (one fused GPU kernel with
TPCOMM_FUSED_NORM=1, and one call instead of three everywhere).

Algorithm: an inductor post-grad pass (``post_grad_custom_post_pass``), built on inductor's
pattern matcher. The search patterns are traced through the same decompositions as the graph
they must match, from the two ways a model writes the sublayer end (per dtype: float32,
bfloat16, float16; residual on either side of the add)::

    h = residual + tpcomm.all_reduce(x)                     # the sum, the next residual
    Hugging Face:  w * (h.float() * rsqrt(mean(h.float()^2) + eps)).to(dtype)
    tpcomm:        (h.float() * rsqrt(mean(h.float()^2) + eps) * w.float()).to(dtype)

and each match becomes ``normed, h = all_reduce_add_rms_norm(x, residual, w, eps)`` (through
``auto_functionalized``: the op reduces x and adds into residual in place, and inductor's
reinplacing keeps it in place where both are dead afterwards, which they are in such a model).
The Communicator handle, the algorithm and eps are read from the matched nodes.

Arithmetic: the fused op rounds like ``tpcomm.reference.add_rms_norm`` (normalized value times
weight in float32, one rounding). Hugging Face's form rounds the normalized value to the dtype
before the weight multiplies it: in bfloat16/float16 the two differ by at most about one unit
in the last place; in float32 they are the same computation.

Routing: the pass rewrites every match (where the Communicator has no fused kernel, the fused
op runs the all-reduce and then the epilogue as torch ops inside it, which is what a user who
installs the pass asked for; a model that calls ``comm.all_reduce_add_rms_norm`` itself needs no
pass). :func:`stats` counts the rewrites.
"""
from __future__ import annotations

import functools

import torch

from ..ops import library  # noqa: F401  (registers torch.ops.tpcomm.*)

EPS_EXAMPLE = 9.87654e-06     # a value no other constant of the patterns takes
_counts = {"graphs": 0, "fused": 0}


def _hf_norm(h, weight, eps):
    dtype = h.dtype
    h = h.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(dtype)


def _tpcomm_norm(h, weight, eps):
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(h.dtype)


def _search(norm, residual_first):
    def search(x, residual, weight, comm, algorithm):
        ar = torch.ops.tpcomm.all_reduce.default(x, comm, algorithm)
        h = residual + ar if residual_first else ar + residual
        return norm(h, weight, EPS_EXAMPLE), h
    return search


def _replacement(x, residual, weight, eps, comm, algorithm):
    out = torch.ops.higher_order.auto_functionalized(
        torch.ops.tpcomm.all_reduce_add_rms_norm.default, x=x, residual=residual, weight=weight,
        eps=eps, comm=comm, algorithm=algorithm)
    return out[0], out[2]           # normed, the new residual


def _pattern(search, dtype):
    """``search`` traced on meta tensors as inductor traces its graphs, with the op's string
    arguments turned into pattern variables (KeywordArgs ``comm``, ``algorithm``)."""
    from torch._inductor.pattern_matcher import fwd_only, fx_to_pattern
    x, residual = (torch.empty(4, 64, dtype=dtype, device="meta") for _ in range(2))
    w = torch.empty(64, dtype=dtype, device="meta")
    gm = fwd_only(search, [x, residual, w, "HANDLE", "ALGORITHM"])
    g = gm.graph
    holders = [n for n in g.nodes if n.op == "placeholder"]
    node = next(n for n in g.nodes if n.target is torch.ops.tpcomm.all_reduce.default)
    comm_ph, algo_ph = holders[3], holders[4]
    if not comm_ph.users:   # make_fx kept the strings as constants: point the op at the inputs
        node.args = (node.args[0], comm_ph, algo_ph)
    g.lint()
    return fx_to_pattern(gm, argnames=["x", "residual", "weight", "comm", "algorithm"],
                         scalar_workaround={"eps": EPS_EXAMPLE})


def _check(match) -> bool:
    kw = match.kwargs
    x, res, w = (kw[k].meta.get("val") for k in ("x", "residual", "weight"))
    if x is None or res is None or w is None or not isinstance(kw["eps"], float):
        return False
    if not (isinstance(kw["comm"], str) and isinstance(kw["algorithm"], str)):
        return False
    return (x.dim() >= 1 and res.shape == x.shape and w.shape == (x.shape[-1],)
            and x.dtype == res.dtype == w.dtype and x.device == res.device == w.device)


@functools.lru_cache(None)
def _patterns(dtype: torch.dtype):
    """The PatternMatcherPass holding the (norm form, add order) patterns of ``dtype``
    (traced on first use: about a second per dtype)."""
    from torch._inductor.pattern_matcher import PatternMatcherPass, register_graph_pattern
    patterns = PatternMatcherPass(pass_name=f"tpcomm_all_reduce_add_rms_norm_{dtype}")

    def handler(match, *args, **kw):
        match.replace_by_example(_replacement, [kw["x"], kw["residual"], kw["weight"],
                                                kw["eps"], kw["comm"], kw["algorithm"]])
        _counts["fused"] += 1

    for norm in (_hf_norm, _tpcomm_norm):
        for residual_first in (True, False):
            register_graph_pattern(_pattern(_search(norm, residual_first), dtype),
                                   extra_check=_check, pass_dict=patterns)(handler)
    return patterns


def _run(graph: torch.fx.Graph) -> None:
    """The pass: the patterns of every dtype that an all-reduce of ``graph`` has."""
    _counts["graphs"] += 1
    dtypes = {n.args[0].meta["val"].dtype for n in graph.nodes
              if n.target is torch.ops.tpcomm.all_reduce.default
              and isinstance(n.args[0], torch.fx.Node) and "val" in n.args[0].meta}
    for dtype in sorted(dtypes, key=str):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            _patterns(dtype).apply(graph)


@functools.lru_cache(1)
def _fusion_pass_class():
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class FusionPass(CustomGraphPass):
        """all_reduce -> add -> RMSNorm => all_reduce_add_rms_norm (an inductor post-grad
        pass); runs ``chained`` (a pass installed before) first."""

        def __init__(self, chained=None):
            self.chained = chained

        def __call__(self, graph: torch.fx.Graph) -> None:
            if self.chained is not None:
                self.chained(graph)
            _run(graph)

        def uuid(self):
            return (get_hash_for_files((__file__, library.__file__)),
                    self.chained.uuid() if hasattr(self.chained, "uuid") else None)

    return FusionPass


def fusion_pass(chained=None):
    """The pass, for ``torch._inductor.config.post_grad_custom_post_pass`` (``chained``: a
    pass to run before it)."""
    return _fusion_pass_class()(chained)


def options() -> dict:
    """``torch.compile(fn, options=options())``: the pass for this compile only."""
    return {"post_grad_custom_post_pass": fusion_pass()}


def install() -> None:
    """Run the pass in every later inductor compile of this process (idempotent; a custom
    post-grad pass installed before keeps running, first)."""
    import torch._inductor.config as config
    current = config.post_grad_custom_post_pass
    if not isinstance(current, _fusion_pass_class()):
        config.post_grad_custom_post_pass = fusion_pass(current)


def uninstall() -> None:
    """Remove the pass installed by :func:`install` (a chained pass stays)."""
    import torch._inductor.config as config
    current = config.post_grad_custom_post_pass
    if isinstance(current, _fusion_pass_class()):
        config.post_grad_custom_post_pass = current.chained


def stats() -> dict:
    """Graphs the pass ran on and patterns it rewrote, in this process (a compile served
    from inductor's FX graph cache runs no pass: its cached code holds the fused op already)."""
    return dict(_counts)
