"""DeepEP-signature facade: ``from lowlat.compat.deep_ep import Buffer`` in place of ``from deep_ep import Buffer``.

Accepts DeepEP's constructor and low-latency call signatures (``num_rdma_bytes``,
``low_latency_mode``, ``num_max_dispatch_tokens_per_rank`` and ``num_experts`` per call, positional
or keyword) and returns the same tensors.  DeepEP fixes shapes per call; lowlat fixes them per
Buffer, so one lowlat Buffer is built per distinct ``(T, hidden, num_experts, num_topk)`` at its first
eager call (a first call inside graph capture raises GraphCaptureError: run it once before capture).
Normal (high-throughput) mode is not provided here.
"""

from __future__ import annotations

import torch

from ..buffer import Buffer as _LowLatBuffer
from ..errors import ArgumentError, UnavailableError
from ..handle import DispatchHandle, EventOverlap


class Buffer:
    num_sms: int = 20  # DeepEP class attribute, kept for code that reads it

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False, comm=None,
                 **lowlat_options):
        if not low_latency_mode:
            raise UnavailableError("lowlat.compat.deep_ep.Buffer provides the low-latency mode only: pass low_latency_mode=True")
        if not allow_nvlink_for_low_latency_mode:
            raise UnavailableError("lowlat moves intranode traffic over NVLink; allow_nvlink_for_low_latency_mode=False is not supported")
        self.group = group
        self.num_rdma_bytes = num_rdma_bytes
        self.explicitly_destroy = explicitly_destroy
        self._options = {"enable_zero_copy": True, **lowlat_options}  # DeepEP always has a zero-copy buffer
        self._buffers: dict[tuple, _LowLatBuffer] = {}
        self._by_id: dict[int, _LowLatBuffer] = {}

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        return _LowLatBuffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def _buffer_for(self, max_tokens: int, hidden: int, num_experts: int, num_topk: int) -> _LowLatBuffer:
        key = (max_tokens, hidden, num_experts, num_topk)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = _LowLatBuffer(self.group, max_tokens_per_rank=max_tokens, hidden=hidden, num_experts=num_experts,
                                   num_topk=num_topk, **self._options)
            self._buffers[key] = buffer
            self._by_id[buffer.buffer_id] = buffer
        return buffer

    def _owner(self, handle) -> _LowLatBuffer:
        if not isinstance(handle, DispatchHandle) or handle.buffer_id not in self._by_id:
            raise ArgumentError("handle must come from this Buffer's low_latency_dispatch")
        return self._by_id[handle.buffer_id]

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2:
            raise ArgumentError("x and topk_idx must be 2-D tensors")
        buffer = self._buffer_for(num_max_dispatch_tokens_per_rank, x.shape[1], num_experts, topk_idx.shape[1])
        return buffer.low_latency_dispatch(
            x, topk_idx, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0, async_finish=async_finish,
            return_recv_hook=return_recv_hook, cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats=dispatch_wait_recv_cost_stats)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False, out=None,
                            combine_wait_recv_cost_stats=None):
        return self._owner(handle).low_latency_combine(
            x, topk_idx, topk_weights, handle, use_logfmt=use_logfmt, zero_copy=zero_copy, async_finish=async_finish,
            return_recv_hook=return_recv_hook, out=out, combine_wait_recv_cost_stats=combine_wait_recv_cost_stats)

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        return self._owner(handle).get_next_low_latency_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        for (max_tokens, buffer_hidden, experts, _), buffer in self._buffers.items():
            if (max_tokens, buffer_hidden, experts) == (num_max_dispatch_tokens_per_rank, hidden, num_experts):
                buffer.clean_low_latency_buffer()

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        for buffer in self._buffers.values():
            buffer.low_latency_update_mask_buffer(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        for buffer in self._buffers.values():
            buffer.low_latency_query_mask_buffer(mask_status)
            return
        mask_status.zero_()

    def low_latency_clean_mask_buffer(self) -> None:
        for buffer in self._buffers.values():
            buffer.low_latency_clean_mask_buffer()

    def get_comm_stream(self):
        for buffer in self._buffers.values():
            return buffer.get_comm_stream()
        return None

    def capture(self) -> EventOverlap:
        if not torch.cuda.is_available():
            return EventOverlap()
        event = torch.cuda.Event()
        event.record()
        return EventOverlap(event)

    def destroy(self) -> None:
        for buffer in self._buffers.values():
            buffer.destroy()
        self._buffers.clear()
        self._by_id.clear()
