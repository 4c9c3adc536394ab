"""A Llama-architecture model with tensor parallelism over a tpcomm (or torch.distributed)
communicator: the reference model of the end-to-end benchmark.

Sharding (Megatron): q/k/v and gate/up are column-parallel (fused into one GEMM each), o and
down are row-parallel; the embedding is replicated; the LM head is split over the (padded)
vocabulary and its logits all-gathered. Every sublayer ends in ONE communication op,
``comm.all_reduce_add_rms_norm`` (all-reduce + residual add + RMSNorm of the next sublayer),
when ``fused``; else in an all-reduce followed by a separate add and norm::

    residual = embed(tokens);  x = norm_0(residual)
    for each layer i:
        x, residual = all_reduce_add_rms_norm(o_proj(attn(x)),   residual, post_attn_norm_i)
        x, residual = all_reduce_add_rms_norm(down(swiglu(x)),   residual, norm_{i+1} or final)
    logits = all_gather(lm_head(x))

The KV cache is preallocated ([batch, kv_heads_local, max_seq, head_dim] per layer) and written
at ``input_pos`` with ``index_copy_``, so a decode step has static shapes and can be captured
in a CUDA graph (see ``tpcomm.models.generate``). A decode step on CUDA attends with the Triton
kernel of ``tpcomm.models.attention``, which reads the filled length from ``input_pos`` on the
device and stops there (no mask over the whole cache); on the CPU a mask selects the positions.

:meth:`LlamaTP.enable_compile` compiles the decoder layer with torch.compile (one compilation
serves all layers, which share the code; decode and prefill compile apart), the collectives
being ``torch.ops.tpcomm`` nodes of the graph.

Shape letters: B batch, T tokens of this call, S cache length, H hidden, D head dim.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (ColumnParallelLinear, RowParallelLinear, kv_head_range, padded_size, rms_norm,
                     shard_range)
from .attention import apply_rope, decode_attention, use_kernel


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0                 # 0: hidden_size // num_heads
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # HF's rope_scaling, e.g. {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default, llama3)")

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` (dict), old or new rope spelling."""
        rope = d.get("rope_parameters") or d.get("rope_scaling") or None
        theta = d.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        if rope is not None:
            rope = dict(rope)
            rope.setdefault("rope_type", rope.pop("type", "default"))
            if rope["rope_type"] == "default":
                rope = None
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
                   num_heads=d["num_attention_heads"],
                   num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                   head_dim=d.get("head_dim") or 0, rope_theta=float(theta), rope_scaling=rope,
                   rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   max_position_embeddings=d.get("max_position_embeddings", 8192))

    def to_hf(self) -> dict:
        """A Hugging Face style ``config.json`` dict (what ``transformers.LlamaConfig`` takes)."""
        d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
             "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
             "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
             "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
             "head_dim": self.head_dim, "rope_theta": self.rope_theta,
             "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
             "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
             "attention_bias": False, "mlp_bias": False}
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d

    def check_tp(self, world: int) -> None:
        """Raise a ValueError naming the dimension that ``world`` ranks cannot split."""
        shard_range(self.num_heads, world, 0, "number of attention heads")
        kv_head_range(self.num_kv_heads, world, 0)
        shard_range(self.intermediate_size, world, 0, "intermediate size")

    def num_params(self) -> int:
        H, D = self.hidden_size, self.head_dim
        attn = H * D * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * H * self.intermediate_size + 2 * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        return self.vocab_size * H + self.num_layers * layer + H + head


CONFIGS = {
    # for CPU tests and the CPU benchmark: 4 layers, GQA 8 q / 4 kv heads, about 3.4 M params
    "tiny": LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4,
                        num_heads=8, num_kv_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5,
                        max_position_embeddings=4096),
    "llama3_8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8),
    "llama3_70b": LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8),
}


def get_config(name: str) -> LlamaConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}") from None


# ---------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """[D/2] inverse frequencies, with Llama 3's long-context scaling when configured."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    sc = cfg.rope_scaling
    if not sc or sc.get("rope_type") != "llama3":
        return inv
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: LlamaConfig, max_seq: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_seq, D] in Hugging Face's rotate-half layout."""
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), rope_inv_freq(cfg))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


