"""NVRTC compilation of kernel specialisations through ``cuda.core``, with a disk and a memory cache.

Cache key: the generated translation unit, the text of every ``kernels/`` header it includes
(followed recursively), the compile options, the target architecture, the NVRTC version and the
versions of the header packages.  Entries are written to a temporary file and renamed into place, so
processes that compile the same kernel at once never see a half-written cubin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from ..errors import CompileError, GraphCaptureError, UnavailableError
from .spec import KernelSpec

CACHE_FORMAT = 1
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def kernel_dir() -> Path:
    """Folder of the CUDA sources: ``lowlat/_kernels`` in an installed wheel, ``kernels/`` beside the
    package in a source checkout (editable install), or ``$LOWLAT_KERNEL_DIR``."""
    override = os.environ.get("LOWLAT_KERNEL_DIR")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_kernels", package.parent / "kernels"):
        if (candidate / "abi.cuh").is_file():
            return candidate
    raise UnavailableError(f"cannot find lowlat's CUDA sources next to {package}")


def cache_dir() -> Path:
    return Path(os.environ.get("LOWLAT_CACHE_DIR") or Path.home() / ".cache" / "lowlat")


@functools.lru_cache(maxsize=None)
def header_dirs() -> tuple[str, ...]:
    """Include folders NVRTC needs for ``cuda_bf16.h`` / ``cuda_fp8.h`` (cudart) and ``cuda/std`` (CCCL)."""
    from cuda.pathfinder import find_nvidia_header_directory

    found = []
    for lib in ("cccl", "cudart"):
        path = find_nvidia_header_directory(lib)
        if path is None:
            cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
            candidate = Path(cuda_home) / "include"
            path = str(candidate / "cccl") if lib == "cccl" and (candidate / "cccl").is_dir() else str(candidate)
        found.append(path)
    return tuple(dict.fromkeys(found))


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


@functools.lru_cache(maxsize=None)
def _toolchain_fingerprint() -> str:
    versions = [f"nvrtc={nvrtc_version()}", f"format={CACHE_FORMAT}"]
    for dist in ("cuda-core", "nvidia-cuda-cccl", "nvidia-cuda-runtime"):
        try:
            versions.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist}=absent")
    versions.extend(header_dirs())
    return ";".join(versions)


@functools.lru_cache(maxsize=None)
def _pch_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"lowlat-pch-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def included_headers(source: str, root: Path) -> list[Path]:
    """Every ``#include "..."`` reachable from ``source`` inside ``root``, in first-seen order."""
    seen: dict[Path, None] = {}
    pending = list(_INCLUDE.findall(source))
    while pending:
        path = root / pending.pop(0)
        if path in seen or not path.is_file():
            continue
        seen[path] = None
        pending.extend(_INCLUDE.findall(path.read_text()))
    return list(seen)


def device_arch() -> str:
    """``sm_XY`` of the current CUDA device (``$LOWLAT_ARCH`` overrides)."""
    if os.environ.get("LOWLAT_ARCH"):
        return os.environ["LOWLAT_ARCH"]
    import torch

    if not torch.cuda.is_available():
        raise UnavailableError("no CUDA device: pass an explicit arch (e.g. 'sm_90') to compile without a GPU")
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


@dataclasses.dataclass(frozen=True)
class CompiledCubin:
    """A compiled specialisation: cubin bytes plus the mangled name of its kernel."""

    spec: KernelSpec
    arch: str
    cubin: bytes
    mangled_name: str
    compile_seconds: float  # 0.0 when it came from the disk cache
    from_cache: bool


_capture_probe = None  # resolved on first use: torch's own test, or "never" where CUDA is unavailable


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (set-up work must not happen then).
    Cheap enough for every call's host path: after the first call it is one call into torch."""
    probe = _capture_probe
    if probe is None:
        probe = _resolve_capture_probe()
    return probe()


def _resolve_capture_probe():
    import torch

    global _capture_probe
    _capture_probe = torch._C._cuda_isCurrentStreamCapturing if torch.cuda.is_available() else (lambda: False)
    return _capture_probe


def cache_digest(source: str, arch: str, options: str, toolchain: str) -> str:
    """The cache key: the translation unit, every kernels/ header it includes, options, arch, toolchain."""
    digest = hashlib.sha256()
    for part in (source, arch, options, toolchain):
        digest.update(part.encode())
        digest.update(b"\0")
    for header in included_headers(source, kernel_dir()):
        digest.update(header.name.encode() + b"\0" + header.read_bytes() + b"\0")
    return digest.hexdigest()


class CachingCompiler:
    """What every compiler shares: memory cache, disk cache, and no compiling during graph capture.
    Subclasses provide ``cache_key``, ``_compile_now``, ``_load`` and ``_store``."""

    arch: str
    use_disk_cache: bool

    def __init__(self, arch: str | None, use_disk_cache: bool):
        self.arch = arch or device_arch()
        self.use_disk_cache = use_disk_cache
        self._memory: dict[str, CompiledCubin] = {}
        self._lock = threading.Lock()

    def compile(self, spec: KernelSpec) -> CompiledCubin:
        key = self.cache_key(spec)
        cached = self._memory.get(key)
        if cached is not None:
            return cached
        if capturing():
            raise GraphCaptureError(
                f"{spec.display_name} is not compiled yet and a CUDA graph is being captured; "
                "call Buffer.warmup() (or run the call once eagerly) before capture"
            )
        if not self.use_disk_cache:
            compiled = self._compile_now(spec)
        else:
            compiled = self._load(spec, key)
            if compiled is None:
                # Ranks of one node start together and would all compile the same kernels: the first
                # to take the entry's lock compiles, the others wait for it and read its result (or
                # its failure, rather than each failing again in turn).
                waiting_since = time.time()
                with disk_lock(spec, self.arch, key):
                    compiled = self._load(spec, key)
                    if compiled is None:
                        failure = disk_failure(spec, self.arch, key, since=waiting_since)
                        if failure is not None:
                            raise CompileError(f"{spec.display_name}: another process failed to compile it just now:\n{failure}")
                        try:
                            compiled = self._compile_now(spec)
                        except CompileError as exc:
                            record_failure(spec, self.arch, key, str(exc))
                            raise
                        self._store(key, compiled)
        with self._lock:
            return self._memory.setdefault(key, compiled)


