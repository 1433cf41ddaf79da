"""Kernels that call NVSHMEM's device API: nvcc (relocatable device code) + nvJitLink, disk-cached.

NVRTC 13.0 cannot parse the headers of NVSHMEM 3.4.5 (the version PyTorch's CUDA 13 wheels pin), so
these kernels take a different road from the rest of lowlat, verified on an H100:

1. ``nvcc -arch=sm_XY -rdc=true -cubin -I<nvshmem>/include`` compiles the same generated translation
   unit as NVRTC does (``KernelSpec.source()``: ``Cfg`` + the header + the ABI check), plus one line
   that instantiates the kernel (nvcc has no NVRTC-style name expressions);
2. ``cuda.core.Linker`` (nvJitLink, never the driver's linker: CI has no driver) links that object
   with ``<nvshmem>/lib/libnvshmem_device.a`` into a loadable cubin;
3. after the cubin is loaded on a device, and once NVSHMEM runs in the process
   (:class:`lowlat.transport.nvshmem.NvshmemTransport`), ``nvshmem.core.library_init`` fills the
   module's copy of NVSHMEM's device state.  That is the *module-init hook* below.

The result is an ordinary :class:`~lowlat.jit.compiler.CompiledCubin` (a subclass carrying the hook),
so the one loader, :class:`lowlat.jit.launch.Kernel`, loads it.

Module-init hook (the loader's side of the contract)
----------------------------------------------------
``compiled.module_init`` is ``None`` for NVRTC cubins and a callable for NVSHMEM ones.  The loader
calls ``compiled.module_init(kernel, device_index)`` once per device, right after
``ObjectCode.get_kernel`` returned ``kernel`` (a ``cuda.core`` Kernel) on that device's current
context, before the first launch and never during graph capture (it raises
:class:`~lowlat.errors.GraphCaptureError` then).  It is idempotent.  It raises
:class:`~lowlat.errors.UnavailableError` when nvshmem4py is missing or NVSHMEM is not initialised
yet (create the transport first).  The loader keeps ``kernel`` (and so its library) alive as long as
it may launch it.

Cache key: generated source + every included ``kernels/`` header + nvcc flags + arch + nvcc version +
nvJitLink version + NVSHMEM version (and the device library's size); entries are written to a
temporary file and renamed into place, next to the NVRTC entries in ``$LOWLAT_CACHE_DIR/<arch>``.

Environment: ``LOWLAT_NVCC`` (the nvcc to use; default ``$CUDA_HOME/bin/nvcc``, then ``nvcc`` on
``PATH``), ``NVSHMEM_HOME`` (an NVSHMEM install with ``include/`` and ``lib/libnvshmem_device.a``;
default: the ``nvidia-nvshmem-cu13`` wheel, found through ``cuda.pathfinder``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import CompileError, GraphCaptureError, UnavailableError
from .compiler import CachingCompiler, CompiledCubin, cache_digest, capturing, disk_read, disk_write, kernel_dir
from .spec import KernelSpec

CACHE_FORMAT = 1
NVCC_TIMEOUT_S = 600

# The hook's type: (cuda.core Kernel just loaded, device ordinal) -> None.
ModuleInitHook = Callable[[object, int], None]


@dataclasses.dataclass(frozen=True)
class LinkedCubin(CompiledCubin):
    """A cubin linked against NVSHMEM's device library; ``module_init`` must run after loading."""

    module_init: Optional[ModuleInitHook] = None
    nvshmem_version: str = ""


