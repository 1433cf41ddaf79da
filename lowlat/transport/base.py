"""The transport interface: a symmetric region per rank, a device array of peer base addresses, and
a host-side barrier.  How the peer addresses were obtained is the transport's business; kernels only
ever see ``peer_bases``."""

from __future__ import annotations

import abc

import torch


class Transport(abc.ABC):
    """One rank's view of a set of ranks that can write into each other's symmetric regions.

    ``region``: uint8 [region_bytes] tensor aliasing this rank's symmetric region (zero-filled at
    creation); ``peer_bases``: int64 [num_ranks] tensor on ``region.device`` holding every rank's
    region base address as seen from this rank (``peer_bases[rank]`` is ``region.data_ptr()``).
    """

    kind: str = "abstract"
    rank: int
    num_ranks: int
    region: torch.Tensor
    peer_bases: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.region.device

    @property
    def region_bytes(self) -> int:
        return self.region.numel()

    @abc.abstractmethod
    def barrier(self) -> None:
        """Host-side barrier among the ranks (no device work is waited for)."""

    def close(self) -> None:
        """Release peer mappings and the region.  Idempotent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, num_ranks={self.num_ranks}, region_bytes={self.region_bytes})"
