"""Engines run the four halves of a low-latency call for one rank.

``KernelEngine`` launches the CUDA kernels; ``EmulatedEngine`` runs the same protocol (same byte
layout, sequence numbers, flags, masks and status codes) in PyTorch on the CPU, so the whole Buffer
API works, and is tested, on a machine without a GPU.
"""

from .base import Engine
from .emulated import EmulatedEngine
from .kernel import KernelEngine

__all__ = ["Engine", "EmulatedEngine", "KernelEngine"]
