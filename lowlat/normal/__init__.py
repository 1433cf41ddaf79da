"""Normal (high-throughput, prefill) mode: DeepEP intranode dispatch/combine semantics on lowlat's
transports (``local`` virtual ranks, ``ipc`` processes).  Its own layout, state, kernels
(``kernels/normal_*.cuh``) and engines; nothing is shared with the low-latency Buffer but the
transports, the JIT and the error types.  See README.md beside this file."""

from .buffer import DEFAULT_NUM_SMS, NormalBuffer, NormalConfig, NormalHandle
from .layout import NormalLayout, NormalShape, region_bytes

__all__ = ["DEFAULT_NUM_SMS", "NormalBuffer", "NormalConfig", "NormalHandle", "NormalLayout", "NormalShape", "region_bytes"]
