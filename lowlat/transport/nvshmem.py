"""``nvshmem``: one NVSHMEM PE per rank of a torch.distributed group, across GPUs and nodes.

NVSHMEM is started by unique id: group rank 0 creates the id, the group broadcasts it (any backend:
gloo works for several processes on one GPU, where NCCL refuses), and every rank calls
``nvshmem.core.init(..., initializer_method="uid")`` with PE = its group rank.  The symmetric region
comes from NVSHMEM's heap (``nvshmem_malloc``, collective), so peers that are not reachable by
pointer can still be written with device-initiated puts (IBGDA over InfiniBand/RoCE).

``peer_bases[p]`` is ``nvshmem_ptr(region, p)`` (the peer's region mapped into this process: NVLink
or the same GPU) or 0 where NVSHMEM has no pointer to it, or for every other rank when
``nvlink=False``: kernels built on ``kernels/nvshmem_transport.cuh`` use plain stores where it is
non-zero and NVSHMEM puts where it is 0.  ``peer_bases[rank]`` is always this rank's own region.

NVSHMEM runs once per process: a second transport in the same process must be built over the same
ranks (it allocates another symmetric region); the runtime is finalised when the last one closes.

Environment (set here only when unset, before NVSHMEM starts): ``NVSHMEM_DISABLE_NVLS=1`` (lowlat
never uses NVLink multicast); ``NVSHMEM_REMOTE_TRANSPORT=none`` when every rank is on one host, else
``NVSHMEM_IB_ENABLE_IBGDA=1`` (puts from the GPU, not through NVSHMEM's CPU proxy);
``NVSHMEM_SYMMETRIC_SIZE`` large enough for the region when the default 1 GiB is not.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from ..errors import ArgumentError, GraphCaptureError, TransportError, UnavailableError
from .base import Transport, agree
from .ipc import _DeviceMemory

_DEFAULT_HEAP_BYTES = 1 << 30  # NVSHMEM_SYMMETRIC_SIZE's default
_HEAP_SLACK_BYTES = 64 << 20  # NVSHMEM's own symmetric allocations (teams, signals)
_STATUS_IS_INITIALIZED, _STATUS_INVALID = 2, 32767  # nvshmem InitStatus values


def nvshmem_core():
    """``nvshmem.core`` (nvshmem4py), or :class:`UnavailableError` saying how to get it."""
    try:
        import nvshmem.bindings  # noqa: F401
        import nvshmem.core
    except ImportError as exc:
        raise UnavailableError(f"the nvshmem transport needs nvshmem4py ({exc}); install it with "
                               "pip install 'lowlat[nvshmem]' (nvshmem4py-cu13 for CUDA 13)") from None
    return nvshmem.core


class _Runtime:
    """Process-wide NVSHMEM state: who started it, how many transports use it, which kernel
    libraries were initialised in this run (``generation`` counts runs)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.users = 0
        self.ranks: tuple[int, ...] | None = None  # global ranks of the group NVSHMEM was started over
        self.device_index = -1
        self.generation = 0
        self.libraries: set[tuple[int, int, int]] = set()


_runtime = _Runtime()


def _initialized(core) -> bool:
    status = int(core.init_status())
    return _STATUS_IS_INITIALIZED <= status < _STATUS_INVALID


def library_init(kernel, device_index: int) -> None:
    """Run ``nvshmem.core.library_init`` on the library holding ``kernel`` (a loaded ``cuda.core``
    Kernel of an NVSHMEM-linked cubin), once per library and NVSHMEM run.  The module-init hook of
    :mod:`lowlat.jit.nvcc` calls this."""
    core = nvshmem_core()
    from cuda.bindings import driver
    from cuda.core import Device

    with _runtime.lock:
        if _runtime.users == 0 or not _initialized(core):
            raise UnavailableError("NVSHMEM is not running in this process: create the NvshmemTransport before "
                                   "loading a kernel linked against NVSHMEM's device library")
        if device_index != _runtime.device_index:
            raise ArgumentError(f"device_index={device_index}: NVSHMEM runs on device {_runtime.device_index} "
                                "in this process")
        err, library = driver.cuKernelGetLibrary(kernel.handle)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise TransportError(f"cuKernelGetLibrary failed: {err}")
        key = (int(library), device_index, _runtime.generation)
        if key in _runtime.libraries:
            return
        Device(device_index).set_current()
        try:
            core.library_init(core.NvshmemKernelObject.from_handle(int(library)))
        except Exception as exc:
            raise TransportError(f"nvshmem.core.library_init failed on a kernel library: {exc}") from None
        _runtime.libraries.add(key)


