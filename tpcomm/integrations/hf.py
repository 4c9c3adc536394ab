"""Tensor parallelism with tpcomm for a Hugging Face ``transformers`` Llama model, gpt-fast
style: shard the linears in place, all-reduce through tpcomm after the row-parallel ones.

    model = transformers.LlamaForCausalLM(config)        # or from_pretrained(...) on every rank
    apply_tp(model, comm)                                 # comm: tpcomm.Communicator
    model.generate(...)                                   # the same on every rank

Per decoder layer: q/k/v and gate/up keep their rows of this rank (column-parallel), o and down
keep their columns (row-parallel) and get a forward hook that all-reduces their output in place
with ``comm.all_reduce_``; the attention module's head counts become the local ones. The
embedding, the norms and the LM head stay replicated (they are small next to the layers, and
replicated logits need no gather). KV heads fewer than the ranks are replicated, as in
:func:`tpcomm.models.layers.kv_head_range`.

``transformers`` is not a dependency of tpcomm: this module uses only the model object it is
given (``llama_for_causal_lm`` builds one and says how to install transformers if missing).
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.layers import kv_head_range, shard_range

TRANSFORMERS_HINT = ("the Hugging Face integration needs transformers: pip install transformers "
                     "(on a CPU machine install the CPU build of torch first)")


def llama_for_causal_lm(config: dict, dtype=torch.float32):
    """``transformers.LlamaForCausalLM`` from a config dict (no hub access)."""
    try:
        import transformers
    except ImportError:
        raise ImportError(TRANSFORMERS_HINT) from None
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(dtype).eval()


@torch.no_grad()
def _keep_rows(linear: nn.Linear, start: int, stop: int) -> None:
    linear.weight = nn.Parameter(linear.weight[start:stop].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[start:stop].clone(), requires_grad=False)
    linear.out_features = stop - start


@torch.no_grad()
def _keep_cols_and_reduce(linear: nn.Linear, start: int, stop: int, comm) -> None:
    """Row-parallel: keep columns [start, stop); all-reduce the output; add the bias (if any)
    once, after the reduction."""
    linear.weight = nn.Parameter(linear.weight[:, start:stop].clone(), requires_grad=False)
    linear.in_features = stop - start
    bias = linear.bias
    linear.bias = None

    def all_reduce_output(module, inputs, out):
        out = comm.all_reduce_(out.contiguous())
        return out if bias is None else out + bias

    linear.register_forward_hook(all_reduce_output)


def apply_tp(model, comm):
    """Shard ``model`` (a ``LlamaForCausalLM`` or its ``LlamaModel``) in place for rank
    ``comm.rank`` of ``comm.world_size``; every rank must start from the same weights.
    Returns the model."""
    world, rank = comm.world_size, comm.rank
    if getattr(model, "_tpcomm_tp", None) is not None:
        raise ValueError(f"apply_tp: this model is already sharded ({model._tpcomm_tp})")
    if world == 1:
        model._tpcomm_tp = (rank, world)
        return model
    cfg = model.config
    base = getattr(model, "model", model)
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    q0, q1 = shard_range(n_heads, world, rank, "number of attention heads")
    k0, k1 = kv_head_range(n_kv, world, rank)
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _keep_rows(attn.q_proj, q0 * head_dim, q1 * head_dim)
        _keep_rows(attn.k_proj, k0 * head_dim, k1 * head_dim)
        _keep_rows(attn.v_proj, k0 * head_dim, k1 * head_dim)
        _keep_cols_and_reduce(attn.o_proj, q0 * head_dim, q1 * head_dim, comm)
        i0, i1 = shard_range(mlp.gate_proj.out_features, world, rank, "intermediate size")
        _keep_rows(mlp.gate_proj, i0, i1)
        _keep_rows(mlp.up_proj, i0, i1)
        _keep_cols_and_reduce(mlp.down_proj, i0, i1, comm)
        # the local head counts (the attention forward infers heads from the tensors, but the
        # GQA grouping and anything sized from the config must see the local numbers)
        attn.num_key_value_groups = (q1 - q0) // (k1 - k0)
        for name, val in (("num_heads", q1 - q0), ("num_key_value_heads", k1 - k0)):
            if hasattr(attn, name):
                setattr(attn, name, val)
    cfg.head_dim = head_dim
    cfg.num_attention_heads, cfg.num_key_value_heads = q1 - q0, k1 - k0
    model._tpcomm_tp = (rank, world)
    return model
