"""tpcomm's ops as torch custom ops (``library``: ``torch.ops.tpcomm.*``, for torch.compile)."""
