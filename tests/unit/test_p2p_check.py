"""The P2P check's orchestration and verdict cache, no devices: the probe kernels are replaced by
a stand-in (the real ones run under the interpreter in test_gpu_protocol_interpreted.py)."""
import json
import logging
import os
import sys
import types

import pytest
import torch

import tpcomm.kernels
from tpcomm.cuda import p2p_check
from tpcomm.settings import reload_settings


class FakeKernels(types.ModuleType):
    """tpcomm.kernels.p2p_probe's interface; ``bad`` wrong words loaded from rank 0."""

    def __init__(self, bad=0, forbid=False):
        super().__init__("tpcomm.kernels.p2p_probe")
        self.bad, self.forbid, self.calls = bad, forbid, 0

    @staticmethod
    def slot_words(nbytes, world):
        return nbytes // world // 16 * 4

    def p2p_probe_write(self, addrs, words, rank, nonce):
        assert not self.forbid, "the probe ran although a cached failure should veto it"
        self.calls += 1

    def p2p_probe_read(self, addrs, words, rank, nonce, counts):
        counts.zero_()
        counts[len(addrs)] = self.bad
        return counts


class OneRankStore:
    def all_gather(self, name, value):
        return [value.encode() if isinstance(value, str) else value]


class OneRankBuffer:
    rank, world_size, device = 0, 1, torch.device("cpu")

    def __init__(self):
        self.t = torch.full((8192,), 0xFF, dtype=torch.uint8)
        self.buffer_ptrs = [self.t.data_ptr()]

    def local_data(self):
        return self.t


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("TPCOMM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TPCOMM_P2P_CHECK", raising=False)
    reload_settings()

    def use(kernels):
        monkeypatch.setitem(sys.modules, "tpcomm.kernels.p2p_probe", kernels)
        monkeypatch.setattr(tpcomm.kernels, "p2p_probe", kernels, raising=False)
        return kernels
    monkeypatch.use_kernels = use
    monkeypatch.tmp = tmp_path
    yield monkeypatch
    monkeypatch.undo()
    reload_settings()


def _verify(buf=None):
    buf = buf or OneRankBuffer()
    return p2p_check.verify_p2p(buf, 4096, None, torch.device("cpu"), 5.0, probe_nbytes=4096,
                                store=OneRankStore())


def test_settings_default_and_switches(env):
    s = reload_settings()
    assert s.p2p_check and s.cache_dir == str(env.tmp)
    env.setenv("TPCOMM_P2P_CHECK", "0")
    env.delenv("TPCOMM_CACHE_DIR")
    s = reload_settings()
    assert not s.p2p_check and s.cache_dir == os.path.expanduser("~/.cache/tpcomm")


def test_cache_key_names_machine_gpus_driver_and_versions(tmp_path):
    key = p2p_check.cache_key("node1", ["GPU-b", "GPU-a"], "550.54")
    assert key == p2p_check.cache_key("node1", ["GPU-a", "GPU-b"], "550.54")  # a set of GPUs
    assert key["torch"] == torch.__version__ and key["host"] == "node1"
    path = p2p_check.cache_path(str(tmp_path), key)
    assert os.path.dirname(path) == str(tmp_path)
    assert path == p2p_check.cache_path(str(tmp_path), dict(key))
    for other in (p2p_check.cache_key("node2", ["GPU-a", "GPU-b"], "550.54"),
                  p2p_check.cache_key("node1", ["GPU-a", "GPU-c"], "550.54"),
                  p2p_check.cache_key("node1", ["GPU-a", "GPU-b"], "560.1"),
                  dict(key, torch="0.0")):
        assert p2p_check.cache_path(str(tmp_path), other) != path


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    key = p2p_check.cache_key("h", ["g"], "d")
    path = p2p_check.cache_path(str(tmp_path / "sub"), key)
    p2p_check.write_cached(path, key, False, "rank 1 read 4 wrong words")
    entry = p2p_check.read_cached(path, key)
    assert entry["ok"] is False and entry["reason"] == "rank 1 read 4 wrong words"
    # a write that fails half way leaves the old file whole and no temporary behind

    def broken_dump(obj, f, **kw):
        f.write('{"key": ')
        raise OSError("disk full")
    monkeypatch.setattr(p2p_check.json, "dump", broken_dump)
    p2p_check.write_cached(path, key, True, None)
    monkeypatch.undo()
    assert p2p_check.read_cached(path, key)["ok"] is False
    assert os.listdir(tmp_path / "sub") == [os.path.basename(path)]


