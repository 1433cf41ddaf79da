"""Loading compiled cubins and launching them on PyTorch's current stream.

There is one launch path for every kernel in lowlat: a :class:`LaunchPlan`.  A plan is built once
(at Buffer construction): it converts every argument to the exact C type its
:class:`~lowlat.jit.spec.Param` declares, checks ranges, packs the values into one block of host
memory with the ``void*[]`` array ``cuLaunchKernel`` reads, and raises the dynamic shared-memory limit
when a kernel needs more than 48 KB.  A call then writes only the arguments that change (tensor
addresses, a token count) into their slots and launches the kernel's ``CUfunction`` on the raw
current stream (``cuLaunchKernel``, or ``cuLaunchKernelEx`` for programmatic dependent launch): a
few microseconds of host time, and a ``torch.cuda.graph`` capture records it like any other
kernel.  :meth:`Kernel.launch` is the one-off form (a plan built and launched at once).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Sequence

import numpy as np

from ..errors import ArgumentError, ArgumentTypeError, DeviceError
from .compiler import CompiledCubin
from .spec import RANK_ARGS_BYTES, ArgKind, Param

_INT_RANGES = {
    ArgKind.I32: (np.int32, -(2**31), 2**31 - 1),
    ArgKind.U32: (np.uint32, 0, 2**32 - 1),
    ArgKind.I64: (np.int64, -(2**63), 2**63 - 1),
    ArgKind.U64: (np.uint64, 0, 2**64 - 1),
}
# numpy type of each argument's slot in a packed plan (RANK is a raw 48-byte struct, see ops/context.py)
_SLOT_TYPES = {ArgKind.PTR: np.uint64, ArgKind.I32: np.int32, ArgKind.U32: np.uint32, ArgKind.I64: np.int64,
               ArgKind.U64: np.uint64, ArgKind.F32: np.float32, ArgKind.BOOL: np.uint8, ArgKind.RANK: np.uint8}
_SLOT_BYTES = 8  # every argument starts on an 8-byte boundary (RANK takes six slots)
_STATIC_SMEM_LIMIT = 48 * 1024
_thread_state = threading.local()


def ensure_context(device_index: int) -> None:
    """Make the device's primary context (the one PyTorch uses) current on this thread."""
    if getattr(_thread_state, "device", None) != device_index:
        from cuda.core import Device

        Device(device_index).set_current()
        _thread_state.device = device_index


_raw_stream = None  # raw_stream_getter(), resolved on first use


def current_stream_handle(device_index: int) -> int:
    """The raw ``cudaStream_t`` PyTorch considers current on ``device_index`` (capture streams too).
    The engine's launch path binds :func:`raw_stream_getter` once instead."""
    global _raw_stream
    if _raw_stream is None:
        _raw_stream = raw_stream_getter()
    return _raw_stream(device_index)


def raw_stream_getter():
    """PyTorch's ``device_index -> cudaStream_t`` of the current stream, as one callable."""
    import torch

    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is None:  # a CPU build of torch: nothing to launch on

        def getter(device_index: int) -> int:
            raise DeviceError(f"no CUDA stream on device {device_index}: this build of torch has no CUDA")
    return getter


def context_ready(device_index: int) -> bool:
    """Whether :func:`ensure_context` already ran for ``device_index`` on this thread (cheap)."""
    return getattr(_thread_state, "device", None) == device_index


def address(value: Any) -> int:
    """A pointer argument: a tensor's address, an int address, or None (null)."""
    if value is None:
        return 0
    if hasattr(value, "data_ptr"):
        return value.data_ptr()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise ArgumentTypeError(f"expected a tensor, an address or None, got {type(value).__name__}")


