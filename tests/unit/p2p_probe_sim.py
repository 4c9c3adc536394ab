"""The data-moving P2P check (kernels and orchestration) on the CPU, through Triton's interpreter.

Each "rank" is a thread with its own buffer (a CPU tensor, data region filled with 0xFF as at
set-up); the probe kernels store into and load from the peers' buffers through raw addresses as
on the GPU, and a threaded stand-in for the group store separates the phases. Checked: a healthy
mapping passes on every rank and leaves every byte as it was; a mapping that does not reach the
peer (one rank's address table points at the wrong buffer) is found, with the writing rank
named, and every rank reaches the same verdict; a cached failure vetoes without probing.

    TRITON_INTERPRET=1 python tests/unit/p2p_probe_sim.py

Run by tests/unit/test_gpu_protocol_interpreted.py (skipped without triton).
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
CACHE = tempfile.mkdtemp(prefix="tpcomm-p2p-sim-")
os.environ["TPCOMM_CACHE_DIR"] = CACHE
os.environ.pop("TPCOMM_P2P_CHECK", None)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from gpu_protocol_sim import (SimBuffer, check_all_reduce, make_group,  # noqa: E402
                              run_ranks)  # (importing it also makes the interpreter thread-safe)
from tpcomm.cuda import p2p_check  # noqa: E402
from tpcomm.kernels import p2p_probe  # noqa: E402

PAD = 4096
DATA = 16 << 10
PROBE_OFF, PROBE_NBYTES = 4096, 4096


class ThreadStore:
    """all_gather over threads of one process (the GroupStore's role), bounded."""

    def __init__(self, world, timeout_s=60.0):
        self.world, self.timeout_s = world, timeout_s
        self.rounds: dict = {}
        self.cv = threading.Condition()

    def bind(self, rank):
        store = self

        class _Rank:
            def all_gather(self, name, value):
                return store.all_gather(rank, name, value)
        return _Rank()

    def all_gather(self, rank, name, value):
        value = value.encode() if isinstance(value, str) else value
        with self.cv:
            got = self.rounds.setdefault(name, {})
            got[rank] = value
            self.cv.notify_all()
            if not self.cv.wait_for(lambda: len(got) == self.world, self.timeout_s):
                raise TimeoutError(f"round {name}: ranks {sorted(got)} of {self.world}")
            return [got[r] for r in range(self.world)]


def make_buffers(world):
    tensors = []
    for _ in range(world):
        t = torch.empty(PAD + DATA, dtype=torch.uint8)
        t[:PAD].zero_()
        t[PAD:].fill_(0xFF)
        tensors.append(t)
    # something that is not the fill around the probe area, to see it untouched and restored
    for r, t in enumerate(tensors):
        t[PAD:PAD + PROBE_OFF].fill_(r + 1)
    return tensors, [SimBuffer(r, tensors, PAD) for r in range(world)]


def check_all(world, bufs, tensors):
    """verify_p2p on every rank; returns (verdicts, whether every buffer came back as it was)."""
    before = [t.clone() for t in tensors]
    store = ThreadStore(world)
    out = [None] * world
    errs = run_ranks([lambda r=r: out.__setitem__(r, p2p_check.verify_p2p(
        bufs[r], PROBE_OFF, None, torch.device("cpu"), 30.0, probe_nbytes=PROBE_NBYTES,
        store=store.bind(r))) for r in range(world)])
    assert not any(errs), errs
    return out, all(torch.equal(a, b) for a, b in zip(before, tensors))


def check_kernels_direct(world):
    """The kernels alone: a healthy table gives all-zero counts on every rank."""
    tensors, bufs = make_buffers(world)
    words = p2p_probe.slot_words(PROBE_NBYTES, world)
    addrs = tuple(p + PROBE_OFF for p in bufs[0].buffer_ptrs)
    nonce = 12345
    errs = run_ranks([lambda r=r: p2p_probe.p2p_probe_write(addrs, words, r, nonce, block=256)
                      for r in range(world)])
    assert not any(errs), errs
    counts = [torch.full((2 * world,), -1, dtype=torch.int32) for _ in range(world)]
    errs = run_ranks([lambda r=r: p2p_probe.p2p_probe_read(addrs, words, r, nonce, counts[r],
                                                           block=256) for r in range(world)])
    assert not any(errs), errs
    for r in range(world):
        assert counts[r].tolist() == [0] * (2 * world), (r, counts[r])
    # the pattern is never the fill, and differs between pairs
    area = tensors[1][PAD + PROBE_OFF:PAD + PROBE_OFF + PROBE_NBYTES].view(torch.int32)
    assert not (area[: world * words] == -1).any()
    assert not torch.equal(area[:words], area[words:2 * words])
    # a wrong nonce (stale data) is seen in every word of every slot
    errs = run_ranks([lambda r=r: p2p_probe.p2p_probe_read(addrs, words, r, nonce + 1, counts[r],
                                                           block=256) for r in range(world)])
    assert not any(errs), errs
    assert counts[0].tolist() == [words] * (2 * world), counts[0]
    print(f"world {world}: kernels ok ({words} words per slot)", flush=True)


def check_healthy(world):
    tensors, bufs = make_buffers(world)
    verdicts, same = check_all(world, bufs, tensors)
    assert verdicts == [None] * world, verdicts
    assert same, "the probe area or its surroundings were not restored byte for byte"
    print(f"world {world}: healthy mapping passes, buffers restored", flush=True)


def check_broken(world, bad_rank, bad_peer, wrong_target, shift=0):
    """``bad_rank``'s mapping of ``bad_peer`` reaches ``wrong_target``'s buffer instead (at
    ``shift`` bytes from where it should)."""
    tensors, bufs = make_buffers(world)
    bufs[bad_rank].buffer_ptrs = list(bufs[bad_rank].buffer_ptrs)
    bufs[bad_rank].buffer_ptrs[bad_peer] = tensors[wrong_target].data_ptr() + PAD + shift
    verdicts, _ = check_all(world, bufs, tensors)
    assert all(v == verdicts[0] for v in verdicts), verdicts
    why = verdicts[0]
    assert why and f"written by rank {bad_rank} through the peer mapping" in why, why
    assert "TPCOMM_P2P_CHECK=0" in why and CACHE in why, why
    assert p2p_check.last_verdict().source == "probe"
    print(f"world {world}: broken mapping found: {why[:150]}", flush=True)
    # the failure is cached for this machine: the next start vetoes without probing, even with
    # a healthy mapping
    tensors, bufs = make_buffers(world)
    verdicts, same = check_all(world, bufs, tensors)
    assert all(v == verdicts[0] for v in verdicts) and verdicts[0], verdicts
    assert "failed on this machine before" in verdicts[0] and CACHE in verdicts[0], verdicts[0]
    assert p2p_check.last_verdict().source == "cache"
    assert same
    for name in os.listdir(CACHE):
        os.unlink(os.path.join(CACHE, name))
    print(f"world {world}: cached failure vetoes without probing", flush=True)


def check_as_wired(world):
    """As make_cuda_backend runs it: on the user region of a backend's buffer, right after
    set-up; the push and pull kernels work afterwards (the sentinel fill is intact)."""
    backs, tensors = make_group(world, 16 << 10, 2)
    layout = backs[0].layout
    before = [t.clone() for t in tensors]
    store = ThreadStore(world)
    out = [None] * world
    nbytes = min(layout.user, p2p_check.PROBE_BYTES)
    errs = run_ranks([lambda r=r: out.__setitem__(r, p2p_check.verify_p2p(
        backs[r].buf, layout.user_off, None, torch.device("cpu"), 30.0, probe_nbytes=nbytes,
        store=store.bind(r))) for r in range(world)])
    assert not any(errs) and out == [None] * world, (errs, out)
    assert all(torch.equal(a, b) for a, b in zip(before, tensors))
    for salt, algo in enumerate(("one_shot/push", "one_shot/pull", "two_shot")):
        check_all_reduce(backs, algo, 300, torch.float32, salt)
    print(f"world {world}: as wired into make_cuda_backend, collectives ok after", flush=True)


def main():
    check_kernels_direct(3)
    check_healthy(2)
    check_healthy(4)
    check_as_wired(2)
    check_broken(3, bad_rank=1, bad_peer=2, wrong_target=0)
    check_broken(2, bad_rank=0, bad_peer=1, wrong_target=0)   # a "peer" mapping to itself
    check_broken(3, bad_rank=2, bad_peer=0, wrong_target=0, shift=64)   # the right GPU, off
    print("ALL OK")


if __name__ == "__main__":
    main()
