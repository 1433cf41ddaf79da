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


def test_two_call_modes_time_each_call_within_the_same_bursts(monkeypatch):
    """A send and its hook (or an async call and its wait) are timed part by part inside one burst:
    each call returns its first part's seconds, the rest of the burst is the second part's."""
    monkeypatch.setattr(versus.torch.cuda, "synchronize", lambda *a, **k: None)
    now = [0.0]
    monkeypatch.setattr(versus.time, "perf_counter", lambda: now[0])

    def library(first_us, second_us):
        def call():
            now[0] += first_us * 1e-6
            now[0] += second_us * 1e-6
            return first_us * 1e-6
        return call

    result = versus._interleaved_split_us({"deepep": library(3.0, 5.0), "lowlat": library(2.0, 7.0)}, count=4, repeats=3)
    assert result["deepep"] == pytest.approx((3.0, 5.0)) and result["lowlat"] == pytest.approx((2.0, 7.0))


def test_the_per_call_table_shows_each_part_for_both_libraries():
    modes = ("dispatch_hook", "combine_hook", "dispatch_async", "combine_async")
    host = lambda a, b: {**{f"{m}_first": a for m in modes}, **{f"{m}_second": b for m in modes}}
    text = versus.per_call_table([{"num_tokens": 4, "lowlat": {"host_us": host(11.0, 12.5)}, "deepep": {"host_us": host(13.0, 4.25)}}])
    row = text.splitlines()[-1]
    assert row.startswith("   4 |") and row.count("11.0 / 12.5 (13.0 / 4.2)") == 4
