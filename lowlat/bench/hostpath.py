"""``python -m lowlat.bench.hostpath``: where an eager call's host time goes.

Drives lowlat's DeepEP facade as ``--baseline deepep`` does (one process, one rank, DeepEP's test
shape, the same calls), mode by mode, and splits each call's host time into the driver calls it makes
(kernel launches, event records, stream waits, event queries; counted and timed by wrapping them)
and the rest (Python: checks, pools, handles).  It also times each kind of driver call alone, and
PyTorch's equivalents, on this host: what a launch or an event costs here bounds what any Python
host path can reach.  Timings are medians over bursts; the wrapping adds well under a microsecond
per driver call.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from typing import Callable

import torch

from ..jit.compiler import capturing
from ..jit.launch import LaunchPlan, current_stream_handle
from ..streams import RawEvent
from .timing import host_burst

DRIVER_CALLS = ((LaunchPlan, "launch_on", "launch"), (RawEvent, "record", "event record"), (RawEvent, "wait", "stream wait"),
                (RawEvent, "query", "event query"), (RawEvent, "synchronize", "event sync"))


class DriverClock:
    """While entered, counts and times every driver call of lowlat's host path (DRIVER_CALLS)."""

    def __init__(self, targets=DRIVER_CALLS):
        self.targets = targets
        self.counts: collections.Counter = collections.Counter()
        self.seconds: collections.Counter = collections.Counter()
        self._saved = []

    def __enter__(self) -> "DriverClock":
        for owner, name, label in self.targets:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._timed(original, label))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def _timed(self, original: Callable, label: str) -> Callable:
        counts, seconds, clock = self.counts, self.seconds, time.perf_counter

        def timed(*args, **kwargs):
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] += clock() - start
                counts[label] += 1
        return timed

    def per_call(self, calls: int) -> dict:
        """``{kind: (calls per call, us per call)}`` after ``calls`` calls."""
        return {label: (self.counts[label] / calls, self.seconds[label] / calls * 1e6) for label in self.counts}


def split(call: Callable[[], object], *, count: int, repeats: int, targets=DRIVER_CALLS) -> dict:
    """Host us per call of ``call`` and the driver calls' share of it, from bursts of ``count``
    calls that alternate between plain and wrapped (DriverClock), so that both see the same host
    speed (it drifts within a run).  ``rest`` is wrapped host time minus driver time, burst by burst:
    the Python around the driver calls.  Medians over ``repeats`` burst pairs, and per kind of driver
    call ``(calls per call, us per call)`` over all wrapped bursts."""
    clock = DriverClock(targets)
    plain, rest, driver = [], [], []
    for _ in range(repeats):
        plain.append(host_burst(call, count))
        before = sum(clock.seconds.values())
        with clock:
            wrapped = host_burst(call, count)
        spent = (sum(clock.seconds.values()) - before) / count * 1e6
        driver.append(spent)
        rest.append(wrapped - spent)
    return {"host": statistics.median(plain), "driver": statistics.median(driver), "rest": statistics.median(rest),
            "kinds": clock.per_call(count * repeats)}


def _median_us(call: Callable[[], object], *, count: int, repeats: int) -> float:
    return statistics.median(host_burst(call, count) for _ in range(repeats))


def bare_costs(device: torch.device, *, count: int = 200, repeats: int = 15) -> dict[str, float]:
    """Microseconds per call of each kind of driver call alone on this host, and PyTorch's equivalents."""
    index = device.index
    comm = torch.cuda.Stream(device)
    raw = RawEvent(index)
    raw.record(comm.cuda_stream)
    torch.cuda.synchronize(device)
    stream = current_stream_handle(index)
    event = torch.cuda.Event()
    event.record()
    return {
        "RawEvent.record (cuEventRecord)": _median_us(lambda: raw.record(comm.cuda_stream), count=count, repeats=repeats),
        "RawEvent.wait (cuStreamWaitEvent)": _median_us(lambda: raw.wait(stream), count=count, repeats=repeats),
        "RawEvent.query, done (cuEventQuery)": _median_us(raw.query, count=count, repeats=repeats),
        "torch current raw stream": _median_us(lambda: current_stream_handle(index), count=count, repeats=repeats),
        "capture probe (lowlat capturing())": _median_us(capturing, count=count, repeats=repeats),
        "torch.cuda.Event() + record": _median_us(lambda: torch.cuda.Event().record(), count=count, repeats=repeats),
        "torch Stream.wait_event": _median_us(lambda: torch.cuda.current_stream().wait_event(event), count=count, repeats=repeats),
        "torch.empty, 1 MiB": _median_us(lambda: torch.empty(2**20, dtype=torch.uint8, device=device), count=count, repeats=repeats),
    }