class Compiler(CachingCompiler):
    """Compiles :class:`KernelSpec` s for one architecture; thread-safe; caches on disk and in memory.

    (NVRTC holds the GIL here, so compiles run one after another; precompiled headers keep each short.)"""

    def __init__(self, arch: str | None = None, *, use_disk_cache: bool = True):
        # Import cuda.core here, in the constructing thread: its lazy sub-package import is not
        # safe to run from several compile threads at once.
        from cuda.core import Program, ProgramOptions

        self._program, self._program_options = Program, ProgramOptions
        _toolchain_fingerprint()  # likewise: resolve headers and the NVRTC version once, up front
        super().__init__(arch, use_disk_cache)

    def options(self):
        return self._program_options(
            arch=self.arch,
            std="c++17",
            include_path=[str(kernel_dir()), *header_dirs()],
            # Automatic precompiled headers: the first kernel of a family parses the CUDA headers
            # (~1 s), the next ones reuse them (~0.15 s).
            pch=True,
            pch_dir=str(_pch_dir()),
            # IEEE division and no flush-to-zero: the FP8 scales must match the reference bit for bit.
            ftz=False,
            prec_div=True,
            prec_sqrt=True,
        )

    def cache_key(self, spec: KernelSpec) -> str:
        return cache_digest(spec.source(), self.arch, repr(self.options()), _toolchain_fingerprint())

    def _compile_now(self, spec: KernelSpec) -> CompiledCubin:
        start = time.perf_counter()
        program = self._program(spec.source(), "c++", self.options())
        try:
            obj = program.compile("cubin", name_expressions=[spec.name_expression])
        except Exception as exc:  # cuda.core raises its own NVRTCError carrying the log
            raise CompileError(f"NVRTC failed on {spec.display_name} for {self.arch}:\n{exc}") from None
        mangled = obj.symbol_mapping[spec.name_expression]
        mangled = mangled.decode() if isinstance(mangled, bytes) else mangled
        return CompiledCubin(spec, self.arch, bytes(obj.code), mangled, time.perf_counter() - start, False)

    # -- disk cache -------------------------------------------------------------------------------

    def _load(self, spec: KernelSpec, key: str) -> CompiledCubin | None:
        found = disk_read(spec, self.arch, key)
        return None if found is None else CompiledCubin(spec, self.arch, found[0], found[1]["mangled_name"], 0.0, True)

    def _store(self, key: str, compiled: CompiledCubin) -> None:
        disk_write(compiled, key)


def _cache_paths(spec: KernelSpec, arch: str, key: str) -> tuple[Path, Path]:
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", spec.kernel.split("::")[-1])
    folder = cache_dir() / arch
    return folder / f"{stem}-{key[:32]}.cubin", folder / f"{stem}-{key[:32]}.json"


@contextlib.contextmanager
def disk_lock(spec: KernelSpec, arch: str, key: str):
    """An exclusive lock on the cache entry of ``key``, across processes and threads (``flock`` on a
    lock file beside the entry); no lock where the cache folder cannot be written, ``fcntl`` is
    missing or the file system has no locks."""
    fd = None
    try:
        import fcntl

        path = _cache_paths(spec, arch, key)[0].with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass  # compile without the lock, as before
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def record_failure(spec: KernelSpec, arch: str, key: str, message: str) -> None:
    """Leave the compile error of ``key`` beside its entry, for processes waiting on its lock."""
    path = _cache_paths(spec, arch, key)[0].with_suffix(".failed")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, message.encode())
    except OSError:
        pass


def disk_failure(spec: KernelSpec, arch: str, key: str, *, since: float) -> str | None:
    """The compile error another process recorded for ``key`` after ``since`` (a time.time()), or
    None: older records are from earlier runs, and are retried."""
    path = _cache_paths(spec, arch, key)[0].with_suffix(".failed")
    try:
        if path.stat().st_mtime < since:
            return None
        return path.read_text()
    except OSError:
        return None


def disk_read(spec: KernelSpec, arch: str, key: str) -> tuple[bytes, dict] | None:
    """``(cubin, metadata)`` of a complete cache entry for ``key``, or None."""
    cubin_path, meta_path = _cache_paths(spec, arch, key)
    try:
        meta = json.loads(meta_path.read_text())
        cubin = cubin_path.read_bytes()
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or len(cubin) != meta.get("size"):
        return None
    return cubin, meta


def disk_write(compiled: CompiledCubin, key: str, **extra) -> None:
    """Store a compiled cubin under ``key``; ``extra`` goes into its metadata."""
    cubin_path, meta_path = _cache_paths(compiled.spec, compiled.arch, key)
    meta = {"key": key, "size": len(compiled.cubin), "mangled_name": compiled.mangled_name,
            "kernel": compiled.spec.display_name, **extra}
    try:
        cubin_path.parent.mkdir(parents=True, exist_ok=True)
        # The cubin lands first and the metadata (which names its size) last: a reader that finds
        # the metadata finds a complete cubin.
        _atomic_write(cubin_path, compiled.cubin)
        _atomic_write(meta_path, json.dumps(meta).encode())
    except OSError:
        pass  # a read-only or full cache folder costs a recompile next time, nothing more


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
