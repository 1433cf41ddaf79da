"""``lowlat.Buffer``: low-latency expert-parallel dispatch and combine, CUDA-graph first.

Every shape is fixed at construction, where the symmetric region, the output storage and every
kernel's launch plan are prepared; the calls compile nothing and talk to no host process, so they
can be captured in a CUDA graph and replayed any number of times.  Per-call state (sequence
numbers, buffer parity) lives on the device and is advanced by the kernels.  An eager call costs a
few microseconds of host time: argument checks, then one prepared launch per half.

Output ownership (``lowlat/outputs.py``): dispatch outputs are static by default (two sets, used
alternately; a handle raises ``StaleHandleError`` once its set was reused) or fresh per call with
``fresh_outputs=True``; combine outputs are always fresh (or the caller's ``out=``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import os

import torch

from . import validation as check
from .engines import EmulatedEngine, KernelEngine
from .errors import (ArgumentError, ArgumentTypeError, DeviceError, GraphCaptureError, LowLatencyTimeoutError, ProtocolError,
                     RoutingError, StaleHandleError, UnavailableError)
from .handle import DispatchHandle, EventOverlap, RecvHook
from .layout import BufferShape, RegionLayout, StateWord, StatusCode
from .jit.compiler import capturing
from .jit.launch import context_ready, current_stream_handle, ensure_context
from .ops.context import KernelConfig, RankContext
from .outputs import CombineOutput, OutputSet, Pool
from .streams import EventRing, RawEvent
from .transport.base import Transport
from .transport.local import LocalWorld, resolve_device

DEFAULT_TIMEOUT_S = float(os.environ.get("LOWLAT_TIMEOUT_S", "5"))
_buffer_ids = itertools.count(1)
_KEEP_ALIVE_LIMIT = 64  # async calls whose inputs are held before the oldest is waited for
_PRUNE_EVERY = 8  # held async calls between two looks for finished ones (_hold_until_done)
_NO_EVENT = EventOverlap()  # what synchronous and hook-mode calls return (nothing to wait for)
_DISPATCH_FLAGS = ("use_fp8", "round_scale", "use_ue8m0", "async_finish", "return_recv_hook")
_COMBINE_FLAGS = ("use_logfmt", "zero_copy", "async_finish", "return_recv_hook")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes a Buffer allocated, by purpose (one rank)."""

    symmetric_region: int
    dispatch_outputs: int
    combine_outputs: int
    zero_copy_buffers: int
    device_state: int

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def __str__(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)] + [("total", self.total)]
        return "\n".join(f"{name:>18}: {value / 2**20:10.1f} MiB" for name, value in rows)

    @staticmethod
    def estimate(shape: BufferShape, *, enable_zero_copy: bool = False) -> "MemoryReport":
        """What a Buffer of ``shape`` allocates per rank at construction, without building one (a
        ``fresh_outputs`` Buffer's pools start at the same two sets and grow while results are held)."""
        s = shape
        return MemoryReport(
            symmetric_region=RegionLayout.of(s).total_bytes,
            dispatch_outputs=2 * OutputSet.carve(s)[2],
            combine_outputs=2 * s.max_tokens_per_rank * s.hidden * 2,
            zero_copy_buffers=2 * s.num_local_experts * s.rows_per_expert * s.hidden * 2 if enable_zero_copy else 0,
            device_state=StateWord.NUM_STATE_WORDS * 8 + s.num_ranks * 4,
        )


