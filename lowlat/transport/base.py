"""The transport interface: a symmetric region per rank, a device array of peer base addresses, and
a host-side barrier.  How the peer addresses were obtained is the transport's business; kernels only
ever see ``peer_bases``."""

from __future__ import annotations

import abc
import socket

import torch


class Transport(abc.ABC):
    """One rank's view of a set of ranks that can write into each other's symmetric regions.

    ``region``: uint8 [region_bytes] tensor aliasing this rank's symmetric region (zero-filled at
    creation); ``peer_bases``: int64 [num_ranks] tensor on ``region.device`` holding every rank's
    region base address as seen from this rank (``peer_bases[rank]`` is ``region.data_ptr()``).
    """

    kind: str = "abstract"
    colocated: bool = False  # True when every rank runs on this one device (virtual ranks)
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

    def sub(self, offset: int, num_bytes: int) -> "SubTransport":
        """The same ranks over bytes ``[offset, offset + num_bytes)`` of every rank's region.

        Carving is local (no rendezvous): every rank must carve the same ranges in the same order,
        as it builds the same Buffers.  This is how one transport region hosts several Buffers."""
        return SubTransport(self, offset, num_bytes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, num_ranks={self.num_ranks}, region_bytes={self.region_bytes})"


class SubTransport(Transport):
    """A byte range of a parent transport's regions, on every rank (see :meth:`Transport.sub`)."""

    def __init__(self, parent: Transport, offset: int, num_bytes: int):
        from ..errors import ArgumentError

        if offset < 0 or num_bytes <= 0 or offset + num_bytes > parent.region_bytes or offset % 128:
            raise ArgumentError(f"cannot carve bytes [{offset}, {offset + num_bytes}) from a {parent.region_bytes}-byte region "
                                "(offsets are multiples of 128)")
        self.parent, self.offset = parent, offset
        self.kind, self.colocated = parent.kind, parent.colocated
        self.rank, self.num_ranks = parent.rank, parent.num_ranks
        self.region = parent.region[offset: offset + num_bytes]
        # 0 marks a peer reached by NVSHMEM puts (kernels/nvshmem_transport.cuh) and stays 0.
        self.peer_bases = torch.where(parent.peer_bases != 0, parent.peer_bases + offset, parent.peer_bases)
        self.stream = getattr(parent, "stream", None)
        if hasattr(parent, "rendezvous"):  # virtual ranks of one process (the local transport)
            self.rendezvous = parent.rendezvous

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def peer_region(self, rank: int) -> torch.Tensor:
        return self.parent.peer_region(rank)[self.offset: self.offset + self.region_bytes]

    def barrier(self) -> None:
        self.parent.barrier()


def host_identity() -> str:
    """Hostname plus the kernel's boot id: containers on different machines may share a hostname,
    never a boot id (processes in containers on one machine share it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot_id = handle.read().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"


def group_rank(group) -> int:
    """This process's rank in the torch.distributed ``group``; ArgumentError when it is not a member."""
    import torch.distributed as dist

    from ..errors import ArgumentError

    rank = dist.get_rank(group)
    if rank < 0:
        raise ArgumentError("this process is not a member of group (its rank in the group is -1)")
    return rank


def agree(group, what: str, value, problem: BaseException | None = None) -> bool:
    """Check, collectively over the torch.distributed ``group``, that every rank is ready and passes
    an equal ``value``: a rank that hit ``problem`` (an argument error, a missing package, a failed
    set-up) raises it, and every other rank raises a copy naming that rank, so that a mistake on one
    rank is an error everywhere and never a hang in a later collective; unequal values raise
    ArgumentError listing each rank's.  Returns whether every rank runs on this host."""
    import torch.distributed as dist

    from ..errors import ArgumentError

    group_rank(group)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (host_identity(), None if problem is not None else value, _portable(problem)), group=group)
    if problem is not None:
        raise problem
    failures = [(rank, failure) for rank, (_, _, failure) in enumerate(everyone) if failure is not None]
    if failures:
        rank, failure = failures[0]
        others = f" (and ranks {', '.join(str(r) for r, _ in failures[1:])})" if len(failures) > 1 else ""
        failure.args = (f"rank {rank}{others}: {failure}",) + tuple(failure.args[1:])
        raise failure
    values = [v for _, v, _ in everyone]
    if any(v != values[0] for v in values):
        detail = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise ArgumentError(f"{what} differs across ranks ({detail}); every rank must pass the same")
    return len({host for host, _, _ in everyone}) == 1


def _portable(problem: BaseException | None) -> BaseException | None:
    """``problem`` as the other ranks receive it: itself when it survives pickling, else a
    TransportError with its type and message."""
    if problem is None:
        return None
    import pickle

    from ..errors import TransportError

    try:
        copy = pickle.loads(pickle.dumps(problem))
    except Exception:  # noqa: BLE001 - any class that cannot be rebuilt from its args
        return TransportError(f"{type(problem).__name__}: {problem}")
    copy.__traceback__ = None
    return copy
