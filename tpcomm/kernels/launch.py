"""A lean launch path for tpcomm's Triton kernels: bind once, then only pointers and launch.

Problem. ``kernel[grid](...)`` costs 17.8 us of host time for a one-argument kernel and 23.2 us
for a 16-argument one on an H200 host, while the compiled kernel's own launcher costs 8-10 us
(issue 16): the dispatcher binds every argument, runs Triton's specialization on each, builds a
cache key, checks globals and grid on every call. An eager collective is bound by that host time.

Algorithm. A :class:`LeanKernel` is one kernel at one launch configuration: the grid, the
``tl.constexpr`` values, ``num_warps`` and every argument that never changes (addresses of the
symmetric buffers, counters, rank, timeout; a tuple parameter such as the push kernels'
``sync`` bundle of ``kernels/sync.py`` is bound as its values, tensors as their addresses)
are bound once. A call passes only the changing arguments (``call``: tensors and per-call
ints). Per call it computes a key that covers everything Triton's specialization would look
at for those arguments:

    tensor     dtype, data_ptr % 16 == 0          (Triton: '*fp32' + 'D' when 16-byte aligned)
    int        == 1, % 16 == 0, i32/i64/u64 range (Triton: constexpr 1, 'D', the int type)
    int (do_not_specialize)   i32/i64/u64 range
    tuple of ints             the above per element
    float      nothing (always fp32)

The first call of a key goes through the dispatcher (which compiles on first use as today and
launches this call) and keeps its ``CompiledKernel``; later calls of that key call the compiled
kernel's C launcher directly, with raw ``data_ptr()`` integers, on the current torch stream
(``torch._C._cuda_getCurrentRawStream``: the capturing stream inside a CUDA-graph capture, so
the path is capture-safe; it allocates nothing). The fixed arguments were specialized once, at
the first call, and never change.

Routing. Under ``TRITON_INTERPRET=1`` (no compiled kernels), for a kernel whose ``tl.constexpr``
parameters are not all after the others, for a compiled kernel that needs a scratch allocation
or a launcher this module does not know, the call goes through the dispatcher (logged once per
reason). Triton's launch hooks (``knobs.runtime.launch_enter_hook``, used by profilers) are not
called on the lean path. With ``verify=True`` (``TPCOMM_DEBUG=1``) every lean call also runs
Triton's own binder and raises if its specialization differs from the one of the cached kernel.

Pinned calls. A caller that repeats one shape (the GPU engine's per-shape call, which the
Communicator's hot path caches) takes ``pinned(dtype, dtype, n, ...)``: a launch with every
non-tensor call argument fixed and the key precomputed but for the tensors' alignment, on the
stream the caller passes (it has just read it). The key is the one ``launch`` computes for such
a call, so both share the compiled entries; a key not seen yet goes through ``launch``.

Example::

    k = LeanKernel(_my_kernel, grid=16, call=("inp_ptr", "out_ptr", "n"),
                   fixed=dict(counter_ptr=counters, rank=rank), constexprs=dict(BLOCK=1024),
                   num_warps=8)
    k.launch(x, y, x.numel())     # binds three values, launches
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import triton

log = logging.getLogger("tpcomm")
_logged: set[str] = set()

_I32_LO, _I32_HI, _U64_LO = -(1 << 31), (1 << 31) - 1, 1 << 63


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.info("tpcomm: kernels launch through Triton's dispatcher: %s (logged once)", reason)


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1): there are no compiled kernels."""
    return bool(triton.knobs.runtime.interpret)


def int_key(x: int, specialize: bool = True) -> tuple:
    """What Triton's specialization sees of an int argument (see the module docstring)."""
    rng = 0 if _I32_LO <= x <= _I32_HI else (2 if x >= _U64_LO else 1)
    if not specialize:
        return (rng,)
    return (x == 1, x & 15 == 0, rng)


# the same as int_key, inlined into the generated call (``{v}`` is the argument's name)
_INT_EXPR = "({v} == 1, {v} & 15 == 0, 0 if -2147483648 <= {v} <= 2147483647 else " \
            "(2 if {v} >= 9223372036854775808 else 1))"
_INT_DNS_EXPR = "(0 if -2147483648 <= {v} <= 2147483647 else " \
                "(2 if {v} >= 9223372036854775808 else 1),)"


def _raw_stream_fn() -> Callable[[int], int]:
    """The current CUDA stream of a device as an int (what Triton's driver uses)."""
    fn = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if fn is None:
        raise RuntimeError("this torch has no CUDA: the lean launch path needs a GPU")
    return fn


