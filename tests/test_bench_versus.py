"""The low-latency versus bench's timing on the CPU (CUDA synchronisation stubbed): host and eager
figures alternate between the libraries burst by burst, and each is a median per call."""

import itertools

import pytest

from lowlat.bench import versus


def test_bursts_alternate_between_libraries_in_abba_order_and_report_medians(monkeypatch):
    monkeypatch.setattr(versus.torch.cuda, "synchronize", lambda *a, **k: None)
    clock = itertools.count()
    monkeypatch.setattr(versus.time, "perf_counter", lambda: next(clock) * 1e-6)  # 1 us per clock reading
    order = []
    calls = {"deepep": lambda: order.append("deepep"), "lowlat": lambda: order.append("lowlat")}
    result = versus._interleaved_median_us(calls, count=2, repeats=3, wait_for_gpu=False)
    assert order == ["deepep"] * 2 + ["lowlat"] * 4 + ["deepep"] * 4 + ["lowlat"] * 2  # ABBA: bursts of 2 calls
    # Each burst reads the clock twice (start, end): 1 us apart, over 2 calls.
    assert result == pytest.approx({"deepep": 0.5, "lowlat": 0.5})
