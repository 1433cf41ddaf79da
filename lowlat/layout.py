"""Static shapes of a Buffer and the byte layout of its symmetric region (pure Python).

This module is the single source of truth for sizes and offsets: the kernels receive every offset
as a compile-time constant of their ``Cfg`` struct (see :meth:`RegionLayout.constants`), and the CPU
emulation engine reads and writes the same bytes.

Symmetric region of one rank (everything a peer may write into)::

    exchange  parity 0 | parity 1         all-gather words + flags (transport smoke test / barrier)
    parity block 0 | parity block 1       one per buffer parity (the low bit of the call counter):
        dispatch_flags   uint64 [R]               epoch flag per source rank
        combine_flags    uint64 [R]
        dispatch_count   int32  [L][R]            tokens source s sends to local expert l
        dispatch_route   int32  [L][R][T]         (token << 5 | k) of those tokens, in token order
        dispatch_staging msg    [R][T]            one message per (source rank, token), deduplicated
        combine_staging  slot   [T][K]            expert outputs coming back, per (token, top-k slot)
    send_buffer  msg [T]                  this rank's outgoing tokens, staged for puts (FP8-quantised or
                                          bf16); peers reached by pointer get their bytes straight
    route_staging         int32 [E][T]    } only with put staging (the nvshmem transport): what RDMA
    combine_send_staging  slot  [R*T*min(L, K)] } puts read, since they read only symmetric memory

with R ranks, L local experts, T max tokens per rank, K top-k.  A dispatch message is the token's
data (bf16 ``2H`` bytes, or fp8 ``H`` bytes followed by ``H/128`` fp32 scales); a combine slot is
``2H`` bytes of data (bf16, or LogFMT units) followed by ``H/128`` LogFMT metadata words.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

from .errors import ArgumentError

ALIGN = 128
EXCHANGE_WORDS = 4
MAX_TOPK = 32  # the route entry keeps k in 5 bits
MAX_EXPERTS = 2048  # per-expert prefix sums live in shared memory


def align(value: int, to: int = ALIGN) -> int:
    return (value + to - 1) // to * to


class StateWord(enum.IntEnum):
    """Words of the per-Buffer device state (mirrors ``kernels/state.cuh``)."""

    DISPATCH_SEND_SEQ = 0
    DISPATCH_RECV_SEQ = 1
    COMBINE_SEND_SEQ = 2
    COMBINE_RECV_SEQ = 3
    EXCHANGE_SEQ = 4
    STATUS = 5
    BLOCKS_DONE = 8
    NUM_STATE_WORDS = 16


class StatusCode(enum.IntEnum):
    """Codes of the device status word (mirrors ``kernels/state.cuh``)."""

    OK = 0
    TIMEOUT = 1
    OVERRUN = 2
    TOO_MANY_IN_FLIGHT = 3
    RECV_WITHOUT_SEND = 4
    BAD_EXPERT = 5
    BAD_NUM_TOKENS = 6
    ROUTE_OVERFLOW = 7


class ExpertParallelShape:
    """What every expert-parallel shape shares (low-latency ``BufferShape``, normal-mode
    ``NormalShape``): the checks of ``num_ranks``, ``num_experts`` and ``hidden``, and the counts
    derived from them.  Subclasses are frozen dataclasses with those fields."""

    def check(self, fields: tuple[str, ...], *, max_ranks: int | None = None, max_experts: int = MAX_EXPERTS) -> None:
        """Each of ``fields`` a positive int, at most ``max_ranks`` ranks, hidden a multiple of 128,
        experts a multiple of the ranks and at most ``max_experts``."""
        for name in fields:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ArgumentError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ArgumentError(f"{name} must be >= 1, got {value}")
        if max_ranks is not None and self.num_ranks > max_ranks:
            raise ArgumentError(f"num_ranks={self.num_ranks} exceeds the supported maximum {max_ranks}")
        if self.hidden % 128:
            raise ArgumentError(f"hidden must be a multiple of 128, got {self.hidden}")
        if self.num_experts % self.num_ranks:
            raise ArgumentError(f"num_experts={self.num_experts} must be divisible by num_ranks={self.num_ranks}")
        if self.num_experts > max_experts:
            raise ArgumentError(f"num_experts={self.num_experts} exceeds the supported maximum {max_experts}")

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def num_groups(self) -> int:
        """fp32 FP8 scales per token (one per 128 channels)."""
        return self.hidden // 128


@dataclasses.dataclass(frozen=True)
class BufferShape(ExpertParallelShape):
    """Every static shape of a low-latency Buffer.

    ``num_ranks`` R, ``num_experts`` E (a multiple of R), ``num_topk`` K, ``hidden`` H (a multiple
    of 128), ``max_tokens_per_rank`` T.  Each rank owns ``num_local_experts = E / R`` experts.
    """

    num_ranks: int
    num_experts: int
    num_topk: int
    hidden: int
    max_tokens_per_rank: int

    def __post_init__(self):
        self.check(("num_ranks", "num_experts", "num_topk", "hidden", "max_tokens_per_rank"))
        if self.num_topk > min(MAX_TOPK, self.num_experts):
            raise ArgumentError(f"num_topk={self.num_topk} must be <= min({MAX_TOPK}, num_experts={self.num_experts})")
        if self.max_tokens_per_rank * MAX_TOPK >= 2**31:
            raise ArgumentError(f"max_tokens_per_rank={self.max_tokens_per_rank} is too large")

    @property
    def num_ue8m0_words(self) -> int:
        """int32 words of packed UE8M0 scales per token (four exponents each)."""
        return (self.num_groups + 3) // 4

    @property
    def rows_per_expert(self) -> int:
        """Rows of each local expert's receive buffer: every token of every rank, ``R * T``."""
        return self.num_ranks * self.max_tokens_per_rank

    @functools.cached_property
    def expert_rows_shape(self) -> tuple[int, int, int]:
        """``(L, R*T, H)``: the dispatch's receive layout, which the combine's ``x`` shares (computed
        once: every combine checks its ``x`` against it)."""
        return self.num_local_experts, self.rows_per_expert, self.hidden

    @property
    def scale_row_stride(self) -> int:
        """Row stride of the column-major scale tensors: ``R * T`` rounded up to 4 (16-byte TMA rows)."""
        return align(self.rows_per_expert, 4)

    # Message and slot sizes (bytes) ---------------------------------------------------------------

    @property
    def bf16_message_bytes(self) -> int:
        return 2 * self.hidden

    @property
    def fp8_message_bytes(self) -> int:
        return align(self.hidden + 4 * self.num_groups, 16)

    @property
    def message_stride(self) -> int:
        return max(self.bf16_message_bytes, self.fp8_message_bytes)

    @property
    def combine_slot_stride(self) -> int:
        return align(2 * self.hidden + 4 * self.num_groups, 16)


