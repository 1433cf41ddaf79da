"""``ipc``: one process per GPU on one node (or several processes sharing one GPU, for tests).

Each rank allocates its region with ``cudaMalloc``, exports it with ``cudaIpcGetMemHandle``, and the
handles are exchanged over the torch.distributed group (any backend; gloo works for processes that
share a GPU, where NCCL refuses).  Peers open each other's handles, so kernels store into peer memory
directly: over NVLink between GPUs, into the same HBM between processes on one GPU (whose contexts
time-slice: good for correctness, not for timing).
"""

from __future__ import annotations

import os

import torch

from ..errors import TransportError
from .base import Transport


def _check(result, what: str):
    from cuda.bindings import runtime

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != runtime.cudaError_t.cudaSuccess:
        raise TransportError(f"{what} failed: {err}")
    return values[0] if len(values) == 1 else values


class _DeviceMemory:
    """``__cuda_array_interface__`` over raw device memory, so torch can alias it without owning it."""

    def __init__(self, ptr: int, num_bytes: int):
        self.__cuda_array_interface__ = {"shape": (num_bytes,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None}


class IpcTransport(Transport):
    kind = "ipc"

    def __init__(self, group, region_bytes: int, device: torch.device | int | None = None):
        import torch.distributed as dist
        from cuda.bindings import runtime

        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        index = torch.cuda.current_device() if device is None else torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        self._device = torch.device("cuda", index)
        self._opened: list[int] = []
        self._ptr = 0
        with torch.cuda.device(index):
            _check(runtime.cudaSetDevice(index), "cudaSetDevice")
            self._ptr = _check(runtime.cudaMalloc(region_bytes), f"cudaMalloc({region_bytes})")
            _check(runtime.cudaMemset(self._ptr, 0, region_bytes), "cudaMemset")
            _check(runtime.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
            handle = _check(runtime.cudaIpcGetMemHandle(self._ptr), "cudaIpcGetMemHandle")
            mine = (bytes(handle.reserved), os.getpid(), region_bytes)
            everyone = [None] * self.num_ranks
            dist.all_gather_object(everyone, mine, group=group)
            bases = []
            for peer, (handle_bytes, pid, peer_bytes) in enumerate(everyone):
                if peer_bytes != region_bytes:
                    raise TransportError(f"rank {peer} has a {peer_bytes}-byte region, rank {self.rank} {region_bytes}: "
                                         "every rank must build its Buffer with the same shapes")
                if peer == self.rank:
                    bases.append(self._ptr)
                    continue
                peer_handle = runtime.cudaIpcMemHandle_t()
                peer_handle.reserved = handle_bytes
                ptr = _check(runtime.cudaIpcOpenMemHandle(peer_handle, runtime.cudaIpcMemLazyEnablePeerAccess),
                             f"cudaIpcOpenMemHandle(rank {peer}, pid {pid})")
                self._opened.append(int(ptr))
                bases.append(int(ptr))
            self.region = torch.as_tensor(_DeviceMemory(self._ptr, region_bytes), device=self._device)
            self.peer_bases = torch.tensor(bases, dtype=torch.int64, device=self._device)

    @property
    def device(self) -> torch.device:
        return self._device

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def close(self) -> None:
        from cuda.bindings import runtime

        for ptr in self._opened:
            runtime.cudaIpcCloseMemHandle(ptr)
        self._opened = []
        if self._ptr:
            runtime.cudaFree(self._ptr)
            self._ptr = 0

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
