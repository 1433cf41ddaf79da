"""What every lowlat kernel launch needs to know about its rank, gathered in one object."""

from __future__ import annotations

import dataclasses
import struct

import torch

from ..jit import ArgKind, KernelSpec, Param, get_kernel
from ..jit.launch import LaunchPlan
from ..jit.spec import RANK_ARGS_BYTES
from ..layout import RegionLayout

# The parameter that ends every kernel's signature: the RankArgs struct of kernels/rank.cuh, by value.
RANK_PARAM = Param("rank", ArgKind.RANK)
# Its byte layout: peer_bases, state, mask, status (pointers), timeout_ns (int64), id, reserved (int32).
_RANK_ARGS = struct.Struct("<QQQQqii")
assert _RANK_ARGS.size == RANK_ARGS_BYTES


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything a kernel is specialised on: the region layout (all shapes), the block size, the
    flavour of ``kernels/transport.cuh`` (``"peer"``, or ``"nvshmem"`` with a put-staging layout), and
    whether every rank runs on this GPU (``peers_on_device``: virtual ranks or a group of one), which
    lets flags and fences use GPU scope instead of system scope (``kernels/rank.cuh`` peer_scope)."""

    layout: RegionLayout
    num_warps: int = 16
    transport: str = "peer"
    peers_on_device: bool = False
    trace: bool = False  # kernels/trace.cuh: fused kernels print per-phase SM cycles (for profiling only)

    def __post_init__(self):
        if self.peers_on_device and self.transport != "peer":
            raise ValueError(f"peers_on_device=True needs the peer transport flavour, got transport={self.transport!r}")

    def spec(self, header: str, kernel: str, signature, **flags) -> KernelSpec:
        constants = dict(self.layout.constants(), kNumWarps=self.num_warps, kPeersOnDevice=self.peers_on_device, kTrace=self.trace,
                         **flags)
        return KernelSpec.make(header, kernel, signature, constants, transport=self.transport)


@dataclasses.dataclass(frozen=True)
class RankArgsContext:
    """Device-side identity of one rank, what ``kernels/rank.cuh``'s RankArgs carries (both kernel
    families take it).

    ``peer_bases`` int64 [R] (device): base address of every rank's symmetric region;
    ``state`` int64 (device): the family's call counters, status copy and block counters;
    ``rank_mask`` int32 [R] (device): 1 for ranks excluded after a timeout;
    ``status`` int64 [1] (pinned host memory on a GPU, written by kernels): first error, 0 when none;
    ``num_blocks``: blocks of the kernels that spread over SMs.
    ``packed`` is the RankArgs struct, packed once from these.
    """

    rank: int
    peer_bases: torch.Tensor
    state: torch.Tensor
    rank_mask: torch.Tensor
    status: torch.Tensor
    timeout_ns: int
    num_blocks: int
    packed: bytes = dataclasses.field(init=False)

    def __post_init__(self):
        packed = pack_rank_args(self.peer_bases, self.state, self.rank_mask, self.status, self.timeout_ns, self.rank)
        object.__setattr__(self, "packed", packed)

    @property
    def device_index(self) -> int:
        return self.state.device.index


@dataclasses.dataclass(frozen=True)
class RankContext(RankArgsContext):
    """One rank of one low-latency Buffer: its RankArgs (``state`` int64 [16], see layout.StateWord),
    ``config``, everything its kernels are specialised on, and ``pdl``: whether its kernels launch
    with programmatic dependent launch (not for several virtual ranks of one process: they share the
    SMs, and a next kernel's early blocks could hold the room another rank's kernel needs to be
    resident; processes that share a GPU under MPS would have the same problem, without PDL too)."""

    config: KernelConfig = dataclasses.field(kw_only=True)
    pdl: bool = dataclasses.field(default=False, kw_only=True)

    @property
    def layout(self) -> RegionLayout:
        return self.config.layout

    def plan(self, spec: KernelSpec, *, grid: int | None = None, block: int | None = None, resident: bool = False) -> LaunchPlan:
        """A launch plan of ``spec`` for this rank: every parameter but the trailing RankArgs is
        passed per launch, in signature order.  ``resident``: the grid is capped so that every block
        fits on the device at once (kernels whose blocks wait for each other)."""
        return plan_with_rank(get_kernel(spec), self.device_index, grid or self.num_blocks, block or self.config.num_warps * 32,
                              self.packed, resident=resident, pdl=self.pdl)


def pack_rank_args(peer_bases: torch.Tensor, state: torch.Tensor, mask: torch.Tensor, status: torch.Tensor, timeout_ns: int,
                   rank: int) -> bytes:
    """The 48 bytes of ``kernels/rank.cuh``'s RankArgs, every kernel family's last parameter."""
    return _RANK_ARGS.pack(peer_bases.data_ptr(), state.data_ptr(), mask.data_ptr(), status.data_ptr(), timeout_ns, rank, 0)


def plan_with_rank(kernel, device_index: int, grid: int, block: int, packed: bytes, *, resident: bool = False,
                   pdl: bool = False) -> LaunchPlan:
    """A plan of ``kernel`` whose every parameter is per-call except a trailing RankArgs (``packed``);
    ``resident`` caps the grid at what fits on the device at once; ``pdl``: programmatic dependent
    launch (the kernel must start with ``chain_after_previous_grid``)."""
    signature = kernel.signature
    has_rank = bool(signature) and signature[-1].kind is ArgKind.RANK
    per_call = signature[:-1] if has_rank else signature
    if resident:
        grid = max(1, min(grid, kernel.resident_blocks(device_index, block)))
    placeholders = tuple(_PLACEHOLDERS.get(p.kind, 0) for p in per_call)  # overwritten by every launch
    return kernel.plan(device_index, grid, block, placeholders + ((packed,) if has_rank else ()), variable=[p.name for p in per_call],
                       pdl=pdl)


_PLACEHOLDERS = {ArgKind.PTR: None, ArgKind.BOOL: False, ArgKind.F32: 0.0}


def unpack_rank_args(packed: bytes) -> dict:
    """The fields of a packed RankArgs (for tests)."""
    names = ("peer_bases", "state", "mask", "status", "timeout_ns", "id", "reserved")
    return dict(zip(names, _RANK_ARGS.unpack(packed)))
