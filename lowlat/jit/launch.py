"""Loading compiled cubins and launching them on PyTorch's current stream.

There is one launch path for every kernel in lowlat: :meth:`Kernel.launch`.  It converts each
argument to the exact C type its :class:`~lowlat.jit.spec.Param` declares (tensors to their address,
32-bit integers to ``numpy.int32``...), checks ranges, raises the dynamic shared-memory limit once
when a kernel needs more than 48 KB, and calls ``cuda.core.launch`` on the current stream, so a
``torch.cuda.graph`` capture records it like any other kernel.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from ..errors import ArgumentError, ArgumentTypeError
from .compiler import CompiledCubin
from .spec import ArgKind, Param

_INT_RANGES = {
    ArgKind.I32: (np.int32, -(2**31), 2**31 - 1),
    ArgKind.U32: (np.uint32, 0, 2**32 - 1),
    ArgKind.I64: (np.int64, -(2**63), 2**63 - 1),
    ArgKind.U64: (np.uint64, 0, 2**64 - 1),
}
_STATIC_SMEM_LIMIT = 48 * 1024
_thread_state = threading.local()


def _ensure_context(device_index: int) -> None:
    """Make the device's primary context (the one PyTorch uses) current on this thread."""
    if getattr(_thread_state, "device", None) != device_index:
        from cuda.core import Device

        Device(device_index).set_current()
        _thread_state.device = device_index


def _convert(param: Param, value: Any):
    kind = param.kind
    if kind is ArgKind.PTR:
        if value is None:
            return 0
        if hasattr(value, "data_ptr"):
            return value.data_ptr()
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        raise ArgumentTypeError(f"kernel argument {param.name}: expected a tensor, an address or None, got {type(value).__name__}")
    if kind is ArgKind.F32:
        return np.float32(value)
    if kind is ArgKind.BOOL:
        return np.bool_(bool(value))
    ctype, low, high = _INT_RANGES[kind]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ArgumentTypeError(f"kernel argument {param.name}: expected an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise ArgumentError(f"kernel argument {param.name}={value} does not fit {ctype.__name__}")
    return ctype(value)


class Kernel:
    """A loaded kernel specialisation, launchable on the current stream."""

    def __init__(self, compiled: CompiledCubin):
        self.compiled = compiled
        self.signature = compiled.spec.signature
        self._kernels: dict[int, Any] = {}  # per device ordinal
        self._smem_set: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.compiled.spec.display_name

    def load(self, device_index: int):
        """Load the cubin on a device (module loading is set-up: do it before graph capture)."""
        kernel = self._kernels.get(device_index)
        if kernel is None:
            from cuda.bindings import driver
            from cuda.core import ObjectCode

            _ensure_context(device_index)
            expr = self.compiled.spec.name_expression
            obj = ObjectCode.from_cubin(self.compiled.cubin, symbol_mapping={expr: self.compiled.mangled_name.encode()})
            kernel = obj.get_kernel(expr)
            # Resolve the per-context function now, so no lazy module load happens inside a capture.
            driver.cuKernelGetFunction(kernel.handle)
            with self._lock:
                kernel = self._kernels.setdefault(device_index, kernel)
        return kernel

    def _ensure_smem(self, kernel, device_index: int, shmem: int) -> None:
        if shmem <= _STATIC_SMEM_LIMIT or self._smem_set.get(device_index, 0) >= shmem:
            return
        from cuda.bindings import driver

        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        (err,) = driver.cuKernelSetAttribute(attr, shmem, kernel.handle, device_index)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise ArgumentError(f"{self.name}: cannot raise dynamic shared memory to {shmem} bytes ({err})")
        self._smem_set[device_index] = shmem

    def convert_args(self, args: Sequence[Any]) -> tuple:
        if len(args) != len(self.signature):
            names = ", ".join(p.name for p in self.signature)
            raise ArgumentError(f"{self.name} takes {len(self.signature)} arguments ({names}), got {len(args)}")
        return tuple(_convert(param, value) for param, value in zip(self.signature, args))

    def launch(self, grid: int | tuple, block: int | tuple, args: Sequence[Any], *, shmem: int = 0, stream=None) -> None:
        """Launch on ``stream`` (default: PyTorch's current stream) with typed ``args``."""
        import torch
        from cuda.core import LaunchConfig, launch

        device_index = torch.cuda.current_device()
        kernel = self.load(device_index)
        _ensure_context(device_index)
        self._ensure_smem(kernel, device_index, shmem)
        stream = torch.cuda.current_stream() if stream is None else stream
        config = LaunchConfig(grid=grid, block=block, shmem_size=shmem)
        launch(_StreamRef.of(stream), config, kernel, *self.convert_args(args))


class _StreamRef:
    """cuda.core ``Stream`` wrapping a torch stream's handle, cached per handle (no ownership)."""

    _cache: dict[int, object] = {}

    @classmethod
    def of(cls, stream):
        handle = int(stream.cuda_stream)
        ref = cls._cache.get(handle)
        if ref is None:
            from cuda.core import Stream

            ref = cls._cache.setdefault(handle, Stream.from_handle(handle))
        return ref