def launch_costs(device: torch.device, *, count: int = 200, repeats: int = 15) -> dict[str, float]:
    """Host microseconds per launch of an empty kernel, by launch flavour: through cuda-bindings with
    ``cuLaunchKernel`` (on the current stream, on another of torch's streams, on a non-blocking
    stream: a launch on the legacy default stream may cost the driver more) and with
    ``cuLaunchKernelEx`` (no attribute, and programmatic stream serialisation as lowlat's PDL plans
    set it), and ``cuLaunchKernel`` called through ctypes (what the Python binding's own
    conversion costs)."""
    import ctypes

    from cuda.bindings import driver
    from cuda.core import Program, ProgramOptions

    index = device.index
    major, minor = torch.cuda.get_device_capability(device)
    code = Program('extern "C" __global__ void lowlat_noop(int* p) { if (p) *p = 0; }', code_type="c++",
                   options=ProgramOptions(arch=f"sm_{major}{minor}")).compile("cubin")
    kernel = code.get_kernel("lowlat_noop")
    err, function = driver.cuKernelGetFunction(kernel.handle)
    assert not err, err
    stream = current_stream_handle(index)
    word = (ctypes.c_uint64 * 1)(0)
    params = (ctypes.c_void_p * 1)(ctypes.addressof(word))
    address = ctypes.addressof(params)

    def config(pdl: bool):
        cfg = driver.CUlaunchConfig()
        cfg.gridDimX = cfg.gridDimY = cfg.gridDimZ = 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = 32, 1, 1
        cfg.hStream = stream
        if pdl:
            attr = driver.CUlaunchAttribute()
            attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            cfg.attrs, cfg.numAttrs = [attr], 1
        return cfg

    plain_config, pdl_config = config(False), config(True)
    libcuda = ctypes.CDLL("libcuda.so.1")
    raw_launch = libcuda.cuLaunchKernel
    raw_launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    raw_launch.restype = ctypes.c_int
    raw_function = int(function)
    side = torch.cuda.Stream(device)  # a blocking stream of torch's pool, when the current stream is the legacy default one
    err, own = driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
    assert not err, err
    launches = {
        "cuLaunchKernel (cuda-bindings)": lambda: driver.cuLaunchKernel(function, 1, 1, 1, 32, 1, 1, 0, stream, address, 0),
        "  the same on another torch stream": lambda: driver.cuLaunchKernel(function, 1, 1, 1, 32, 1, 1, 0, side.cuda_stream, address, 0),
        "  the same on a non-blocking stream": lambda: driver.cuLaunchKernel(function, 1, 1, 1, 32, 1, 1, 0, own, address, 0),
        "cuLaunchKernelEx, no attribute": lambda: driver.cuLaunchKernelEx(plain_config, function, address, 0),
        "cuLaunchKernelEx, PDL attribute": lambda: driver.cuLaunchKernelEx(pdl_config, function, address, 0),
        "cuLaunchKernel (ctypes)": lambda: raw_launch(raw_function, 1, 1, 1, 32, 1, 1, 0, stream, address, None),
    }
    costs = {name: _median_us(call, count=count, repeats=repeats) for name, call in launches.items()}
    torch.cuda.synchronize(device)
    driver.cuStreamDestroy(own)
    return costs


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowlat.bench.hostpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=288)
    parser.add_argument("--topk", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("lowlat.bench.hostpath times the launch path of the CUDA kernels: it needs an NVIDIA GPU, and this machine has none.")
        return 2
    from ..compat import deep_ep
    from .versus import Session, _async, _hooked, _init_single_rank_group

    device = torch.device("cuda", torch.cuda.current_device())
    group = _init_single_rank_group()
    buffer = deep_ep.Buffer(group, num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(args.tokens, args.hidden, 1, args.experts),
                            low_latency_mode=True, explicitly_destroy=True)
    session = Session("lowlat", buffer, tokens=args.tokens, max_tokens=args.tokens, hidden=args.hidden, experts=args.experts,
                      topk=args.topk, seed=0)
    modes = {"dispatch": session.dispatch, "combine": session.combine,
             "dispatch + hook": _hooked(session, "dispatch"), "combine + hook": _hooked(session, "combine"),
             "dispatch async + wait": _async(session, "dispatch"), "combine async + wait": _async(session, "combine"),
             "eager step (d + c)": session.step}
    print(f"host path of lowlat's DeepEP facade on one {torch.cuda.get_device_name(device)}: EP1, T={args.tokens}, hidden {args.hidden}, "
          f"{args.experts} experts, top-{args.topk}, FP8 dispatch, bf16 combine; us per call (medians of 15 bursts of 40, "
          "plain and wrapped bursts alternating; the rest is wrapped time minus driver time, burst by burst)")
    with_pdl = [plan for inner in buffer._buffers.values() for plan in inner._engine.plans() if plan.pdl]
    if with_pdl:  # the plain calls again with plain launches, to price PDL's launch path
        modes.update({f"{mode}, PDL off": modes[mode] for mode in ("dispatch", "combine", "eager step (d + c)")})
    for mode, call in modes.items():
        pdl_off = mode.endswith("PDL off")
        if pdl_off:
            for plan in with_pdl:
                plan.use_pdl(False)
        part = split(call, count=40, repeats=15)
        if pdl_off:
            for plan in with_pdl:
                plan.use_pdl(True)
        detail = ", ".join(f"{label} {n:g}x {us:.1f}" for label, (n, us) in sorted(part["kinds"].items()))
        print(f"  {mode:<22} {part['host']:6.1f} us: driver calls {part['driver']:5.1f} us ({detail}); the rest {part['rest']:5.1f} us")
    print("each kind of call alone, us:")
    for name, us in bare_costs(device).items():
        print(f"  {name:<38} {us:6.2f}")
    print("one launch of an empty kernel, us:")
    for name, us in launch_costs(device).items():
        print(f"  {name:<38} {us:6.2f}")
    buffer.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(run())
