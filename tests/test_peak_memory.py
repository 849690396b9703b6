"""PeakMemory on a CPU: the kernel's high-water mark of the resident set, per block, nested blocks
included, and the sampling fallback where the mark cannot be reset."""

from __future__ import annotations

import mmap

import pytest

from mera.eval import profile
from mera.eval.profile import PeakMemory

MIB = 2**20

pytestmark = pytest.mark.skipif(profile._hwm_bytes() is None or not profile._reset_hwm(),
                                reason="needs Linux's VmHWM and a writable /proc/self/clear_refs")


def touch(mib: int) -> mmap.mmap:
    """``mib`` MiB resident: fresh anonymous pages, every one written (an mmap of its own, so that
    memory the process freed earlier and still holds cannot serve it); ``del`` gives them back."""
    b = mmap.mmap(-1, mib * MIB)
    for i in range(0, mib * MIB, mmap.PAGESIZE):
        b[i] = 1
    return b


def test_a_short_peak_is_caught_exactly():
    with PeakMemory() as pm:
        start = profile._rss_bytes()
        b = touch(160)  # resident for a moment only: a sampler could miss it, the kernel's mark cannot
        del b
    assert pm._hwm and pm._thread is None  # measured by the kernel, nothing sampled
    assert start + 155 * MIB <= pm.peak <= start + 175 * MIB


def test_nested_blocks_each_keep_their_own_peak():
    with PeakMemory() as outer:
        base = profile._rss_bytes()
        b = touch(240)
        del b  # the outer block's peak, before the inner block resets the mark
        with PeakMemory() as inner:
            c = touch(80)
            del c
        d = touch(40)  # after the inner block: counted by the outer one only
        del d
    assert base + 75 * MIB <= inner.peak <= base + 120 * MIB  # not the outer block's 240 MiB
    assert base + 235 * MIB <= outer.peak <= base + 260 * MIB
    assert not profile._HWM_OPEN  # every block closed


def test_without_a_resettable_mark_the_resident_set_is_sampled(monkeypatch):
    monkeypatch.setattr(profile, "_reset_hwm", lambda: False)
    import time

    with PeakMemory(interval=0.002) as pm:
        start = profile._rss_bytes()
        b = touch(120)
        time.sleep(0.05)  # long enough for the sampler
        del b
    assert not pm._hwm and pm._thread is not None
    assert start + 115 * MIB <= pm.peak <= start + 140 * MIB
