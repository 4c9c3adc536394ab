"""Greedy generation with a static KV cache: a prefill, then decode steps that are replayed
from a CUDA graph on the GPU (eager on the CPU).

A decode step reads its input token and position from static device tensors and writes the
next ones back into them (``tokens <- argmax``, ``pos += 1``), so replaying the graph n times
decodes n tokens with no host work in between, and the whole step (GEMMs, attention, every
collective) is one graph launch.

The prefill is eager, except with a CUDA graph and a compiled model: then each prompt length
is captured once (its compiled layers warmed up, then recorded on a side stream) and replayed
for every prompt of that length, the prompt copied into the graph's static input first. The
compiled prefill of a prompt launches several hundred kernels from Python; eagerly
timed, that host work set its time on a VM (28.6 ms one day, 23.4 ms another, one H200).
"""
from __future__ import annotations

import torch

from .llama import LlamaTP


class Generator:
    """Greedy decoding of ``batch`` sequences of up to ``max_seq`` tokens with ``model``.

    ``graph``: capture the decode step in a CUDA graph (GPU only). The model's KV cache is
    (re)allocated for [batch, max_seq]; graphs hold its addresses, so a Generator owns the
    cache until the next one is made.

    ``compile``: True compiles the model's layers with torch.compile and runs them
    (:meth:`LlamaTP.enable_compile`; the first prefill and the first decode step compile), False
    runs the model eagerly, None (default) leaves the model as it is. A compiled decode step
    attends over the whole cache (static shapes: one compiled graph per batch size, the length
    read on the device), then, with ``graph``, is captured as one CUDA graph like the eager one.

    ``prefill_graph`` (default True): with ``graph`` and a compiled model, each prompt length's
    prefill is captured once and replayed (the module docstring); an eager model's prefill
    stays eager. Each captured length keeps its graph's memory until :meth:`close`.
    """

    def __init__(self, model: LlamaTP, batch: int, max_seq: int, *, graph: bool = False,
                 compile: bool | None = None, prefill_graph: bool = True):
        if graph and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if compile:
            model.enable_compile()
        elif compile is not None:
            model.compiled = False
        self.model, self.batch, self.max_seq, self.use_graph = model, batch, max_seq, graph
        self.prefill_graph = prefill_graph
        model.setup_cache(batch, max_seq)
        dev = model.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)   # next input
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)             # its position
        self.host_pos = 0
        self.logits: torch.Tensor | None = None   # [B, V] of the last step
        self._replay = None      # the decode step's CUDA graph (its replay)
        self._graph_out = None
        # prompt length -> (replay, prompt, positions, logits)
        self._prefills: dict[int, tuple] = {}

    # ---------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor, *, graph: bool | None = None) -> torch.Tensor:
        """prompt: [B, P] int64 -> the first generated token of each sequence, [B].

        ``graph``: replay the prompt length's CUDA graph (captured on first use); None (default)
        does where the Generator's settings say so (:meth:`graphs_prefill`), False never."""
        B, P = prompt.shape
        if B != self.batch or P >= self.max_seq:
            raise ValueError(f"prefill of {tuple(prompt.shape)}: this Generator takes batch "
                             f"{self.batch} and fewer than {self.max_seq} prompt tokens")
        if graph and not (self.use_graph and self.model.compiled):
            raise ValueError("a prefill CUDA graph needs Generator(graph=True) and a compiled "
                             "model")
        if self.graphs_prefill() if graph is None else graph:
            logits = self._graphed_prefill(prompt)
        else:
            input_pos = torch.arange(P, device=self.model.device)
            logits = self.model(prompt.to(self.model.device), input_pos, kv_len=P,
                                fresh=True)[:, -1]
        nxt = logits.argmax(-1)
        self.logits = logits
        self.tokens.copy_(nxt[:, None])
        self.pos.fill_(P)
        self.host_pos = P
        return nxt

    def graphs_prefill(self) -> bool:
        """Whether :meth:`prefill` replays a CUDA graph: ``graph``, ``prefill_graph`` and a
        compiled model (an eager prefill is left as it is)."""
        return self.use_graph and self.prefill_graph and self.model.compiled

    def _graphed_prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """The logits [B, V] of the prompt's last position, from the CUDA graph of its length
        (captured on first use). The returned tensor is the graph's output: the next prefill
        of this length overwrites it."""
        P = prompt.shape[1]
        entry = self._prefills.get(P)
        if entry is None:
            dev = self.model.device
            static = prompt.to(dev).clone()
            input_pos = torch.arange(P, device=dev)
            replay, logits = _graph_of(lambda: self.model(static, input_pos, kv_len=P,
                                                          fresh=True)[:, -1])
            # the entry keeps every tensor the graph reads that was allocated outside it (the
            # prompt and the positions): freed, their memory would go to later allocations
            # and a replay would read those (a replay after the decode graph's read positions
            # past the RoPE table: a device-side assert in its index kernel)
            entry = self._prefills[P] = (replay, static, input_pos, logits)
        replay, static, _, logits = entry
        static.copy_(prompt)
        replay()
        return logits

    # ---------------------------------------------------------------- decode
    def kv_len(self) -> int:
        """Cache positions an eager decode step attends over: the filled ones; compiled, all of
        them (a static shape: one compiled graph; the mask, or on CUDA the kernel, stops at the
        length)."""
        return self.max_seq if self.model.compiled else self.host_pos + 1

    def _step(self, kv_len: int) -> torch.Tensor:
        logits = self.model(self.tokens, self.pos, kv_len=kv_len)[:, -1]
        nxt = logits.argmax(-1)
        self.tokens.copy_(nxt[:, None])
        self.pos.add_(1)
        return logits, nxt

    def _capture(self) -> None:
        """Record one decode step (attending over the whole cache, a static length). The
        warm-up steps write the cache at the next positions, which the real steps overwrite
        before anything reads them, and advance the tokens and positions: those are put back
        before the capture."""
        saved_tokens, saved_pos = self.tokens.clone(), self.pos.clone()

        def put_back() -> None:
            self.tokens.copy_(saved_tokens)
            self.pos.copy_(saved_pos)

        self._replay, self._graph_out = _graph_of(lambda: self._step(self.max_seq),
                                                  after_warmup=put_back)

    @torch.inference_mode()
    def decode_step(self) -> torch.Tensor:
        """Decode one token for every sequence; returns it, [B] (valid until the next step)."""
        if self.host_pos >= self.max_seq:
            raise ValueError(f"the KV cache holds {self.max_seq} positions; all are used")
        if self.use_graph:
            if self._replay is None:
                self._capture()
            self._replay()
            self.logits, nxt = self._graph_out
        else:
            self.logits, nxt = self._step(self.kv_len())
        self.host_pos += 1
        return nxt

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy: [B, P] -> [B, new_tokens] (the prefill's token, then new_tokens-1 steps)."""
        out = [self.prefill(prompt).clone()]
        for _ in range(new_tokens - 1):
            out.append(self.decode_step().clone())
        return torch.stack(out, dim=1)

    def close(self) -> None:
        """Drop the graphs (and with them the addresses of the cache)."""
        self._replay = self._graph_out = None
        self._prefills.clear()


def _graph_of(fn, warmup: int = 2, after_warmup=None):
    """(replay, out): ``fn`` run ``warmup`` times on a side stream (a compiled function
    compiles, lazy NCCL / tpcomm set-up and cuBLAS workspaces happen, outside the capture),
    ``after_warmup()`` (if given) on the current stream, then one call of ``fn`` captured in a
    CUDA graph on the side stream (a Communicator sees one stream for its captured calls);
    ``replay()`` reruns it, writing ``out`` (its result) in place. Whatever ``fn`` writes (the
    KV cache) the warm-up writes too."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    if after_warmup is not None:
        after_warmup()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph.replay, out
