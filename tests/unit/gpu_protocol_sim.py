"""The GPU backend's kernels and protocol, run on the CPU by Triton's interpreter.

Each "rank" is a thread with its own symmetric buffer (a CPU tensor); the kernels reach the
peers' buffers through raw addresses exactly as on the GPU, and spin on them while the other
threads run. This checks the indexing, the push/poll/clear protocol, the epoch rotation, the
chunking and the timeout path without a GPU; it says nothing about speed or the GPU memory
model. Run by tests/unit/test_gpu_protocol_interpreted.py in a subprocess with
TRITON_INTERPRET=1 (needs triton installed; CI without triton skips it).

    TRITON_INTERPRET=1 python tests/unit/gpu_protocol_sim.py [quick]
"""
from __future__ import annotations

import os
import sys
import threading

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tpcomm.errors import (CommunicatorBrokenError, MismatchError,  # noqa: E402
                           PeerTimeoutError, TpcommError)
from tpcomm.cuda.emulated import EmulatedBuffer, check_ranks, make_emulated_group  # noqa: E402
from tpcomm.kernels.barrier import decode_error  # noqa: E402
from tpcomm.testing import exact  # noqa: E402

# ---- make the interpreter usable from several threads at once --------------------------------
_tls = threading.local()


def _get_idx(self):
    return getattr(_tls, "grid_idx", None)


def _set_idx(self, v):
    _tls.grid_idx = v


def _get_dim(self):
    return getattr(_tls, "grid_dim", None)


def _set_dim(self, v):
    _tls.grid_dim = v


interp.InterpreterBuilder.grid_idx = property(_get_idx, _set_idx)
interp.InterpreterBuilder.grid_dim = property(_get_dim, _set_dim)
_orig_patch = interp._patch_lang
_patched = []
_patch_lock = threading.Lock()


class _Keep:
    def restore(self):
        pass


def _patch_once(fn):
    import triton.language as tl
    with _patch_lock:
        mods = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        if not mods <= set(_patched):
            _orig_patch(fn)
            _patched.extend(mods)
            # numpy >= 2.4 refuses int() of a 1-element array (the interpreter's scalars)
            import triton.language as tl
            tl.tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])
    return _Keep()


interp._patch_lang = _patch_once
# CPython 3.11's AST constructor is not thread-safe ("AST constructor recursion depth
# mismatch"): ranks that interpret different kernels for the first time at once parse together
import ast  # noqa: E402
_parse, _parse_lock = ast.parse, threading.Lock()


def _locked_parse(*a, **k):
    with _parse_lock:
        return _parse(*a, **k)


ast.parse = _locked_parse
# CPU tensors are used in place: no copy back (a copy back of a whole buffer would race with
# the peers' stores into it)
interp.GridExecutor._restore_args_dev = lambda self, *a, **k: None


SimBuffer = EmulatedBuffer  # the name other protocol scripts import


def make_group(world, max_bytes, grid, timeout_s=20.0):
    return make_emulated_group(world, max_bytes, grid, timeout_s=timeout_s, num_warps=1)


def run_ranks(fns):
    errors = [None] * len(fns)

    def wrap(i):
        try:
            fns[i]()
        except BaseException as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            errors[i] = e
    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def check_all_reduce(backs, algo, numel, dtype, salt, offset=0):
    world = len(backs)
    ins = [exact(numel + offset, r, dtype, salt)[offset:] for r in range(world)]
    outs = [torch.full((numel + offset + 8,), 77.0, dtype=dtype) for _ in range(world)]
    views = [o[offset:offset + numel] for o in outs]
    errs = run_ranks([lambda r=r: backs[r].all_reduce(ins[r], views[r], algo)
                      for r in range(world)])
    assert not any(errs), errs
    want = sum(exact(numel + offset, r, torch.float64, salt)[offset:] for r in range(world)).to(dtype)
    for r in range(world):
        assert torch.equal(views[r], want), (algo, numel, dtype, r, views[r][:20], want[:20])
        assert torch.all(outs[r][:offset] == 77) and torch.all(outs[r][offset + numel:] == 77)
    return True


