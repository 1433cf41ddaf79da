"""Static shapes of a NormalBuffer and the byte layout of its symmetric region (pure Python).

The single source of truth for normal mode's sizes and offsets: the ``kernels/normal_*.cuh`` kernels
receive them as ``Cfg`` constants (:meth:`NormalLayout.constants`) and the CPU engine reads and
writes the same bytes.  Nothing here is shared with the low-latency ``RegionLayout``.

Symmetric region of one rank (everything a peer may write into), two parity blocks, one per buffer
parity (the low bit of the normal-mode call counter, shared by dispatch and combine)::

    parity block p (p = 0, 1):
        flags    uint64 [R]             epoch flag per source rank (call number + 1)
        counts   int32  [R][R + L]      per source: tokens it sends to every rank [R],
                                        tokens it sends to each of this rank's local experts [L]
        staging  row    [R][T]          one row per (source rank, position among the tokens that
                                        source sends here); dispatch and combine share it

A staging row holds ``row_stride`` bytes::

    data     2H bytes     bf16 [H], or fp8 [H] in the first H bytes
    scales   4G bytes     fp32 [G] (G = H / 128), FP8 dispatch only
    topk     4K bytes     int32 [K] global expert index or -1 (dispatch; K = max_topk)
    weights  4K bytes     fp32 [K]
    source   4 bytes      int32 source token index (dispatch)

Why two parities are enough: rank A's call k+2 writes parity k&1 only after A's call k+1 received
from every rank B, and B sends call k+1 only after its own call k finished reading parity k&1.
"""

from __future__ import annotations

import dataclasses
import enum

from ..errors import ArgumentError
from ..layout import ExpertParallelShape

ALIGN = 128
MAX_RANKS = 32  # one lane per destination rank in the warp-level send loops
MAX_TOPK = 32
MAX_EXPERTS = 2048  # per-expert counters live in shared memory in the layout kernel


def align(value: int, to: int = ALIGN) -> int:
    return (value + to - 1) // to * to


class NormalWord(enum.IntEnum):
    """Words of the per-NormalBuffer device state (mirrors ``kernels/normal_common.cuh``)."""

    SEQ = 0  # normal-mode calls completed (dispatch and combine share the counter)
    STATUS = 1  # first error (device copy; the host reads a pinned mirror)
    BLOCKS_DONE = 2  # uint32 counters from here on, one per kernel (last-block detection)
    NUM_WORDS = 8


class NormalStatus(enum.IntEnum):
    """Codes of normal mode's status word (mirrors ``kernels/normal_common.cuh``)."""

    OK = 0
    TIMEOUT = 1  # rank = the late source
    OVERRUN = 2  # rank = a source two calls ahead (the ranks' call sequences differ)
    BAD_EXPERT = 3  # value = an expert index outside [-1, num_experts)
    RECV_OVERFLOW = 4  # value = rows received; more than the output holds (num_worst_tokens too small)


@dataclasses.dataclass(frozen=True)
class NormalShape(ExpertParallelShape):
    """Every static shape of a NormalBuffer.

    ``num_ranks`` R (at most 32), ``num_experts`` E (a multiple of R, at most 2048), ``hidden`` H
    (a multiple of 128), ``max_tokens_per_rank`` T (the most tokens one rank dispatches per call),
    ``max_topk`` K (the widest ``topk_idx`` a call may pass, at most 32).
    """

    num_ranks: int
    num_experts: int
    hidden: int
    max_tokens_per_rank: int
    max_topk: int = 16

    def __post_init__(self):
        self.check(("num_ranks", "num_experts", "hidden", "max_tokens_per_rank", "max_topk"), max_ranks=MAX_RANKS,
                   max_experts=MAX_EXPERTS)
        if self.max_topk > MAX_TOPK:
            raise ArgumentError(f"max_topk={self.max_topk} exceeds the supported maximum {MAX_TOPK}")
        if self.num_ranks * self.max_tokens_per_rank >= 2**31:
            raise ArgumentError(f"max_tokens_per_rank={self.max_tokens_per_rank} is too large for {self.num_ranks} ranks")

    @property
    def max_recv_tokens(self) -> int:
        """The most rows one rank can receive in a dispatch: every token of every rank, ``R * T``."""
        return self.num_ranks * self.max_tokens_per_rank


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Byte offsets inside one staging row."""

    data: int
    scales: int
    topk: int
    weights: int
    source: int
    stride: int

    @staticmethod
    def of(shape: NormalShape) -> "RowLayout":
        H, G, K = shape.hidden, shape.num_groups, shape.max_topk
        scales = 2 * H
        topk = scales + 4 * G
        weights = topk + 4 * K
        source = weights + 4 * K
        return RowLayout(0, scales, topk, weights, source, align(source + 4, 16))


@dataclasses.dataclass(frozen=True)
class NormalLayout:
    """Byte offsets inside one rank's normal-mode symmetric region (identical on every rank)."""

    shape: NormalShape
    row: RowLayout
    flags: int  # offsets relative to a parity block
    counts: int
    staging: int
    parity_bytes: int
    total_bytes: int

    @staticmethod
    def of(shape: NormalShape) -> "NormalLayout":
        R, L, T = shape.num_ranks, shape.num_local_experts, shape.max_tokens_per_rank
        row = RowLayout.of(shape)
        flags = 0
        counts = align(flags + 8 * R)
        staging = align(counts + 4 * R * (R + L))
        parity_bytes = align(staging + R * T * row.stride)
        total = align(2 * parity_bytes, 2**21)  # whole 2 MiB pages for IPC
        return NormalLayout(shape, row, flags, counts, staging, parity_bytes, total)

    @property
    def counts_width(self) -> int:
        """int32 words per source in the counts block: ``R + L``."""
        return self.shape.num_ranks + self.shape.num_local_experts

    def parity_offset(self, parity: int) -> int:
        return parity * self.parity_bytes

    def constants(self) -> dict[str, int]:
        """The ``Cfg`` members every normal-mode kernel of a NormalBuffer is compiled with."""
        s, r = self.shape, self.row
        return {
            "kNumRanks": s.num_ranks,
            "kNumExperts": s.num_experts,
            "kNumLocalExperts": s.num_local_experts,
            "kHidden": s.hidden,
            "kMaxTokens": s.max_tokens_per_rank,
            "kMaxTopk": s.max_topk,
            "kRowStride": r.stride,
            "kOffRowScales": r.scales,
            "kOffRowTopk": r.topk,
            "kOffRowWeights": r.weights,
            "kOffRowSource": r.source,
            "kOffFlags": self.flags,
            "kOffCounts": self.counts,
            "kOffStaging": self.staging,
            "kParityBytes": self.parity_bytes,
        }


def region_bytes(*, num_ranks: int, num_experts: int, hidden: int, max_tokens_per_rank: int, max_topk: int = 16) -> int:
    """Bytes of symmetric region one rank of a NormalBuffer of these shapes needs (a multiple of 2 MiB)."""
    return NormalLayout.of(NormalShape(num_ranks, num_experts, hidden, max_tokens_per_rank, max_topk)).total_bytes
