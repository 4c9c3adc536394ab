"""The GPU engine's recovery from a call mismatch, host side (``P2PCollectives._recover``), on
emulated ranks over CPU tensors: no kernel runs, the error words a kernel would record are set
by hand. The kernels' side (who records what, no output written, exact calls after a reset)
runs under Triton's interpreter: ``gpu_protocol_sim.py mismatch``.
"""
import pytest
import torch

pytest.importorskip("triton", reason="the GPU engine imports triton (pip install --no-deps triton)")

from tpcomm.cuda.emulated import check_ranks, make_emulated_group  # noqa: E402
from tpcomm.errors import CommunicatorBrokenError, MismatchError  # noqa: E402
from tpcomm.kernels import barrier as k_barrier  # noqa: E402

H300 = k_barrier.call_hash("all_reduce", "float32", 300)
H600 = k_barrier.call_hash("all_reduce", "float32", 600)


def _mismatch_word(rank: int, peer: int, op: int = k_barrier.OP_ONE_SHOT_PUSH) -> int:
    """An error word as record_mismatch writes it (phase 15)."""
    return (1 << 62) | (7 << 24) | (k_barrier.PHASE_MISMATCH << 20) | (op << 16) | (peer << 8) | rank


def _record(back, word: int, mine: int, theirs: int) -> None:
    back._err_dev[0], back._err_dev[1], back._err_dev[2] = word, mine, theirs
    back._err_host_tensor[0] = word


def _dirty(backs, tensors) -> None:
    """Counters, flags, headers and receive slots as a run of calls leaves them, and a user
    region holding a user's tensor."""
    for b, t in zip(backs, tensors):
        L = b.layout
        pad = b.buf.signal_pad(b.rank)
        pad[:L.pad_bytes // 8] = torch.arange(L.pad_bytes // 8) % 5
        data = b.buf.local_data()
        data[:L.user_off] = (torch.arange(L.user_off) % 7).to(torch.uint8)
        data[L.user_off:L.user_off + 64] = 42


def test_every_rank_resets_its_engine_and_raises_naming_both_calls():
    backs, tensors = make_emulated_group(2, 16 << 10, 3, timeout_s=5.0)
    _dirty(backs, tensors)
    _record(backs[0], _mismatch_word(0, 1), H300, H600)
    _record(backs[1], _mismatch_word(1, 0), H600, 0)    # it only saw a stopped peer
    errors = check_ranks(backs, timeout_s=20.0)
    assert all(isinstance(e, MismatchError) for e in errors), errors
    assert "rank 0 called all_reduce float32 numel=300 but rank 1 called all_reduce " \
           "float32 numel=600" in str(errors[0])
    # rank 1 names its own call and the pair rank 0 saw
    assert "rank 1 called all_reduce float32 numel=600; rank 0 called all_reduce float32 " \
           "numel=300 but rank 1 called all_reduce float32 numel=600" in str(errors[1])
    for b in backs:
        L = b.layout
        assert "stays usable" in str(errors[b.rank]) and b.broken is None
        assert int(b.buf.signal_pad(b.rank)[:L.pad_bytes // 8].abs().sum()) == 0
        data = b.buf.local_data()
        assert bool(torch.all(data[:L.user_off] == 0xFF)), "receive areas not sentinel-filled"
        assert bool(torch.all(data[L.user_off:L.user_off + 64] == 42)), "user region touched"
        assert int(b._err_host_tensor[0]) == 0
    # nothing left: the next checks see no error; a second mismatch recovers as well
    assert check_ranks(backs) == [None, None]
    _record(backs[0], _mismatch_word(0, 1), H300, H600)
    _record(backs[1], _mismatch_word(1, 0), H600, H300)
    errors = check_ranks(backs, timeout_s=20.0)
    assert all(isinstance(e, MismatchError) for e in errors), errors
    assert "rank 1 called all_reduce float32 numel=600 but rank 0 called all_reduce " \
           "float32 numel=300" in str(errors[1])


def test_a_rank_that_never_comes_leaves_its_peer_broken_within_the_timeout():
    backs, _ = make_emulated_group(2, 16 << 10, 3, timeout_s=0.3)
    _record(backs[0], _mismatch_word(0, 1), H300, H600)
    with pytest.raises(CommunicatorBrokenError, match=r"ranks \[1\] did not meet"):
        backs[0].check()
    assert backs[0].broken
    with pytest.raises(CommunicatorBrokenError, match="is broken"):   # not tried again
        backs[0].check()


def test_no_reset_inside_a_graph_capture(monkeypatch):
    """A capture that finds the mismatch raises MismatchError saying so and changes nothing;
    the next check outside the capture recovers."""
    backs, tensors = make_emulated_group(2, 16 << 10, 3, timeout_s=5.0)
    _dirty(backs, tensors)
    for r in range(2):
        _record(backs[r], _mismatch_word(r, 1 - r), (H300, H600)[r], (H600, H300)[r])
    pad_before = backs[0].buf.signal_pad(0).clone()
    monkeypatch.setattr(backs[0], "_is_cuda", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(MismatchError, match="outside a capture"):
        backs[0]._fail(int(backs[0]._err_host_tensor[0]))
    assert backs[0].broken is None
    assert torch.equal(backs[0].buf.signal_pad(0), pad_before), "reset during a capture"
    monkeypatch.undo()
    errors = check_ranks(backs, timeout_s=20.0)
    assert all(isinstance(e, MismatchError) for e in errors), errors
    assert int(backs[0].buf.signal_pad(0)[:backs[0].layout.pad_bytes // 8].abs().sum()) == 0


def test_without_a_rendezvous_a_mismatch_breaks_the_engine():
    backs, _ = make_emulated_group(2, 16 << 10, 3, timeout_s=5.0)
    backs[0]._rendezvous = None
    _record(backs[0], _mismatch_word(0, 1), H300, H600)
    with pytest.raises(MismatchError, match="close the Communicator"):
        backs[0].check()
    with pytest.raises(CommunicatorBrokenError):    # refused before any kernel
        backs[0].all_reduce(torch.ones(4), torch.ones(4), "one_shot/push")