def check_in_place(backs, algo, numel, dtype, salt):
    world = len(backs)
    xs = [exact(numel, r, dtype, salt) for r in range(world)]
    errs = run_ranks([lambda r=r: backs[r].all_reduce(xs[r], xs[r], algo) for r in range(world)])
    assert not any(errs), errs
    want = sum(exact(numel, r, torch.float64, salt) for r in range(world)).to(dtype)
    for r in range(world):
        assert torch.equal(xs[r], want), (algo, numel, r)


def check_rs_ag(backs, c, dtype, salt):
    world = len(backs)
    ins = [exact(world * c, r, dtype, salt).view(world, c) for r in range(world)]
    outs = [torch.full((c,), 5.0, dtype=dtype) for _ in range(world)]
    errs = run_ranks([lambda r=r: backs[r].reduce_scatter(ins[r], outs[r]) for r in range(world)])
    assert not any(errs), errs
    full = sum(exact(world * c, r, torch.float64, salt) for r in range(world)).to(dtype).view(world, c)
    for r in range(world):
        assert torch.equal(outs[r], full[r]), ("rs", c, r)
    gin = [exact(c, r, dtype, salt) for r in range(world)]
    gout = [torch.full((world, c), 5.0, dtype=dtype) for _ in range(world)]
    errs = run_ranks([lambda r=r: backs[r].all_gather(gin[r], gout[r]) for r in range(world)])
    assert not any(errs), errs
    for r in range(world):
        for p in range(world):
            assert torch.equal(gout[r][p], gin[p]), ("ag", c, r, p)


def check_zero_copy(backs, numel, dtype, salt):
    world = len(backs)
    xs = [b.empty((numel,), dtype) for b in backs]
    for r in range(world):
        xs[r].copy_(exact(numel, r, dtype, salt))
    want = sum(exact(numel, r, torch.float64, salt) for r in range(world)).to(dtype)
    outs = [torch.empty(numel, dtype=dtype) for _ in range(world)]
    errs = run_ranks([lambda r=r: backs[r].all_reduce(xs[r], outs[r], "one_shot/pull")
                      for r in range(world)])
    assert not any(errs), errs
    for r in range(world):
        assert torch.equal(outs[r], want), ("zero-copy", r)
    errs = run_ranks([lambda r=r: backs[r].all_reduce(xs[r], xs[r], "one_shot/pull")
                      for r in range(world)])
    assert not any(errs), errs
    for r in range(world):
        assert torch.equal(xs[r], want), ("zero-copy in place", r)


