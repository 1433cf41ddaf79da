"""Timing by CUDA-graph replay with CUDA events (many calls per graph, so a microsecond kernel is not
swamped by the ~5 us cost of launching a graph), and per-kernel times from the profiler."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    """Microseconds per call: median over rounds, with the spread (min, max) of the rounds."""

    median_us: float
    min_us: float
    max_us: float
    rounds: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def time_replays(fn: Callable[[], None], *, calls_per_graph: int = 20, rounds: int = 15, replays_per_round: int = 5,
                 before_round: Callable[[], None] | None = None) -> Timing:
    """Capture ``calls_per_graph`` calls of ``fn`` in one graph; time ``replays_per_round`` replays per
    round with events; per-call time = round time / (replays * calls).  ``before_round`` runs outside
    the timed region (a barrier between ranks, for instance)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: first launches, allocator pools
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(rounds):
        if before_round is not None:
            before_round()
        start.record()
        for _ in range(replays_per_round):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (replays_per_round * calls_per_graph))
    del graph
    return Timing(statistics.median(samples), min(samples), max(samples), rounds)


def host_burst(call: Callable[[], object], count: int, *, wait_for_gpu: bool = False, split: bool = False):
    """One burst of ``count`` calls of ``call`` issued on a drained device: microseconds per call of
    host time, or of wall time with ``wait_for_gpu`` (the burst ends when the device is done).  With
    ``split`` each call returns the seconds of its first part, and the burst gives the pair (first
    part, the rest) per call."""
    torch.cuda.synchronize()
    first = 0.0
    start = time.perf_counter()
    for _ in range(count):
        part = call()
        if split:
            first += part
    if wait_for_gpu:
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    return (first / count * 1e6, (total - first) / count * 1e6) if split else total / count * 1e6


def kernel_times(fn: Callable[[], None], names: tuple[str, ...], *, iterations: int = 20) -> dict[str, float]:
    """Average device time (us) per launch of each kernel whose name contains one of ``names``,
    from the PyTorch profiler over ``iterations`` eager calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            fn()
        torch.cuda.synchronize()
    totals = {name: [0.0, 0] for name in names}
    for row in prof.key_averages():
        for name in names:
            if name in row.key:
                device_us = getattr(row, "self_device_time_total", None)
                if device_us is None:
                    device_us = getattr(row, "self_cuda_time_total", 0.0)
                totals[name][0] += device_us
                totals[name][1] += row.count
    return {name: (total / count if count else float("nan")) for name, (total, count) in totals.items()}
