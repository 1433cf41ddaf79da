"""DeepEP-signature facade: ``from lowlat.compat.deep_ep import Buffer`` in place of ``from deep_ep import Buffer``.

It takes DeepEP V1's constructor and low-latency signatures and conventions, as DeepEP's users write
them, and returns the same tensors:

* The collective set-up happens in the constructor, as in DeepEP: one symmetric region of
  ``num_rdma_bytes`` per rank (size it with :meth:`Buffer.get_low_latency_rdma_size_hint`), peers
  mapped.  DeepEP fixes shapes per call and lowlat per kernel specialisation, so the first call with a
  new ``(num_max_dispatch_tokens_per_rank, hidden, num_experts, num_topk)`` carves that shape's
  layout out of the region and compiles its kernels: no rendezvous, but outside graph capture.
  Every rank must use the same shapes in the same order (DeepEP requires the same
  ``num_max_dispatch_tokens_per_rank`` on every rank too).
* Every call returns fresh tensors, as DeepEP does; handles stay valid as long as they are held.
* ``zero_copy=True``: the expert outputs are read from ``get_next_low_latency_combine_buffer(handle)``
  (where the caller wrote them); ``x`` is the caller's tensor of the same shape and dtype.
* One rank mask and one communication stream for the whole Buffer.

Deliberately different: any batch works (DeepEP refuses ``num_ranks * T % 4 != 0`` and has a hidden
and top-k whitelist); ``allow_nvlink_for_low_latency_mode=False`` and normal (high-throughput) mode
are not provided yet and raise ``UnavailableError``.
"""

from __future__ import annotations

import torch

from ..buffer import Buffer as _LowLatBuffer, _group_size, _ipc_transport
from ..errors import ArgumentError, ArgumentTypeError, GraphCaptureError, UnavailableError
from ..handle import DispatchHandle, EventOverlap
from ..layout import BufferShape, RegionLayout
from ..outputs import capturing_now
from ..transport.base import Transport

topk_idx_t = torch.int64  # DeepEP's default build; int32 top-k indices work here too

__all__ = ["Buffer", "EventOverlap", "topk_idx_t"]


