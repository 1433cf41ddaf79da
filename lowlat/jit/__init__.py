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

_compilers: dict[tuple[str, str], object] = {}
_kernels: dict[tuple[str, KernelSpec], Kernel] = {}
_lock = threading.Lock()


def default_compiler(arch: str | None = None, transport: str = "peer"):
    """The process's compiler for ``arch`` and a transport flavour (``KernelSpec.transport``): NVRTC
    for ``"peer"``, nvcc + nvJitLink for ``"nvshmem"`` (which raises UnavailableError naming what
    is missing)."""
    arch = arch or device_arch()
    with _lock:
        compiler = _compilers.get((arch, transport))
        if compiler is None:
            if transport == "nvshmem":
                from .nvcc import NvshmemCompiler

                compiler = NvshmemCompiler(arch)
            else:
                compiler = Compiler(arch)
            _compilers[arch, transport] = compiler
        return compiler


def get_kernel(spec: KernelSpec, arch: str | None = None) -> Kernel:
    """The loaded kernel for ``spec`` on the current GPU's architecture, compiling it if needed."""
    compiler = default_compiler(arch, spec.transport)
    key = (compiler.arch, spec)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = Kernel(compiler.compile(spec))
        with _lock:
            kernel = _kernels.setdefault(key, kernel)
    return kernel


def compile_all(specs, arch: str | None = None) -> list[CompiledCubin]:
    """Compile (or fetch from the caches) every specialisation in ``specs``; returns them in order.
    nvcc builds (separate processes) run in parallel, one per CPU core."""
    specs = list(dict.fromkeys(specs))
    compilers = [default_compiler(arch, spec.transport) for spec in specs]
    if sum(spec.transport == "nvshmem" for spec in specs) < 2:
        return [compiler.compile(spec) for compiler, spec in zip(compilers, specs)]
    import concurrent.futures
    import os

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda pair: pair[0].compile(pair[1]), zip(compilers, specs)))
