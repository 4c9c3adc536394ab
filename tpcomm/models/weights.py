"""Weights of :class:`~tpcomm.models.llama.LlamaTP`: random (seeded, no download) or from a
Hugging Face style safetensors checkpoint, each rank reading only its shard.

Both sources go through one path: the model lists, for each of its tensors, the pieces of the
Hugging Face tensors it is made of (``weight_plan``), and a reader returns a slice of one
tensor. A random reader makes the full tensor from a seed derived from its name and slices it,
so every world size sees the same model: the TP model equals the unsharded one.

Checkpoint layout (what ``save_pretrained`` writes)::

    DIR/config.json
    DIR/model.safetensors                      one file, or
    DIR/model.safetensors.index.json           {"weight_map": {name: file}} and the files

Names: ``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, ``model.layers.{i}.input_layernorm.weight``,
``model.layers.{i}.post_attention_layernorm.weight``, ``model.norm.weight``, ``lm_head.weight``
(absent with tied embeddings).
"""
from __future__ import annotations

import json
import os
import zlib

import torch

from .llama import LlamaConfig, LlamaTP

SAFETENSORS_HINT = ("loading a safetensors checkpoint needs the safetensors package: "
                    "pip install safetensors (or pip install 'tpcomm[models]')")


def _safetensors():
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise ImportError(SAFETENSORS_HINT) from None
    return safetensors


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hugging Face checkpoint of ``cfg``, with its shape."""
    H, I, D, V = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (cfg.num_heads * D, H),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * D, H),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * D, H),
            p + "self_attn.o_proj.weight": (H, cfg.num_heads * D),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def weight_plan(model: LlamaTP) -> list[tuple[torch.Tensor, list[tuple]]]:
    """(local tensor, pieces) for every tensor of the model. A piece is (hf_name, dim, start,
    stop): rows/columns [start, stop) along ``dim`` of that tensor (dim None: all of it); the
    pieces are concatenated along dim 0 (column-parallel) or taken whole."""
    cfg = model.cfg
    plan = [(model.embed_tokens, [("model.embed_tokens.weight", None, 0, 0)]),
            (model.norm, [("model.norm.weight", None, 0, 0)])]
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        att, mlp = layer.self_attn, layer.mlp
        q, k, v = att.qkv_proj.row_ranges
        gate, up = mlp.gate_up_proj.row_ranges
        plan += [
            (att.qkv_proj.weight, [(p + "self_attn.q_proj.weight", 0, *q),
                                   (p + "self_attn.k_proj.weight", 0, *k),
                                   (p + "self_attn.v_proj.weight", 0, *v)]),
            (att.o_proj.weight, [(p + "self_attn.o_proj.weight", 1, *att.o_proj.col_range)]),
            (mlp.gate_up_proj.weight, [(p + "mlp.gate_proj.weight", 0, *gate),
                                       (p + "mlp.up_proj.weight", 0, *up)]),
            (mlp.down_proj.weight, [(p + "mlp.down_proj.weight", 1, *mlp.down_proj.col_range)]),
            (layer.input_layernorm, [(p + "input_layernorm.weight", None, 0, 0)]),
            (layer.post_attention_layernorm, [(p + "post_attention_layernorm.weight", None, 0, 0)]),
        ]
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    plan.append((model.lm_head.weight, [(head, 0, *model.lm_head.row_ranges[0])]))
    return plan


@torch.no_grad()
def load_weights(model: LlamaTP, reader) -> LlamaTP:
    """Fill every tensor of ``model`` from ``reader.read(name, dim, start, stop)``.

    Rows past the end of a tensor (the padding of a vocab-parallel LM head) are zeros.
    """
    shapes = hf_shapes(model.cfg)
    for dst, pieces in weight_plan(model):
        parts = []
        for name, dim, start, stop in pieces:
            full = shapes[name]
            if dim is None:
                parts.append(reader.read(name, full, None, 0, 0))
                continue
            end = min(stop, full[dim])
            part = reader.read(name, full, dim, start, end) if end > start else None
            if end < stop:   # padding
                pad_shape = list(full)
                pad_shape[dim] = stop - max(start, end)
                pad = torch.zeros(pad_shape, dtype=dst.dtype, device=dst.device)
                part = pad if part is None else torch.cat([part.to(dst.device, dst.dtype), pad], dim)
            parts.append(part)
        src = parts[0] if len(parts) == 1 else torch.cat(
            [p.to(dst.device, dst.dtype) for p in parts], 0)
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{pieces[0][0]}: the checkpoint gives {tuple(src.shape)} for a "
                             f"tensor of shape {tuple(dst.shape)} on rank {model.rank}")
        dst.copy_(src)
    return model


class RandomReader:
    """Seeded random weights: the full tensor from a seed derived from (seed, name), sliced.

    Projections ~ N(0, 1/fan_in) (activations keep their scale through the layers), the
    embedding ~ N(0, 1), norm weights 1 + N(0, 0.1) (not all ones, so a norm applied with the
    wrong weight shows). Generated on ``device``: the same on every rank of one device type.
    """

    def __init__(self, seed: int = 0, device="cpu"):
        self.seed, self.device = seed, torch.device(device)

    def full(self, name: str, shape) -> torch.Tensor:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1000003 + zlib.crc32(name.encode())) % (1 << 63))
        t = torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
        if len(shape) == 1:
            return t.mul_(0.1).add_(1.0)
        if name.endswith("embed_tokens.weight"):
            return t
        return t.mul_(shape[1] ** -0.5)

    def read(self, name, full_shape, dim, start, stop):
        t = self.full(name, full_shape)
        return t if dim is None else t.narrow(dim, start, stop - start)


class SafetensorsReader:
    """Slices of the tensors of a Hugging Face checkpoint directory, read lazily (a rank reads
    only its rows/columns)."""

    def __init__(self, path: str):
        st = _safetensors()
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(single):
            weight_map = None
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self.path, self._weight_map, self._open = path, weight_map, {}
        self._safe_open = st.safe_open

    def _file(self, name: str):
        fname = "model.safetensors" if self._weight_map is None else self._weight_map.get(name)
        if fname is None:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}")
        if fname not in self._open:
            self._open[fname] = self._safe_open(os.path.join(self.path, fname), framework="pt")
        return self._open[fname]

    def read(self, name, full_shape, dim, start, stop):
        f = self._file(name)
        if name not in f.keys():
            raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}")
        sl = f.get_slice(name)
        shape = tuple(sl.get_shape())
        if shape != tuple(full_shape):
            raise ValueError(f"{self.path}: {name} has shape {shape}, the config says "
                             f"{tuple(full_shape)}")
        if dim is None:
            return sl[:]
        return sl[start:stop] if dim == 0 else sl[:, start:stop]


def load_config(path: str) -> LlamaConfig:
    with open(os.path.join(path, "config.json")) as f:
        return LlamaConfig.from_hf(json.load(f))


def save_checkpoint(path: str, cfg: LlamaConfig, tensors: dict[str, torch.Tensor],
                    max_file_tensors: int | None = None) -> None:
    """Write ``config.json`` and the tensors as a Hugging Face style checkpoint (a single
    ``model.safetensors``, or files of ``max_file_tensors`` tensors plus an index)."""
    st = _safetensors()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=1)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if max_file_tensors is None:
        st.torch.save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    names = sorted(tensors)
    chunks = [names[i:i + max_file_tensors] for i in range(0, len(names), max_file_tensors)]
    weight_map = {}
    for n, chunk in enumerate(chunks):
        fname = f"model-{n + 1:05d}-of-{len(chunks):05d}.safetensors"
        st.torch.save_file({k: tensors[k] for k in chunk}, os.path.join(path, fname))
        weight_map.update({k: fname for k in chunk})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def build_model(cfg: LlamaConfig, comm, *, checkpoint: str | None = None, seed: int = 0,
                dtype=torch.float32, device="cpu", fused: bool = True,
                random_device=None) -> LlamaTP:
    """A sharded model with weights from ``checkpoint`` (a directory) or seeded random ones.

    ``random_device``: where random weights are drawn (default ``device``; CUDA's generator
    draws other numbers than the CPU's for one seed, so "cpu" gives a GPU model the weights of
    the CPU model of the same seed, slower)."""
    model = LlamaTP(cfg, comm, dtype=dtype, device=device, fused=fused)
    reader = (SafetensorsReader(checkpoint) if checkpoint
              else RandomReader(seed, device if random_device is None else random_device))
    return load_weights(model, reader).eval()
