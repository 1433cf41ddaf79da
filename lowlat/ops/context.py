"""What every lowlat kernel launch needs to know about its rank, gathered in one object."""

from __future__ import annotations

import dataclasses

import torch

from ..jit import ArgKind, KernelSpec, Param, get_kernel
from ..layout import RegionLayout

# Parameters that end every kernel's signature, in this order.
RANK_PARAMS = (
    Param("rank", ArgKind.I32),
    Param("peer_bases", ArgKind.PTR),
    Param("state", ArgKind.PTR),
    Param("rank_mask", ArgKind.PTR),
    Param("status", ArgKind.PTR),
)
TIMEOUT_PARAM = Param("timeout_ns", ArgKind.I64)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything a kernel is specialised on: the region layout (all shapes) and the block size."""

    layout: RegionLayout
    num_warps: int = 16

    def spec(self, header: str, kernel: str, signature, **flags) -> KernelSpec:
        constants = dict(self.layout.constants(), kNumWarps=self.num_warps, **flags)
        return KernelSpec.make(header, kernel, signature, constants)


@dataclasses.dataclass(frozen=True)
class RankContext:
    """Device-side identity of one rank of one Buffer.

    ``peer_bases`` int64 [R] (device): base address of every rank's symmetric region;
    ``state`` int64 [16] (device): call sequence numbers and block counters (see layout.StateWord);
    ``rank_mask`` int32 [R] (device): 1 for ranks excluded after a timeout;
    ``status`` int64 [1] (pinned host memory, written by kernels): first error, 0 when none.
    """

    config: KernelConfig
    rank: int
    peer_bases: torch.Tensor
    state: torch.Tensor
    rank_mask: torch.Tensor
    status: torch.Tensor
    timeout_ns: int
    num_blocks: int

    @property
    def layout(self) -> RegionLayout:
        return self.config.layout

    def rank_args(self) -> tuple:
        return (self.rank, self.peer_bases, self.state, self.rank_mask, self.status)

    def launch(self, spec: KernelSpec, args: tuple, *, grid: int | None = None, block: int | None = None) -> None:
        get_kernel(spec).launch(grid or self.num_blocks, block or self.config.num_warps * 32, args)