def _convert(param: Param, value: Any):
    kind = param.kind
    if kind is ArgKind.PTR:
        try:
            return address(value)
        except ArgumentTypeError as exc:
            raise ArgumentTypeError(f"kernel argument {param.name}: {exc}") from None
    if kind is ArgKind.F32:
        return np.float32(value)
    if kind is ArgKind.BOOL:
        return np.uint8(bool(value))
    if kind is ArgKind.RANK:
        raw = bytes(value)
        if len(raw) != RANK_ARGS_BYTES:
            raise ArgumentError(f"kernel argument {param.name}: expected {RANK_ARGS_BYTES} packed bytes, got {len(raw)}")
        return np.frombuffer(raw, dtype=np.uint8)
    ctype, low, high = _INT_RANGES[kind]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ArgumentTypeError(f"kernel argument {param.name}: expected an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise ArgumentError(f"kernel argument {param.name}={value} does not fit {ctype.__name__}")
    return ctype(value)


class Kernel:
    """A loaded kernel specialisation."""

    def __init__(self, compiled: CompiledCubin):
        self.compiled = compiled
        self.signature = compiled.spec.signature
        self._index = {p.name: i for i, p in enumerate(self.signature)}
        self._kernel = None
        self._initialised: set[int] = set()
        self._smem_set: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.compiled.spec.display_name

    def load(self, device_index: int):
        """Load the cubin and resolve the kernel on a device (set-up: do it before graph capture).

        Returns the context-independent ``CUkernel`` (plans launch the context's ``CUfunction``,
        :meth:`function`)."""
        from cuda.bindings import driver

        ensure_context(device_index)
        with self._lock:
            if self._kernel is None:
                from cuda.core import ObjectCode

                expr = self.compiled.spec.name_expression
                obj = ObjectCode.from_cubin(self.compiled.cubin, symbol_mapping={expr: self.compiled.mangled_name.encode()})
                self._object, self._kernel = obj, obj.get_kernel(expr)
            kernel = self._kernel
        # Resolve the per-context function now, so no lazy module load happens inside a capture.
        err, _ = driver.cuKernelGetFunction(kernel.handle)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise DeviceError(f"{self.name}: cannot load on device {device_index} ({err})")
        # Cubins linked against a device library (NVSHMEM: lowlat/jit/nvcc.py) bring a hook that binds
        # the library to the loaded module on this device.
        init = getattr(self.compiled, "module_init", None)
        if init is not None and device_index not in self._initialised:
            init(kernel, device_index)
            self._initialised.add(device_index)
        return kernel

    def function(self, device_index: int):
        """The ``CUfunction`` of this kernel in the device's primary context (loading it if needed).
        Plans launch it rather than the context-independent ``CUkernel``, which the driver would
        resolve to this function at every launch."""
        from cuda.bindings import driver

        kernel = self.load(device_index)
        err, function = driver.cuKernelGetFunction(kernel.handle)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise DeviceError(f"{self.name}: cannot load on device {device_index} ({err})")
        return function

    def _ensure_smem(self, kernel, device_index: int, shmem: int) -> None:
        if shmem <= _STATIC_SMEM_LIMIT or self._smem_set.get(device_index, 0) >= shmem:
            return
        from cuda.bindings import driver

        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        (err,) = driver.cuKernelSetAttribute(attr, shmem, kernel.handle, device_index)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise ArgumentError(f"{self.name}: cannot raise dynamic shared memory to {shmem} bytes ({err})")
        self._smem_set[device_index] = shmem

    def resident_blocks(self, device_index: int, block: int, shmem: int = 0) -> int:
        """How many blocks of ``block`` threads fit on the device at once (occupancy x SMs)."""
        from cuda.bindings import driver

        err, per_sm = driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.function(device_index), block, shmem)
        if not err:
            attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
            err, sms = driver.cuDeviceGetAttribute(attr, device_index)
        if err:
            raise DeviceError(f"{self.name}: cannot query occupancy on device {device_index} ({err!r})")
        return per_sm * sms

    def convert_args(self, args: Sequence[Any]) -> tuple:
        """Every argument converted and range-checked for its declared C type."""
        if len(args) != len(self.signature):
            names = ", ".join(p.name for p in self.signature)
            raise ArgumentError(f"{self.name} takes {len(self.signature)} arguments ({names}), got {len(args)}")
        return tuple(_convert(param, value) for param, value in zip(self.signature, args))

    def plan(self, device_index: int, grid: int | tuple, block: int | tuple, args: Sequence[Any], *, shmem: int = 0,
             variable: Sequence[str] = (), pdl: bool = False) -> "LaunchPlan":
        """A launch of this kernel with ``args`` packed now; the parameters named in ``variable`` are
        the ones :meth:`LaunchPlan.launch` takes per call, in that order.  ``pdl``: launch with
        programmatic dependent launch (see :class:`LaunchPlan`)."""
        kernel = self.load(device_index)
        self._ensure_smem(kernel, device_index, shmem)
        unknown = [name for name in variable if name not in self._index]
        if unknown:
            raise ArgumentError(f"{self.name} has no parameter {unknown[0]!r}")
        return LaunchPlan(self, self.function(device_index), device_index, grid, block, shmem, self.convert_args(args),
                          [self._index[name] for name in variable], pdl=pdl)

    def launch(self, grid: int | tuple, block: int | tuple, args: Sequence[Any], *, shmem: int = 0, device_index: int | None = None) -> None:
        """One-off launch on the current stream of ``device_index`` (default: the current device)."""
        import torch

        index = torch.cuda.current_device() if device_index is None else device_index
        self.plan(index, grid, block, args, shmem=shmem).launch()


def _dims(value) -> tuple[int, int, int]:
    dims = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


