"""Run-time compilation of lowlat's CUDA kernels (NVRTC via ``cuda.core``) and the one launch helper.

    spec = KernelSpec.make("dispatch.cuh", "lowlat::dispatch_send", SIGNATURE, constants)
    kernel = get_kernel(spec)           # compiles (or loads from cache) and returns a Kernel
    kernel.launch(grid, block, args)    # on torch.cuda.current_stream()

Environment: ``LOWLAT_CACHE_DIR`` (default ``~/.cache/lowlat``), ``LOWLAT_ARCH`` (default: the
current GPU), ``LOWLAT_KERNEL_DIR`` (default: the sources shipped with the package).
"""

from __future__ import annotations

import threading

from .compiler import CompiledCubin, Compiler, cache_dir, device_arch, kernel_dir
from .launch import Kernel
from .spec import ArgKind, KernelSpec, Param, params

__all__ = [
    "ArgKind", "CompiledCubin", "Compiler", "Kernel", "KernelSpec", "Param", "params",
    "cache_dir", "compile_all", "default_compiler", "device_arch", "get_kernel", "kernel_dir",
]

_compilers: dict[str, Compiler] = {}
_kernels: dict[tuple[str, KernelSpec], Kernel] = {}
_lock = threading.Lock()


def default_compiler(arch: str | None = None) -> Compiler:
    arch = arch or device_arch()
    with _lock:
        compiler = _compilers.get(arch)
        if compiler is None:
            compiler = _compilers[arch] = Compiler(arch)
        return compiler


def get_kernel(spec: KernelSpec, arch: str | None = None) -> Kernel:
    """The loaded kernel for ``spec`` on the current GPU's architecture, compiling it if needed."""
    compiler = default_compiler(arch)
    key = (compiler.arch, spec)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = Kernel(compiler.compile(spec))
        with _lock:
            kernel = _kernels.setdefault(key, kernel)
    return kernel


def compile_all(specs, arch: str | None = None) -> list[CompiledCubin]:
    """Compile (or fetch from the caches) every specialisation in ``specs``; returns them in order."""
    compiler = default_compiler(arch)
    return [compiler.compile(spec) for spec in dict.fromkeys(specs)]
