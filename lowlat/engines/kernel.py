"""The GPU engine: each half of a call is one launch of a prepared plan.

Every plan (kernel, grid, packed RankArgs) is built in :meth:`KernelEngine.warmup`, at Buffer
construction; a call only writes its tensor addresses into the plan and launches it.  ``stream`` is a
raw ``cudaStream_t`` (None: PyTorch's current stream of the Buffer's device).
"""

from __future__ import annotations

import torch

from ..jit import compile_all
from ..jit.launch import raw_stream_getter
from ..ops import combine, dispatch, exchange, low_latency_specs
from ..ops.context import RankContext
from .base import Engine


class KernelEngine(Engine):
    def __init__(self, ctx: RankContext):
        self.ctx = ctx
        self._ready = False
        self._device_index = ctx.device_index
        self._current_stream = raw_stream_getter()

    def specs(self):
        return low_latency_specs(self.ctx.config)

    def warmup(self) -> None:
        if self._ready:
            return
        compile_all(self.specs())
        self._dispatch_send = dispatch.send_plans(self.ctx)
        self._dispatch_recv = dispatch.recv_plans(self.ctx)
        self._combine_send = combine.send_plans(self.ctx)
        self._combine_recv = combine.recv_plans(self.ctx)
        self._dispatch_fused = dispatch.fused_plans(self.ctx)  # empty where the fused kernel does not fit
        self._combine_fused = combine.fused_plans(self.ctx)
        self._exchange = exchange.plan(self.ctx)
        self._ready = True

    def plans(self) -> list:
        """Every launch plan of this engine (after warmup)."""
        return [plan for plans in (self._dispatch_send, self._dispatch_recv, self._dispatch_fused, self._combine_send,
                                   self._combine_recv, self._combine_fused) for plan in plans.values()] + [self._exchange]

    def _stream(self, stream):
        return self._current_stream(self._device_index) if stream is None else stream

    def dispatch_send(self, x, topk_idx, num_tokens, num_tokens_device, use_fp8, round_scale, stream=None):
        plan = self._dispatch_send[use_fp8, topk_idx.dtype is torch.int64]
        plan.launch_on(self._stream(stream), x.data_ptr(), topk_idx.data_ptr(), _address(num_tokens_device), num_tokens,
                       1 if round_scale else 0)

    def dispatch_recv(self, out, use_fp8, use_ue8m0, cumulative_recv_stats, wait_cost_stats, stream=None):
        plan = self._dispatch_recv[use_fp8, use_ue8m0]
        plan.launch_on(self._stream(stream), *out.addresses, _address(cumulative_recv_stats), _address(wait_cost_stats))

    def combine_send(self, x, layout, use_logfmt, stream=None):
        self._combine_send[use_logfmt].launch_on(self._stream(stream), x.data_ptr(), *layout.addresses[2:])

    def combine_recv(self, out, topk_idx, topk_weights, num_tokens, num_tokens_device, use_logfmt, wait_cost_stats,
                     stream=None):
        plan = self._combine_recv[use_logfmt, topk_idx.dtype is torch.int64]
        plan.launch_on(self._stream(stream), out.data_ptr(), topk_idx.data_ptr(), topk_weights.data_ptr(), _address(num_tokens_device),
                       num_tokens, out.shape[0], _address(wait_cost_stats))

    def dispatch(self, x, topk_idx, num_tokens, num_tokens_device, use_fp8, round_scale, out, use_ue8m0, cumulative_recv_stats,
                 wait_cost_stats, stream=None) -> None:
        plan = self._dispatch_fused.get((use_fp8, use_ue8m0, topk_idx.dtype is torch.int64))
        if plan is None:
            return super().dispatch(x, topk_idx, num_tokens, num_tokens_device, use_fp8, round_scale, out, use_ue8m0,
                                    cumulative_recv_stats, wait_cost_stats, stream)
        plan.launch_on(self._stream(stream), x.data_ptr(), topk_idx.data_ptr(), _address(num_tokens_device), num_tokens,
                       1 if round_scale else 0, *out.addresses, _address(cumulative_recv_stats), _address(wait_cost_stats))

    def combine(self, x, layout, use_logfmt, out, topk_idx, topk_weights, num_tokens, num_tokens_device, wait_cost_stats,
                stream=None) -> None:
        plan = self._combine_fused[use_logfmt, topk_idx.dtype is torch.int64]
        plan.launch_on(self._stream(stream), x.data_ptr(), *layout.addresses[2:], out.data_ptr(), topk_idx.data_ptr(),
                       topk_weights.data_ptr(), _address(num_tokens_device), num_tokens, out.shape[0], _address(wait_cost_stats))

    def exchange(self, words, gathered, *, stream=None) -> None:
        self._exchange.launch_on(self._stream(stream), words.data_ptr(), gathered.data_ptr())


def _address(tensor) -> int:
    return 0 if tensor is None else tensor.data_ptr()
