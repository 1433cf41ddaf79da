"""lowlat: CUDA-graph-first low-latency expert-parallel dispatch/combine for MoE decoding.

    import lowlat
    buffer = lowlat.Buffer(group, max_tokens_per_rank=128, hidden=7168, num_experts=256, num_topk=8)
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(x, topk_idx)
    combined_x, event, hook = buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle)

Same semantics and tensor formats as DeepEP's low-latency mode (``lowlat.compat.deep_ep.Buffer``
takes DeepEP's own signatures), with device-side epochs instead of host-side buffer toggling, so
captured CUDA graphs replay correctly any number of times.
"""

from .buffer import Buffer, MemoryReport
from .errors import (ArgumentError, ArgumentTypeError, CompileError, DeviceError, GraphCaptureError, LowLatError,
                     LowLatencyTimeoutError, ProtocolError, RoutingError, StaleHandleError, TransportError, UnavailableError)
from .handle import DispatchHandle, EventOverlap, RecvHook
from .layout import BufferShape

__version__ = "0.1.0"

__all__ = [
    "ArgumentError", "ArgumentTypeError", "Buffer", "BufferShape", "CompileError", "DeviceError", "DispatchHandle",
    "EventOverlap", "GraphCaptureError", "LowLatError", "LowLatencyTimeoutError", "MemoryReport", "ProtocolError",
    "RecvHook", "RoutingError", "StaleHandleError", "TransportError", "UnavailableError",
]