@dataclasses.dataclass(frozen=True)
class RegionLayout:
    """Byte offsets inside one rank's symmetric region (identical on every rank)."""

    shape: BufferShape
    exchange_words: int
    exchange_flags: int
    exchange_parity_bytes: int
    parity_base: int
    parity_bytes: int
    dispatch_flags: int  # offsets below are relative to a parity block
    combine_flags: int
    dispatch_count: int
    dispatch_route: int
    dispatch_staging: int
    combine_staging: int
    send_buffer: int  # absolute
    total_bytes: int
    route_staging: int = 0  # absolute; 0 and 0 rows without put staging
    combine_send_staging: int = 0
    combine_send_rows: int = 0

    @property
    def put_staging(self) -> bool:
        return self.combine_send_rows > 0

    @staticmethod
    def of(shape: BufferShape, *, put_staging: bool = False) -> "RegionLayout":
        """The layout for ``shape``; ``put_staging`` adds the areas the nvshmem transport's puts read
        from (a routing table per expert and one combine slot per row this rank can send back)."""
        R, L, T, K = shape.num_ranks, shape.num_local_experts, shape.max_tokens_per_rank, shape.num_topk
        exchange_words = 0
        exchange_flags = align(R * EXCHANGE_WORDS * 8)
        exchange_parity_bytes = exchange_flags + align(R * 8)
        cursor = 0
        fields = {}
        for name, size in (
            ("dispatch_flags", R * 8),
            ("combine_flags", R * 8),
            ("dispatch_count", L * R * 4),
            ("dispatch_route", L * R * T * 4),
            ("dispatch_staging", R * T * shape.message_stride),
            ("combine_staging", T * K * shape.combine_slot_stride),
        ):
            fields[name] = cursor
            cursor = align(cursor + size)
        parity_base = 2 * exchange_parity_bytes
        parity_bytes = cursor
        send_buffer = parity_base + 2 * parity_bytes
        end = align(send_buffer + T * shape.message_stride)
        if put_staging:
            # A rank sends back at most one row per (source, token, top-k slot) and per (local expert, source, token).
            fields["combine_send_rows"] = shape.num_ranks * T * min(L, K)
            fields["route_staging"] = end
            fields["combine_send_staging"] = align(end + shape.num_experts * T * 4)
            end = align(fields["combine_send_staging"] + fields["combine_send_rows"] * shape.combine_slot_stride)
        total = align(end, 2**21)  # whole 2 MiB pages for IPC
        return RegionLayout(shape, exchange_words, exchange_flags, exchange_parity_bytes, parity_base, parity_bytes,
                            send_buffer=send_buffer, total_bytes=total, **fields)

    def parity_offset(self, parity: int) -> int:
        return self.parity_base + parity * self.parity_bytes

    def constants(self) -> dict[str, int]:
        """The ``Cfg`` members every kernel of a Buffer is compiled with."""
        s = self.shape
        return {
            "kNumRanks": s.num_ranks,
            "kNumExperts": s.num_experts,
            "kNumLocalExperts": s.num_local_experts,
            "kNumTopk": s.num_topk,
            "kHidden": s.hidden,
            "kMaxTokens": s.max_tokens_per_rank,
            "kScaleRowStride": s.scale_row_stride,
            "kMessageStride": s.message_stride,
            "kFP8MessageBytes": s.fp8_message_bytes,
            "kCombineSlotStride": s.combine_slot_stride,
            "kNumWords": EXCHANGE_WORDS,
            "kOffExchangeWords": self.exchange_words,
            "kOffExchangeFlags": self.exchange_flags,
            "kExchangeParityBytes": self.exchange_parity_bytes,
            "kOffParityBase": self.parity_base,
            "kParityBytes": self.parity_bytes,
            "kOffDispatchFlags": self.dispatch_flags,
            "kOffCombineFlags": self.combine_flags,
            "kOffDispatchCount": self.dispatch_count,
            "kOffDispatchRoute": self.dispatch_route,
            "kOffDispatchStaging": self.dispatch_staging,
            "kOffCombineStaging": self.combine_staging,
            "kOffSendBuffer": self.send_buffer,
            "kOffRouteStaging": self.route_staging,
            "kOffCombineSendStaging": self.combine_send_staging,
            "kCombineSendRows": self.combine_send_rows,
        }
