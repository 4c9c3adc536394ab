"""The nccl_symm contender of `tpcomm bench` (NCCL's symmetric-memory kernels through torch):
refused before any rank starts, with what it needs, wherever it cannot run; never mixed with
backends that need torch's CUDA symmetric-memory backend in the same process."""
import pytest

from tpcomm.bench import contenders


def test_refusals_name_what_is_needed():
    old = contenders.why_nccl_symm_unavailable(nccl=(2, 26, 5), takes_nccl=True)
    assert "NCCL >= 2.27" in old and "2.26.5" in old
    no_backend = contenders.why_nccl_symm_unavailable(nccl=(2, 27, 3), takes_nccl=False)
    assert "set_backend" in no_backend and "torch >= 2.9" in no_backend
    assert contenders.why_nccl_symm_unavailable(nccl=(2, 28, 3), takes_nccl=True) is None


def test_a_cpu_torch_refuses_instead_of_crashing(monkeypatch):
    monkeypatch.setattr(contenders, "_nccl_tuple", lambda: None)
    with pytest.raises(ValueError, match="nccl_symm needs torch built with NCCL"):
        contenders.resolve_contenders("nccl_symm,nccl", "cuda", "all_reduce")


def test_resolution_where_available(monkeypatch):
    monkeypatch.setattr(contenders, "_nccl_tuple", lambda: (2, 27, 7))
    monkeypatch.setattr(contenders, "_symm_mem_takes_nccl", lambda: True)
    assert contenders.resolve_contenders("nccl_symm,nccl", "cuda", "all_reduce") == ["nccl_symm",
                                                                                  "nccl"]
    for other in ("tpcomm", "symm_mem", "symm_mem_two_shot"):
        with pytest.raises(ValueError, match="run of its own, --contenders nccl_symm,nccl"):
            contenders.resolve_contenders(f"nccl_symm,{other}", "cuda", "all_reduce")
    with pytest.raises(ValueError, match="all_reduce only"):
        contenders.resolve_contenders("nccl_symm,nccl", "cuda", "all_gather")
    with pytest.raises(ValueError, match="does not run on cpu"):
        contenders.resolve_contenders("nccl_symm", "cpu", "all_reduce")


def test_this_torch_is_judged_without_error():
    why = contenders.why_nccl_symm_unavailable()
    assert why is None or why.startswith("contender nccl_symm needs")
