"""``python -m lowlat.jit --check [--arch sm_90]``: compile every shipped kernel specialisation.

Runs without a GPU (NVRTC compiles for the named architecture); prints one line per kernel with its
compile time and exits non-zero if any fails.  The kernels that call NVSHMEM are compiled with nvcc
and linked with nvJitLink where nvcc, the NVSHMEM wheel and nvJitLink are present; otherwise the
check says plainly that it skipped them (``--require-nvshmem`` makes that a failure, as in CI).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowlat.jit", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compile every shipped specialisation")
    parser.add_argument("--arch", default=None, help="target, e.g. sm_90 (default: the current GPU)")
    parser.add_argument("--use-cache", action="store_true", help="accept cubins from the disk cache")
    parser.add_argument("--require-nvshmem", action="store_true",
                        help="fail (instead of skipping) when the NVSHMEM kernels cannot be compiled here")
    parser.add_argument("--no-nvshmem", action="store_true", help="skip the NVSHMEM kernels")
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return 2

    from .compiler import Compiler, nvrtc_version
    from .registry import shipped_specs

    compiler = Compiler(args.arch, use_disk_cache=args.use_cache)
    specs = shipped_specs()
    print(f"lowlat.jit: compiling {len(specs)} kernel specialisations for {compiler.arch} with NVRTC {nvrtc_version()}")
    start = time.perf_counter()
    failures = _compile_each(compiler, specs)
    total = time.perf_counter() - start
    print(f"lowlat.jit: {len(specs) - failures}/{len(specs)} compiled in {total:.1f} s")
    if not args.no_nvshmem:
        failures += _check_nvshmem(compiler.arch, args)
    return 1 if failures else 0


def _compile_each(compiler, specs, *, workers: int = 1) -> int:
    """Compile every spec (``workers`` at a time: nvcc runs as separate processes), printing one line
    each in order; returns the number of failures (every failure is reported, not just the first)."""
    import concurrent.futures

    def attempt(spec):
        try:
            return compiler.compile(spec), None
        except Exception as exc:
            return None, exc

    failures = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for spec, (compiled, exc) in zip(specs, pool.map(attempt, specs)):
            if exc is not None:
                failures += 1
                print(f"  FAIL  {spec.display_name}\n{exc}", flush=True)
                continue
            origin = "cached" if compiled.from_cache else f"{compiled.compile_seconds:6.2f} s"
            print(f"  ok  {origin:>9}  {len(compiled.cubin) / 1024:7.1f} KiB  {spec.display_name}", flush=True)
    return failures


def _check_nvshmem(arch: str, args) -> int:
    """Compile + link the NVSHMEM kernels; returns the number of failures (a skip counts as one
    only with --require-nvshmem)."""
    from .nvcc import NvshmemCompiler, unavailable_reason
    from .registry import shipped_nvshmem_specs

    specs = shipped_nvshmem_specs()
    reason = unavailable_reason()
    if reason is not None:
        verdict = "FAIL" if args.require_nvshmem else "skipped"
        print(f"lowlat.jit: {verdict}: {len(specs)} NVSHMEM kernel specialisations not compiled: {reason}")
        return 1 if args.require_nvshmem else 0
    compiler = NvshmemCompiler(arch, use_disk_cache=args.use_cache)
    tools = compiler.tools
    print(f"lowlat.jit: compiling {len(specs)} NVSHMEM kernel specialisations for {arch} with nvcc {tools.nvcc_version} "
          f"+ nvJitLink {tools.nvjitlink_version}, NVSHMEM {tools.nvshmem_version} ({tools.nvshmem_home})")
    start = time.perf_counter()
    failures = _compile_each(compiler, specs, workers=os.cpu_count() or 1)
    print(f"lowlat.jit: {len(specs) - failures}/{len(specs)} NVSHMEM kernels compiled and linked in "
          f"{time.perf_counter() - start:.1f} s")
    return failures


if __name__ == "__main__":
    sys.exit(main())
