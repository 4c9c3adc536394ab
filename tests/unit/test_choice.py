"""One choice per call, one chunk loop (issue 12 item 2): the Choice value, the mechanism of a
plain one_shot, the engines' round sizes and run_rounds, without devices."""
import pytest
import torch

from tpcomm.algorithms import Choice, choice
from tpcomm.engine import run_call, run_rounds
from tpcomm.selection.select import engine_choice, select_mechanism


class Recorder:
    """An engine that records its rounds: (op, name, numel, total, offset)."""
    device_type = "cuda"

    def __init__(self, limits):
        self.limits, self.rounds = limits, []

    def round_limit(self, op, name, dtype):
        if name not in self.limits:
            raise ValueError(name)
        return self.limits[name]

    def _rec(self, op, inp, out, name, total=-1, offset=0):
        self.rounds.append((op, name, out.numel() if op == "reduce_scatter" else inp.numel(),
                            total, offset))

    def all_reduce(self, inp, out, name, *, total=-1, offset=0):
        self._rec("all_reduce", inp, out, name, total, offset)
        out.copy_(inp)

    def reduce_scatter(self, inp, out, name, *, total=-1, offset=0):
        self._rec("reduce_scatter", inp, out, name, total, offset)

    def all_gather(self, inp, out, name, *, total=-1, offset=0):
        self._rec("all_gather", inp, out, name, total, offset)


def test_choice_names_the_mechanism():
    c = choice("one_shot", "push", 64)
    assert isinstance(c, Choice) and c.name == "one_shot/push" and c.chunk == 64
    assert choice("two_shot").name == "two_shot" and choice("torch", reason="r").reason == "r"
    with pytest.raises(AttributeError):
        c.chunk = 1   # immutable


def test_plain_one_shot_pushes_while_the_call_fits_one_push_round():
    assert select_mechanism("all_reduce", "one_shot", 100, "cuda", 100) == "push"
    assert select_mechanism("all_reduce", "one_shot", 101, "cuda", 100) == "pull"
    assert select_mechanism("all_reduce", "two_shot", 10**9, "cuda", 100) is None
    assert select_mechanism("all_reduce", "one_shot", 10**9, "cpu", 100) is None


def test_engine_choice_asks_the_engine_for_the_rounds_of_the_name_it_picked():
    eng = Recorder({"one_shot/push": 100, "one_shot/pull": 48, "two_shot": 64})
    f32 = torch.float32
    assert engine_choice("all_reduce", "one_shot", None, 100, f32, eng) == \
        Choice("one_shot/push", "one_shot", "push", 100, "")
    assert engine_choice("all_reduce", "one_shot", None, 101, f32, eng).name == "one_shot/pull"
    assert engine_choice("all_reduce", "one_shot", "push", 10**6, f32, eng).chunk == 100
    assert engine_choice("all_reduce", "two_shot", None, 10**6, f32, eng) == \
        Choice("two_shot", "two_shot", None, 64, "")


def test_run_rounds_is_the_one_loop():
    eng = Recorder({})
    x, out = torch.arange(100.0), torch.empty(100)
    run_rounds(eng, "all_reduce", x, out, "two_shot", 32, 2)
    assert eng.rounds == [("all_reduce", "two_shot", 32, 100, 0),
                          ("all_reduce", "two_shot", 32, 100, 32),
                          ("all_reduce", "two_shot", 32, 100, 64),
                          ("all_reduce", "two_shot", 4, 100, 96)]
    assert torch.equal(out, x)
    eng.rounds.clear()
    run_rounds(eng, "all_reduce", x, out, "two_shot", 100, 2)          # one round, whole
    assert eng.rounds == [("all_reduce", "two_shot", 100, 100, 0)]
    eng.rounds.clear()
    run_rounds(eng, "reduce_scatter", torch.ones(2 * 40), torch.empty(40), "direct", 16, 2)
    assert [r[2:] for r in eng.rounds] == [(16, 80, 0), (16, 80, 16), (8, 80, 32)]
    eng.rounds.clear()
    run_rounds(eng, "all_gather", torch.ones(40), torch.empty(2, 40), "direct", 32, 2)
    assert [r[2:] for r in eng.rounds] == [(32, 40, 0), (8, 40, 32)]
    with pytest.raises(ValueError, match="a round of 0"):
        run_rounds(eng, "all_reduce", x, out, "two_shot", 0, 2)


def test_run_call_makes_the_communicators_choice():
    eng = Recorder({"one_shot/push": 50, "one_shot/pull": 30})
    x, out = torch.arange(70.0), torch.empty(70)
    run_call(eng, "all_reduce", x, out, "one_shot", 2)      # over one push round: pull rounds
    assert [r[1:] for r in eng.rounds] == [("one_shot/pull", 30, 70, 0),
                                           ("one_shot/pull", 30, 70, 30),
                                           ("one_shot/pull", 10, 70, 60)]
    eng.rounds.clear()
    run_call(eng, "all_reduce", x, out, "one_shot/push", 2)  # forced: push rounds
    assert [r[1:3] for r in eng.rounds] == [("one_shot/push", 50), ("one_shot/push", 20)]


def test_engines_round_limits():
    pytest.importorskip("triton")
    from tpcomm.cuda.emulated import make_emulated_group
    from tpcomm.cuda.p2p_collectives import STAGE_BYTES, Layout
    (a, b), _ = make_emulated_group(2, 64 << 10, 2)
    L, f32, bf16 = Layout.make(2, 64 << 10, 2), torch.float32, torch.bfloat16
    assert a.round_limit("all_reduce", "one_shot/push", f32) == L.one_shot_push_max(4)
    assert a.round_limit("all_reduce", "one_shot_push", bf16) == L.one_shot_push_max(2)
    assert a.round_limit("all_reduce", "one_shot/pull", f32) == min(64 << 10, STAGE_BYTES) // 4
    assert a.round_limit("all_reduce", "two_shot", f32) == L.two_shot_max(4)
    assert a.round_limit("reduce_scatter", "direct", f32) == L.slot_max(4)
    with pytest.raises(ValueError, match="resolved by the caller"):
        a.round_limit("all_reduce", "one_shot", f32)    # the mechanism is the caller's choice
    with pytest.raises(ValueError):
        a.round_limit("all_gather", "ring", f32)