class LaunchPlan:
    """One kernel launch with its arguments packed in host memory, ready for ``cuLaunchKernel``.

    Every argument owns a 64-bit word of one ``uint64`` array (the 48-byte RankArgs six words);
    ``cuLaunchKernel`` reads them through an array of pointers built once.  ``launch_on`` writes the
    per-call arguments (declared at planning) as 64-bit words into their slots and launches:
    addresses and non-negative integers (a 32-bit or bool argument reads the low bytes,
    little-endian).  When the per-call arguments are the leading parameters, as in every lowlat
    kernel, that is one slice assignment.  The driver copies the arguments at launch time, so the slots may change right
    after.  Not thread-safe: one plan per caller.

    With ``pdl`` the launch goes through ``cuLaunchKernelEx`` with programmatic stream serialisation:
    the kernel may be scheduled while the previous kernel on the stream finishes, so it must wait
    (``griddepcontrol.wait``, kernels/common.cuh ``chain_after_previous_grid``) before reading anything
    that kernel wrote.  A stream capture records the edge as a programmatic one.
    """

    def __init__(self, kernel: Kernel, function, device_index: int, grid, block, shmem: int, converted: tuple,
                 variable: Sequence[int], *, pdl: bool = False):
        from cuda.bindings import driver

        self.kernel = kernel
        self.device_index = device_index
        self._function = function
        self._grid, self._block, self._shmem = _dims(grid), _dims(block), int(shmem)
        offsets, cursor = [], 0  # in 64-bit words
        for param in kernel.signature:
            offsets.append(cursor)
            size = RANK_ARGS_BYTES if param.kind is ArgKind.RANK else 8
            cursor += -(-size // _SLOT_BYTES) * (_SLOT_BYTES // 8)
        self._words = (ctypes.c_uint64 * max(cursor, 2))()
        base = ctypes.addressof(self._words)
        self._pointers = (ctypes.c_void_p * max(len(offsets), 1))(*[base + 8 * offset for offset in offsets])
        self._params = ctypes.addressof(self._pointers) if offsets else 0
        self._offsets = offsets
        for param, offset, value in zip(kernel.signature, offsets, converted):
            raw = bytes(value) if param.kind is ArgKind.RANK else np.asarray(value).tobytes()
            ctypes.memmove(base + 8 * offset, raw, len(raw))
        self._variable = tuple(offsets[i] for i in variable)
        self._leading = self._variable == tuple(range(len(self._variable)))  # words [0, n): one slice assignment
        self._num_variable = len(self._variable)
        self._launch_kernel = driver.cuLaunchKernel
        self._launch_ex = driver.cuLaunchKernelEx
        self._config = None
        self.use_pdl(pdl)

    def use_pdl(self, enabled: bool) -> None:
        """Launch with programmatic dependent launch (True) or with a plain ``cuLaunchKernel``."""
        from cuda.bindings import driver

        self.pdl = bool(enabled)
        if not self.pdl:
            self._config = None
            return
        attr = driver.CUlaunchAttribute()
        attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        config = driver.CUlaunchConfig()
        (config.gridDimX, config.gridDimY, config.gridDimZ), (config.blockDimX, config.blockDimY, config.blockDimZ) = self._grid, self._block
        config.sharedMemBytes = self._shmem
        config.attrs, config.numAttrs = [attr], 1
        self._config, self._config_grid = config, self._grid

    def launch(self, *values) -> None:
        """Launch on PyTorch's current stream of the plan's device with the per-call ``values``."""
        ensure_context(self.device_index)
        self.launch_on(current_stream_handle(self.device_index), *values)

    def launch_on(self, stream: int, *values, grid: int | None = None) -> None:
        """Launch on the raw stream handle ``stream``; ``values`` are the per-call arguments in the
        order planned, as ints (use :func:`address` for tensors); ``grid`` replaces the planned
        (1-D) grid for this launch.  The caller has made the device's context current on this
        thread (:func:`ensure_context`; a Buffer does it once per call)."""
        n = self._num_variable
        if len(values) != n:
            raise ArgumentError(f"{self.kernel.name}: this plan takes {n} per-call arguments, got {len(values)}")
        if self._leading:
            self._words[:n] = values
        else:
            words = self._words
            for offset, value in zip(self._variable, values):
                words[offset] = value
        config = self._config
        if config is not None:
            config.hStream = stream
            dims = self._grid if grid is None else (grid, 1, 1)
            if dims != self._config_grid:  # the config keeps the last grid: set it only when it changes
                (config.gridDimX, config.gridDimY, config.gridDimZ), self._config_grid = dims, dims
            (err,) = self._launch_ex(config, self._function, self._params, 0)
        else:
            (gx, gy, gz), (bx, by, bz) = self._grid if grid is None else (grid, 1, 1), self._block
            (err,) = self._launch_kernel(self._function, gx, gy, gz, bx, by, bz, self._shmem, stream, self._params, 0)
        if err:
            launcher = "cuLaunchKernelEx" if config is not None else "cuLaunchKernel"
            raise DeviceError(f"{self.kernel.name}: {launcher} failed ({err!r})")

    def argument(self, name: str):
        """The packed value of argument ``name`` (for tests and debugging): bytes for RankArgs, else an int."""
        index = self.kernel._index[name]
        kind = self.kernel.signature[index].kind
        address_ = ctypes.addressof(self._words) + 8 * self._offsets[index]
        if kind is ArgKind.RANK:
            return ctypes.string_at(address_, RANK_ARGS_BYTES)
        dtype = np.dtype(_SLOT_TYPES[kind])
        return np.frombuffer(ctypes.string_at(address_, dtype.itemsize), dtype=dtype)[0].item()