@dataclasses.dataclass(frozen=True)
class NvshmemToolchain:
    """Where nvcc, NVSHMEM's device headers/library and nvJitLink are, and their versions."""

    nvcc: Path
    nvcc_version: str
    nvshmem_home: Path  # holds include/nvshmem.h and lib/libnvshmem_device.a
    nvshmem_version: str
    nvjitlink_version: str

    @property
    def include_dir(self) -> Path:
        return self.nvshmem_home / "include"

    @property
    def device_library(self) -> Path:
        return self.nvshmem_home / "lib" / "libnvshmem_device.a"

    def fingerprint(self) -> str:
        return ";".join([
            f"format={CACHE_FORMAT}", f"nvcc={self.nvcc_version}", f"nvjitlink={self.nvjitlink_version}",
            f"nvshmem={self.nvshmem_version}", f"libnvshmem_device.a={self.device_library.stat().st_size}",
            str(self.nvshmem_home),
        ])


# -- finding the tools ---------------------------------------------------------------------------

def find_nvcc() -> Path:
    """``$LOWLAT_NVCC``, else ``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on ``PATH``."""
    explicit = os.environ.get("LOWLAT_NVCC")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise UnavailableError(f"LOWLAT_NVCC={explicit!r} is not an executable nvcc")
        return Path(explicit)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.access(Path(home) / "bin" / "nvcc", os.X_OK):
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found is None:
        raise UnavailableError("nvcc not found (needed to compile NVSHMEM kernels: NVRTC 13.0 cannot parse NVSHMEM's "
                               "headers); install the CUDA toolkit's nvcc and put it on PATH, or set LOWLAT_NVCC or CUDA_HOME")
    return Path(found)


def nvcc_version(nvcc: Path) -> str:
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise UnavailableError(f"{nvcc} --version failed: {exc}") from None
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    if match is None:
        raise UnavailableError(f"cannot read the version of {nvcc}: {out.strip()!r}")
    return match.group(1)


def find_nvshmem_home() -> Path:
    """``$NVSHMEM_HOME``, else the ``nvidia-nvshmem-cu13`` wheel (``nvidia/nvshmem`` in site-packages)."""
    explicit = os.environ.get("NVSHMEM_HOME")
    if explicit:
        home = Path(explicit)
        origin = f"NVSHMEM_HOME={explicit!r}"
    else:
        try:
            from cuda.pathfinder import find_nvidia_header_directory

            include = find_nvidia_header_directory("nvshmem")
        except Exception:  # an old cuda.pathfinder that does not know NVSHMEM
            include = None
        if include is None:
            raise UnavailableError("NVSHMEM device headers not found: install the nvidia-nvshmem-cu13 wheel "
                                   "(pip install 'lowlat[nvshmem]'; PyTorch's CUDA 13 wheels bring it) or set NVSHMEM_HOME")
        home = Path(include).parent
        origin = f"the NVSHMEM wheel at {home}"
    for needed in (home / "include" / "nvshmem.h", home / "lib" / "libnvshmem_device.a"):
        if not needed.is_file():
            raise UnavailableError(f"{origin} has no {needed.relative_to(home)} (NVSHMEM's device headers and "
                                   "static device library are both needed)")
    return home


