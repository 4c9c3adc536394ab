"""Reference models for tensor-parallel inference over tpcomm.

llama (the TP Llama model and its configs), weights (random or safetensors, sharded per rank),
generate (greedy decoding, CUDA-graph decode step), comm (the --comm switch), cli (``tpcomm
bench model``).
"""
from .generate import Generator
from .llama import CONFIGS, LlamaConfig, LlamaTP, get_config
from .weights import build_model

__all__ = ["CONFIGS", "Generator", "LlamaConfig", "LlamaTP", "build_model", "get_config"]
