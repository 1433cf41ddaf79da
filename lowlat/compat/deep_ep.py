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

Normal (high-throughput) mode, intranode: ``get_dispatch_layout``, ``dispatch`` and ``combine`` with
DeepEP's signatures, on :class:`lowlat.normal.NormalBuffer` in the ``num_nvl_bytes`` part of the
region (after the ``num_rdma_bytes`` of the low-latency mode, so both modes live side by side and no
``clean_low_latency_buffer`` is needed between them).  Its shape (hidden, experts, top-k) is fixed by
the first dispatch, with room for as many tokens per rank as ``num_nvl_bytes`` holds.

Deliberately different: any batch works (DeepEP refuses ``num_ranks * T % 4 != 0`` and has a hidden
and top-k whitelist); ``get_dispatch_layout`` runs as torch ops (DeepEP calls it before the hidden size,
which lowlat's kernels are specialised on, is known); internode normal mode is not provided yet and
raises ``UnavailableError``.

Transports: one node goes over CUDA IPC, several nodes over NVSHMEM; ``allow_nvlink_for_low_latency_mode=False``
selects NVSHMEM with puts to every peer, as in DeepEP.
"""

from __future__ import annotations

import torch

from .. import validation as check
from ..buffer import Buffer as _LowLatBuffer, _group_size, make_transport
from ..errors import ArgumentError, ArgumentTypeError, GraphCaptureError, UnavailableError
from ..handle import DispatchHandle, EventOverlap
from ..layout import BufferShape, RegionLayout
from ..normal import NormalBuffer, NormalConfig, NormalHandle
from ..jit.compiler import capturing
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
        if group is None:
            raise ArgumentTypeError("group must be a torch.distributed ProcessGroup (mpi4py communicators are not supported)"
                                    if comm is not None else "group must be a torch.distributed ProcessGroup, got None")
        self.group = group
        self.group_size = _group_size(group)
        self._options = dict(lowlat_options)
        problem = None
        try:
            for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % 128:
                    raise ArgumentError(f"{name} must be a non-negative multiple of 128, got {value!r}")
            for reserved in ("fresh_outputs", "enable_zero_copy", "rank_mask"):
                if reserved in self._options:
                    raise ArgumentError(f"{reserved} is set by the facade (fresh outputs, zero-copy on request, one mask)")
            check.flag("allow_nvlink_for_low_latency_mode", allow_nvlink_for_low_latency_mode)
        except (ArgumentError, ArgumentTypeError) as exc:
            if isinstance(group, Transport):
                raise
            problem = exc  # raised on every rank of the group (make_transport), not on this one alone
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode, self.explicitly_destroy, self.enable_shrink = low_latency_mode, explicitly_destroy, enable_shrink
        # The collective part, now: every rank's region of num_rdma_bytes, mapped by every peer.
        # One region per rank: [0, num_rdma_bytes) for the low-latency mode, then num_nvl_bytes for normal mode.
        if isinstance(group, Transport):
            if group.region_bytes < num_rdma_bytes + num_nvl_bytes:
                raise ArgumentError(f"num_rdma_bytes + num_nvl_bytes = {num_rdma_bytes + num_nvl_bytes} exceeds the transport's "
                                    f"{group.region_bytes}-byte region")
            if not allow_nvlink_for_low_latency_mode and any(group.peer_bases.tolist()[r] for r in range(group.num_ranks)
                                                             if r != group.rank):
                raise ArgumentError(f"allow_nvlink_for_low_latency_mode=False needs a transport that reaches peers by NVSHMEM "
                                    f"puts (transport='nvshmem'); this {group.kind} transport writes to them by pointer")
            self.transport = group
        else:
            # allow_nvlink_for_low_latency_mode=False: every peer through NVSHMEM puts, as in DeepEP.
            kind = self._options.pop("transport", "auto" if allow_nvlink_for_low_latency_mode else "nvshmem")
            self.transport = make_transport(group, kind, lambda _: max(num_rdma_bytes + num_nvl_bytes, 2**21),
                                            allow_nvlink_for_low_latency_mode, "((num_rdma_bytes, num_nvl_bytes), transport, allow_nvlink)",
                                            (num_rdma_bytes, num_nvl_bytes), problem)
        self.rank = self.transport.rank
        self.device = self.transport.device
        if self.device.type == "cuda" and getattr(self.transport, "stream", None) is None:
            self.transport.stream = torch.cuda.Stream(self.device)  # one comm stream, shared by every shape
        self._mask = torch.zeros(self.group_size, dtype=torch.int32, device=self.device)
        self._buffers: dict[tuple, _LowLatBuffer] = {}
        self._by_id: dict[int, _LowLatBuffer] = {}
        self._carved = 0
        self._normal: dict[tuple, NormalBuffer] = {}
        self._normal_by_id: dict[int, NormalBuffer] = {}
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
        if capturing():
            raise GraphCaptureError(f"the first call with shape (T={max_tokens}, hidden={hidden}, experts={num_experts}, "
                                    f"topk={num_topk}) compiles its kernels: run it once before CUDA graph capture")
        shape = BufferShape(self.group_size, num_experts, num_topk, hidden, max_tokens)
        need = RegionLayout.of(shape, put_staging=self.transport.kind == "nvshmem").total_bytes
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
        """Bytes of ``num_rdma_bytes`` for one shape (any top-k up to min(32, num_experts), any transport:
        it includes the staging NVSHMEM puts read from)."""
        return _LowLatBuffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts,
                                                            transport="nvshmem")

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
        try:  # the shape's Buffer checks x and topk_idx in full
            buffer = self._buffers.get((num_max_dispatch_tokens_per_rank, x.shape[1], num_experts, topk_idx.shape[1]))
        except (AttributeError, IndexError, TypeError):
            buffer = None
        if buffer is None:  # a new shape, or arguments that are not 2-D tensors: named here
            buffer = self._buffer_for(num_max_dispatch_tokens_per_rank, _width(x, "x"), num_experts, _width(topk_idx, "topk_idx"))
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

    # -- normal (high-throughput) mode, intranode ----------------------------------------------------

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> NormalConfig:
        return NormalBuffer.get_dispatch_config(num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> NormalConfig:
        return NormalBuffer.get_combine_config(num_ranks)

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's layout: ``(num_tokens_per_rank int32 [R], None (no RDMA ranks within a node),
        num_tokens_per_expert int32 [E], is_token_in_rank bool [n, R], event)``, as torch ops on the
        current stream.  Indices outside ``[-1, num_experts)`` count nowhere (dispatch reports them)."""
        self._alive()
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.dtype not in (torch.int64, torch.int32):
            raise ArgumentError(f"topk_idx must be an int64 or int32 [num_tokens, num_topk] tensor, got "
                                f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} {tuple(getattr(topk_idx, 'shape', ()))}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0 or num_experts % self.group_size:
            raise ArgumentError(f"num_experts must be a positive multiple of the {self.group_size} ranks, got {num_experts!r}")
        if previous_event is not None:
            previous_event.current_stream_wait()
        ranks, topk = self.group_size, topk_idx.to(torch.int64)
        valid = (topk >= 0) & (topk < num_experts)
        owner = torch.where(valid, topk // (num_experts // ranks), ranks)
        in_rank = torch.zeros(topk.shape[0], ranks + 1, dtype=torch.bool, device=topk.device).scatter_(1, owner, True)[:, :ranks].contiguous()
        per_rank = in_rank.sum(dim=0, dtype=torch.int32)
        per_expert = torch.bincount(topk[valid], minlength=num_experts).to(torch.int32)
        return per_rank, None, per_expert, in_rank, (self.capture() if async_finish else EventOverlap())

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                 num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0, config=None, previous_event=None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """DeepEP's intranode ``dispatch``: ``(recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event)``; a cached dispatch (``handle=``) returns
        ``(recv_x, None, None, None, None, event)`` as DeepEP does."""
        if num_tokens_per_rdma_rank is not None:
            raise UnavailableError("internode normal mode (num_tokens_per_rdma_rank) is not provided yet: one node only")
        if handle is not None:
            buffer = self._normal_owner(handle)
        else:
            data = x[0] if isinstance(x, tuple) else x
            if not isinstance(data, torch.Tensor) or data.dim() != 2:
                raise ArgumentError(f"x must be a [num_tokens, hidden] tensor or an (fp8, scales) tuple, got {type(x).__name__}")
            if not isinstance(num_tokens_per_expert, torch.Tensor):
                raise ArgumentError("a dispatch without handle= needs num_tokens_per_expert (from get_dispatch_layout)")
            num_topk = topk_idx.shape[1] if isinstance(topk_idx, torch.Tensor) and topk_idx.dim() == 2 else 1
            buffer = self._normal_buffer(data.shape[1], num_tokens_per_expert.numel(), num_topk)
        result = buffer.dispatch(x, handle=handle, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                                 num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
                                 expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, config=config,
                                 previous_event=previous_event, async_finish=async_finish,
                                 allocate_on_comm_stream=allocate_on_comm_stream)
        if handle is not None:
            return result[0], None, None, None, None, result[5]
        return result

    def combine(self, x: torch.Tensor, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's intranode ``combine``: ``(combined_x, combined_topk_weights, event)``."""
        return self._normal_owner(handle).combine(x, handle, topk_weights=topk_weights, bias=bias, config=config,
                                                  previous_event=previous_event, async_finish=async_finish,
                                                  allocate_on_comm_stream=allocate_on_comm_stream)

    def internode_dispatch(self, *args, **kwargs):
        raise UnavailableError("internode normal mode is not provided yet: lowlat's normal mode is intranode")

    def internode_combine(self, *args, **kwargs):
        raise UnavailableError("internode normal mode is not provided yet: lowlat's normal mode is intranode")

    def _normal_buffer(self, hidden: int, num_experts: int, num_topk: int) -> NormalBuffer:
        key = (hidden, num_experts, num_topk)
        buffer = self._normal.get(key)
        if buffer is not None:
            return buffer
        self._alive()
        if capturing():
            raise GraphCaptureError("the first normal-mode dispatch builds its buffer and compiles its kernels: run it before capture")
        if self._normal:
            raise ArgumentError(f"normal mode is set up for (hidden, num_experts, num_topk) = {next(iter(self._normal))}; "
                                f"a second shape {key} does not fit next to it in num_nvl_bytes={self.num_nvl_bytes}")

        def size(tokens: int) -> int:
            return NormalBuffer.region_bytes(num_ranks=self.group_size, hidden=hidden, num_experts=num_experts,
                                             max_tokens_per_rank=tokens, max_topk=num_topk)

        if size(1) > self.num_nvl_bytes:
            raise ArgumentError(f"num_nvl_bytes={self.num_nvl_bytes} is too small for normal mode at hidden {hidden}: one token "
                                f"per rank needs {size(1)} bytes")
        low, high = 1, 1  # the most tokens per rank that num_nvl_bytes holds
        while high < 2**24 and size(2 * high) <= self.num_nvl_bytes:
            high *= 2
        low, high = high, min(2 * high, 2**24)
        while low + 1 < high:
            mid = (low + high) // 2
            low, high = (mid, high) if size(mid) <= self.num_nvl_bytes else (low, mid)
        options = {k: v for k, v in self._options.items() if k == "timeout_s"}
        buffer = NormalBuffer(self.transport, hidden=hidden, num_experts=num_experts, max_tokens_per_rank=low, max_topk=num_topk,
                              region_offset=self.num_rdma_bytes, **options)
        self._normal[key] = buffer
        self._normal_by_id[buffer.buffer_id] = buffer
        return buffer

    def _normal_owner(self, handle) -> NormalBuffer:
        buffer = self._normal_by_id.get(getattr(handle, "buffer_id", None)) if isinstance(handle, NormalHandle) else None
        if buffer is None:
            raise ArgumentError(f"handle must be the handle this Buffer's dispatch returned, got {type(handle).__name__}")
        return buffer

    # -- odds and ends ------------------------------------------------------------------------------------

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        return getattr(self.transport, "stream", None)

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: torch.Size | None = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """This rank's symmetric region as a ``dtype`` tensor from element ``offset`` (``size``: a view of
        that many elements): the RDMA buffer (low-latency mode) or the NVLink buffer (normal mode)."""
        self._alive()
        if not isinstance(dtype, torch.dtype):
            raise ArgumentTypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        if use_rdma_buffer:
            region = self.transport.region[: self.num_rdma_bytes]
        else:
            region = self.transport.region[self.num_rdma_bytes: self.num_rdma_bytes + self.num_nvl_bytes]
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
        self._normal.clear()
        self._normal_by_id.clear()
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