# ---------------------------------------------------------------- modules
class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, comm, rank: int, world: int, dtype, device):
        super().__init__()
        D, H = cfg.head_dim, cfg.hidden_size
        q0, q1 = shard_range(cfg.num_heads, world, rank, "number of attention heads")
        k0, k1 = kv_head_range(cfg.num_kv_heads, world, rank)
        self.n_heads, self.n_kv_heads, self.head_dim = q1 - q0, k1 - k0, D
        kv = cfg.num_kv_heads * D
        self.qkv_proj = ColumnParallelLinear(
            H, [cfg.num_heads * D, kv, kv], rank=rank, world=world, dtype=dtype, device=device,
            row_ranges=[(q0 * D, q1 * D), (k0 * D, k1 * D), (k0 * D, k1 * D)])
        self.o_proj = RowParallelLinear(cfg.num_heads * D, H, comm, rank=rank, world=world,
                                        dtype=dtype, device=device)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None   # the decode kernel's, int32 zeros [B * hk]

    def forward(self, x, cos, sin, input_pos, kv_len: int, fresh: bool) -> torch.Tensor:
        """x: [B, T, H] normed; returns the attention output before o_proj, [B, T, h*D].

        ``fresh``: the call is a prefill from position 0, so attention needs only this call's
        keys (causal), not the cache.
        """
        B, T, _ = x.shape
        hq, hk, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        if T == 1 and not fresh and use_kernel(x):   # decode: one kernel, up to the length
            y = decode_attention(qkv.view(B, -1), cos[0], sin[0], self.k_cache, self.v_cache,
                                 input_pos, self.counters)
            return y.view(B, T, hq * D)
        q, k, v = qkv.split([hq * D, hk * D, hk * D], dim=-1)
        q = apply_rope(q.view(B, T, hq, D), cos, sin).transpose(1, 2)
        k = apply_rope(k.view(B, T, hk, D), cos, sin).transpose(1, 2)
        v = v.view(B, T, hk, D).transpose(1, 2)
        k_cache, v_cache = self.k_cache[:B], self.v_cache[:B]
        k_cache.index_copy_(2, input_pos, k)
        v_cache.index_copy_(2, input_pos, v)
        if fresh:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hk)
        else:
            mask = torch.arange(kv_len, device=x.device)[None, :] <= input_pos[:, None]  # [T, S]
            y = F.scaled_dot_product_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len],
                                               attn_mask=mask, enable_gqa=hq != hk)
        return y.transpose(1, 2).reshape(B, T, hq * D)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, comm, rank: int, world: int, dtype, device):
        super().__init__()
        I, H = cfg.intermediate_size, cfg.hidden_size
        self.gate_up_proj = ColumnParallelLinear(H, [I, I], rank=rank, world=world, dtype=dtype,
                                                 device=device)
        self.down_proj = RowParallelLinear(I, H, comm, rank=rank, world=world, dtype=dtype,
                                           device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU before down_proj: [B, T, H] -> [B, T, I_local] (in the gate_up GEMM's
        epilogue where the skinny GEMM's table has it)."""
        y = self.gate_up_proj.forward_swiglu(x)
        if y is not None:
            return y
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg, comm, rank, world, dtype, device):
        super().__init__()
        self.self_attn = Attention(cfg, comm, rank, world, dtype, device)
        self.mlp = MLP(cfg, comm, rank, world, dtype, device)
        H = cfg.hidden_size
        self.input_layernorm = nn.Parameter(torch.ones(H, dtype=dtype, device=device),
                                            requires_grad=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(H, dtype=dtype, device=device),
                                                     requires_grad=False)

    def forward(self, x, residual, cos, sin, input_pos, kv_len: int, fresh: bool,
                next_norm: torch.Tensor, eps: float, fused: bool):
        """x: [B, T, H] normed, residual: [B, T, H] (updated in place) -> (x normed with
        ``next_norm``, residual): attention and MLP, each ending in one communication op."""
        a = self.self_attn(x, cos, sin, input_pos, kv_len, fresh)
        x, residual = self.self_attn.o_proj.forward_add_rms_norm(
            a, residual, self.post_attention_layernorm, eps, fused)
        return self.mlp.down_proj.forward_add_rms_norm(self.mlp(x), residual, next_norm, eps,
                                                       fused)


def _decode_layer(layer, *args):
    """A decoder layer in a decode step (T = 1): what torch.compile compiles for decode."""
    return layer(*args)


def _prefill_layer(layer, *args):
    """A decoder layer in a prefill (T > 1): compiled apart from decode, shapes automatic."""
    return layer(*args)


def _prologue(model, tokens, input_pos):
    """This call's RoPE rows, the embedding and the first RMSNorm -> (residual, x, cos, sin).
    Eagerly about twelve small kernels (two gathers, the embedding, the norm's float32 steps);
    compiled, for decode steps, one or two (in a CUDA graph of the step: about 20 us less)."""
    cos, sin = model.cos[input_pos], model.sin[input_pos]
    residual = F.embedding(tokens, model.embed_tokens)            # [B, T, H]
    x = rms_norm(residual, model.layers[0].input_layernorm, model.cfg.rms_norm_eps)
    return residual, x, cos, sin


class LlamaTP(nn.Module):
    """One rank's shard of a Llama model.

    Args:
        cfg: the architecture.
        comm: the communicator (``tpcomm.Communicator`` or ``TorchDistComm``); its world size
            and rank decide the sharding.
        fused: end each sublayer with ``comm.all_reduce_add_rms_norm`` (else all-reduce, add,
            norm as three steps).

    Weights start uninitialized: load them with ``tpcomm.models.weights.load_weights``. Call
    :meth:`setup_cache` before :meth:`forward`.
    """

    def __init__(self, cfg: LlamaConfig, comm, *, dtype=torch.float32, device="cpu",
                 fused: bool = True):
        super().__init__()
        rank, world = comm.rank, comm.world_size
        cfg.check_tp(world)
        self.cfg, self.comm, self.fused = cfg, comm, fused
        self.rank, self.world = rank, world
        self.dtype, self.device = dtype, torch.device(device)
        H = cfg.hidden_size
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, H, dtype=dtype,
                                                     device=device), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, comm, rank, world, dtype, device)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(H, dtype=dtype, device=device), requires_grad=False)
        self.vocab_padded = padded_size(cfg.vocab_size, world)
        self.lm_head = ColumnParallelLinear(H, self.vocab_padded, rank=rank, world=world,
                                            dtype=dtype, device=device)
        self.max_batch = self.max_seq = 0
        self.cos = self.sin = None
        self._compiled_fns = None
        self.compiled = False     # run the compiled layers (after enable_compile)

    def enable_compile(self, backend: str = "inductor", **kwargs) -> None:
        """Compile the decoder layer with ``torch.compile`` and use it (``compiled = True``;
        set ``compiled = False`` to run eagerly again, the compiled code kept).

        Regional compilation: the layers share one compiled graph per shape, so the compile
        time is one layer's, not the model's. Decode steps compile with static shapes (one
        graph per batch size, fit for CUDA graphs), and so does their prologue (embedding,
        first norm, RoPE rows: one more small graph); prefills with automatic dynamic shapes (a
        second prompt length makes the length symbolic instead of compiling again).
        ``kwargs`` go to torch.compile (mode, options, ...). The collectives are
        torch.ops.tpcomm nodes; a communicator whose calls torch.compile cannot trace would
        break the graph there and still run. Compiles once; later calls only switch it on."""
        if self._compiled_fns is None:
            self._compiled_fns = (
                torch.compile(_decode_layer, backend=backend, dynamic=False, **kwargs),
                torch.compile(_prefill_layer, backend=backend, **kwargs),
                torch.compile(_prologue, backend=backend, dynamic=False, **kwargs))
        self.compiled = True

    def set_comm(self, comm) -> None:
        """Switch the communication backend (same world and rank) without touching weights."""
        if (comm.rank, comm.world_size) != (self.rank, self.world):
            raise ValueError(f"set_comm: the model is sharded for rank {self.rank} of "
                             f"{self.world}, the communicator is rank {comm.rank} of "
                             f"{comm.world_size}")
        self.comm = comm
        for layer in self.layers:
            layer.self_attn.o_proj.comm = comm
            layer.mlp.down_proj.comm = comm

    def setup_cache(self, max_batch: int, max_seq: int) -> None:
        """(Re)allocate the KV cache for ``max_batch`` sequences of up to ``max_seq`` tokens."""
        if max_seq > self.cfg.max_position_embeddings:
            raise ValueError(f"max_seq {max_seq} is beyond the model's "
                             f"max_position_embeddings {self.cfg.max_position_embeddings}")
        for layer in self.layers:
            a = layer.self_attn
            a.k_cache = a.v_cache = a.counters = None   # free the old cache first
        for layer in self.layers:
            a = layer.self_attn
            shape = (max_batch, a.n_kv_heads, max_seq, a.head_dim)
            a.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            a.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            a.counters = torch.zeros(max_batch * a.n_kv_heads, dtype=torch.int32,
                                     device=self.device)
        self.cos, self.sin = rope_tables(self.cfg, max_seq, self.dtype, self.device)
        self.max_batch, self.max_seq = max_batch, max_seq

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None,
                fresh: bool = False, last_only: bool = True) -> torch.Tensor:
        """tokens: [B, T] int64; input_pos: [T] int64 positions of these tokens (the same for
        every sequence of the batch). Returns logits [B, 1 or T, vocab] (1 with ``last_only``).

        kv_len: how many cache positions attention reads (a Python int, static for CUDA
        graphs; default ``max_seq``). fresh: prefill from position 0 (attention reads only
        this call's keys).
        """
        B, T = tokens.shape
        if self.cos is None or B > self.max_batch:
            raise ValueError(f"forward with batch {B}: call setup_cache(max_batch >= {B}, ...) "
                             f"first (now {self.max_batch})")
        kv_len = self.max_seq if kv_len is None else kv_len
        eps, fused = self.cfg.rms_norm_eps, self.fused
        decode = T == 1 and not fresh
        fns = self._compiled_fns if self.compiled else (_decode_layer, _prefill_layer, _prologue)
        residual, x, cos, sin = (fns[2] if decode else _prologue)(self, tokens, input_pos)
        n = len(self.layers)
        run = fns[0 if decode else 1]
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < n else self.norm
            x, residual = run(layer, x, residual, cos, sin, input_pos, kv_len, fresh, next_norm,
                              eps, fused)
        if last_only:
            x = x[:, -1:]
        return self.gather_logits(self.lm_head(x))

    def gather_logits(self, logits_local: torch.Tensor) -> torch.Tensor:
        """[B, T, V_padded / W] on each rank -> [B, T, V] on every rank (one all_gather)."""
        if self.world == 1:
            return logits_local[..., :self.cfg.vocab_size]
        B, T, v = logits_local.shape
        gathered = self.comm.all_gather(logits_local.reshape(B * T, v).t().contiguous())
        return gathered.t().reshape(B, T, self.vocab_padded)[..., :self.cfg.vocab_size]
