"""Transports give each rank a symmetric region, a device array of peer base addresses and a barrier.

``local``: virtual ranks in one process (``LocalWorld``); ``ipc``: one process per GPU in a node,
through CUDA IPC handles (``IpcTransport``).  Kernels only ever see the peer addresses.
"""

from .base import SubTransport, Transport
from .local import LocalTransport, LocalWorld

__all__ = ["LocalTransport", "LocalWorld", "SubTransport", "Transport"]