def _on_own_device(method):
    """Run a call with the Buffer's device current, whatever device the caller made current."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return self.run(method, self, *args, **kwargs)

    return call


class Buffer:
    """Low-latency dispatch/combine between the ranks of ``group``, with DeepEP LL semantics and formats.

    Args:
        group: a ``torch.distributed`` process group (one process per GPU on one node: the ``ipc``
            transport), or a :class:`~lowlat.transport.base.Transport` (see :meth:`local_group`).
        max_tokens_per_rank: T, the most tokens any rank dispatches in one call.
        hidden: H, any multiple of 128.
        num_experts: E, a multiple of the number of ranks (each owns E / R experts), at most 2048.
        num_topk: K, experts per token (at most 32).
        transport: for process groups: ``"ipc"`` (CUDA IPC, one node), ``"nvshmem"`` (NVSHMEM,
            any number of nodes), or ``"auto"``: ``ipc`` when every rank runs on this host, else
            ``nvshmem``.  Ignored when ``group`` is a Transport.
        allow_nvlink: with ``nvshmem``, write by pointer to the peers NVSHMEM maps (NVLink, or the
            same GPU); False sends to every other rank with NVSHMEM puts (DeepEP's
            ``allow_nvlink_for_low_latency_mode=False``; the only way to run the put path on one node).
        num_sms: blocks per kernel (default: two per SM; ``SMs / R`` for virtual ranks on one GPU).
        timeout_s: how long a receive waits for a peer before it masks it and reports a timeout.
        enable_zero_copy: allocate the bf16 ``[L, R*T, hidden]`` buffers that
            ``get_next_low_latency_combine_buffer`` returns (one per static output set; fresh-output
            Buffers allocate them on first request).
        fresh_outputs: every dispatch returns tensors no earlier result aliases (DeepEP's behaviour;
            see ``lowlat/outputs.py``); default: two static output sets, for CUDA graphs.
        validate_routing: check ``topk_idx`` fully on the host before each eager call (synchronises;
            the kernels always detect bad indices themselves and report them at the next call).
        rank_mask: int32 ``[num_ranks]`` on the Buffer's device to use as the rank mask, shared with
            other Buffers of the same ranks (default: a mask of its own).
    """

    def __init__(self, group, *, max_tokens_per_rank: int, hidden: int, num_experts: int, num_topk: int,
                 transport: str = "auto", allow_nvlink: bool = True, num_sms: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, enable_zero_copy: bool = False, fresh_outputs: bool = False,
                 validate_routing: bool = False, rank_mask: torch.Tensor | None = None):
        if capturing():
            raise GraphCaptureError("a Buffer allocates and compiles: build it before CUDA graph capture")
        num_ranks = _group_size(group)
        process_group = None if isinstance(group, Transport) else group
        problem = None
        try:  # every check that needs no device, before anything collective
            self.shape = BufferShape(num_ranks, num_experts, num_topk, hidden, max_tokens_per_rank)
            check.flag("allow_nvlink", allow_nvlink)
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
                raise ArgumentError(f"timeout_s must be a number > 0, got {timeout_s!r}")
            if num_sms is not None and (isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1):
                raise ArgumentError(f"num_sms must be a positive int, got {num_sms!r}")
            self.validate_routing = check.flag("validate_routing", validate_routing)
            self.fresh_outputs = check.flag("fresh_outputs", fresh_outputs)
            check.flag("enable_zero_copy", enable_zero_copy)
        except (ArgumentError, ArgumentTypeError) as exc:
            if process_group is None:
                raise
            problem, self.shape = exc, None  # raised on every rank of the group, not on this one alone
        if process_group is not None:
            group = make_transport(process_group, transport,
                                   lambda kind: RegionLayout.of(self.shape, put_staging=kind == "nvshmem").total_bytes,
                                   allow_nvlink, "(shape, transport, allow_nvlink)", self.shape, problem)
        self.transport = group
        self.timeout_s = float(timeout_s)
        if process_group is None:
            self._set_up(num_sms, rank_mask, enable_zero_copy)
            return
        # Over a process group, a failure of one rank's set-up (a bad rank_mask, a compile error, no
        # memory) is raised on every rank, and every rank releases the transport it built.
        try:
            self._set_up(num_sms, rank_mask, enable_zero_copy)
            problem = None
        except Exception as exc:  # noqa: BLE001 - relayed to every rank by agree() below
            problem = exc
        from .transport.base import agree

        try:
            agree(process_group, "Buffer set-up", None, problem)
        except BaseException:
            self.transport.close()
            raise

    def _set_up(self, num_sms, rank_mask, enable_zero_copy: bool) -> None:
        """Everything after the transport: layout, device state, engine (kernels compiled and
        planned), output storage, streams."""
        self.layout = RegionLayout.of(self.shape, put_staging=self.transport.kind == "nvshmem")
        self.rank, self.num_ranks = self.transport.rank, self.transport.num_ranks
        if self.transport.region_bytes < self.layout.total_bytes:
            raise ArgumentError(f"the transport's region has {self.transport.region_bytes} bytes, {self.layout.total_bytes} needed")
        self.device = self.transport.device
        self._device_index = self.device.index if self.device.type == "cuda" else None
        self.buffer_id = next(_buffer_ids)
        fresh_outputs = self.fresh_outputs
        with torch.cuda.device(self._device_index) if self._device_index is not None else contextlib.nullcontext():
            self._ctx = self._make_context(num_sms, rank_mask)
            self._status_host = self._ctx.status.numpy()  # the pinned status word, read without torch ops
            self._engine = KernelEngine(self._ctx) if self.device.type == "cuda" else EmulatedEngine(self._ctx, self.transport)
            s, device = self.shape, self.device
            first = [OutputSet(s, device, index=-1 if fresh_outputs else i, with_zero_copy=enable_zero_copy) for i in range(2)]
            self._static = [] if fresh_outputs else first  # used alternately
            self._output_pool = Pool(lambda: OutputSet(s, device), first if fresh_outputs else [])
            self._combine_pool = Pool(lambda: CombineOutput(s, device), [CombineOutput(s, device) for _ in range(2)])
            self._comm_stream = getattr(self.transport, "stream", None)
            if self._comm_stream is None and self.device.type == "cuda":
                self._comm_stream = torch.cuda.Stream(self.device)
            if self.device.type == "cuda":
                self._comm_handle = self._comm_stream.cuda_stream
                self._fork = RawEvent(self._device_index)  # orders the comm stream after the caller's stream
                self._events = EventRing(self._device_index)
            self.warmup()
        self._dispatches = 0
        self._pending: dict[str, collections.deque] = {"dispatch": collections.deque(), "combine": collections.deque()}
        self._in_flight: collections.deque = collections.deque()  # (event, tensors) of async_finish calls

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def local_group(cls, num_ranks: int, *, device=None, **kwargs) -> list["Buffer"]:
        """``num_ranks`` virtual ranks in this process on one device (the ``local`` transport).

        ``device`` defaults to the current GPU, or the CPU (emulated kernels) when there is none.
        Every rank has its own region and stream; returns the Buffers in rank order.
        """
        if capturing():
            raise GraphCaptureError("a Buffer allocates and compiles: build it before CUDA graph capture")
        device = resolve_device(device)
        probe = BufferShape(num_ranks, kwargs["num_experts"], kwargs["num_topk"], kwargs["hidden"], kwargs["max_tokens_per_rank"])
        world = LocalWorld(num_ranks, RegionLayout.of(probe).total_bytes, device)
        return [cls(world.transport(rank), **kwargs) for rank in range(num_ranks)]

    def _make_context(self, num_sms, rank_mask) -> RankContext:
        if self.device.type == "cuda":
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            # Two 512-thread blocks per SM keep enough loads in flight (fewer blocks sized to the work
            # measured slower at small T: bench/NOTES.md v8); virtual ranks that run concurrently on
            # one GPU share it, and their kernels must be co-resident.
            default = max(1, sms // self.num_ranks) if self.transport.colocated else 2 * sms
            # Written by kernels, read without a sync.
            status = torch.zeros(1, dtype=torch.int64, device="cpu", pin_memory=True)
        else:
            default, status = 1, torch.zeros(1, dtype=torch.int64, device="cpu")
        if rank_mask is None:
            rank_mask = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)
        check.tensor("rank_mask", rank_mask, dtypes=check.INT32, shape=(self.num_ranks,), device=self.device)
        flavour = "nvshmem" if self.transport.kind == "nvshmem" else "peer"
        # GPU-scope flags when every rank is on this GPU; programmatic dependent launch (sm_90+) unless
        # this rank is one of several virtual ranks of this process (see RankContext).
        on_device = flavour == "peer" and (self.transport.colocated or self.num_ranks == 1)
        alone = not self.transport.colocated or self.num_ranks == 1
        pdl = self.device.type == "cuda" and alone and torch.cuda.get_device_capability(self.device)[0] >= 9
        trace = os.environ.get("LOWLAT_TRACE") == "1"  # kernels/trace.cuh: per-phase cycles printed by the fused kernels
        return RankContext(
            config=KernelConfig(self.layout, transport=flavour, peers_on_device=on_device, trace=trace),
            pdl=pdl,
            rank=self.rank,
            peer_bases=self.transport.peer_bases,
            state=torch.zeros(StateWord.NUM_STATE_WORDS, dtype=torch.int64, device=self.device),
            rank_mask=rank_mask,
            status=status,
            timeout_ns=int(self.timeout_s * 1e9),
            num_blocks=num_sms or default,
        )

    def warmup(self) -> None:
        """Compile and load every kernel this Buffer can launch and plan its launches (the
        constructor already does)."""
        if capturing():
            raise GraphCaptureError("Buffer.warmup() compiles and loads kernels: call it before CUDA graph capture")
        self._engine.warmup()

    # -- dispatch ----------------------------------------------------------------------------------------

    @_on_own_device
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, *, use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                             cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, num_tokens=None):
        """Send each token to the ranks owning its experts.

        Args:
            x: bf16 ``[n, hidden]``, ``n <= max_tokens_per_rank``.
            topk_idx: int64 or int32 ``[n, num_topk]``; ``-1`` means no expert.
            use_fp8: cast to FP8 e4m3 with one fp32 scale per 128 channels inside the send.
            round_scale: power-of-two scales.  use_ue8m0: scales as packed exponent bytes (needs round_scale).
            num_tokens: None (all ``n`` rows), an int, or an int32 device scalar, so that one captured
                graph serves every batch size up to ``n``.
            cumulative_local_expert_recv_stats: int32 ``[num_local_experts]``, += rows received.
            dispatch_wait_recv_cost_stats: int64 ``[num_ranks]``, += clock cycles spent waiting per source.

        Returns ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` is bf16 ``[L, R*T, hidden]``
        or ``(fp8 [L, R*T, hidden], scales)`` with fp32 scales ``[L, R*T, hidden/128]`` or int32 UE8M0
        ``[L, R*T, ceil(hidden/512)]``, column-major in the last two dimensions; only the first
        ``recv_count[l]`` rows of local expert l are valid (ordered by source rank, then token).
        Static outputs (the default) stay valid until the next-but-one dispatch; fresh outputs
        (``fresh_outputs=True``) as long as they are held.
        """
        return self._dispatch(x, topk_idx, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook,
                              cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, num_tokens)

    def _dispatch(self, x, topk_idx, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook, recv_stats, wait_stats,
                  num_tokens):
        """low_latency_dispatch with positional arguments, on the Buffer's device (the host path's core)."""
        if self._status_host[0]:
            self.check_status()
        s = self.shape
        if not use_fp8.__class__ is round_scale.__class__ is use_ue8m0.__class__ is async_finish.__class__ is return_recv_hook.__class__ is bool:
            check.flags(_DISPATCH_FLAGS, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook)  # names the culprit
        if round_scale and not use_fp8:
            raise ArgumentError("round_scale=True needs use_fp8=True")
        if use_ue8m0 and not round_scale:
            raise ArgumentError("use_ue8m0=True needs round_scale=True (UE8M0 scales are powers of two)")
        check.tensor("x", x, check.BF16, (None, s.hidden), self.device)
        n = x.shape[0]
        if n > s.max_tokens_per_rank:
            raise ArgumentError(f"x has {n} tokens, more than max_tokens_per_rank={s.max_tokens_per_rank}")
        check.tensor("topk_idx", topk_idx, check.TOPK_DTYPES, (n, s.num_topk), self.device)
        num_tokens, num_tokens_device = (n, None) if num_tokens is None else check.num_tokens_arg(num_tokens, n, self.device)
        if recv_stats is not None:
            check.tensor("cumulative_local_expert_recv_stats", recv_stats, dtypes=check.INT32, shape=(s.num_local_experts,),
                         device=self.device)
        if wait_stats is not None:
            check.tensor("dispatch_wait_recv_cost_stats", wait_stats, dtypes=check.INT64, shape=(s.num_ranks,), device=self.device)
        self._check_modes(async_finish, return_recv_hook, "dispatch")
        if self.validate_routing and not capturing():
            check.routing(topk_idx, s.num_experts, num_tokens)

        on_comm_stream = async_finish and self._device_index is not None  # a CPU Buffer runs async calls in place
        capture = (on_comm_stream or self.fresh_outputs) and capturing()  # asked once per call, where it matters
        outputs = self._take_outputs(on_comm_stream, capture)
        handle = DispatchHandle(self.buffer_id, outputs, outputs.generation, n, num_tokens_device, s.max_tokens_per_rank,
                                s.hidden, s.num_experts)
        if self.fresh_outputs:
            outputs.attach(handle)
        recv_x = outputs.recv_x(use_fp8, use_ue8m0)
        recv_count = outputs.outputs.recv_count
        engine, out = self._engine, outputs.outputs
        if return_recv_hook:
            event, hook = self._issue_hook(
                "dispatch", lambda: engine.dispatch_send(x, topk_idx, num_tokens, num_tokens_device, use_fp8, round_scale),
                lambda: engine.dispatch_recv(out, use_fp8, use_ue8m0, recv_stats, wait_stats), handle)
            return recv_x, recv_count, handle, event, hook
        args = (x, topk_idx, num_tokens, num_tokens_device, use_fp8, round_scale, out, use_ue8m0, recv_stats, wait_stats)
        if on_comm_stream:
            event = self._issue_async(engine.dispatch, args, (x, topk_idx, num_tokens_device, recv_stats, wait_stats), (outputs,),
                                      capture)
            return recv_x, recv_count, handle, event, None
        engine.dispatch(*args)  # both halves, one launch on the caller's stream
        return recv_x, recv_count, handle, _NO_EVENT, None

    def run(self, call, *args, **kwargs):
        """``call(*args, **kwargs)`` with this Buffer's device (and its context) current: the one
        device guard of every call, also the DeepEP facade's way in to the positional cores
        ``_dispatch`` / ``_combine``."""
        index = self._device_index
        if index is not None and (torch._C._cuda_getDevice() != index or not context_ready(index)):
            with torch.cuda.device(index):
                ensure_context(index)
                return call(*args, **kwargs)
        return call(*args, **kwargs)

    def _take_outputs(self, on_comm_stream: bool, capture: bool) -> OutputSet:
        """The dispatch's output set: a static one in turn, or a fresh one (``capture``: whether the
        caller's stream is capturing, asked by the caller for fresh outputs and async calls)."""
        self._dispatches += 1
        if not self.fresh_outputs:
            outputs = self._static[self._dispatches & 1]
            # An async dispatch may still write this set, or an async combine read its layout: a user
            # on the caller's stream waits for that event.  An async call needs no claim: it runs
            # after it on the comm stream, and _issue_async replaces the set's event with its own.
            if outputs.pending_event is not None and not on_comm_stream and not capturing():
                outputs.claim()
        elif capture:
            outputs = OutputSet(self.shape, self.device)  # from the graph's memory pool; lives with the graph
        else:
            outputs = self._output_pool.acquire(on_comm_stream)
        outputs.generation = self._dispatches
        return outputs

    # -- combine -----------------------------------------------------------------------------------------

    @_on_own_device
    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: DispatchHandle, *,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None):
        """Bring expert outputs back and reduce them: ``out[t] = sum_k topk_weights[t, k] * y(t, k)``.

        Args:
            x: bf16 ``[L, R*T, hidden]`` expert outputs in the dispatch layout of ``handle``.  With
                ``zero_copy=True`` the outputs are read from ``get_next_low_latency_combine_buffer(handle)``,
                where the caller wrote them, and ``x`` (any tensor of that shape and dtype, DeepEP's
                convention) only names the shape.
            topk_idx / topk_weights: the ``[n, num_topk]`` routing of the dispatch (weights float32).
            use_logfmt: LogFMT-10 on the wire (not with zero_copy).
            out: optional bf16 ``[n, hidden]`` to write into.
            combine_wait_recv_cost_stats: int64 ``[num_ranks]``, += clock cycles spent waiting per source.

        Returns ``(combined_x bf16 [n, hidden], event, hook)``; the sum runs in fp32 in top-k order.
        ``combined_x`` is ``out``, or a tensor of its own (no two combines share storage).
        """
        return self._combine(x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out,
                             combine_wait_recv_cost_stats)

    def _combine(self, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out, wait_stats):
        """low_latency_combine with positional arguments, on the Buffer's device (the host path's core)."""
        if self._status_host[0]:
            self.check_status()
        s = self.shape
        if not use_logfmt.__class__ is zero_copy.__class__ is async_finish.__class__ is return_recv_hook.__class__ is bool:
            check.flags(_COMBINE_FLAGS, use_logfmt, zero_copy, async_finish, return_recv_hook)  # names the culprit
        if handle.__class__ is not DispatchHandle or handle.buffer_id != self.buffer_id or handle.is_stale:
            self._check_handle(handle)  # raises, naming the problem
        if zero_copy and use_logfmt:
            raise ArgumentError("zero_copy=True cannot be combined with use_logfmt=True")
        n = handle.num_tokens
        check.tensor("x", x, check.BF16, s.expert_rows_shape, self.device, contiguous=not zero_copy)
        source = x
        if zero_copy:
            source = handle.outputs.zero_copy
            if source is None:
                raise ArgumentError("zero_copy=True reads get_next_low_latency_combine_buffer(handle), and this Buffer "
                                    + ("has none yet for this handle: call it and write the expert outputs there first"
                                       if self.fresh_outputs else "was built without enable_zero_copy=True"))
        check.tensor("topk_idx", topk_idx, check.TOPK_DTYPES, (n, s.num_topk), self.device)
        check.tensor("topk_weights", topk_weights, check.FLOAT32, (n, s.num_topk), self.device)
        if wait_stats is not None:
            check.tensor("combine_wait_recv_cost_stats", wait_stats, check.INT64, (s.num_ranks,), self.device)
        if out is not None:
            check.tensor("out", out, check.BF16, (n, s.hidden), self.device)
        self._check_modes(async_finish, return_recv_hook, "combine")

        on_comm_stream = async_finish and self._device_index is not None  # a CPU Buffer runs async calls in place
        reusable = ()
        capture = (out is None or on_comm_stream) and capturing()  # asked once per call
        if out is None:
            if capture:
                out = torch.empty(n, s.hidden, dtype=torch.bfloat16, device=self.device)
            else:
                entry = self._combine_pool.acquire(on_comm_stream)
                out, reusable = entry.rows(n), (entry,)
        engine, layout, num_tokens_device = self._engine, handle.layout, handle.num_tokens_device
        if return_recv_hook:
            event, hook = self._issue_hook(
                "combine", lambda: engine.combine_send(source, layout, use_logfmt),
                lambda: engine.combine_recv(out, topk_idx, topk_weights, n, num_tokens_device, use_logfmt, wait_stats), None)
            return out, event, hook
        args = (source, layout, use_logfmt, out, topk_idx, topk_weights, n, num_tokens_device, wait_stats)
        if on_comm_stream:
            # The caller's tensors are held until the kernel is done; the Buffer's own (a pooled out,
            # the handle's layout and zero-copy buffer) are not, since holding them would grow the
            # pools: their next user waits for this call's event instead (Pool.acquire -> claim).
            # (The source is x itself, or with zero_copy the handle's buffer: never a tensor of theirs besides x.)
            theirs = (x, topk_idx, topk_weights, wait_stats, num_tokens_device) + (() if reusable else (out,))
            return out, self._issue_async(engine.combine, args, theirs, reusable + (handle.outputs,), capture), None
        engine.combine(*args)  # both halves, one launch on the caller's stream
        return out, _NO_EVENT, None

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, DispatchHandle):
            raise ArgumentTypeError(f"handle must be the DispatchHandle low_latency_dispatch returned, got {type(handle).__name__}")
        if handle.buffer_id != self.buffer_id:
            raise ArgumentError(f"handle comes from Buffer #{handle.buffer_id}, not from this Buffer (#{self.buffer_id})")
        if handle.is_stale:
            raise StaleHandleError(f"handle of dispatch #{handle.generation} is stale: dispatch #{handle.outputs.generation} reused "
                                   f"its output slot {handle.slot} (static outputs live until the next-but-one dispatch; "
                                   "build the Buffer with fresh_outputs=True to hold results longer)")

    @_on_own_device
    def get_next_low_latency_combine_buffer(self, handle: DispatchHandle) -> torch.Tensor:
        """bf16 ``[L, R*T, hidden]`` that the next combine of ``handle`` reads with ``zero_copy=True``:
        a GEMM epilogue writes the expert outputs here, then ``low_latency_combine(x, ...,
        zero_copy=True)`` sends them (``x`` only names the shape, as in DeepEP).  Each handle has its
        own, so two micro-batches' buffers never alias."""
        self._check_handle(handle)
        if handle.outputs.zero_copy is None:
            if not self.fresh_outputs:
                raise ArgumentError("this Buffer was built without enable_zero_copy=True")
            if capturing():
                raise GraphCaptureError("the zero-copy buffer is allocated on first request: ask for it once before capture")
            handle.outputs.ensure_zero_copy()
        return handle.outputs.zero_copy

    # -- issuing halves ----------------------------------------------------------------------------------

    def _check_modes(self, async_finish: bool, return_recv_hook: bool, kind: str) -> None:
        if async_finish and return_recv_hook:
            raise ArgumentError("async_finish=True and return_recv_hook=True cannot be combined")
        pending = self._pending[kind]
        if pending:
            if not return_recv_hook:
                raise ArgumentError(f"a {kind} receive hook is pending: call it before a {kind} without return_recv_hook")
            if len(pending) >= 2:
                raise ArgumentError(f"two {kind} receive hooks are pending: call the older one before sending a third {kind}")

    def _issue_hook(self, kind: str, send, receive, handle):
        """Hook mode: ``send()`` now on the current stream; the returned hook runs ``receive()``."""
        send()
        hook = RecvHook(kind, receive, self._run_hook, handle)
        self._pending[kind].append(hook)
        return _NO_EVENT, hook

    def _issue_async(self, launch, args: tuple, keep: tuple, reusable: tuple, capture: bool) -> EventOverlap:
        """``launch(*args, stream=...)`` (both halves at once) on the comm stream, after the caller's
        stream: ``async_finish``.  ``keep`` (the caller's tensors the kernels touch) is held until
        they are done, and ``reusable`` (the Buffer's own output sets) gets the call's event, which
        their next user on another stream waits for (outputs.py ``claim``).  Inside a capture the
        graph orders replays, and a captured event must not be queried later, so none is attached
        there (``capture``: whether the caller's stream is capturing, asked once by the caller)."""
        comm = self._comm_handle
        self._fork.record(current_stream_handle(self._device_index))
        self._fork.wait(comm)
        launch(*args, stream=comm)
        event = self._events.next()
        event.record(comm)
        if not capture:
            self._hold_until_done(event, keep)
            for item in reusable:
                item.pending_event = event
        return EventOverlap(event, keep)

    def _hold_until_done(self, event, tensors: tuple) -> None:
        """Keep the tensors of an async call alive until its event completes, even if the caller drops
        the event and its inputs (the caching allocator would otherwise reuse their memory).

        Every async call of a Buffer runs on its one comm stream, so the calls finish in order: once
        the newest held call is done, all are.  That one event is queried every ``_PRUNE_EVERY``
        calls (a query is a driver call, several microseconds on some hosts), and at
        ``_KEEP_ALIVE_LIMIT`` held calls the oldest is waited for.  Not inside a capture (the graph
        holds what it uses)."""
        in_flight = self._in_flight
        held = len(in_flight)
        if held >= _KEEP_ALIVE_LIMIT:
            in_flight[0][0].synchronize()
            in_flight.popleft()
        elif held and held % _PRUNE_EVERY == 0 and in_flight[-1][0].query():
            in_flight.clear()
        in_flight.append((event, tensors))

    def _run_hook(self, hook: RecvHook) -> None:
        pending = self._pending[hook.kind]
        if hook.done:
            raise ArgumentError(f"this {hook.kind} receive hook was already called")
        if not pending or pending[0] is not hook:
            raise ArgumentError(f"{hook.kind} receive hooks must be called in the order their sends were issued")
        pending.popleft()
        hook.done = True
        self.run(hook.receive)
        hook.handle = None
        if self._status_host[0]:  # after the receive, so an error leaves no hook half-consumed
            self.check_status()

    # -- status, masks, maintenance ---------------------------------------------------------------------

    def check_status(self) -> None:
        """Raise the typed error a kernel reported since the last check (reads pinned host memory;
        no synchronisation, so an error surfaces at the first check after the kernel ran)."""
        word = int(self._status_host[0])
        if word == 0:
            return
        self._status_host[0] = 0
        self._ctx.state[StateWord.STATUS].zero_()  # the device copy, in stream order after the reporting kernels
        code, rank, value = (word >> 56) & 0xFF, (word >> 32) & 0xFFFFFF, word & 0xFFFFFFFF
        value = value - (1 << 32) if value >= 1 << 31 else value
        raise _status_error(StatusCode(code), self.rank, rank, value, self.timeout_s)

    def synchronize(self) -> None:
        """Wait for this device's work, then :meth:`check_status`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._in_flight.clear()
        self.check_status()

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Exclude (``mask=True``) or re-admit a rank: nothing is sent to or awaited from a masked rank."""
        if isinstance(rank_to_mask, bool) or not isinstance(rank_to_mask, int) or not 0 <= rank_to_mask < self.num_ranks:
            raise ArgumentError(f"rank_to_mask must be an int in [0, {self.num_ranks}), got {rank_to_mask!r}")
        self._ctx.rank_mask[rank_to_mask] = int(bool(mask))

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy the mask (int32 ``[num_ranks]``, 1 = masked) into ``mask_status`` (any device)."""
        check.tensor("mask_status", mask_status, dtypes=check.INT32, shape=(self.num_ranks,))
        mask_status.copy_(self._ctx.rank_mask)

    def low_latency_clean_mask_buffer(self) -> None:
        self._ctx.rank_mask.zero_()

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int | None = None, hidden: int | None = None,
                                 num_experts: int | None = None) -> None:
        """Collective reset of the device state (sequence numbers, flags, mask, status).

        Epoch flags make this unnecessary in normal operation; it is the way back after a timeout
        left the ranks' call counters apart.  Every rank must call it, outside graph capture.
        """
        if capturing():
            raise GraphCaptureError("clean_low_latency_buffer synchronises the ranks: call it outside graph capture")
        for name, value, expected in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, self.shape.max_tokens_per_rank),
                                      ("hidden", hidden, self.shape.hidden), ("num_experts", num_experts, self.shape.num_experts)):
            if value is not None and value != expected:
                raise ArgumentError(f"{name}={value} differs from this Buffer's {expected}")
        if any(self._pending.values()):
            raise ArgumentError("receive hooks are pending: call them before clean_low_latency_buffer")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.transport.barrier()
        self.transport.region.zero_()
        self._ctx.state.zero_()
        self._ctx.rank_mask.zero_()
        self._ctx.status.zero_()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.transport.barrier()

    @_on_own_device
    def exchange_words(self, words: torch.Tensor) -> torch.Tensor:
        """All-gather int64 ``[4]`` from every rank through peer memory (a device-side barrier):
        returns int64 ``[num_ranks, 4]``.  Every rank must call it; capturable."""
        if self.device.type != "cuda":
            raise UnavailableError("exchange_words runs a CUDA kernel; it needs a GPU")
        check.tensor("words", words, dtypes=check.INT64, shape=(4,), device=self.device)
        gathered = torch.empty(self.num_ranks, 4, dtype=torch.int64, device=self.device)
        self._engine.exchange(words, gathered)
        return gathered

    # -- DeepEP-compatible odds and ends ----------------------------------------------------------------

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int,
                                       num_topk: int | None = None, transport: str = "ipc") -> int:
        """Bytes of the symmetric region (per rank) a Buffer of these shapes uses.  ``num_topk``
        defaults to the largest supported, min(32, num_experts); ``transport="nvshmem"`` adds the
        staging its puts read from."""
        topk = num_topk if num_topk is not None else min(32, num_experts)
        if transport not in ("ipc", "local", "nvshmem"):
            raise ArgumentError(f"transport must be 'ipc', 'local' or 'nvshmem', got {transport!r}")
        shape = BufferShape(num_ranks, num_experts, topk, hidden, num_max_dispatch_tokens_per_rank)
        return RegionLayout.of(shape, put_staging=transport == "nvshmem").total_bytes

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        return self._comm_stream

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current stream now (DeepEP's ``Buffer.capture``)."""
        if not torch.cuda.is_available():
            return EventOverlap()
        event = torch.cuda.Event()
        event.record()
        return EventOverlap(event)

    def memory_report(self) -> MemoryReport:
        sets = self._output_pool.items if self.fresh_outputs else self._static
        zero_copy = [o.zero_copy for o in sets if o.zero_copy is not None]
        return MemoryReport(
            symmetric_region=self.transport.region_bytes,
            dispatch_outputs=sum(o.num_bytes for o in sets),
            combine_outputs=sum(c.tensor.numel() * 2 for c in self._combine_pool.items),
            zero_copy_buffers=sum(z.numel() * 2 for z in zero_copy),
            device_state=sum(t.numel() * t.element_size() for t in (self._ctx.state, self._ctx.rank_mask)),
        )

    def destroy(self) -> None:
        """Release the transport (collective for ``ipc`` and ``nvshmem``: every rank calls it)."""
        self.transport.barrier()
        self.transport.close()

    def __repr__(self) -> str:
        s = self.shape
        return (f"lowlat.Buffer(rank={self.rank}/{self.num_ranks}, transport={self.transport.kind}, device={self.device}, "
                f"T={s.max_tokens_per_rank}, hidden={s.hidden}, experts={s.num_experts}, topk={s.num_topk})")


def _group_size(group) -> int:
    if isinstance(group, Transport):
        return group.num_ranks
    import torch.distributed as dist

    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        from .transport.base import group_rank

        group_rank(group)
        return dist.get_world_size(group)
    raise ArgumentTypeError(f"group must be a torch.distributed ProcessGroup or a lowlat Transport, got {type(group).__name__}")


def make_transport(group, kind: str, region_bytes, allow_nvlink: bool, what: str, value, problem: Exception | None = None) -> Transport:
    """A transport over a process group (collective over ``group``): ``kind`` is ``"ipc"``,
    ``"nvshmem"`` or ``"auto"`` (``ipc`` when every rank runs on this host and ``allow_nvlink``,
    else ``nvshmem``); ``region_bytes(kind)`` is the size of the symmetric region the chosen kind
    needs.  ``value`` (named ``what``, the Buffer's shapes) must be equal on every rank.  A rank's
    ``problem`` (an argument error found before), or a problem found here (no GPU, a missing
    package), is raised on every rank before any transport starts."""
    from .transport.base import agree

    one_host = agree(group, what, (value, kind, allow_nvlink), problem or _transport_problem(kind, allow_nvlink))
    if kind == "auto":
        kind = "ipc" if one_host and allow_nvlink else "nvshmem"
        if kind == "nvshmem":
            agree(group, "the nvshmem transport's readiness", None, _transport_problem(kind, allow_nvlink))
    if kind == "ipc":
        from .transport.ipc import IpcTransport

        return IpcTransport(group, region_bytes("ipc"))
    from .transport.nvshmem import NvshmemTransport

    return NvshmemTransport(group, region_bytes("nvshmem"), nvlink=allow_nvlink)


def _transport_problem(kind: str, allow_nvlink: bool) -> Exception | None:
    """Why this rank cannot build a ``kind`` transport, or None."""
    try:
        if kind not in ("auto", "ipc", "nvshmem"):
            raise ArgumentError(f"transport must be 'auto', 'ipc' or 'nvshmem', got {kind!r}")
        if not torch.cuda.is_available():
            raise UnavailableError(f"transport={kind!r} needs CUDA GPUs and this machine has none; use Buffer.local_group "
                                   "for virtual ranks on the CPU")
        if kind == "ipc" and not allow_nvlink:
            raise ArgumentError("allow_nvlink=False needs transport='nvshmem' (ipc writes to peers by pointer only)")
        if kind == "nvshmem":
            from .jit.nvcc import toolchain
            from .transport.nvshmem import nvshmem_core

            nvshmem_core(), toolchain()  # nvshmem4py, nvcc, NVSHMEM's device library, nvJitLink
    except (ArgumentError, ArgumentTypeError, UnavailableError) as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - e.g. a broken nvshmem4py install: still raised on every rank
        return UnavailableError(f"the {kind} transport cannot start on this rank ({type(exc).__name__}: {exc})")
    return None


_STATUS_ERRORS = {
    StatusCode.TIMEOUT: (LowLatencyTimeoutError, "rank {rank} sent nothing for {timeout:g} s; it is masked now "
                                                 "(low_latency_clean_mask_buffer / clean_low_latency_buffer to recover)"),
    StatusCode.OVERRUN: (ProtocolError, "rank {rank} is two calls ahead and reused a buffer this call still needed"),
    StatusCode.TOO_MANY_IN_FLIGHT: (ProtocolError, "a third send was issued before the first receive (call {value}); it was dropped"),
    StatusCode.RECV_WITHOUT_SEND: (ProtocolError, "a receive ran with no send pending (call {value})"),
    StatusCode.BAD_EXPERT: (RoutingError, "topk_idx held expert index {value}, outside [-1, num_experts); treated as -1"),
    StatusCode.BAD_NUM_TOKENS: (RoutingError, "num_tokens={value} is outside [0, max_tokens_per_rank]; nothing was sent"),
    StatusCode.ROUTE_OVERFLOW: (RoutingError, "a token named expert {value} twice; its extra rows were dropped"),
}


def _status_error(code: StatusCode, me: int, rank: int, value: int, timeout_s: float) -> DeviceError:
    error, message = _STATUS_ERRORS.get(code, (DeviceError, "unknown device status {code}"))
    text = message.format(rank=rank, value=value, timeout=timeout_s, code=int(code))
    return error(f"rank {me}: {text}", code=code, rank=rank, value=value)
