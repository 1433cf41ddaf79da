"""``lowlat.normal.NormalBuffer``: normal (high-throughput, prefill) expert-parallel dispatch and
combine with the semantics of DeepEP's intranode path.

Every static size (hidden, experts, the most tokens a rank dispatches, the widest top-k) is fixed at
construction, where the symmetric region is sized and every kernel compiled.  A call allocates its
outputs (fresh tensors, as DeepEP does).  A dispatch without ``num_worst_tokens`` learns how many rows
arrive from the device (one host synchronisation) and sizes ``recv_x`` exactly; with
``num_worst_tokens`` (or a cached handle) nothing synchronises, so dispatch and combine can be captured
in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os

import torch

from .. import validation as check
from ..errors import (ArgumentError, ArgumentTypeError, DeviceError, GraphCaptureError, NormalTimeoutError, ProtocolError, RoutingError,
                      UnavailableError)
from ..handle import EventOverlap
from ..jit.compiler import capturing
from ..transport.base import Transport
from ..transport.local import LocalTransport, LocalWorld, resolve_device
from .engine import EmulatedNormalEngine, KernelNormalEngine, NormalContext
from .layout import NormalLayout, NormalShape, NormalStatus, NormalWord
from .ops import NormalKernels

DEFAULT_NUM_SMS = 24  # blocks of the channel-parallel kernels (DeepEP's default is 20 SMs)
DEFAULT_TIMEOUT_S = float(os.environ.get("LOWLAT_TIMEOUT_S", "5"))
_buffer_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class NormalConfig:
    """Launch configuration of one call, in place of DeepEP's tuned tables.

    ``num_sms``: blocks of the kernels that spread over SMs (each block is a channel: a strided share
    of the tokens or rows); ``None`` takes the NormalBuffer's default.  On the local transport a
    GPU's SMs are shared by the virtual ranks, so the count is capped at ``SMs // num_ranks``.
    """

    num_sms: int | None = None

    def __post_init__(self):
        if self.num_sms is not None and (isinstance(self.num_sms, bool) or not isinstance(self.num_sms, int) or self.num_sms < 1):
            raise ArgumentError(f"num_sms must be None or a positive int, got {self.num_sms!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class NormalHandle:
    """What a cached dispatch and a combine need from the dispatch that produced it.

    ``rank_prefix_matrix`` int32 [R, R]: [s, r] = tokens ranks 0..s send to rank r (inclusive, as
    DeepEP); ``is_token_in_rank`` bool [n, R]; ``send_pos`` int32 [n, R]: the position of token t among
    the tokens this rank sends to rank r, -1 where it is not sent; ``num_sent`` int32 [R];
    ``recv_src_idx`` int32 [num_rows]: the source token of each received row (-1 for padding);
    ``recv_info`` int32 [1 + L]: rows received, then rows per local expert (aligned), on the device;
    ``num_recv_tokens``: rows received, known on the host (None after a ``num_worst_tokens`` dispatch);
    ``num_rows``: rows of ``recv_x`` (``num_recv_tokens`` or ``num_worst_tokens``).
    """

    buffer_id: int
    rank_prefix_matrix: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_pos: torch.Tensor
    num_sent: torch.Tensor
    recv_src_idx: torch.Tensor
    recv_info: torch.Tensor
    num_recv_tokens: int | None
    num_tokens: int
    num_rows: int

    _DEEP_EP_FIELDS = {0: "rank_prefix_matrix", 3: "recv_src_idx", 4: "is_token_in_rank"}

    def __getitem__(self, index):
        # Code written for DeepEP indexes its tuple handle: handle[0] is the rank prefix matrix.
        name = self._DEEP_EP_FIELDS.get(index)
        if name is None:
            raise IndexError(f"NormalHandle[{index}]: only DeepEP's handle[0] (rank_prefix_matrix), [3] (recv_src_idx) and "
                             "[4] (is_token_in_rank) exist here; lowlat has no channel prefix matrices or send_head")
        return getattr(self, name)


class _StreamPlan:
    """Where a call runs: the current stream, or the communication stream when the caller asked for
    ``previous_event``, ``async_finish`` or ``allocate_on_comm_stream`` (DeepEP's semantics)."""

    def __init__(self, comm: torch.cuda.Stream | None, previous_event, async_finish: bool, allocate_on_comm_stream: bool):
        self.comm = comm if comm is not None and (async_finish or previous_event is not None or allocate_on_comm_stream) else None
        self.previous_event = previous_event
        self.async_finish = async_finish
        self.allocate_on_comm_stream = allocate_on_comm_stream
        self.current = torch.cuda.current_stream() if comm is not None else None
        self._context = contextlib.nullcontext()

    def __enter__(self):
        if self.comm is not None:
            if self.previous_event is not None and self.previous_event.event is not None:
                self.comm.wait_event(self.previous_event.event)
            else:
                self.comm.wait_stream(self.current)
            self._context = torch.cuda.stream(self.comm)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        self._context.__exit__(*exc)

    def allocating(self):
        """Context for output allocations: on the current stream unless allocate_on_comm_stream."""
        if self.comm is not None and not self.allocate_on_comm_stream:
            return torch.cuda.stream(self.current)
        return contextlib.nullcontext()

    def finish(self, tensors) -> EventOverlap:
        if self.comm is None:
            return EventOverlap()
        if not self.async_finish:
            self.current.wait_stream(self.comm)
            return EventOverlap()
        event = torch.cuda.Event()
        event.record(self.comm)
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
                tensor.record_stream(self.comm)
        return EventOverlap(event)


class NormalBuffer:
    """Normal-mode dispatch/combine between the ranks of ``group``.

    Args:
        group: a :class:`~lowlat.transport.base.Transport` (``local``: virtual ranks, see
            :meth:`local_group`; ``ipc``) or a ``torch.distributed`` process group (an ``ipc``
            transport is built for it).
        hidden: H, a multiple of 128.
        num_experts: E, a multiple of the number of ranks R (each owns E / R experts), at most 2048.
        max_tokens_per_rank: T, the most tokens any rank dispatches in one call (the worst case the
            symmetric region is sized for: 2 * R * T staging rows of about 2H bytes).
        max_topk: the widest ``topk_idx`` a call may pass (at most 32).
        num_sms: default blocks of the channel-parallel kernels (default 24; ``SMs // R`` at most
            on the local transport, whose virtual ranks must be co-resident on one GPU).
        timeout_s: how long a receive waits for a peer before it reports a timeout and goes on.
        region_offset: where this buffer's bytes start inside the transport's region (a multiple of
            128), so that one region can host a low-latency Buffer and a NormalBuffer.
    """

    def __init__(self, group, *, hidden: int, num_experts: int, max_tokens_per_rank: int, max_topk: int = 16,
                 num_sms: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, region_offset: int = 0):
        if capturing():
            raise GraphCaptureError("a NormalBuffer allocates and compiles: build it before CUDA graph capture")
        num_ranks = group.num_ranks if isinstance(group, Transport) else _group_size(group)
        self.shape = NormalShape(num_ranks, num_experts, hidden, max_tokens_per_rank, max_topk)
        self.layout = NormalLayout.of(self.shape)
        if isinstance(region_offset, bool) or not isinstance(region_offset, int) or region_offset < 0 or region_offset % 128:
            raise ArgumentError(f"region_offset must be a non-negative multiple of 128, got {region_offset!r}")
        if isinstance(group, Transport):
            self.transport = group
        else:
            from ..transport.ipc import IpcTransport

            if not torch.cuda.is_available():
                raise UnavailableError("the ipc transport needs CUDA GPUs; use NormalBuffer.local_group for virtual ranks on the CPU")
            self.transport = IpcTransport(group, region_offset + self.layout.total_bytes)
        if self.transport.region_bytes < region_offset + self.layout.total_bytes:
            raise ArgumentError(f"the transport's region has {self.transport.region_bytes} bytes; this NormalBuffer needs "
                                f"{self.layout.total_bytes} from offset {region_offset}")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ArgumentError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.rank, self.num_ranks = self.transport.rank, self.transport.num_ranks
        self.device = self.transport.device
        self.region_offset = region_offset
        self.timeout_s = float(timeout_s)
        self.buffer_id = next(_buffer_ids)
        self.default_num_sms = NormalConfig(num_sms).num_sms or DEFAULT_NUM_SMS
        self._max_blocks = self._co_resident_blocks()
        cuda = self.device.type == "cuda"
        if not all(self.transport.peer_bases.tolist()):
            raise UnavailableError("normal mode writes to every peer by pointer; this transport reaches some peers only by "
                                   "NVSHMEM puts (allow_nvlink=False, or another node)")
        self._ctx = NormalContext(
            kernels=NormalKernels(self.layout),
            rank=self.rank,
            peer_bases=(self.transport.peer_bases + region_offset).contiguous(),
            state=torch.zeros(NormalWord.NUM_WORDS, dtype=torch.int64, device=self.device),
            rank_mask=torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device),
            status=torch.zeros(1, dtype=torch.int64, device="cpu", pin_memory=cuda),  # written by kernels, read without a sync
            timeout_ns=int(self.timeout_s * 1e9),
            num_blocks=self._blocks(None),
        )
        self._engine = KernelNormalEngine(self._ctx) if cuda else EmulatedNormalEngine(self._ctx, _OffsetRegions(self.transport, region_offset))
        self._comm_stream = getattr(self.transport, "stream", None)
        if self._comm_stream is None and cuda:
            self._comm_stream = torch.cuda.Stream(self.device)
        # Virtual ranks in one process (local transport) driven by one host thread each: a
        # synchronising dispatch meets its peers' threads on the host (see _meet).
        self._rendezvous = getattr(self.transport, "rendezvous", None) if self.num_ranks > 1 else None
        self._epoch, self._sync_calls = 0, 0
        self.warmup()

    # -- construction ---------------------------------------------------------------------------------

    @staticmethod
    def region_bytes(*, num_ranks: int, hidden: int, num_experts: int, max_tokens_per_rank: int, max_topk: int = 16) -> int:
        """Bytes of symmetric region one rank needs (a multiple of 2 MiB), computable before any transport exists."""
        return NormalLayout.of(NormalShape(num_ranks, num_experts, hidden, max_tokens_per_rank, max_topk)).total_bytes

    @classmethod
    def local_group(cls, num_ranks: int, *, device=None, **kwargs) -> list["NormalBuffer"]:
        """``num_ranks`` virtual ranks in this process on one device (the ``local`` transport); the
        current GPU by default, or the CPU (emulated engine) when there is none.  Returns the buffers
        in rank order.  Drive the ranks concurrently: one host thread per rank for calls that
        synchronise (a dispatch without ``num_worst_tokens``), or each rank on its own stream."""
        if capturing():
            raise GraphCaptureError("a NormalBuffer allocates and compiles: build it before CUDA graph capture")
        device = resolve_device(device)
        size = cls.region_bytes(num_ranks=num_ranks, hidden=kwargs["hidden"], num_experts=kwargs["num_experts"],
                                max_tokens_per_rank=kwargs["max_tokens_per_rank"], max_topk=kwargs.get("max_topk", 16))
        world = LocalWorld(num_ranks, size, device)
        return [cls(world.transport(rank), **kwargs) for rank in range(num_ranks)]

    def _co_resident_blocks(self) -> int | None:
        if self.device.type != "cuda" or not isinstance(self.transport, LocalTransport):
            return None
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return max(1, sms // self.num_ranks)

    def _blocks(self, config: NormalConfig | None) -> int:
        if config is not None and not isinstance(config, NormalConfig):
            raise ArgumentTypeError(f"config must be a lowlat.normal.NormalConfig or None, got {type(config).__name__}")
        blocks = (config.num_sms if config is not None and config.num_sms is not None else None) or self.default_num_sms
        if self.device.type != "cuda":
            return 1
        return min(blocks, self._max_blocks) if self._max_blocks is not None else blocks

    def warmup(self) -> None:
        """Compile and load every kernel (the constructor already does), and do once, here, the
        first-use work of a call's host path that may wait for the whole device: loading PyTorch's
        fill kernel (lazy module loading) and a first cudaMalloc of small blocks for the
        communication stream (PyTorch's caching allocator keeps blocks per stream).  Inside a call,
        such a wait would stall this rank's launches behind a peer's kernel that waits for them."""
        if capturing():
            raise GraphCaptureError("NormalBuffer.warmup() compiles and loads kernels: call it before CUDA graph capture")
        self._engine.warmup()
        if self.device.type == "cuda":
            with torch.cuda.stream(self._comm_stream):
                blocks = [torch.zeros(256 * 1024, dtype=torch.int32, device=self.device) for _ in range(4)]  # 4 MiB, small pool
                torch.zeros(1, dtype=torch.bool, device=self.device)
                del blocks
            torch.cuda.synchronize(self.device)

    def _meet(self, step: str) -> None:
        """Host rendezvous of the virtual ranks of a local group inside a synchronising dispatch
        (which needs one host thread per rank anyway: its host waits for every peer's send).

        Before ``counts`` (the kernel that waits for every peer's send): no rank's waiting kernel
        reaches the GPU until every rank's thread has launched its send, so nothing a late thread
        does on the host before its send (an allocation, a first kernel load; CUDA may make such
        calls wait for the whole device) can stall behind a spinning peer.  After the last launch:
        no rank goes on to its next call (whose kernels may wait) while a peer still allocates
        this call's outputs.  NCCL's GROUP launch mode answers the same hazard.  Bounded by
        ``timeout_s``: ranks driven from one thread, or a rank that never comes, cost a delay and
        the device reports the missing peer as before."""
        if self._rendezvous is not None:
            self._rendezvous(("normal", self.region_offset, self._epoch, self._sync_calls, step), self.timeout_s)

    @staticmethod
    def get_dispatch_config(num_ranks: int | None = None) -> NormalConfig:
        """The default dispatch configuration (one rule for every rank count; no tuned table)."""
        return NormalConfig(DEFAULT_NUM_SMS)

    @staticmethod
    def get_combine_config(num_ranks: int | None = None) -> NormalConfig:
        """The default combine configuration (one rule for every rank count; no tuned table)."""
        return NormalConfig(DEFAULT_NUM_SMS)

    # -- layout -------------------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Counts a dispatch needs, from this rank's routing.

        ``topk_idx``: int64 or int32 ``[n, K]`` (``n <= max_tokens_per_rank``, ``K <= max_topk``), -1 = no
        expert.  Returns ``(num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E],
        is_token_in_rank bool [n, R], event)`` (DeepEP's tuple without ``num_tokens_per_rdma_rank``).
        Indices outside ``[-1, E)`` are reported by the kernel (RoutingError at the next check) and
        treated as -1.
        """
        self.check_status()
        self._check_num_experts(num_experts)
        topk_idx = self._check_topk_idx(topk_idx, None)
        plan = self._plan(previous_event, async_finish, allocate_on_comm_stream)
        s, n = self.shape, topk_idx.shape[0]
        with plan:
            with plan.allocating():
                per_rank = torch.zeros(s.num_ranks, dtype=torch.int32, device=self.device)
                per_expert = torch.zeros(s.num_experts, dtype=torch.int32, device=self.device)
                in_rank = torch.empty(n, s.num_ranks, dtype=torch.bool, device=self.device)
            self._engine.dispatch_layout(topk_idx, per_rank, per_expert, in_rank, num_blocks=self._ctx.num_blocks)
        return per_rank, per_expert, in_rank, plan.finish([topk_idx, per_rank, per_expert, in_rank])

    # -- dispatch -----------------------------------------------------------------------------------------

    def dispatch(self, x, handle: NormalHandle | None = None, num_tokens_per_rank: torch.Tensor | None = None,
                 is_token_in_rank: torch.Tensor | None = None, num_tokens_per_expert: torch.Tensor | None = None,
                 topk_idx: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0, config: NormalConfig | None = None, previous_event: EventOverlap | None = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Send every token once to every rank it is bound for.

        Args:
            x: bf16 ``[n, hidden]``, or ``(fp8 e4m3 [n, hidden], fp32 scales [n, hidden/128])`` (scales
                may have any strides); ``n <= max_tokens_per_rank``.
            handle: a previous dispatch's handle: reuse its layout (a cached dispatch, no routing
                arguments, no host synchronisation).
            num_tokens_per_rank / is_token_in_rank / num_tokens_per_expert: from
                :meth:`get_dispatch_layout` (int32 ``[R]``, bool ``[n, R]``, int32 ``[E]``); computed from
                ``topk_idx`` when left out.  ``is_token_in_rank`` decides where tokens go;
                ``num_tokens_per_expert`` only feeds the per-expert counts.
            topk_idx: int64 or int32 ``[n, K]``; topk_weights: float32 ``[n, K]``.
            expert_alignment: round each local expert's count up to a multiple of this.
            num_worst_tokens: if > 0, ``recv_x`` has exactly this many rows (padding after the received
                ones: top-k -1, weights 0), nothing synchronises with the host, and the call can be
                captured in a CUDA graph; more arrivals than this are reported (RoutingError).
            config: :class:`NormalConfig`; previous_event / async_finish / allocate_on_comm_stream: as
                DeepEP (the work runs on the communication stream; ``allocate_on_comm_stream`` needs
                ``previous_event`` and ``async_finish``).

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle,
        event)``: ``recv_x`` like ``x`` with ``num_recv`` (or ``num_worst_tokens``) rows ordered by
        source rank then source token, scales row-major ``[rows, hidden/128]``; ``recv_topk_idx`` (dtype
        of ``topk_idx``) holds local expert indices, -1 for other ranks' experts; ``recv_topk_weights``
        float32 (0 where the index is -1); the list (Python ints, aligned) is empty with
        ``num_worst_tokens`` and None for a cached dispatch, as are the top-k outputs then.
        """
        self.check_status()
        s, device = self.shape, self.device
        x, x_scales = self._check_x(x)
        n = x.shape[0]
        expert_alignment = _positive_int("expert_alignment", expert_alignment)
        if isinstance(num_worst_tokens, bool) or not isinstance(num_worst_tokens, int) or not 0 <= num_worst_tokens < 2**31:
            raise ArgumentError(f"num_worst_tokens must be an int in [0, 2**31), got {num_worst_tokens!r}")
        num_blocks = self._blocks(config)
        cached = handle is not None
        if cached:
            self._check_handle(handle)
            given = [name for name, value in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                                              ("num_tokens_per_expert", num_tokens_per_expert), ("topk_idx", topk_idx),
                                              ("topk_weights", topk_weights)) if value is not None]
            if given:
                raise ArgumentError(f"a cached dispatch (handle=...) reuses the handle's layout; do not pass {', '.join(given)}")
            if n != handle.num_tokens:
                raise ArgumentError(f"x has {n} tokens but the handle's dispatch had {handle.num_tokens}")
        else:
            topk_idx = self._check_topk_idx(topk_idx, n) if topk_idx is not None else None
            if topk_weights is not None:
                if topk_idx is None:
                    raise ArgumentError("topk_weights needs topk_idx")
                topk_weights = check.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=tuple(topk_idx.shape), device=device)
            if is_token_in_rank is None and topk_idx is None:
                raise ArgumentError("dispatch needs is_token_in_rank (from get_dispatch_layout) or topk_idx, or a handle")
            if is_token_in_rank is not None:
                is_token_in_rank = check.tensor("is_token_in_rank", is_token_in_rank, dtypes=(torch.bool,), shape=(n, s.num_ranks), device=device)
            if num_tokens_per_rank is not None:
                check.tensor("num_tokens_per_rank", num_tokens_per_rank, dtypes=(torch.int32,), shape=(s.num_ranks,), device=device)
            if num_tokens_per_expert is not None:
                num_tokens_per_expert = check.tensor("num_tokens_per_expert", num_tokens_per_expert, dtypes=(torch.int32,),
                                                     shape=(s.num_experts,), device=device)
        for name, value in (("async_finish", async_finish), ("allocate_on_comm_stream", allocate_on_comm_stream)):
            check.flag(name, value)
        if not cached and num_worst_tokens == 0 and capturing():
            raise GraphCaptureError("a dispatch without num_worst_tokens synchronises with the host to size recv_x; "
                                    "pass num_worst_tokens (or a handle) to capture it in a CUDA graph")
        plan = self._plan(previous_event, async_finish, allocate_on_comm_stream)

        with plan:
            if cached:
                send_pos, num_sent, in_rank = handle.send_pos, handle.num_sent, handle.is_token_in_rank
            else:
                if is_token_in_rank is None or (num_tokens_per_expert is None and topk_idx is not None):
                    _, layout_per_expert, layout_in_rank, _ = self.get_dispatch_layout(topk_idx, s.num_experts)
                    is_token_in_rank = layout_in_rank if is_token_in_rank is None else is_token_in_rank
                    num_tokens_per_expert = layout_per_expert if num_tokens_per_expert is None else num_tokens_per_expert
                in_rank = is_token_in_rank
                with plan.allocating():
                    send_pos = torch.empty(n, s.num_ranks, dtype=torch.int32, device=device)
                    num_sent = torch.empty(s.num_ranks, dtype=torch.int32, device=device)
                self._engine.prepare(in_rank, send_pos, num_sent)
            self._engine.send(x, x_scales, topk_idx, topk_weights, send_pos, num_sent, None if cached else num_tokens_per_expert,
                              num_blocks=num_blocks)
            with plan.allocating():
                rank_prefix = torch.empty(s.num_ranks, s.num_ranks, dtype=torch.int32, device=device)
                recv_info = torch.empty(1 + s.num_local_experts, dtype=torch.int32, device=device)
            synchronising = not cached and not num_worst_tokens
            if synchronising:
                self._meet("sent")
            self._engine.counts(rank_prefix, recv_info, expert_alignment)
            per_expert_list, num_recv, synchronised = None, None, False
            if cached:
                num_rows, num_recv = handle.num_rows, handle.num_recv_tokens
            elif num_worst_tokens:
                num_rows, per_expert_list = num_worst_tokens, []
            else:
                info = recv_info.cpu().tolist()  # the one host synchronisation
                num_recv = num_rows = info[0]
                synchronised = True
                per_expert_list = info[1:]
            with plan.allocating():
                recv_x = torch.empty(num_rows, s.hidden, dtype=x.dtype, device=device)
                recv_scales = torch.empty(num_rows, s.num_groups, dtype=torch.float32, device=device) if x_scales is not None else None
                recv_topk_idx = torch.empty(num_rows, topk_idx.shape[1], dtype=topk_idx.dtype, device=device) if topk_idx is not None else None
                recv_topk_weights = (torch.empty(num_rows, topk_idx.shape[1], dtype=torch.float32, device=device)
                                     if topk_weights is not None else None)
                recv_src_idx = torch.empty(num_rows, dtype=torch.int32, device=device)
            self._engine.copy(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, rank_prefix, num_blocks=num_blocks)
            if synchronising:
                self._meet("issued")
                self._sync_calls += 1

        if synchronised:  # report what the kernels saw so far now, once every step of the call is issued (ranks stay in step)
            self.check_status()
        outputs = [recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, rank_prefix, recv_info]
        event = plan.finish([x, x_scales, topk_idx, topk_weights, in_rank, send_pos, num_sent, num_tokens_per_expert, *outputs])
        if not cached:
            handle = NormalHandle(self.buffer_id, rank_prefix, in_rank, send_pos, num_sent, recv_src_idx, recv_info, num_recv, n, num_rows)
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        return recv, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event

    # -- combine ------------------------------------------------------------------------------------------

    def combine(self, x: torch.Tensor, handle: NormalHandle, topk_weights: torch.Tensor | None = None, bias=None,
                config: NormalConfig | None = None, previous_event: EventOverlap | None = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """Send every received row back to its source, which sums its copies (no weights, as DeepEP).

        Args:
            x: bf16 ``[handle.num_rows, hidden]`` in the row order of the dispatch (padding rows of a
                ``num_worst_tokens`` dispatch are ignored).
            topk_weights: float32 ``[handle.num_rows, K]`` (``K <= max_topk``), summed the same way.
            bias: None, one bf16 ``[n, hidden]`` tensor, or a tuple of up to two, added first.

        Returns ``(combined_x bf16 [n, hidden], combined_topk_weights float32 [n, K] or None, event)``:
        ``combined_x[t] = bf16(((0 + bias_0[t]) + bias_1[t]) + sum over ranks r holding t, ascending, of
        x_r[row of t])``, every add rounded in fp32.
        """
        self.check_status()
        s, device = self.shape, self.device
        self._check_handle(handle)
        x = check.tensor("x", x, dtypes=(torch.bfloat16,), shape=(handle.num_rows, s.hidden), device=device)
        _check_aligned("x", x)
        if topk_weights is not None:
            topk_weights = check.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(handle.num_rows, None), device=device)
            if not 1 <= topk_weights.shape[1] <= s.max_topk:
                raise ArgumentError(f"topk_weights has {topk_weights.shape[1]} columns; 1 to max_topk={s.max_topk} are supported")
        biases = self._check_bias(bias, handle.num_tokens)
        for name, value in (("async_finish", async_finish), ("allocate_on_comm_stream", allocate_on_comm_stream)):
            check.flag(name, value)
        num_blocks = self._blocks(config)
        plan = self._plan(previous_event, async_finish, allocate_on_comm_stream)
        with plan:
            # The send first: it never waits, and nothing on the host may delay it behind a peer's
            # receive that waits for it (an allocation can wait for the whole device).
            self._engine.combine_send(x, topk_weights, handle.rank_prefix_matrix, num_blocks=num_blocks)
            with plan.allocating():
                out = torch.empty(handle.num_tokens, s.hidden, dtype=torch.bfloat16, device=device)
                out_weights = (torch.empty(handle.num_tokens, topk_weights.shape[1], dtype=torch.float32, device=device)
                               if topk_weights is not None else None)
            self._engine.combine_recv(out, out_weights, biases[0], biases[1], handle.send_pos, num_blocks=num_blocks)
        event = plan.finish([x, topk_weights, *biases, handle.rank_prefix_matrix, handle.send_pos, out, out_weights])
        return out, out_weights, event

    # -- checks ---------------------------------------------------------------------------------------------

    def _plan(self, previous_event, async_finish, allocate_on_comm_stream) -> _StreamPlan:
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise ArgumentTypeError(f"previous_event must be an EventOverlap (e.g. from NormalBuffer.capture()) or None, "
                                    f"got {type(previous_event).__name__}")
        check.flag("async_finish", async_finish)
        check.flag("allocate_on_comm_stream", allocate_on_comm_stream)
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ArgumentError("allocate_on_comm_stream=True needs previous_event and async_finish=True (as DeepEP)")
        return _StreamPlan(self._comm_stream, previous_event, async_finish, allocate_on_comm_stream)

    def _check_num_experts(self, num_experts) -> None:
        if isinstance(num_experts, bool) or not isinstance(num_experts, int):
            raise ArgumentTypeError(f"num_experts must be an int, got {num_experts!r}")
        if num_experts != self.shape.num_experts:
            raise ArgumentError(f"num_experts={num_experts} differs from this NormalBuffer's {self.shape.num_experts}")

    def _check_topk_idx(self, topk_idx, num_tokens: int | None) -> torch.Tensor:
        s = self.shape
        topk_idx = check.tensor("topk_idx", topk_idx, dtypes=check.TOPK_DTYPES, shape=(num_tokens, None), device=self.device)
        if topk_idx.shape[0] > s.max_tokens_per_rank:
            raise ArgumentError(f"topk_idx has {topk_idx.shape[0]} tokens, more than max_tokens_per_rank={s.max_tokens_per_rank}")
        if not 1 <= topk_idx.shape[1] <= s.max_topk:
            raise ArgumentError(f"topk_idx has {topk_idx.shape[1]} columns; 1 to max_topk={s.max_topk} are supported")
        return topk_idx

    def _check_x(self, x):
        s = self.shape
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ArgumentError(f"x as a tuple must be (fp8 data, fp32 scales), got {len(x)} elements")
            data, scales = x
            data = check.tensor("x[0]", data, dtypes=(torch.float8_e4m3fn,), shape=(None, s.hidden), device=self.device)
            scales = check.tensor("x[1]", scales, dtypes=(torch.float32,), shape=(data.shape[0], s.num_groups), device=self.device,
                                  contiguous=False)
        else:
            data = check.tensor("x", x, dtypes=(torch.bfloat16,), shape=(None, s.hidden), device=self.device)
            scales = None
        if data.shape[0] > s.max_tokens_per_rank:
            raise ArgumentError(f"x has {data.shape[0]} tokens, more than max_tokens_per_rank={s.max_tokens_per_rank}")
        _check_aligned("x", data)
        return data, scales

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, NormalHandle):
            raise ArgumentTypeError(f"handle must be the NormalHandle a NormalBuffer.dispatch returned, got {type(handle).__name__}")
        if handle.buffer_id != self.buffer_id:
            raise ArgumentError(f"handle comes from NormalBuffer #{handle.buffer_id}, not from this one (#{self.buffer_id})")

    def _check_bias(self, bias, num_tokens: int) -> tuple:
        if bias is None:
            parts = ()
        elif isinstance(bias, torch.Tensor):
            parts = (bias,)
        elif isinstance(bias, (tuple, list)) and len(bias) <= 2:
            parts = tuple(b for b in bias if b is not None)
        else:
            raise ArgumentTypeError(f"bias must be None, a tensor or a tuple of up to two tensors, got {type(bias).__name__}"
                                    + (f" of length {len(bias)}" if isinstance(bias, (tuple, list)) else ""))
        checked = []
        for i, b in enumerate(parts):
            b = check.tensor(f"bias[{i}]", b, dtypes=(torch.bfloat16,), shape=(num_tokens, self.shape.hidden), device=self.device)
            _check_aligned(f"bias[{i}]", b)
            checked.append(b)
        return tuple(checked) + (None,) * (2 - len(checked))

    # -- status, maintenance --------------------------------------------------------------------------------

    def check_status(self) -> None:
        """Raise the typed error a kernel reported since the last check (reads pinned host memory)."""
        word = int(self._ctx.status[0])
        if word == 0:
            return
        self._ctx.status[0] = 0
        self._ctx.state[NormalWord.STATUS].zero_()
        code, rank, value = (word >> 56) & 0xFF, (word >> 32) & 0xFFFFFF, word & 0xFFFFFFFF
        value = value - (1 << 32) if value >= 1 << 31 else value
        raise _status_error(code, self.rank, rank, value, self.timeout_s)

    def synchronize(self) -> None:
        """Wait for this device's work, then :meth:`check_status`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.check_status()

    def reset(self) -> None:
        """Collective reset of the call counter, flags and status, after a timeout left the ranks'
        counters apart.  Every rank calls it, outside graph capture."""
        if capturing():
            raise GraphCaptureError("NormalBuffer.reset() synchronises the ranks: call it outside graph capture")
        self.synchronize_quietly()
        self.transport.barrier()
        self.transport.region[self.region_offset: self.region_offset + self.layout.total_bytes].zero_()
        self._ctx.state.zero_()
        self._ctx.status.zero_()
        self._epoch, self._sync_calls = self._epoch + 1, 0  # a fresh rendezvous sequence (every rank resets)
        self.synchronize_quietly()
        self.transport.barrier()

    def synchronize_quietly(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def destroy(self) -> None:
        """Release the transport (collective for ``ipc``: every rank calls it)."""
        self.transport.barrier()
        self.transport.close()

    def capture(self) -> EventOverlap:
        """An event recorded on the current stream now (DeepEP's ``Buffer.capture``)."""
        if self.device.type != "cuda":
            return EventOverlap()
        event = torch.cuda.Event()
        event.record()
        return EventOverlap(event)

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        return self._comm_stream

    def __repr__(self) -> str:
        s = self.shape
        return (f"lowlat.normal.NormalBuffer(rank={self.rank}/{self.num_ranks}, transport={self.transport.kind}, device={self.device}, "
                f"T={s.max_tokens_per_rank}, hidden={s.hidden}, experts={s.num_experts}, max_topk={s.max_topk})")


class _OffsetRegions:
    """The local transport's regions as the emulated engine sees them, from ``region_offset`` on."""

    def __init__(self, transport: LocalTransport, offset: int):
        self.transport, self.offset = transport, offset

    def peer_region(self, rank: int) -> torch.Tensor:
        return self.transport.peer_region(rank)[self.offset:]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value >= 2**31:
        raise ArgumentError(f"{name} must be an int in [1, 2**31), got {value!r}")
    return value


def _check_aligned(name: str, tensor: torch.Tensor) -> None:
    if tensor.numel() and tensor.data_ptr() % 16:
        raise ArgumentError(f"{name} must start at a 16-byte aligned address (kernels move 16-byte chunks), got {tensor.data_ptr():#x}")


def _group_size(group) -> int:
    import torch.distributed as dist

    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return dist.get_world_size(group)
    raise ArgumentTypeError(f"group must be a torch.distributed ProcessGroup or a lowlat Transport, got {type(group).__name__}")


_STATUS_ERRORS = {
    NormalStatus.TIMEOUT: (NormalTimeoutError, "rank {rank} did not signal within {timeout:g} s; its data was left out "
                                               "(NormalBuffer.reset() on every rank to recover)"),
    NormalStatus.OVERRUN: (ProtocolError, "rank {rank} is two calls ahead: the ranks did not make the same sequence of calls"),
    NormalStatus.BAD_EXPERT: (RoutingError, "topk_idx held expert index {value}, outside [-1, num_experts); treated as -1"),
    NormalStatus.RECV_OVERFLOW: (RoutingError, "{value} rows arrived, more than num_worst_tokens; the rest were dropped"),
}


def _status_error(code: int, me: int, rank: int, value: int, timeout_s: float) -> DeviceError:
    error, message = _STATUS_ERRORS.get(code, (DeviceError, "unknown device status {code}"))
    text = message.format(rank=rank, value=value, timeout=timeout_s, code=code)
    return error(f"normal mode, rank {me}: {text}", code=code, rank=rank, value=value)
