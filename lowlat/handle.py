"""Small typed objects a Buffer hands back: the dispatch handle, the receive hook and the event."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .ops.dispatch import DispatchOutputs


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What ``low_latency_combine`` needs from the dispatch that produced it.

    ``layout`` holds the receive metadata of output slot ``slot``: ``recv_count`` int32 [L],
    ``recv_src_info`` int32 [L, R*T] (source token of each row, DeepEP's ``packed_recv_src_info``),
    ``recv_src_topk`` int32 [L, R*T] (its top-k slot), ``recv_layout_range`` int64 [L, R]
    (``begin << 32 | count`` of each source rank's rows, DeepEP's ``packed_recv_layout_range``).
    ``num_tokens`` is the row count of the dispatched ``x``; ``num_tokens_device`` the int32 device
    scalar that narrowed it, if one was given.
    """

    buffer_id: int
    slot: int
    layout: DispatchOutputs
    num_tokens: int
    num_tokens_device: torch.Tensor | None
    max_tokens_per_rank: int
    hidden: int
    num_experts: int

    @property
    def packed_recv_src_info(self) -> torch.Tensor:
        return self.layout.recv_src_info

    @property
    def packed_recv_layout_range(self) -> torch.Tensor:
        return self.layout.recv_layout_range

    def as_deep_ep_tuple(self) -> tuple:
        """DeepEP's positional handle ``(src_info, layout_range, T, hidden, num_experts)``."""
        return (self.packed_recv_src_info, self.packed_recv_layout_range, self.max_tokens_per_rank, self.hidden, self.num_experts)

    def __getitem__(self, index):
        # Code written for DeepEP indexes its tuple handle (handle[0] is the source-token table).
        return self.as_deep_ep_tuple()[index]

    def __len__(self) -> int:
        return 5


class EventOverlap:
    """Completion of work issued on another stream (``async_finish=True``); empty otherwise.

    ``current_stream_wait()`` makes the current stream wait for it; as a context manager it does so
    on exit, like DeepEP's ``EventOverlap``.
    """

    def __init__(self, event: torch.cuda.Event | None = None):
        self.event = event

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

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

    def __init__(self, kind: str, receive: Callable[[], None], run: Callable[["RecvHook"], None]):
        self.kind = kind
        self.receive = receive
        self.done = False
        self._run = run

    def __call__(self) -> None:
        self._run(self)

    def __repr__(self) -> str:
        return f"RecvHook({self.kind}, {'done' if self.done else 'pending'})"
