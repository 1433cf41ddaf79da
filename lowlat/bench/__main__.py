"""``python -m lowlat.bench``: lowlat's latency benchmark, the library's main job.

Runs the standard shape (128 tokens per rank, hidden 7168, top-8, 256 experts, FP8 dispatch, bf16
combine) on the GPUs present: several GPUs -> one process per GPU on the ipc transport (spawned
here); one GPU -> R virtual ranks on the local transport (a kernel measurement: every rank's work
runs on that one GPU, nothing crosses NVLink); no GPU -> the CPU reference path, checked, and a plain
statement that the kernels need an NVIDIA GPU.  Every run first checks correctness against
lowlat.reference and prints one line saying so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")  # before CUDA starts: rank streams must not share queues

import torch

from ..layout import BufferShape
from .workload import Config

STANDARD = dict(tokens="128", hidden=7168, topk=8, experts=256)
SWEEP = "1,2,4,8,16,32,64,128,256"
VERSUS = dict(tokens="1,4,32,128,256", experts=288)  # DeepEP's own test shape, for --baseline deepep


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowlat.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default=None, help=f"tokens per rank: one value or a list (default {STANDARD['tokens']}; "
                        f"sweep: {SWEEP}; with --baseline deepep: {VERSUS['tokens']})")
    parser.add_argument("--sweep", action="store_true", help=f"shorthand for --tokens {SWEEP}")
    parser.add_argument("--hidden", type=int, default=STANDARD["hidden"])
    parser.add_argument("--topk", type=int, default=STANDARD["topk"])
    parser.add_argument("--experts", type=int, default=None,
                        help=f"default {STANDARD['experts']} ({VERSUS['experts']} with --baseline deepep, DeepEP's test shape)")
    parser.add_argument("--mode", choices=("low-latency", "normal"), default="low-latency",
                        help="normal: the normal (prefill) mode's benchmark, lowlat/bench/normal.py, with its own options "
                             "(python -m lowlat.bench --mode normal --help)")
    parser.add_argument("--baseline", choices=("none", "deepep"), default="none",
                        help="deepep: DeepEP V1's low-latency mode next to lowlat's DeepEP facade, same run, one GPU, EP1")
    parser.add_argument("--ranks", default=None, help="virtual ranks on one GPU (list allowed; default 8), or processes")
    parser.add_argument("--processes", type=int, default=None,
                        help="force N processes over a process group (default: one per GPU when there are several; "
                             "2 on one GPU with --transport ipc or nvshmem)")
    parser.add_argument("--transport", choices=("auto", "ipc", "nvshmem"), default="auto",
                        help="transport of the process group (auto: ipc on one host, nvshmem across hosts)")
    parser.add_argument("--no-nvlink", action="store_true",
                        help="with --transport nvshmem: NVSHMEM puts to every peer, none by pointer")
    parser.add_argument("--dispatch", choices=("fp8", "bf16"), default="fp8")
    parser.add_argument("--logfmt", action="store_true", help="LogFMT-10 on the combine wire")
    parser.add_argument("--hook", action="store_true", help="also time the send and receive halves separately (hook mode)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per measurement (median reported)")
    parser.add_argument("--calls-per-graph", type=int, default=20, help="calls captured in each timed graph")
    parser.add_argument("--check-all", action="store_true", help="check every point against the reference, not just the first")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON record and the plot")
    args = parser.parse_args(argv)
    versus = args.baseline == "deepep"
    if args.sweep:
        args.tokens = SWEEP
    if args.tokens is None:
        args.tokens = VERSUS["tokens"] if versus else STANDARD["tokens"]
    if args.experts is None:
        args.experts = VERSUS["experts"] if versus else STANDARD["experts"]
    if args.no_nvlink and args.transport == "auto":
        args.transport = "nvshmem"  # puts need the NVSHMEM transport
    args.token_list = [int(t) for t in str(args.tokens).split(",")]
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    mode, rest = _mode(argv)
    if mode == "normal":
        from .normal import main as normal_main

        return normal_main(rest)
    args = parse_args(argv)  # its parser knows --mode and refuses a mode it does not know
    from . import report

    out = Path(args.out)
    env = report.environment()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    processes = args.processes or (gpus if gpus >= 2 else 2 if args.transport != "auto" or args.no_nvlink else None)
    if gpus == 0:
        return _cpu(args, env)
    if args.baseline == "deepep":
        from .versus import run

        return run(args, env, out)
    if processes:
        from .multiproc import run_processes

        return run_processes(args, processes, env, out)
    return _one_gpu(args, env, out)


def _mode(argv: list[str]) -> tuple[str, list[str]]:
    """``--mode MODE`` (or ``--mode=MODE``) taken out of ``argv``: the modes have their own options."""
    for i, arg in enumerate(argv):
        if arg == "--mode" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--mode="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return "low-latency", argv


def _configs(args, num_ranks: int) -> list[Config]:
    shape = BufferShape(num_ranks, args.experts, args.topk, args.hidden, max(args.token_list))
    return [Config(shape, n, use_fp8=args.dispatch == "fp8", use_logfmt=args.logfmt) for n in args.token_list]


def _cpu(args, env) -> int:
    from .runner import run_cpu_reference

    ranks = int((args.ranks or "8").split(",")[0])
    config = _configs(args, ranks)[0]
    print(f"lowlat.bench: no CUDA device on this machine ({env['device']}); running the CPU reference path"
          + (f" (--transport {args.transport} needs CUDA GPUs: not used)." if args.transport != "auto" else "."))
    start = time.perf_counter()
    print(run_cpu_reference(config) + f" [CPU emulation of the kernels' protocol, {time.perf_counter() - start:.1f} s]")
    print("lowlat's kernels need an NVIDIA GPU (Hopper or newer): no timings are taken on this machine.")
    return 0


def _one_gpu(args, env, out: Path) -> int:
    from ..buffer import Buffer
    from . import report
    from .baselines import copy_bandwidth
    from .runner import LocalRanks, check_against_reference, measure_local
    from .workload import Workload

    device = torch.device("cuda", torch.cuda.current_device())
    rank_counts = [int(r) for r in (args.ranks or "8").split(",")]
    print(f"lowlat.bench on one {env['device']}: R virtual ranks on the local transport. This is a kernel "
          "measurement: all ranks' work runs on this GPU (hook mode: every rank's send, then every rank's receive, "
          "ranks on their own streams, each kernel sized for the whole GPU), and nothing crosses NVLink.")
    copy_gbps = copy_bandwidth(device)
    print(f"device copy bandwidth (read + write): {copy_gbps:.0f} GB/s")
    points = []
    total = len(rank_counts) * len(args.token_list)
    for num_ranks in rank_counts:
        configs = _configs(args, num_ranks)
        s = configs[0].shape
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        buffers = Buffer.local_group(num_ranks, max_tokens_per_rank=s.max_tokens_per_rank, hidden=s.hidden,
                                     num_experts=s.num_experts, num_topk=s.num_topk, num_sms=2 * sms)
        for i, config in enumerate(configs):
            work = Workload.make(config, device, seed=len(points))
            ranks = LocalRanks(buffers, work)
            if i == 0 or args.check_all:
                print(check_against_reference(ranks), flush=True)
            point = measure_local(ranks, copy_gbps=copy_gbps, hook_breakdown=args.hook, rounds=args.rounds,
                                  calls_per_graph=args.calls_per_graph)
            point.update(num_ranks=num_ranks, num_tokens=config.num_tokens, label=config.label)
            points.append(point)
            print(f"  [{len(points)}/{total}] {config.label}: dispatch {point['dispatch']['us']:.1f} us, "
                  f"combine {point['combine']['us']:.1f} us", flush=True)
        del buffers
        torch.cuda.empty_cache()
    print(report.table(points, "local transport, virtual ranks on one GPU"))
    stem = f"local-{env['device'].replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    record = {"kind": "local", "environment": env, "copy_bandwidth_gbps": copy_gbps, "args": vars(args), "points": points,
              "note": "virtual ranks share one GPU; the batch size of each point is set through the device num_tokens "
                      "scalar of one Buffer built for the largest batch"}
    print(f"wrote {report.write_json(out, record, stem)}")
    plot = report.plot(out, points, f"lowlat on {env['device']} (virtual ranks, local transport)", stem)
    if plot:
        print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
