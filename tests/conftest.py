import glob
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/_dist.py for the spawned ranks


def _tpcomm_segments():
    return sorted(glob.glob("/dev/shm/tpcomm-*"))


@pytest.fixture(autouse=True, scope="session")
def no_shm_leak_after_suite():
    before = set(_tpcomm_segments())
    yield
    left = sorted(set(_tpcomm_segments()) - before)
    assert not left, f"tpcomm left shared-memory segments behind: {left}"
