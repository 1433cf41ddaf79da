"""The interface both engines implement (one instance per rank of a Buffer).

Each method runs one half of a call.  ``stream`` is a raw ``cudaStream_t`` to launch on (None: the
current stream); the CPU engine has no streams and ignores it."""

from __future__ import annotations

import abc

import torch

from ..ops.dispatch import DispatchOutputs


class Engine(abc.ABC):
    @abc.abstractmethod
    def warmup(self) -> None:
        """Do every piece of set-up a call could need (compile and load kernels)."""

    @abc.abstractmethod
    def dispatch_send(self, x: torch.Tensor, topk_idx: torch.Tensor, num_tokens: int, num_tokens_device: torch.Tensor | None,
                      use_fp8: bool, round_scale: bool, stream: int | None = None) -> None: ...

    @abc.abstractmethod
    def dispatch_recv(self, out: DispatchOutputs, use_fp8: bool, use_ue8m0: bool,
                      cumulative_recv_stats: torch.Tensor | None, wait_cost_stats: torch.Tensor | None,
                      stream: int | None = None) -> None: ...

    @abc.abstractmethod
    def combine_send(self, x: torch.Tensor, layout: DispatchOutputs, use_logfmt: bool, stream: int | None = None) -> None: ...

    def dispatch(self, x, topk_idx, num_tokens, num_tokens_device, use_fp8, round_scale, out, use_ue8m0, cumulative_recv_stats,
                 wait_cost_stats, stream=None) -> None:
        """Both halves of a dispatch without a receive hook (the GPU engine: one launch)."""
        self.dispatch_send(x, topk_idx, num_tokens, num_tokens_device, use_fp8, round_scale, stream)
        self.dispatch_recv(out, use_fp8, use_ue8m0, cumulative_recv_stats, wait_cost_stats, stream)

    def combine(self, x, layout, use_logfmt, out, topk_idx, topk_weights, num_tokens, num_tokens_device, wait_cost_stats,
                stream=None) -> None:
        """Both halves of a combine without a receive hook (the GPU engine: one launch)."""
        self.combine_send(x, layout, use_logfmt, stream)
        self.combine_recv(out, topk_idx, topk_weights, num_tokens, num_tokens_device, use_logfmt, wait_cost_stats, stream)

    def exchange(self, words: torch.Tensor, gathered: torch.Tensor, *, stream: int | None = None) -> None:
        """All-gather of a few words through peer memory (kernels/exchange.cuh)."""
        from ..errors import UnavailableError

        raise UnavailableError(f"{type(self).__name__} has no exchange kernel; it needs a GPU")

    @abc.abstractmethod
    def combine_recv(self, out: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int,
                     num_tokens_device: torch.Tensor | None, use_logfmt: bool, wait_cost_stats: torch.Tensor | None,
                     stream: int | None = None) -> None: ...


class EmulatedRegions:
    """What the CPU engines of both families share: one rank's context, the local transport, and
    byte views of any rank's symmetric region (they read and write the bytes the kernels would)."""

    def __init__(self, ctx, transport):
        self.ctx = ctx
        self.transport = transport  # lowlat.transport.local.LocalTransport
        self.layout = ctx.layout
        self.shape = ctx.layout.shape

    def warmup(self) -> None:
        return None  # nothing to compile

    def _bytes(self, rank: int, offset: int, num_bytes: int) -> torch.Tensor:
        return self.transport.peer_region(rank)[offset: offset + num_bytes]
