"""``lowlat.graphs``: CUDA-graph helpers for decode steps built on the public lowlat API.

    step = lowlat.graphs.capture(lambda: run_layer(...), warmup=1)   # eager warm-up, then capture
    step.replay()                                                   # outputs land in step.outputs

Everything a captured step touches must be static: load new inputs into the tensors the step reads
(``tensor.copy_(...)``) before each replay; lowlat's Buffers keep their call state on the device, so
the replayed graph needs no host bookkeeping between replays.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


@dataclasses.dataclass
class CapturedStep:
    """A CUDA graph and whatever the captured function returned (tensors it writes on every replay)."""

    graph: torch.cuda.CUDAGraph
    outputs: Any

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs


def capture(fn: Callable[[], Any], *, warmup: int = 1, pool=None) -> CapturedStep:
    """Run ``fn`` ``warmup`` times eagerly (compiles, loads and allocates what it needs), then capture
    one call of it on a side stream and return the graph with the captured call's outputs."""
    if not torch.cuda.is_available():
        raise RuntimeError("lowlat.graphs.capture needs a CUDA device")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        outputs = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return CapturedStep(graph, outputs)


__all__ = ["CapturedStep", "capture"]