def test_broken_or_foreign_cache_file_is_ignored(tmp_path, caplog):
    key = p2p_check.cache_key("h", ["g"], "d")
    path = p2p_check.cache_path(str(tmp_path), key)
    with open(path, "w") as f:
        f.write("{not json")
    with caplog.at_level(logging.DEBUG, logger="tpcomm"):
        assert p2p_check.read_cached(path, key) is None
    assert "ignoring the P2P verdict cache" in caplog.text
    with open(path, "w") as f:
        json.dump({"key": dict(key, host="other"), "ok": False, "reason": "x"}, f)
    assert p2p_check.read_cached(path, key) is None
    assert p2p_check.read_cached(str(tmp_path / "missing.json"), key) is None
    assert p2p_check.cached_verdicts(str(tmp_path), host="h") == []
    assert len(p2p_check.cached_verdicts(str(tmp_path))) == 1   # every host, for reports


def test_live_failure_is_cached_and_then_vetoes_without_probing(env):
    buf = OneRankBuffer()
    before = buf.t.clone()
    env.use_kernels(FakeKernels(bad=7))
    why = _verify(buf)
    assert "rank 0 loaded 7 wrong words" in why and "TPCOMM_P2P_CHECK=0" in why
    assert torch.equal(buf.t, before)
    [(path, entry)] = p2p_check.cached_verdicts(str(env.tmp))
    assert entry["ok"] is False and "loaded 7 wrong words" in entry["reason"]
    assert path in why
    # next start: the cached failure vetoes, the kernels never run
    env.use_kernels(FakeKernels(forbid=True))
    why = _verify(buf)
    assert "failed on this machine before" in why and path in why and "delete it" in why
    assert p2p_check.last_verdict().source == "cache" and not p2p_check.last_verdict().ok
    assert torch.equal(buf.t, before)


def test_cached_success_still_probes_and_never_overrides_a_live_failure(env):
    k = env.use_kernels(FakeKernels())
    assert _verify() is None
    [(path, entry)] = p2p_check.cached_verdicts(str(env.tmp))
    assert entry["ok"] is True and k.calls == 1
    assert _verify() is None and k.calls == 2            # the probe runs again (milliseconds)
    assert p2p_check.last_verdict().source == "probe" and p2p_check.last_verdict().ok
    env.use_kernels(FakeKernels(bad=3))
    assert "loaded 3 wrong words" in _verify()            # a cached success cannot enable
    assert p2p_check.read_cached(path, entry["key"])["ok"] is False


def test_p2p_check_0_skips_probe_and_cache(env):
    env.use_kernels(FakeKernels(bad=1))
    assert _verify()
    env.setenv("TPCOMM_P2P_CHECK", "0")
    reload_settings()
    env.use_kernels(FakeKernels(forbid=True))
    assert _verify() is None
    assert p2p_check.last_verdict().source == "skipped"


def test_a_kernel_error_vetoes_but_is_not_cached(env):
    k = FakeKernels()

    def fail(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    k.p2p_probe_write = fail
    env.use_kernels(k)
    why = _verify()
    assert "could not run" in why and "illegal memory access" in why
    assert p2p_check.cached_verdicts(str(env.tmp)) == []


def test_mismatch_reason_names_the_writer_first():
    # 3 ranks, rank 1's mapping of rank 2 reaches rank 0: rows are [received 0..2, loaded 0..2]
    rows = [[0, 5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 5], [0, 5, 0, 0, 0, 0]]
    why = p2p_check.mismatch_reason(rows, 5)
    assert why.startswith("rank 0 read 5 wrong words (of 5) written by rank 1 through the peer "
                          "mapping") and "2 more" in why
    assert p2p_check.mismatch_reason([[0] * 4, [0] * 4], 5) is None
    # a rank's own slot comes last
    assert p2p_check.mismatch_reason([[2, 0, 0, 0], [2, 0, 0, 0]], 5).startswith(
        "rank 1 read 2 wrong words (of 5) written by rank 0")