def nvshmem_version(home: Path) -> str:
    header = home / "include" / "non_abi" / "nvshmem_version.h"
    try:
        text = header.read_text()
    except OSError:
        raise UnavailableError(f"cannot read the NVSHMEM version from {header}") from None
    parts = [re.search(rf"#define\s+NVSHMEM_VENDOR_{p}_VERSION\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise UnavailableError(f"cannot read the NVSHMEM version from {header}")
    return ".".join(m.group(1) for m in parts)


def nvjitlink_version() -> str:
    """nvJitLink's version; raises if the library cannot be loaded (cuda.core would otherwise fall
    back to the driver's linker, which needs a GPU and cannot read NVSHMEM's archive the same way)."""
    try:
        from cuda.bindings import nvjitlink

        major, minor = nvjitlink.version()
        backend = _linker_backend()
    except Exception as exc:
        raise UnavailableError(f"nvJitLink is not available ({type(exc).__name__}: {exc}); install the "
                               "nvidia-nvjitlink wheel of the CUDA major version in use (pip install 'lowlat[nvshmem]')") from None
    if str(backend).lower() != "nvjitlink":
        raise UnavailableError(f"cuda.core would link with {backend!r}, not nvJitLink; install the nvidia-nvjitlink wheel")
    return f"{major}.{minor}"


def _linker_backend() -> str:
    from cuda.core import Linker

    return str(Linker.which_backend())


@functools.lru_cache(maxsize=None)
def _toolchain_cached(nvcc_env, cuda_home, path, nvshmem_home) -> NvshmemToolchain:
    nvcc = find_nvcc()
    home = find_nvshmem_home()
    return NvshmemToolchain(nvcc, nvcc_version(nvcc), home, nvshmem_version(home), nvjitlink_version())


def toolchain() -> NvshmemToolchain:
    """The NVSHMEM toolchain, or :class:`UnavailableError` naming the first missing piece."""
    env = os.environ
    return _toolchain_cached(env.get("LOWLAT_NVCC"), env.get("CUDA_HOME") or env.get("CUDA_PATH"), env.get("PATH"),
                             env.get("NVSHMEM_HOME"))


def unavailable_reason() -> str | None:
    """Why NVSHMEM kernels cannot be compiled here, or None when they can."""
    try:
        toolchain()
    except UnavailableError as exc:
        return str(exc)
    return None


# -- the module-init hook ------------------------------------------------------------------------

def nvshmem_module_init(kernel, device_index: int) -> None:
    """The module-init hook of every NVSHMEM cubin: ``nvshmem.core.library_init`` on the library
    that holds ``kernel`` (a ``cuda.core`` Kernel), once per library and NVSHMEM run."""
    if capturing():
        raise GraphCaptureError("an NVSHMEM kernel is being loaded while a CUDA graph is captured; "
                                "load (warm up) every kernel before capture")
    from ..transport.nvshmem import library_init

    library_init(kernel, device_index)


# -- the compiler --------------------------------------------------------------------------------

class NvshmemCompiler(CachingCompiler):
    """Compiles :class:`KernelSpec` s whose headers call NVSHMEM, for one architecture; thread-safe;
    caches on disk and in memory.  Raises :class:`UnavailableError` at construction when nvcc, the
    NVSHMEM wheel (headers + ``libnvshmem_device.a``) or nvJitLink is missing."""

    def __init__(self, arch: str | None = None, *, use_disk_cache: bool = True):
        self.tools = toolchain()
        super().__init__(arch, use_disk_cache)
        if not re.fullmatch(r"sm_\d+a?", self.arch):
            raise ValueError(f"arch must look like 'sm_90', got {self.arch!r}")

    def options(self) -> list[str]:
        """nvcc flags (besides the input and output files)."""
        return [
            f"-arch={self.arch}", "-rdc=true", "-cubin", "-std=c++17", "-O3",
            # IEEE division and no flush-to-zero, as for NVRTC.
            "-ftz=false", "-prec-div=true", "-prec-sqrt=true",
            f"-I{kernel_dir()}", f"-I{self.tools.include_dir}",
        ]

    @staticmethod
    def translation_unit(spec: KernelSpec) -> str:
        """``spec.source()`` plus an instantiation of the kernel (what NVRTC's name expression does)."""
        return (spec.source() +
                "\n// nvcc has no name expressions: taking the address instantiates the kernel.\n"
                f"static void* const lowlat_instantiate = reinterpret_cast<void*>(&{spec.name_expression});\n")

    def cache_key(self, spec: KernelSpec) -> str:
        return cache_digest(self.translation_unit(spec), self.arch, " ".join(self.options()), self.tools.fingerprint())

    def _compile_now(self, spec: KernelSpec) -> LinkedCubin:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lowlat-nvcc-") as folder:
            source_path, object_path = Path(folder) / "kernel.cu", Path(folder) / "kernel.cubin"
            source_path.write_text(self.translation_unit(spec))
            command = [str(self.tools.nvcc), *self.options(), "-o", str(object_path), str(source_path)]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise CompileError(f"nvcc ran past {NVCC_TIMEOUT_S} s on {spec.display_name}") from None
            if result.returncode != 0:
                raise CompileError(f"nvcc failed on {spec.display_name} for {self.arch} "
                                   f"(exit {result.returncode}):\n{result.stderr or result.stdout}")
            relocatable = object_path.read_bytes()
        cubin = self._link(spec, relocatable)
        mangled = kernel_symbol(cubin, spec.kernel)
        return LinkedCubin(spec, self.arch, cubin, mangled, time.perf_counter() - start, False,
                           module_init=nvshmem_module_init, nvshmem_version=self.tools.nvshmem_version)

    def _link(self, spec: KernelSpec, relocatable: bytes) -> bytes:
        from cuda.core import Linker, LinkerOptions, ObjectCode

        objects = [ObjectCode.from_cubin(relocatable, name=spec.display_name),
                   ObjectCode.from_library(str(self.tools.device_library), name="libnvshmem_device.a")]
        linker = Linker(*objects, options=LinkerOptions(arch=self.arch))
        try:
            return bytes(linker.link("cubin").code)
        except Exception as exc:
            try:
                log = linker.get_error_log()
            except Exception:
                log = ""
            raise CompileError(f"nvJitLink failed to link {spec.display_name} with {self.tools.device_library} "
                               f"for {self.arch}: {exc}\n{log}") from None
        finally:
            linker.close()

    # -- disk cache (compiler.disk_read / disk_write, as for NVRTC cubins) ---------------------------

    def _load(self, spec: KernelSpec, key: str) -> LinkedCubin | None:
        found = disk_read(spec, self.arch, key)
        if found is None:
            return None
        return LinkedCubin(spec, self.arch, found[0], found[1]["mangled_name"], 0.0, True,
                           module_init=nvshmem_module_init, nvshmem_version=self.tools.nvshmem_version)

    def _store(self, key: str, compiled: LinkedCubin) -> None:
        disk_write(compiled, key, linked_with=f"nvshmem {compiled.nvshmem_version}")


# -- finding the kernel in the linked cubin ------------------------------------------------------

_SHT_SYMTAB = 2
_STT_FUNC = 2
_STO_CUDA_ENTRY = 0x10


def entry_symbols(cubin: bytes) -> list[str]:
    """Names of the ``__global__`` functions (CUDA entry points) in an ELF cubin."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise CompileError("not a 64-bit ELF cubin")
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != _SHT_SYMTAB:
            continue
        strtab_offset = sections[link][4]
        for pos in range(offset, offset + size, entsize or 24):
            st_name, st_info, st_other = struct.unpack_from("<IBB", cubin, pos)
            if st_info & 0xF == _STT_FUNC and st_other & _STO_CUDA_ENTRY:
                end = cubin.index(b"\0", strtab_offset + st_name)
                names.append(cubin[strtab_offset + st_name:end].decode())
    return names


def _mangled_prefix(kernel: str) -> str:
    """Itanium-mangled prefix of ``kernel<Cfg>`` returning void: ``_ZN6lowlat4ringI3CfgEEv``."""
    parts = kernel.split("::")
    encoded = "".join(f"{len(p)}{p}" for p in parts)
    if len(parts) == 1:
        return f"_Z{encoded}I3CfgEv"
    return f"_ZN{encoded}I3CfgEEv"


def kernel_symbol(cubin: bytes, kernel: str) -> str:
    """The mangled name of ``kernel<Cfg>`` among the cubin's entry points (exactly one must match)."""
    prefix = _mangled_prefix(kernel)
    entries = entry_symbols(cubin)
    matches = [name for name in entries if name.startswith(prefix)]
    if len(matches) != 1:
        raise CompileError(f"expected one entry point {kernel}<Cfg> ({prefix}...) in the linked cubin, "
                           f"found {matches or 'none'} among {entries}")
    return matches[0]
