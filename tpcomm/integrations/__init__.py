"""Tensor parallelism with tpcomm for models of other libraries (hf: Hugging Face transformers)."""
