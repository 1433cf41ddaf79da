"""``local``: R virtual ranks in one process, on one GPU (or on the CPU for the emulated engine).

Each rank gets its own region, allocated by PyTorch on the same device, and its own stream.  This is
how the multi-rank logic is tested without several GPUs, and it lets engine developers run their EP
code on one GPU.  Two ways to drive the ranks:

* hook mode: every rank's send half (which never waits), then every receive half, even on one
  stream; nothing needs to run concurrently.
* non-hook calls on the ranks' own streams, concurrently.  A receive waits for the other ranks'
  sends, so those kernels must be co-resident: a Buffer on this transport uses at most ``SMs / R``
  blocks per kernel by default, and the ranks' streams must not share a hardware queue, so set
  ``CUDA_DEVICE_MAX_CONNECTIONS`` to at least ``R + 1`` (up to 32) before CUDA starts (the default, 8,
  is too few beyond 7 ranks).  If they do share one, the bounded waits report a timeout; nothing hangs.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from ..errors import ArgumentError
from .base import Transport


def resolve_device(device) -> torch.device:
    """The device of a local group: ``device`` with its index filled in; by default the current GPU,
    or the CPU (emulated engines) where there is none."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class LocalWorld:
    """The regions of ``num_ranks`` virtual ranks; ``world.transport(r)`` is rank r's view."""

    def __init__(self, num_ranks: int, region_bytes: int, device: torch.device | str):
        if num_ranks < 1:
            raise ArgumentError(f"num_ranks must be >= 1, got {num_ranks}")
        self.num_ranks = num_ranks
        self.device = torch.device(device)
        self.regions = [torch.zeros(region_bytes, dtype=torch.uint8, device=self.device) for _ in range(num_ranks)]
        self.peer_bases = torch.tensor([r.data_ptr() for r in self.regions], dtype=torch.int64, device=self.device)
        self.streams = [torch.cuda.Stream(self.device) for _ in range(num_ranks)] if self.device.type == "cuda" else [None] * num_ranks
        if self.device.type == "cuda" and num_ranks + 1 > int(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8")):
            warnings.warn(f"{num_ranks} virtual ranks on concurrent streams need CUDA_DEVICE_MAX_CONNECTIONS >= {num_ranks + 1} "
                          "(set before CUDA starts); hook mode needs nothing", stacklevel=3)
        self._meeting = threading.Condition()
        self._arrived: dict = {}  # rendezvous key -> [ranks arrived, ranks left]

    def rendezvous(self, key, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until every virtual rank has called ``rendezvous(key)``, for
        ranks driven by one host thread each.  Returns False on a timeout (a rank that never comes,
        or ranks driven from one thread): the caller goes on, and its bounded device waits report
        what is missing.  Nothing is left broken: a later key starts afresh."""
        if self.num_ranks == 1:
            return True
        with self._meeting:
            entry = self._arrived.setdefault(key, [0, 0])
            entry[0] += 1
            if entry[0] >= self.num_ranks:
                self._meeting.notify_all()
            met = self._meeting.wait_for(lambda: entry[0] >= self.num_ranks, timeout_s)
            entry[1] += 1
            if entry[1] >= self.num_ranks:
                del self._arrived[key]
            return met

    def transport(self, rank: int) -> "LocalTransport":
        if not 0 <= rank < self.num_ranks:
            raise ArgumentError(f"rank must be in [0, {self.num_ranks}), got {rank}")
        return LocalTransport(self, rank)


class LocalTransport(Transport):
    kind = "local"
    colocated = True

    def __init__(self, world: LocalWorld, rank: int):
        self.world = world
        self.rank = rank
        self.num_ranks = world.num_ranks
        self.region = world.regions[rank]
        self.peer_bases = world.peer_bases  # every virtual rank sees the same addresses
        self.stream = world.streams[rank]

    def rendezvous(self, key, timeout_s: float) -> bool:
        """See :meth:`LocalWorld.rendezvous`."""
        return self.world.rendezvous(key, timeout_s)

    def peer_region(self, rank: int) -> torch.Tensor:
        """Rank ``rank``'s region (only the local transport can hand out peers' memory as tensors)."""
        return self.world.regions[rank]

    def barrier(self) -> None:
        # All virtual ranks are driven by this one host thread: there is nothing to wait for.
        return None