def _raw(value: Any) -> Any:
    """A fixed argument as the compiled launcher takes it: tensors as their addresses, also
    inside (named) tuples, which become plain tuples (the launcher parses any sequence)."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr()
    if isinstance(value, tuple):
        return tuple(_raw(v) for v in value)
    return value


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool)
                                        for v in value):
        return "ints"
    raise TypeError(f"lean launch: unsupported per-call argument {type(value).__name__}")


class LeanKernel:
    """One @triton.jit kernel bound to one launch configuration (see the module docstring).

    ``launch(*call_args)`` takes the ``call`` parameters in order. ``fixed`` holds every other
    non-constexpr parameter, ``constexprs`` every ``tl.constexpr`` one. ``grid``: an int or a
    tuple of up to three ints. ``device``: the CUDA device index the kernel runs on (the caller
    makes it current, as for the dispatcher)."""

    def __init__(self, kernel, grid, *, call: tuple[str, ...], fixed: dict, constexprs: dict,
                 num_warps: int, device: int | None = None, verify: bool = False):
        self.kernel = kernel
        grid = (grid,) if isinstance(grid, int) else tuple(grid)
        self.grid = grid
        self._g = (grid + (1, 1))[:3]
        self.call = tuple(call)
        self.fixed = dict(fixed)
        self.constexprs = dict(constexprs)
        self.num_warps = num_warps
        self.device = device
        self.verify = verify
        self.lean_calls = 0 if verify else None   # counted only when verifying (tests)
        names = list(getattr(kernel, "arg_names", ()))
        self._names = names
        missing = set(names) - set(self.call) - set(self.fixed) - set(self.constexprs)
        extra = (set(self.call) | set(self.fixed) | set(self.constexprs)) - set(names)
        if missing or extra:
            raise ValueError(f"LeanKernel({getattr(kernel, '__name__', kernel)}): parameters "
                             f"{sorted(missing)} are not bound, {sorted(extra)} are not "
                             f"parameters of the kernel")
        self._entries: dict = {}
        self._spec: dict = {}   # key -> Triton's specialization (verify)
        self.reason = self._lean_reason()
        if self.reason:
            _log_once(self.reason)
            self.launch: Callable = self.dispatch
        else:
            self.launch = self._bootstrap

    # ------------------------------------------------------------ routing
    def _lean_reason(self) -> str | None:
        if interpreting():
            return "TRITON_INTERPRET=1 (no compiled kernels)"
        params = getattr(self.kernel, "params", None)
        if params is None or not hasattr(self.kernel, "device_caches"):
            return f"{type(self.kernel).__name__} is not a JITFunction"
        flags = [p.is_constexpr for p in params]
        if flags != sorted(flags):
            return f"{self.kernel.__name__}: tl.constexpr parameters are not all last"
        return None

    def _full_args(self, call_args) -> list:
        """Every parameter's value, in the kernel's order (constexprs included)."""
        vals = dict(zip(self.call, call_args))
        vals.update(self.fixed)
        vals.update(self.constexprs)
        return [vals[n] for n in self._names]

    def dispatch(self, *call_args):
        """Launch through Triton's dispatcher (``kernel[grid](...)``); returns what it returns
        (the CompiledKernel on a GPU)."""
        return self.kernel[self.grid](*self._full_args(call_args), num_warps=self.num_warps)

    def warmup(self, *call_args):
        """Compile for these call arguments without launching (Triton's ``warmup``); returns
        the CompiledKernel."""
        return self.kernel.warmup(*self._full_args(call_args), grid=self.grid,
                                  num_warps=self.num_warps)

    # ------------------------------------------------------------ the lean path
    def _bootstrap(self, *call_args):
        """The first call: learn the kinds of the call arguments, generate the keyed call."""
        if len(call_args) != len(self.call):
            raise TypeError(f"{self.kernel.__name__} takes {len(self.call)} call arguments "
                            f"{self.call}, got {len(call_args)}")
        kinds = [_kind(v) for v in call_args]
        dns = {p.name for p in self.kernel.params if p.do_not_specialize}
        try:
            self.key_of, self.launch = self._generate(kinds, dns)
            self._kinds, self._dns = kinds, dns
        except Exception as e:  # noqa: BLE001 - never crash for want of a fast path
            self.reason = f"{self.kernel.__name__}: {type(e).__name__}: {e}"
            _log_once(self.reason)
            self.launch = self.dispatch
        return self.launch(*call_args)

    def _generate(self, kinds: list[str], dns: set[str]):
        """Source of ``key_of(a0, ...)`` and ``launch(a0, ...)`` for these kinds."""
        params = [f"a{i}" for i in range(len(self.call))]
        pre, key, raw = [], [], {}
        for i, (name, kind) in enumerate(zip(self.call, kinds)):
            a = params[i]
            if kind == "tensor":
                pre.append(f"    p{i} = {a}.data_ptr()")
                key.append(f"{a}.dtype" if name in dns else f"{a}.dtype, p{i} & 15 == 0")
                raw[name] = f"p{i}"
            elif kind == "int":
                key.append((_INT_DNS_EXPR if name in dns else _INT_EXPR).format(v=a))
                raw[name] = a
            elif kind == "ints":
                key.append(f"tuple([int_key(v, {name not in dns}) for v in {a}])")
                raw[name] = a
            elif kind == "bool":
                key.append(f"type({a})")
                raw[name] = a
            else:
                raw[name] = a
        fixed_raw = {n: _raw(v) for n, v in self.fixed.items()}
        ns: dict = {"int_key": int_key, "cache": self._entries, "first": self._first,
                    "stream_of": _raw_stream_fn(), "dev": self.device,
                    "g0": self._g[0], "g1": self._g[1], "g2": self._g[2],
                    "verify": self._verify if self.verify else None}
        order = []
        for n in self._names:
            if n in raw:
                order.append(raw[n])
            elif n in fixed_raw:
                ns[f"f_{n}"] = fixed_raw[n]
                order.append(f"f_{n}")
            else:
                ns[f"c_{n}"] = self.constexprs[n]
                order.append(f"c_{n}")
        sig = ", ".join(params)
        key_expr = "(" + ", ".join(key) + (",)" if len(key) == 1 else ")")
        if self.device is None:
            ns["dev"] = None
            stream = "stream_of(torch_cuda_current())"
            ns["torch_cuda_current"] = torch.cuda.current_device
        else:
            stream = "stream_of(dev)"
        body = "\n".join(pre)
        src = f"""
def key_of({sig}):
{body or '    pass'}
    return {key_expr}

def launch({sig}):
{body or '    pass'}
    e = cache.get({key_expr})
    if e is None:
        return first({key_expr}, ({sig}{',' if len(params) == 1 else ''}))
    if verify is not None:
        verify({key_expr}, ({sig}{',' if len(params) == 1 else ''}))
    e[0](g0, g1, g2, {stream}, e[1], e[2], e[3], None, None, e[4], None, None, None,
         {", ".join(order)})
"""
        self.source = src   # for reading (tests, debugging)
        exec(compile(src, f"<lean launch of {self.kernel.__name__}>", "exec"), ns)
        return ns["key_of"], ns["launch"]

    # ------------------------------------------------------------ pinned calls
    def pinned(self, *spec) -> Callable | None:
        """``launch(stream, *tensors)`` for calls whose every non-tensor call argument is fixed:
        ``spec`` has one entry per ``call`` parameter, a ``torch.dtype`` for a tensor passed per
        call (the caller guarantees that dtype: it is not read per call), else the argument's
        value. Per call it reads the tensors' pointers, looks the key up with everything else of
        it precomputed, and launches on ``stream`` (the raw handle of the current stream of this
        kernel's device, which the caller has just read: passing it saves the query). A key not
        seen yet goes through :attr:`launch` (the dispatcher compiles and launches on the current
        stream). None where the lean path is not in use for this kernel (interpreter, dispatcher
        fallback, ``verify``) or its first call has not run yet (the kinds of its arguments are
        learnt then), or where ``spec``'s kinds differ from that first call's."""
        kinds = getattr(self, "_kinds", None)
        if (kinds is None or self.reason or self.verify or len(spec) != len(self.call)
                or self.launch in (self.dispatch, self._bootstrap)):
            return None
        for v, kind in zip(spec, kinds):
            if (kind == "tensor") != isinstance(v, torch.dtype):
                return None
            if kind not in ("tensor", "float") and _kind(v) != kind:
                return None
        try:
            return self._generate_pinned(spec, kinds, self._dns)
        except Exception as e:  # noqa: BLE001 - the caller keeps its general launch
            _log_once(f"{self.kernel.__name__}: no pinned launch ({type(e).__name__}: {e})")
            return None

    def _generate_pinned(self, spec: tuple, kinds: list[str], dns: set[str]):
        """Source of ``pinned(stream, t0, ...)``: the key of :meth:`_generate`'s ``launch`` with
        every part but the tensors' alignment bound as a constant."""
        ns: dict = {"cache": self._entries, "slow": self.launch_with,
                    "g0": self._g[0], "g1": self._g[1], "g2": self._g[2]}
        params, pre, key, raw, full = [], [], [], {}, []
        first = None     # the first tensor: an in-place call passes it twice, read it once
        for i, (name, kind, v) in enumerate(zip(self.call, kinds, spec)):
            if kind == "tensor":
                a = f"t{i}"
                params.append(a)
                if first is None:
                    first = i
                    pre.append(f"    p{i} = {a}.data_ptr()")
                else:
                    pre.append(f"    p{i} = p{first} if {a} is t{first} else {a}.data_ptr()")
                ns[f"d{i}"] = v
                key.append(f"d{i}" if name in dns else f"d{i}, p{i} & 15 == 0")
                raw[name] = f"p{i}"
                full.append(a)
                continue
            ns[f"v{i}"] = v
            raw[name] = f"v{i}"
            full.append(f"v{i}")
            if kind == "int":
                ns[f"k{i}"] = int_key(v, name not in dns)
            elif kind == "ints":
                ns[f"k{i}"] = tuple(int_key(x, name not in dns) for x in v)
            elif kind == "bool":
                ns[f"k{i}"] = type(v)
            else:
                continue     # a float adds nothing to the key
            key.append(f"k{i}")
        order = []
        for n in self._names:
            if n in raw:
                order.append(raw[n])
            elif n in self.fixed:
                ns[f"f_{n}"] = _raw(self.fixed[n])
                order.append(f"f_{n}")
            else:
                ns[f"c_{n}"] = self.constexprs[n]
                order.append(f"c_{n}")
        key_expr = "(" + ", ".join(key) + (",)" if len(key) == 1 else ")")
        sig = ", ".join(["stream"] + params)
        src = f"""
def pinned({sig}):
{chr(10).join(pre) or '    pass'}
    e = cache.get({key_expr})
    if e is None:
        return slow(({", ".join(full)}{',' if len(full) == 1 else ''}))
    e[0](g0, g1, g2, stream, e[1], e[2], e[3], None, None, e[4], None, None, None,
         {", ".join(order)})
"""
        self.pinned_source = src
        exec(compile(src, f"<pinned launch of {self.kernel.__name__}>", "exec"), ns)
        return ns["pinned"]

    def launch_with(self, call_args: tuple):
        """:attr:`launch` of ``call_args`` (a tuple): a pinned call's way to a key not seen yet."""
        return self.launch(*call_args)

    def _first(self, key, call_args):
        """First call of a key: the dispatcher compiles (if needed) and launches; keep its
        CompiledKernel and the pieces of a direct launch."""
        ck = self.dispatch(*call_args)
        if hasattr(ck, "result"):
            ck = ck.result()
        try:
            entry = self._entry(ck)
        except Exception as e:  # noqa: BLE001 - this key stays on the dispatcher
            self.reason = f"{self.kernel.__name__}: {type(e).__name__}: {e}"
            _log_once(self.reason)
            self.launch = self.dispatch
            return ck
        if self.verify:
            self._spec[key] = self._triton_spec(call_args)
        self._entries[key] = entry
        return ck

    @staticmethod
    def _entry(ck) -> tuple:
        run = ck.run   # loads the module: the launcher of this compiled kernel
        launch = getattr(run, "launch", None)
        needs = (getattr(run, "global_scratch_size", 0) or 0,
                 getattr(run, "profile_scratch_size", 0) or 0)
        coop = getattr(run, "launch_cooperative_grid", None)
        pdl = getattr(run, "launch_pdl", None)
        if launch is None or coop is None or pdl is None or any(needs):
            # a launcher we do not know, or one that allocates scratch: its own __call__
            def launch(g0, g1, g2, stream, fn, _coop, _pdl, _gs, _ps, md, lm, eh, xh, *args):
                run(g0, g1, g2, stream, fn, md, lm, eh, xh, *args)
            coop = pdl = False
        return (launch, ck.function, coop, pdl, ck.packed_metadata)

    # ------------------------------------------------------------ verification (TPCOMM_DEBUG)
    def _triton_spec(self, call_args):
        dev = self.device if self.device is not None else torch.cuda.current_device()
        binder = self.kernel.device_caches[dev][4]
        _, spec, _ = binder(*self._full_args(call_args), num_warps=self.num_warps)
        return spec

    def _verify(self, key, call_args) -> None:
        self.lean_calls += 1
        spec = self._triton_spec(call_args)
        if spec != self._spec.get(key, spec):
            raise RuntimeError(f"lean launch of {self.kernel.__name__}: key {key} maps to a "
                               f"kernel specialized as {self._spec[key]} but Triton specializes "
                               f"this call as {spec}")
