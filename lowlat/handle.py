"""Small typed objects a Buffer hands back: the dispatch handle, the receive hook and the event."""

from __future__ import annotations

from typing import Callable

import torch

from .ops.dispatch import DispatchOutputs


class DispatchHandle:
    """What ``low_latency_combine`` needs from the dispatch that produced it.

    ``layout`` holds the receive metadata: ``recv_count`` int32 [L], ``recv_src_info`` int32 [L, R*T]
    (source token of each row, DeepEP's ``packed_recv_src_info``), ``recv_src_topk`` int32 [L, R*T]
    (its top-k slot), ``recv_layout_range`` int64 [L, R] (``begin << 32 | count`` of each source
    rank's rows, DeepEP's ``packed_recv_layout_range``).  ``num_tokens`` is the row count of the
    dispatched ``x``; ``num_tokens_device`` the int32 device scalar that narrowed it, if one was given.
    ``slot`` is the static output slot (0 or 1; -1 for fresh outputs) and ``generation`` the dispatch
    that filled it: a static handle is stale once a later dispatch reused its slot.
    It also indexes like DeepEP's tuple ``(src_info, layout_range, T, hidden, num_experts)``.
    """

    __slots__ = ("buffer_id", "outputs", "generation", "num_tokens", "num_tokens_device", "max_tokens_per_rank", "hidden",
                 "num_experts", "__weakref__")

    def __init__(self, buffer_id: int, outputs, generation: int, num_tokens: int, num_tokens_device, max_tokens_per_rank: int,
                 hidden: int, num_experts: int):
        self.buffer_id = buffer_id
        self.outputs = outputs  # lowlat.outputs.OutputSet
        self.generation = generation
        self.num_tokens = num_tokens
        self.num_tokens_device = num_tokens_device
        self.max_tokens_per_rank = max_tokens_per_rank
        self.hidden = hidden
        self.num_experts = num_experts

    @property
    def slot(self) -> int:
        return self.outputs.index

    @property
    def layout(self) -> DispatchOutputs:
        return self.outputs.outputs

    @property
    def is_stale(self) -> bool:
        """True once a later dispatch reused this handle's static output slot."""
        return self.outputs.generation != self.generation

    @property
    def packed_recv_src_info(self) -> torch.Tensor:
        return self.layout.recv_src_info.detach()

    @property
    def packed_recv_layout_range(self) -> torch.Tensor:
        return self.layout.recv_layout_range.detach()

    def as_deep_ep_tuple(self) -> tuple:
        """DeepEP's positional handle ``(src_info, layout_range, T, hidden, num_experts)``."""
        return (self.packed_recv_src_info, self.packed_recv_layout_range, self.max_tokens_per_rank, self.hidden, self.num_experts)

    def __getitem__(self, index):
        # Code written for DeepEP indexes its tuple handle (handle[0] is the source-token table).
        return self.as_deep_ep_tuple()[index]

    def __len__(self) -> int:
        return 5

    def __iter__(self):
        return iter(self.as_deep_ep_tuple())

    def __repr__(self) -> str:
        return (f"DispatchHandle(buffer={self.buffer_id}, slot={self.slot}, generation={self.generation}, "
                f"num_tokens={self.num_tokens}{', stale' if self.is_stale else ''})")


class EventOverlap:
    """Completion of work issued on another stream (``async_finish=True``); empty otherwise.

    ``event`` is a ``torch.cuda.Event`` or a :class:`lowlat.streams.RawEvent` (both have ``wait``,
    ``query`` and ``synchronize``).

    ``current_stream_wait()`` makes the current stream wait for it; as a context manager it does so
    on exit, like DeepEP's ``EventOverlap``.  ``extra_tensors`` are kept alive with it (the Buffer
    also keeps them until the work is done, whether or not this object is kept).
    """

    def __init__(self, event: torch.cuda.Event | None = None, extra_tensors: tuple | None = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            self.event.wait()

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()


class RecvHook:
    """Launches the receive half of a call on the current stream when called (once).

    Hooks of one kind (dispatch or combine) must be called in the order their sends were issued;
    between the send and the hook no SM is held, so other work (the other micro-batch) runs.
    """

    def __init__(self, kind: str, receive: Callable[[], None], run: Callable[["RecvHook"], None], handle=None):
        self.kind = kind
        self.receive = receive
        self.done = False
        self.handle = handle  # a pending dispatch receive keeps its outputs in use
        self._run = run

    def __call__(self) -> None:
        self._run(self)

    def __repr__(self) -> str:
        return f"RecvHook({self.kind}, {'done' if self.done else 'pending'})"
