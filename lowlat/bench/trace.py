"""``python -m lowlat.bench.trace``: where one fused low-latency call spends its time, phase by phase.

The fused dispatch and combine kernels are built with ``kernels/trace.cuh`` on (``LOWLAT_TRACE=1``):
thread 0 of each block notes ``clock64()`` at numbered points, and every block prints its timeline
with its start and end on the global nanosecond timer.  The report gives the phases of block 0, of
the block that raised the flags (the last to count in) and of the block that finished last, the
kernel's span (first block's start to last block's end) and which block finished last.  This runs
EP1 (one rank owning every expert, DeepEP's test shape by default) eagerly, ``--calls`` times per
token count, reads the kernels' lines from the process's standard output and reports the median
cycles per phase, and microseconds at the device's SM clock (``clock64`` counts the cycles of one
SM; a clock below that rate makes the microseconds an underestimate).  A tool for kernel engineers:
the marks cost a few cycles each; the phases are exact within their block, and the global timer
aligns the blocks at its own resolution (a tie for "finished last" goes to the block printed first).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import tempfile

import torch

# What each point marks (point 0: the kernel's start, after the previous grid on the stream finished).
PHASES = {
    "dispatch": ("top-k staged", "sent", "counted in", "every flag seen", "row map built", "rows stored"),
    "combine": ("row map built", "sent", "counted in", "every flag seen", "tokens reduced"),
}
_LINE = re.compile(r"lowlat-trace (\w+) block (\d+)( last)?: ([-\d ]+?)(?: @ (\d+) (\d+))?$", re.MULTILINE)


def _lines(text: str):
    """(kernel, block, raised the flags, points 1..n, start ns or None, end ns or None) per trace line."""
    for match in _LINE.finditer(text):
        kernel, block, last, numbers, start, end = match.groups()
        if kernel in PHASES:
            points = [int(v) for v in numbers.split()][: len(PHASES[kernel])]
            yield kernel, int(block), bool(last), points, start and int(start), end and int(end)


def parse(text: str) -> dict[tuple[str, str], list[list[int]]]:
    """Timelines by (kernel, "block 0" or "last block"): each a list of cumulative cycles at points
    1..n from point 0.  A block that is both block 0 and the last one counts as the last block;
    other blocks' lines are left out (see :func:`finishing`)."""
    timelines: dict[tuple[str, str], list[list[int]]] = {}
    for kernel, block, last, points, _, _ in _lines(text):
        if last or block == 0:
            timelines.setdefault((kernel, "last block" if last else "block 0"), []).append(points)
    return timelines


def finishing(text: str) -> dict[str, dict]:
    """For the lines of one call: per kernel, its span in ns (the first block's start to the last
    block's end, on the global timer), which block finished last ("block 0", "last block": the one
    that raised the flags, or "another block") and that block's points."""
    found: dict[str, dict] = {}
    for kernel, block, last, points, start, end in _lines(text):
        if start is None:
            continue
        entry = found.setdefault(kernel, dict(start=start, end=-1))
        entry["start"] = min(entry["start"], start)
        if end > entry["end"]:
            entry.update(end=end, block=block, who="last block" if last else "block 0" if block == 0 else "another block",
                         points=points)
    for entry in found.values():
        entry["span_ns"] = entry.pop("end") - entry.pop("start")
    return found


def summarize(timelines: dict[tuple[str, str], list[list[int]]], clock_mhz: float) -> list[dict]:
    """One row per (kernel, block, phase): the median cycles spent between the previous point and this
    one, and the median cumulative cycles, with microseconds at ``clock_mhz``."""
    rows = []
    for (kernel, block), lines in sorted(timelines.items()):
        for p, phase in enumerate(PHASES[kernel]):
            step = statistics.median(line[p] - (line[p - 1] if p else 0) for line in lines)
            total = statistics.median(line[p] for line in lines)
            rows.append(dict(kernel=kernel, block=block, phase=phase, cycles=step, cumulative_cycles=total,
                             us=step / clock_mhz, cumulative_us=total / clock_mhz, calls=len(lines)))
    return rows


def _capture_stdout(fn) -> str:
    """Run ``fn`` with file descriptor 1 sent to a temporary file (device printf writes there when the
    device synchronises) and return what was written."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        return sink.read().decode(errors="replace")


def _inputs(tokens: int, hidden: int, experts: int, topk: int, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    f32 = dict(dtype=torch.float32, device="cpu")
    x = (torch.randn(tokens, hidden, generator=g, **f32) * 0.1).to(device=device, dtype=torch.bfloat16)
    topk_idx = torch.topk(torch.randn(tokens, experts, generator=g, **f32).abs(), topk, dim=-1).indices.to(device)
    weights = torch.rand(tokens, topk, generator=g, **f32).to(device)
    return x, topk_idx, weights


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowlat.bench.trace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,128", help="token counts (comma-separated)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=288)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--calls", type=int, default=20, help="traced calls per token count (after 3 untraced-in-the-report warm-ups)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("lowlat.bench.trace times the CUDA kernels' phases: it needs an NVIDIA GPU, and this machine has none.")
        return 2
    os.environ["LOWLAT_TRACE"] = "1"  # read when a Buffer builds its kernel config
    import lowlat

    token_list = [int(t) for t in args.tokens.split(",")]
    device = torch.device("cuda", torch.cuda.current_device())
    (buffer,) = lowlat.Buffer.local_group(1, device=device, max_tokens_per_rank=max(token_list), hidden=args.hidden,
                                          num_experts=args.experts, num_topk=args.topk)
    from cuda.bindings import driver

    err, khz = driver.cuDeviceGetAttribute(driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CLOCK_RATE, device.index)
    clock_mhz = khz / 1000 if not err else 1980.0
    name = torch.cuda.get_device_name(device)
    print(f"phase trace of the fused kernels on one {name} (EP1, hidden {args.hidden}, {args.experts} experts, top-{args.topk}, "
          f"FP8 dispatch, bf16 combine); median over {args.calls} eager calls; us at {clock_mhz:.0f} MHz")
    for i, tokens in enumerate(token_list):
        x, topk_idx, weights = _inputs(tokens, args.hidden, args.experts, args.topk, device, seed=i)

        def call():
            (data, scales), _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, use_fp8=True)
            y = (data.float().unflatten(-1, (-1, 128)) * scales.float().unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
            buffer.low_latency_combine(y, topk_idx, weights, handle)
            torch.cuda.synchronize(device)  # one call at a time: no phase overlaps the previous call's

        for _ in range(3):
            _capture_stdout(call)
        texts = [_capture_stdout(call) for _ in range(args.calls)]
        buffer.synchronize()
        timelines = parse("".join(texts))
        ends = [finishing(text) for text in texts]
        for kernel in PHASES:
            timelines[(kernel, "finishing last")] = [end[kernel]["points"] for end in ends if kernel in end]
        print(f"T={tokens}")
        for row in summarize({key: lines for key, lines in timelines.items() if lines}, clock_mhz):
            print(f"  {row['kernel']:>8} {row['block']:>14}  {row['phase']:<16} {row['us']:7.2f} us  (to here {row['cumulative_us']:6.2f} us, "
                  f"{row['cycles']:.0f} cycles)")
        for kernel in PHASES:
            spans = [end[kernel]["span_ns"] / 1000 for end in ends if kernel in end]
            if spans:
                who = collections.Counter(end[kernel]["who"] for end in ends if kernel in end)
                print(f"  {kernel:>8} span, first block's start to last block's end (global timer): {statistics.median(spans):.2f} us; "
                      "finished last: " + ", ".join(f"{name} {count}x" for name, count in who.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(run())
