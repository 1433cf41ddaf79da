"""Host side of ``kernels/nvshmem_ring.cuh``: the NVSHMEM transport's smoke test.

Each PE sends one message (and a header word) to the next PE of a ring through
``kernels/nvshmem_transport.cuh`` and receives one from the previous PE, with a bounded wait.  The
message words are :func:`ring_word` of (source PE, call number, index), so every rank knows exactly
what it must receive; a PE named ``silent_rank`` sends nothing, and its successor reports a timeout
naming it.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ArgumentError
from ..jit.spec import ArgKind, KernelSpec, Param

SIGNATURE = (
    Param("peer_bases", ArgKind.PTR), Param("region", ArgKind.PTR), Param("rank", ArgKind.I32),
    Param("silent_rank", ArgKind.I32), Param("received", ArgKind.PTR), Param("header", ArgKind.PTR),
    Param("state", ArgKind.PTR), Param("status", ArgKind.PTR), Param("timeout_ns", ArgKind.I64),
)
NUM_STATE_WORDS = 16  # kernels/state.cuh kNumStateWords
EXCHANGE_SEQ = 4  # kernels/state.cuh kExchangeSeq: the ring's call counter
STATUS_WORD = 5  # kernels/state.cuh kStatusWord: device copy of the first error
STATUS_TIMEOUT, STATUS_OVERRUN = 1, 2  # kernels/state.cuh StatusCode
_ALIGN = 128
MAX_MESSAGE_BYTES = 256 * 1024  # ring_word tells apart 65536 words


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Byte offsets of the ring's areas inside the symmetric region (see the header's comment)."""

    num_ranks: int
    message_bytes: int
    num_warps: int = 4

    def __post_init__(self):
        if self.num_warps < 1 or self.num_warps > 32:
            raise ArgumentError(f"num_warps must be in [1, 32], got {self.num_warps}")
        if not 1 <= self.num_ranks <= 256:
            raise ArgumentError(f"num_ranks must be in [1, 256] (ring_word encodes the source in 8 bits), got {self.num_ranks}")
        if self.message_bytes > MAX_MESSAGE_BYTES:
            raise ArgumentError(f"message_bytes must be at most {MAX_MESSAGE_BYTES}, got {self.message_bytes}")
        if self.message_bytes <= 0 or self.message_bytes % (16 * self.num_warps):
            raise ArgumentError(f"message_bytes must be a positive multiple of {16 * self.num_warps} "
                                f"(16 bytes per warp slice), got {self.message_bytes}")

    @property
    def flag_bytes(self) -> int:
        return _align(8 * (self.num_warps + 1))

    @property
    def off_send(self) -> int:
        return 0

    @property
    def off_recv(self) -> int:
        return _align(self.message_bytes)

    @property
    def off_header(self) -> int:
        return self.off_recv + 2 * _align(self.message_bytes)

    @property
    def off_flags(self) -> int:
        return self.off_header + _align(2 * 16)

    @property
    def region_bytes(self) -> int:
        return self.off_flags + 2 * self.flag_bytes

    def constants(self) -> dict[str, int]:
        return {"kNumRanks": self.num_ranks, "kMessageBytes": self.message_bytes, "kNumWarps": self.num_warps,
                "kOffSend": self.off_send, "kOffRecv": self.off_recv, "kOffHeader": self.off_header,
                "kOffFlags": self.off_flags, "kFlagBytes": self.flag_bytes}


def ring_spec(layout: RingLayout) -> KernelSpec:
    return KernelSpec.make("nvshmem_ring.cuh", "lowlat::nvshmem_ring", SIGNATURE, layout.constants(), transport="nvshmem")


def ring_word(rank: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """Host mirror of ``ring_word`` in the header: int64 tensor of uint32 values for ``index``."""
    i = index.to(torch.int64)
    return ((rank & 0xFF) << 24) | ((epoch & 0xFF) << 16) | (i & 0xFFFF)


def ring_header(rank: int, epoch: int) -> int:
    return 0xA5000000 | (rank << 16) | (epoch & 0xFFFF)


def decode_status(word: int) -> tuple[int, int, int]:
    """(code, rank, value) of a status word (code:8 | rank:24 | value:32)."""
    return word >> 56, (word >> 32) & 0xFFFFFF, word & 0xFFFFFFFF


class Ring:
    """Everything one PE needs to run the ring on a transport: the loaded kernel and its outputs
    (``received`` uint32-as-int32 [message_bytes / 4], ``header`` int32 [1], ``state`` int64
    [16], ``status`` int64 [1], all on the transport's device)."""

    def __init__(self, transport, layout: RingLayout, kernel, *, timeout_ns: int = 2_000_000_000):
        if layout.num_ranks != transport.num_ranks:
            raise ArgumentError(f"layout.num_ranks={layout.num_ranks} but the transport has {transport.num_ranks} ranks")
        if layout.region_bytes > transport.region_bytes:
            raise ArgumentError(f"the ring needs a {layout.region_bytes}-byte region, the transport has {transport.region_bytes}")
        device = transport.device
        self.transport, self.layout, self.kernel, self.timeout_ns = transport, layout, kernel, timeout_ns
        self.received = torch.zeros(layout.message_bytes // 4, dtype=torch.int32, device=device)
        self.header = torch.zeros(1, dtype=torch.int32, device=device)
        self.state = torch.zeros(NUM_STATE_WORDS, dtype=torch.int64, device=device)
        self.status = torch.zeros(1, dtype=torch.int64, device=device)

    def launch(self, silent_rank: int = -1) -> None:
        """Launch on the current stream (capturable: every per-call value lives on the device)."""
        t = self.transport
        self.kernel.launch(1, 32 * self.layout.num_warps,
                           (t.peer_bases, t.region, t.rank, silent_rank, self.received, self.header, self.state,
                            self.status, self.timeout_ns))

    def reset_status(self) -> None:
        """Clear the first-error word (device copy in ``state`` and the ``status`` mirror)."""
        self.state[STATUS_WORD] = 0
        self.status.zero_()

    def calls(self) -> int:
        return int(self.state[EXCHANGE_SEQ].item())

    def expected(self, epoch: int) -> tuple[torch.Tensor, int]:
        """What this PE must have received in call ``epoch`` (1-based): (words as int32, header)."""
        prev = (self.transport.rank - 1) % self.layout.num_ranks
        index = torch.arange(self.layout.message_bytes // 4)
        words = ring_word(prev, epoch, index).to(torch.int64)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        header = ring_header(prev, epoch)
        return words, header - 2**32 if header >= 2**31 else header
