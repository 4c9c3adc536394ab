"""Reference models for tensor-parallel inference over tpcomm.

llama (the TP Llama model and its configs), weights (random or safetensors, sharded per rank),
generate (greedy decoding, CUDA-graph decode step), comm (the --comm switch), cli (``tpcomm
bench model``).
"""
from .llama import CONFIGS, LlamaConfig, LlamaTP, get_config

__all__ = ["CONFIGS", "LlamaConfig", "LlamaTP", "get_config"]
