"""Transports give each rank a symmetric region, a device array of peer base addresses and a barrier.

``local``: virtual ranks in one process (``LocalWorld``); ``ipc``: one process per GPU in a node,
through CUDA IPC handles (``IpcTransport``); ``nvshmem``: NVSHMEM PEs across GPUs and nodes
(``lowlat.transport.nvshmem.NvshmemTransport``, needs nvshmem4py).  Kernels only ever see the peer
addresses (and, on the NVSHMEM path, call NVSHMEM puts where a peer has none).
"""

from .base import SubTransport, Transport
from .local import LocalTransport, LocalWorld

__all__ = ["LocalTransport", "LocalWorld", "SubTransport", "Transport"]