class Buffer:
    """DeepEP V1 ``deep_ep.Buffer`` (low-latency mode) on lowlat's kernels."""

    num_sms: int = 20  # DeepEP's class attribute (SMs for its normal-mode kernels), kept for code that reads it

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False, comm=None,
                 **lowlat_options):
        self._destroyed = True  # until the region exists, nothing to release
        if not low_latency_mode:
            raise UnavailableError("lowlat.compat.deep_ep.Buffer provides the low-latency mode only: pass low_latency_mode=True")
        if group is None:
            raise ArgumentTypeError("group must be a torch.distributed ProcessGroup (mpi4py communicators are not supported)"
                                    if comm is not None else "group must be a torch.distributed ProcessGroup, got None")
        if not allow_nvlink_for_low_latency_mode:
            raise UnavailableError("allow_nvlink_for_low_latency_mode=False needs the put-based (NVSHMEM) transport, "
                                   "which lowlat does not provide yet")
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % 128:
                raise ArgumentError(f"{name} must be a non-negative multiple of 128, got {value!r}")
        self.group = group
        self.group_size = _group_size(group)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode, self.explicitly_destroy, self.enable_shrink = True, explicitly_destroy, enable_shrink
        self._options = dict(lowlat_options)
        for reserved in ("fresh_outputs", "enable_zero_copy", "rank_mask"):
            if reserved in self._options:
                raise ArgumentError(f"{reserved} is set by the facade (fresh outputs, zero-copy on request, one mask)")
        # The collective part, now: every rank's region of num_rdma_bytes, mapped by every peer.
        if isinstance(group, Transport):
            if group.region_bytes < num_rdma_bytes:
                raise ArgumentError(f"num_rdma_bytes={num_rdma_bytes} exceeds the transport's {group.region_bytes}-byte region")
            self.transport = group
        else:
            self.transport = _ipc_transport(group, self._options.pop("transport", "auto"), max(num_rdma_bytes, 2**21))
        self.rank = self.transport.rank
        self.device = self.transport.device
        if self.device.type == "cuda" and getattr(self.transport, "stream", None) is None:
            self.transport.stream = torch.cuda.Stream(self.device)  # one comm stream, shared by every shape
        self._mask = torch.zeros(self.group_size, dtype=torch.int32, device=self.device)
        self._buffers: dict[tuple, _LowLatBuffer] = {}
        self._by_id: dict[int, _LowLatBuffer] = {}
        self._carved = 0
        self._destroyed = False

    # -- shapes ---------------------------------------------------------------------------------------

    def _alive(self) -> None:
        if self._destroyed:
            raise UnavailableError("this Buffer was destroyed")

    def _buffer_for(self, max_tokens, hidden, num_experts, num_topk) -> _LowLatBuffer:
        key = (max_tokens, hidden, num_experts, num_topk)
        buffer = self._buffers.get(key)
        if buffer is not None:
            return buffer
        self._alive()
        if capturing_now():
            raise GraphCaptureError(f"the first call with shape (T={max_tokens}, hidden={hidden}, experts={num_experts}, "
                                    f"topk={num_topk}) compiles its kernels: run it once before CUDA graph capture")
        shape = BufferShape(self.group_size, num_experts, num_topk, hidden, max_tokens)
        need = RegionLayout.of(shape).total_bytes
        if self._carved + need > self.num_rdma_bytes:
            hint = self.get_low_latency_rdma_size_hint(max_tokens, hidden, self.group_size, num_experts)
            raise ArgumentError(f"num_rdma_bytes={self.num_rdma_bytes} is too small: shape (T={max_tokens}, hidden={hidden}, "
                                f"experts={num_experts}, topk={num_topk}) needs {need} bytes and {self._carved} are in use "
                                f"by other shapes (get_low_latency_rdma_size_hint gives {hint} for this one)")
        region = self.transport.sub(self._carved, need)
        buffer = _LowLatBuffer(region, max_tokens_per_rank=max_tokens, hidden=hidden, num_experts=num_experts, num_topk=num_topk,
                               fresh_outputs=True, rank_mask=self._mask, **self._options)
        self._carved += need
        self._buffers[key] = buffer
        self._by_id[buffer.buffer_id] = buffer
        return buffer

    def _owner(self, handle) -> _LowLatBuffer:
        if isinstance(handle, DispatchHandle):
            buffer = self._by_id.get(handle.buffer_id)
            if buffer is not None:
                return buffer
        raise ArgumentError(f"handle must be the handle this Buffer's low_latency_dispatch returned, got {type(handle).__name__}")

    # -- DeepEP's static helpers ------------------------------------------------------------------------

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` for one shape (any top-k up to min(32, num_experts))."""
        return _LowLatBuffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Kernels are compiled at run time for the GPU in use (sm_90 and newer): always True."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """SMs for normal-mode kernels (DeepEP's rule: an even number)."""
        if isinstance(new_num_sms, bool) or not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2:
            raise ArgumentError(f"new_num_sms must be a positive even int, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current stream now."""
        return _LowLatBuffer.capture()

    # -- low-latency mode ---------------------------------------------------------------------------------

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """DeepEP's ``low_latency_dispatch``: returns ``(recv_x, recv_count, handle, event, hook)``."""
        buffer = self._buffers.get((num_max_dispatch_tokens_per_rank, _width(x, "x"), num_experts, _width(topk_idx, "topk_idx")))
        if buffer is None:
            buffer = self._buffer_for(num_max_dispatch_tokens_per_rank, x.shape[1], num_experts, topk_idx.shape[1])
        return buffer.run(buffer._dispatch, x, topk_idx, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook,
                          cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, None)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False, out=None,
                            combine_wait_recv_cost_stats=None):
        """DeepEP's ``low_latency_combine``: returns ``(combined_x, event, hook)``."""
        buffer = self._owner(handle)
        return buffer.run(buffer._combine, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook,
                          out, combine_wait_recv_cost_stats)

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """bf16 ``[L, R*T, hidden]`` that ``low_latency_combine(..., zero_copy=True)`` of ``handle`` reads."""
        return self._owner(handle).get_next_low_latency_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective reset of the state of every shape built for ``(T, hidden, num_experts)``."""
        self._alive()
        for (max_tokens, buffer_hidden, experts, _), buffer in self._buffers.items():
            if (max_tokens, buffer_hidden, experts) == (num_max_dispatch_tokens_per_rank, hidden, num_experts):
                buffer.clean_low_latency_buffer()

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        if isinstance(rank_to_mask, bool) or not isinstance(rank_to_mask, int) or not 0 <= rank_to_mask < self.group_size:
            raise ArgumentError(f"rank_to_mask must be an int in [0, {self.group_size}), got {rank_to_mask!r}")
        self._mask[rank_to_mask] = int(bool(mask))

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy the mask (1 = masked) into ``mask_status``, int32 ``[num_ranks]`` on any device."""
        if not isinstance(mask_status, torch.Tensor) or mask_status.dtype != torch.int32 or mask_status.shape != (self.group_size,):
            raise ArgumentError(f"mask_status must be an int32 tensor of shape ({self.group_size},), got "
                                f"{getattr(mask_status, 'dtype', type(mask_status).__name__)} {tuple(getattr(mask_status, 'shape', ()))}")
        mask_status.copy_(self._mask)

    def low_latency_clean_mask_buffer(self) -> None:
        self._mask.zero_()

    # -- odds and ends ------------------------------------------------------------------------------------

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        return getattr(self.transport, "stream", None)

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: torch.Size | None = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """This rank's symmetric region as a ``dtype`` tensor from element ``offset`` (``size``: a view of
        that many elements).  Low-latency mode lives in the RDMA buffer; there is no NVLink buffer."""
        self._alive()
        if not use_rdma_buffer:
            raise UnavailableError("lowlat has no NVLink (normal-mode) buffer: pass use_rdma_buffer=True")
        if not isinstance(dtype, torch.dtype):
            raise ArgumentTypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        region = self.transport.region[: self.num_rdma_bytes]
        itemsize = torch.empty(0, dtype=dtype, device="cpu").element_size()
        elements = region[: region.numel() // itemsize * itemsize].view(dtype)
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= elements.numel():
            raise ArgumentError(f"offset must be an int in [0, {elements.numel()}], got {offset!r}")
        tensor = elements[offset:]
        if size is None:
            return tensor
        size = torch.Size(size)
        if size.numel() > tensor.numel():
            raise ArgumentError(f"size {tuple(size)} needs {size.numel()} elements, {tensor.numel()} are left from offset {offset}")
        return tensor[: size.numel()].view(size)

    def destroy(self) -> None:
        """Release the region (collective).  As in DeepEP, only for ``explicitly_destroy=True``
        Buffers; the others are released by their destructor."""
        if not self.explicitly_destroy:
            raise ArgumentError("destroy() needs a Buffer built with explicitly_destroy=True (the others are released "
                                "when they are garbage-collected)")
        self._alive()
        self.transport.barrier()
        self._release()

    def _release(self) -> None:
        self._destroyed = True
        self._buffers.clear()
        self._by_id.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.transport.close()

    def __del__(self):
        if not getattr(self, "_destroyed", True) and not self.explicitly_destroy:
            try:
                self._release()
            except Exception:  # interpreter shutdown: CUDA may already be gone
                pass


def _width(tensor, name: str) -> int:
    """The last dimension of a 2-D tensor argument (the key of its shape's Buffer)."""
    shape = getattr(tensor, "shape", None)
    if not isinstance(tensor, torch.Tensor) or len(shape) != 2:
        raise ArgumentError(f"{name} must be a 2-D tensor, got {shape if shape is not None else type(tensor).__name__}")
    return shape[1]