def agree_on_region(group, region_bytes: int) -> bool:
    """Check, before NVSHMEM starts (so that a mismatch is an error, not a hang in a collective
    allocation), that every rank of ``group`` asks for the same ``region_bytes``; returns whether
    all ranks run on one host.  Collective over ``group``."""
    return agree(group, "region_bytes", region_bytes)


def _uid_from_bytes(core, payload: bytes):
    uid = core.get_unique_id(empty=True)
    ctypes.memmove(uid.ptr, payload, len(payload))
    return uid


class NvshmemTransport(Transport):
    """One rank's NVSHMEM PE and symmetric region.

    ``group``: the torch.distributed group, None for the default one (rank r of the group is PE r); ``region_bytes``: size of
    the symmetric region, equal on every rank; ``nvlink``: use pointers (``nvshmem_ptr``) for the
    peers NVSHMEM can map; False forces NVSHMEM puts to every other rank (testing the put path on
    one node).  ``device``: the CUDA device (default: the current one).  Collective: every rank of
    the group constructs it, and later calls ``close()``, in the same order.
    """

    kind = "nvshmem"

    def __init__(self, group, region_bytes: int, *, nvlink: bool = True, device: torch.device | int | None = None):
        import torch.distributed as dist

        if isinstance(region_bytes, bool) or not isinstance(region_bytes, int) or region_bytes <= 0:
            raise ArgumentError(f"region_bytes must be a positive int, got {region_bytes!r}")
        core = nvshmem_core()
        if not torch.cuda.is_available():
            raise UnavailableError("the nvshmem transport needs a CUDA device; this machine has none "
                                   "(torch.cuda.is_available() is False)")
        if torch.cuda.is_current_stream_capturing():
            raise GraphCaptureError("NvshmemTransport was created while a CUDA graph is being captured; create it before capture")
        self.group = group = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.nvlink = bool(nvlink)
        if device is None:
            index = torch.cuda.current_device()
        else:
            device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            if device.type != "cuda":
                raise ArgumentError(f"device must be a CUDA device, got {device}")
            index = torch.cuda.current_device() if device.index is None else device.index
        self._device = torch.device("cuda", index)
        self._buffer = None
        self._closed = True

        one_host = agree_on_region(group, region_bytes)

        with torch.cuda.device(index):
            self._start(core, dist, region_bytes, one_host)
            self._closed = False
            try:
                pe, num_pes = core.my_pe(), core.n_pes()
                if (pe, num_pes) != (self.rank, self.num_ranks):
                    raise TransportError(f"NVSHMEM made this rank PE {pe} of {num_pes}, expected {self.rank} of {self.num_ranks}")
                self._allocate(core, dist, region_bytes)
            except BaseException:
                self._release_runtime(core)
                self._closed = True
                raise

    # -- set-up ---------------------------------------------------------------------------------

    def _start(self, core, dist, region_bytes: int, one_host: bool) -> None:
        ranks = tuple(dist.get_process_group_ranks(self.group))
        with _runtime.lock:
            if _runtime.users > 0:
                if ranks != _runtime.ranks or self._device.index != _runtime.device_index:
                    raise TransportError(f"NVSHMEM already runs in this process over global ranks {list(_runtime.ranks)} "
                                         f"on cuda:{_runtime.device_index}; a second NvshmemTransport must use the same "
                                         f"group and device (got ranks {list(ranks)} on {self._device})")
                _runtime.users += 1
                return
            os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
            if one_host:
                os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
            else:
                os.environ.setdefault("NVSHMEM_IB_ENABLE_IBGDA", "1")  # device-initiated RDMA, not the CPU proxy
            if "NVSHMEM_SYMMETRIC_SIZE" not in os.environ and region_bytes + _HEAP_SLACK_BYTES > _DEFAULT_HEAP_BYTES:
                heap = -(-(region_bytes + _HEAP_SLACK_BYTES) // (2 << 20)) * (2 << 20)
                os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(heap)
            from cuda.core import Device

            cuda_device = Device(self._device.index)
            cuda_device.set_current()
            uid = core.get_unique_id(empty=self.rank != 0)
            payload = [ctypes.string_at(uid.ptr, _uid_size(core)) if self.rank == 0 else None]
            dist.broadcast_object_list(payload, src=dist.get_global_rank(self.group, 0), group=self.group)
            if self.rank != 0:
                uid = _uid_from_bytes(core, payload[0])
            try:
                core.init(device=cuda_device, uid=uid, rank=self.rank, nranks=self.num_ranks, initializer_method="uid")
            except Exception as exc:
                raise TransportError(f"NVSHMEM failed to start on rank {self.rank} of {self.num_ranks} "
                                     f"({type(exc).__name__}: {exc}); run with NVSHMEM_DEBUG=INFO for its log") from None
            _runtime.users, _runtime.ranks, _runtime.device_index = 1, ranks, self._device.index
            _runtime.generation += 1

    def _allocate(self, core, dist, region_bytes: int) -> None:
        from nvshmem import bindings

        try:
            self._buffer = core.buffer(region_bytes)  # collective
        except Exception as exc:
            raise TransportError(f"nvshmem_malloc({region_bytes}) failed on rank {self.rank} ({exc}); raise "
                                 "NVSHMEM_SYMMETRIC_SIZE") from None
        base = int(self._buffer.handle)
        self.region = torch.as_tensor(_DeviceMemory(base, region_bytes), device=self._device)
        self.region.zero_()
        bases = []
        for pe in range(self.num_ranks):
            if pe == self.rank:
                bases.append(base)
            elif not self.nvlink:
                bases.append(0)
            else:
                bases.append(int(bindings.ptr(base, pe) or 0))
        self.peer_bases = torch.tensor(bases, dtype=torch.int64, device=self._device)
        torch.cuda.synchronize(self._device)
        dist.barrier(group=self.group)  # every region is zero before anyone may write into it

    # -- interface --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def pe(self) -> int:
        """This rank's NVSHMEM PE (the group rank)."""
        return self.rank

    @property
    def by_pointer(self) -> list[bool]:
        """Per rank: whether kernels reach it by pointer (else by NVSHMEM puts)."""
        return [bool(b) for b in self.peer_bases.tolist()]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def close(self) -> None:
        """Free the region and, with the last transport of the process, stop NVSHMEM.  Collective
        (nvshmem_free and nvshmem_finalize are); idempotent."""
        if self._closed:
            return
        self._closed = True
        core = nvshmem_core()
        with torch.cuda.device(self._device):
            torch.cuda.synchronize(self._device)
            if self._buffer is not None:
                self.region = torch.empty(0, dtype=torch.uint8, device=self._device)
                self.peer_bases = torch.empty(0, dtype=torch.int64, device=self._device)
                core.free(self._buffer)
                self._buffer = None
            self._release_runtime(core)

    def _release_runtime(self, core) -> None:
        with _runtime.lock:
            _runtime.users -= 1
            if _runtime.users == 0:
                _runtime.ranks, _runtime.device_index = None, -1
                _runtime.libraries.clear()
                core.finalize()

    def __repr__(self) -> str:
        return (f"NvshmemTransport(rank={self.rank}, num_ranks={self.num_ranks}, nvlink={self.nvlink}, "
                f"region_bytes={self.region_bytes if not self._closed else 0})")


def _uid_size(core) -> int:
    from nvshmem import bindings

    return bindings.uniqueid_dtype.itemsize
