"""``python -m lowlat.jit --check [--arch sm_90]``: compile every shipped kernel specialisation.

Runs without a GPU (NVRTC compiles for the named architecture); prints one line per kernel with its
compile time and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowlat.jit", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compile every shipped specialisation")
    parser.add_argument("--arch", default=None, help="target, e.g. sm_90 (default: the current GPU)")
    parser.add_argument("--use-cache", action="store_true", help="accept cubins from the disk cache")
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
    failures = 0
    for spec in specs:
        try:
            compiled = compiler.compile(spec)
        except Exception as exc:  # report every failure, not just the first
            failures += 1
            print(f"  FAIL  {spec.display_name}\n{exc}", flush=True)
            continue
        origin = "cached" if compiled.from_cache else f"{compiled.compile_seconds:6.2f} s"
        print(f"  ok  {origin:>9}  {len(compiled.cubin) / 1024:7.1f} KiB  {spec.display_name}", flush=True)
    total = time.perf_counter() - start
    print(f"lowlat.jit: {len(specs) - failures}/{len(specs)} compiled in {total:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