def check_add_rms_norm(backs, rows, hidden, dtype, salt):
    """The fused all-reduce + add + RMSNorm: x and residual exact, normed within a rounding."""
    from tpcomm.reference import add_rms_norm
    world = len(backs)
    xs = [exact(rows * hidden, r, dtype, salt).view(rows, hidden) for r in range(world)]
    res0 = exact(rows * hidden, 7, dtype, salt + 1).view(rows, hidden)
    w = (exact(hidden, 3, torch.float32, salt) / 8).to(dtype)
    ress = [res0.clone() for _ in range(world)]
    normed = [torch.full((rows, hidden), 9.0, dtype=dtype) for _ in range(world)]
    errs = run_ranks([lambda r=r: backs[r].all_reduce_add_rms_norm(xs[r], ress[r], w, 1e-6,
                                                                   normed[r])
                      for r in range(world)])
    assert not any(errs), errs
    want_x = sum(exact(rows * hidden, r, torch.float64, salt) for r in range(world))
    want_x = want_x.to(dtype).view(rows, hidden)
    want_n, want_r = add_rms_norm(want_x.clone(), res0.clone(), w, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for r in range(world):
        assert torch.equal(xs[r], want_x), ("fused norm x", rows, hidden, r)
        assert torch.equal(ress[r], want_r), ("fused norm residual", rows, hidden, r)
        torch.testing.assert_close(normed[r].float(), want_n.float(), rtol=tol, atol=tol)
        assert torch.equal(normed[r], normed[0]), ("fused norm differs across ranks", r)


def check_timeout(world):
    backs, _ = make_group(world, 16 << 10, 2, timeout_s=0.5)
    x = exact(300, 0, torch.float32)
    try:
        backs[0].all_reduce(x, x.clone(), "one_shot/push")  # the peers never come
    except PeerTimeoutError:
        pass
    try:
        backs[0].check()
    except PeerTimeoutError as e:
        assert e.peers and e.peers[0] != 0, e
        print("timeout ok:", str(e)[:160])
        return
    raise AssertionError("no PeerTimeoutError after a stalled peer")


def _mismatch_calls(world):
    """(name, {rank: odd call}, the others' call) of calls that differ across ranks. A call is
    fn(back, rank) -> kept(): whether its tensors still hold what they held before the call
    (the kernels write no output after a mismatch: in-place inputs and poisoned outputs stay;
    all_gather may write its own row, a copy of its input, before the check)."""
    f32, bf16 = torch.float32, torch.bfloat16

    def ar(n, algo, dtype=f32, in_place=False):
        def call(b, r):
            x = exact(n, r, dtype)
            out = x if in_place else torch.full((n,), 77.0, dtype=dtype)
            b.all_reduce(x, out, algo)
            return lambda: (torch.equal(x, exact(n, r, dtype))
                            and (in_place or bool(torch.all(out == 77))))
        return call

    def rs(c, dtype=f32):
        def call(b, r):
            out = torch.full((c,), 5.0, dtype=dtype)
            b.reduce_scatter(exact(world * c, r, dtype).view(world, c), out)
            return lambda: bool(torch.all(out == 5))
        return call

    def ag(c, dtype=f32):
        def call(b, r):
            out = torch.full((world, c), 5.0, dtype=dtype)
            b.all_gather(exact(c, r, dtype), out)
            others = [p for p in range(world) if p != r]
            return lambda: bool(torch.all(out[others] == 5))
        return call

    def norm(rows, hidden=64, dtype=f32):
        def call(b, r):
            x = exact(rows * hidden, r, dtype).view(rows, hidden)
            res = exact(rows * hidden, 9, dtype).view(rows, hidden)
            normed = torch.full_like(x, 3.0)
            b.all_reduce_add_rms_norm(x, res, torch.ones(hidden, dtype=dtype), 1e-6, normed)
            return lambda: (torch.equal(x.view(-1), exact(rows * hidden, r, dtype))
                            and torch.equal(res.view(-1), exact(rows * hidden, 9, dtype))
                            and bool(torch.all(normed == 3)))
        return call

    push_max = (16 << 10) // world // 4 // 16 * 16   # float32 elements of one push slot
    last = world - 1
    return [
        ("one_shot_push sizes", {last: ar(600, "one_shot_push", in_place=True)},
         ar(300, "one_shot_push", in_place=True)),
        # a whole number of rounds: the first round is where both calls meet
        ("push rounds", {last: ar(2 * push_max, "one_shot_push")}, ar(push_max, "one_shot_push")),
        # other sizes pick other kernels (push and pull families): the call headers still meet
        ("push vs pull", {last: ar(4 * push_max, "one_shot", in_place=True)},
         ar(64, "one_shot", in_place=True)),
        ("two_shot dtype", {last: ar(2000, "two_shot", bf16, in_place=True)},
         ar(1000, "two_shot", in_place=True)),
        ("op", {last: rs(500)}, ar(world * 500, "two_shot")),
        ("all_gather sizes", {last: ag(40)}, ag(48)),
        ("fused norm rows", {last: norm(5)}, norm(4)),
        ("ring sizes", {last: ar(1200, "ring", in_place=True)}, ar(1000, "ring", in_place=True)),
    ]


def _expect_mismatch_everywhere(name, backs):
    """Every rank's check() (each from its own thread: the ranks meet to reset their engines)
    raises MismatchError naming both calls; returns the kinds seen, per rank."""
    kinds = []
    for r, e in enumerate(check_ranks(backs)):
        if isinstance(e, MismatchError):
            msg = str(e)
            assert "numel=" in msg and f"rank {r} called" in msg, (name, r, msg)
            assert "stays usable" in msg, (name, r, msg)
            kinds.append("mismatch")
        else:
            kinds.append("none" if e is None else f"{type(e).__name__}: {str(e)[:160]}")
    return kinds


def _exact_after(backs, salt):
    """Calls after a recovery, on every rank: exact on every algorithm, op and the fused norm."""
    for algo in ("one_shot/push", "one_shot/pull", "two_shot", "ring"):
        salt += 1
        check_all_reduce(backs, algo, 300, torch.float32, salt)
    check_in_place(backs, "one_shot/push", 1000, torch.bfloat16, salt + 1)
    check_rs_ag(backs, 33, torch.float32, salt + 2)
    check_add_rms_norm(backs, 3, 64, torch.float32, salt + 3)
    for r, e in enumerate(check_ranks(backs)):
        assert e is None, (r, repr(e))


def check_mismatch(world):
    """Calls that differ on one rank: MismatchError from the GPU call check (not a timeout) on
    every rank, naming both calls; the mismatched call wrote no output; every rank's engine
    resets itself, and the calls after it are exact on every rank (twice: a second mismatch on
    the same group recovers as well)."""
    for name, odd, common in _mismatch_calls(world):
        backs, _ = make_group(world, 16 << 10, 3, timeout_s=10.0)  # the interpreter is slow: 2 s gave a timeout under load
        calls = [odd.get(r, common) for r in range(world)]
        for round_ in range(2 if name == "one_shot_push sizes" else 1):
            kept = [None] * world
            errs = run_ranks([lambda r=r: kept.__setitem__(r, calls[r](backs[r], r))
                              for r in range(world)])
            assert not any(errs), (name, errs)
            kinds = _expect_mismatch_everywhere(name, backs)
            assert kinds == ["mismatch"] * world, (name, kinds)
            assert all(k() for k in kept), (name, "a mismatched call wrote its output",
                                            [k() for k in kept])
            _exact_after(backs, 7000 + 100 * round_)
        print(f"mismatch {name} world {world}: {kinds}, outputs kept, exact after", flush=True)


def check_stopped_peer(world=2):
    """A peer whose kernels had stopped (its error word set: it found a mismatch first) and
    whose host launched two more calls before this rank looked: its call header of two calls
    later sits in the slot this rank compares. This rank must record the mismatch too (the
    header is of a newer call), not sum the stopped peer's leftover data; then both recover."""
    for algo in ("one_shot/push", "two_shot"):
        backs, tensors = make_group(world, 16 << 10, 3, timeout_s=10.0)
        check_all_reduce(backs, algo, 300, torch.float32, 1)
        # rank 0 stops: a mismatch word (phase 15, peer 1), then three calls that wait for nothing
        word = (1 << 62) | (15 << 20) | (1 << 8)
        backs[0]._err_dev[0] = word
        backs[0]._err_dev[1] = 0
        backs[0]._err_host_tensor[0] = word    # as record_mismatch's copy for the host
        xs = [exact(300, 0, torch.float32) for _ in range(3)]
        for x in xs:
            backs[0].all_reduce(x, x, algo)
        assert all(torch.equal(x, exact(300, 0, torch.float32)) for x in xs), "a dead call wrote"
        y = exact(300, 1, torch.float32)
        out = torch.full((300,), 77.0)
        backs[1].all_reduce(y, out, algo)      # the peer's header here is two calls ahead
        assert bool(torch.all(out == 77)), (algo, "summed a stopped peer's data", out[:8])
        info = decode_error(int(backs[1]._err_dev[0]))
        assert info["mismatch"] and info["peer"] == 0, (algo, info)
        kinds = _expect_mismatch_everywhere("stopped peer", backs)
        assert kinds == ["mismatch"] * world, (algo, kinds)
        _exact_after(backs, 8000)
        print(f"stopped peer {algo}: the other rank recorded it, then exact", flush=True)


def check_no_rendezvous():
    """No rendezvous: a mismatch breaks the engine (later calls refuse), as before recovery."""
    backs, _ = make_group(2, 16 << 10, 3, timeout_s=10.0)
    for b in backs:
        b._rendezvous = None
    f32 = torch.float32
    calls = [lambda b, r: b.all_reduce(exact(300 + r, r, f32), torch.empty(300 + r),
                                       "one_shot/push")] * 2
    errs = run_ranks([lambda r=r: calls[r](backs[r], r) for r in range(2)])
    assert not any(errs), errs
    for r in range(2):
        try:
            backs[r].check(sync=True)
            raise AssertionError("no MismatchError")
        except MismatchError as e:
            assert "close the Communicator" in str(e), str(e)
        try:
            calls[r](backs[r], r)
            raise AssertionError("a broken engine accepted a call")
        except CommunicatorBrokenError:
            pass
    print("no rendezvous: broken as before", flush=True)


def check_mixed_world4(rounds=2):
    """World 4: one_shot push calls of varying sizes (blocks with and without data, several
    tiles per block, chunked calls) interleaved with fused-norm calls of varying rows and
    hidden sizes and with the other algorithms on ONE group, as the GPU script's correctness
    phase and soak do: the call headers (parity slots per block, shared call counters) and the
    push regions (data epochs per family) must stay in step across all of them."""
    backs, _ = make_group(4, 16 << 10, 4, timeout_s=20.0)
    push_max = (16 << 10) // 4 // 2 // 16 * 16       # bf16 elements of one push slot
    salt = 1000
    bf16 = torch.bfloat16
    for k in range(rounds):
        for numel in (1, 300, 2 * push_max + 5, 70, push_max - 3):
            salt += 1
            check_all_reduce(backs, "one_shot/push", numel, bf16, salt, offset=salt % 3)
        for rows, hidden in ((3, 97), (1, 33), (6, 64)):
            salt += 1
            check_add_rms_norm(backs, rows, hidden, bf16, salt)
            salt += 1
            check_all_reduce(backs, "one_shot/push", 17 + 100 * rows, bf16, salt)
        for algo in ("two_shot", "ring", "one_shot/pull", "one_shot/push"):
            salt += 1
            check_all_reduce(backs, algo, 1000 + 13 * k, bf16, salt)
        print(f"mixed world 4 round {k}: ok", flush=True)


def main():
    if "mixed4" in sys.argv:
        check_mixed_world4()
        print("ALL OK")
        return
    if "stopped" in sys.argv:   # the cases after the main ones alone (development)
        check_stopped_peer()
        check_no_rendezvous()
        print("ALL OK")
        return
    if "mismatch" in sys.argv:
        for world in (2, 3):
            check_mismatch(world)
        check_stopped_peer()
        check_no_rendezvous()
        print("ALL OK")
        return
    quick = "quick" in sys.argv
    for world in (2, 3, 4):
        backs, _ = make_group(world, 64 << 10, 3)
        salt = 0
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            sizes = [1, 7, 16, 300, 2048 + 5, 5000] if not quick else [7, 2048 + 5]
            for numel in sizes:
                for algo in ("one_shot/push", "one_shot/pull", "two_shot", "ring"):
                    salt += 1
                    check_all_reduce(backs, algo, numel, dtype, salt, offset=salt % 3)
            big = (64 << 10) // dtype.itemsize + 37  # several rounds of every algorithm
            for algo in ("one_shot", "two_shot", "ring"):
                salt += 1
                check_all_reduce(backs, algo, big, dtype, salt)
                check_in_place(backs, algo, 1000, dtype, salt)
            for c in (1, 33, 4096 + 3):
                salt += 1
                check_rs_ag(backs, c, dtype, salt)
            check_zero_copy(backs, 777, dtype, salt)
            # rows of an odd hidden size; then more rows than one push slot holds (rounds)
            check_add_rms_norm(backs, 5, 3 * 33, dtype, salt)
            check_add_rms_norm(backs, (64 << 10) // dtype.itemsize // 200 + 3, 200, dtype, salt)
            print(f"world {world} {dtype}: ok", flush=True)
            if quick:
                break
    check_timeout(2)
    print("ALL OK")


if __name__ == "__main__":
    main()
