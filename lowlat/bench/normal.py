"""``main(argv)``: the normal-mode (prefill) benchmark: DeepEP's intranode shape by default (4096 tokens
per rank, hidden 7168, top-8 of 256 experts, FP8 dispatch, bf16 combine).

One GPU: R virtual ranks on the local transport, each on its own stream with SMs / R blocks, every
rank's calls captured in its own CUDA graph (``num_worst_tokens``: static shapes, no host sync) and
the R graphs replayed concurrently.  It is a kernel measurement: every rank's traffic is this GPU's
HBM traffic, nothing crosses NVLink.  Reported per point: microseconds per call, GB/s counted
DeepEP's way (received bytes: FP8 ``H + 4H/128`` or bf16 ``2H`` per received token for dispatch,
``2H`` per received token for combine; per rank and summed over ranks), the HBM floor (inputs read
once, outputs written once, at the copy bandwidth measured in the same run) and the pure-torch
reference of all ranks on this GPU, captured in a graph.  Every run first checks one dispatch and
combine against lowlat.reference, bit for bit.  No GPU: the same check on virtual CPU ranks (the
emulated engine), at a reduced size, and no timings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")  # before CUDA starts: rank streams must not share queues

import torch

from .. import formats, reference
from ..normal import NormalBuffer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowlat.bench --mode normal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=8, help="virtual ranks on this GPU")
    parser.add_argument("--dispatch", choices=("fp8", "bf16"), default="fp8")
    parser.add_argument("--num-sms", type=int, default=None, help="blocks per kernel per rank (default: the NormalBuffer's, SMs / R at most)")
    parser.add_argument("--check-tokens", type=int, default=512, help="tokens per rank in the correctness check (CPU: 32)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--calls-per-graph", type=int, default=2)
    parser.add_argument("--out", default="bench/results", help="folder for the JSON record")
    parser.add_argument("--baseline", choices=("none", "deepep"), default="none",
                        help="deepep: DeepEP V1's normal mode beside lowlat's, one process per GPU (needs 2+ GPUs; "
                             "lowlat/bench/versus_normal.py)")
    parser.add_argument("--calls", type=int, default=10, help="with --baseline deepep: calls per timed round")
    return parser.parse_args(argv)


class Workload:
    """Every rank's inputs from one seed: x bf16 [T, H] (and its FP8 form), topk_idx int64 [T, K]
    (top-k of random scores, 1% of the entries -1, as DeepEP's test), topk_weights float32 [T, K]."""

    def __init__(self, num_ranks: int, tokens: int, hidden: int, experts: int, num_topk: int, device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.x, self.x_fp8, self.x_scales, self.topk_idx, self.topk_weights = [], [], [], [], []
        for _ in range(num_ranks):
            x = (torch.randn(tokens, hidden, generator=g) * 0.1).to(torch.bfloat16).to(device)
            scores = torch.rand(tokens, experts, generator=g) + 1
            topk = scores.topk(num_topk, dim=-1).indices
            topk = torch.where(torch.rand(tokens, num_topk, generator=g) < 0.01, -1, topk)
            q = formats.quantize_fp8(x)
            self.x.append(x)
            self.x_fp8.append(q.data)
            self.x_scales.append(q.scales)
            self.topk_idx.append(topk.to(device))
            self.topk_weights.append(torch.rand(tokens, num_topk, generator=g).to(device))

    def inputs(self, rank: int, fp8: bool):
        return (self.x_fp8[rank], self.x_scales[rank]) if fp8 else self.x[rank]


def check(buffers: list[NormalBuffer], work: Workload, fp8: bool, tokens: int) -> str:
    """One dispatch (sizes synchronised with the host) and combine of ``tokens`` tokens per rank, run
    concurrently (a host thread per rank), compared with lowlat.reference bit for bit."""
    R = len(buffers)
    E = buffers[0].shape.num_experts
    results, outs, errors = [None] * R, [None] * R, []
    cuda = buffers[0].device.type == "cuda"

    def run(fn):
        if cuda:
            for b in buffers:
                b.get_comm_stream().wait_stream(torch.cuda.current_stream())

        def work_of(rank):
            try:
                stream = buffers[rank].get_comm_stream() if cuda else None
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    fn(rank)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work_of, args=(r,)) for r in range(R)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if cuda:
            torch.cuda.synchronize()
        if errors:
            raise errors[0]

    def dispatch(r):
        x = work.inputs(r, fp8)
        x = (x[0][:tokens], x[1][:tokens]) if fp8 else x[:tokens]
        results[r] = buffers[r].dispatch(x, topk_idx=work.topk_idx[r][:tokens], topk_weights=work.topk_weights[r][:tokens])

    run(dispatch)
    xs = [(work.x_fp8[r] if fp8 else work.x[r])[:tokens].cpu() for r in range(R)]
    refs = reference.reference_normal_dispatch(xs, [t[:tokens].cpu() for t in work.topk_idx], num_experts=E,
                                               x_scales=[s[:tokens].cpu() for s in work.x_scales] if fp8 else None,
                                               topk_weights=[w[:tokens].cpu() for w in work.topk_weights])
    rows = 0
    for r, (result, ref) in enumerate(zip(results, refs)):
        data = result[0][0] if fp8 else result[0]
        if not torch.equal(data.cpu().view(torch.uint8), ref.recv_x.view(torch.uint8)):
            raise AssertionError(f"rank {r}: received rows differ from lowlat.reference")
        if fp8 and not torch.equal(result[0][1].cpu(), ref.recv_scales):
            raise AssertionError(f"rank {r}: received scales differ from lowlat.reference")
        if not (torch.equal(result[1].cpu(), ref.recv_topk_idx) and torch.equal(result[2].cpu(), ref.recv_topk_weights)):
            raise AssertionError(f"rank {r}: received top-k differs from lowlat.reference")
        rows += ref.recv_x.shape[0]
    ys = [(ref.recv_x.float() * 0.5).to(torch.bfloat16) for ref in refs]
    # On the device before the threads start: a copy from pageable memory (and its allocation) in a
    # rank's thread could wait for the whole GPU while a peer's combine waits for this rank's send.
    ys_device = [y.to(b.device) for y, b in zip(ys, buffers)]
    if cuda:
        torch.cuda.synchronize()

    def combine(r):
        outs[r] = buffers[r].combine(ys_device[r], results[r][4], topk_weights=results[r][2])

    run(combine)
    expected = reference.reference_normal_combine(ys, refs, [tokens] * R, topk_weights=[res[2].cpu() for res in results])
    for r, ((out, weights, _), (want, want_weights)) in enumerate(zip(outs, expected)):
        if not (torch.equal(out.cpu().view(torch.int16), want.view(torch.int16)) and torch.equal(weights.cpu(), want_weights)):
            raise AssertionError(f"rank {r}: combined tokens differ from lowlat.reference")
    return (f"correct: {rows} dispatched rows and {R * tokens} combined tokens bit-exact vs lowlat.reference "
            f"(R={R}, {tokens} tokens per rank, {'fp8' if fp8 else 'bf16'} dispatch)")


class TorchNormal:
    """The pure-torch reference of every rank at once on one GPU, capturable (the routing is fixed, so
    the number of received rows M is known up front and ``nonzero_static`` keeps shapes static).
    Dispatch: gather the rows each rank receives (canonical order) with their top-k converted to local
    indices; combine: add every received row back into its source token (fp32, then bf16)."""

    def __init__(self, work: Workload, num_experts: int, fp8: bool):
        R = len(work.x)
        T, H = work.x[0].shape
        self.L = num_experts // R
        self.fp8 = fp8
        self.rows = torch.cat([x.view(torch.uint8) for x in (work.x_fp8 if fp8 else work.x)])  # [R*T, row bytes]
        self.scales = torch.cat(work.x_scales) if fp8 else None
        self.topk = torch.cat(work.topk_idx)
        self.weights = torch.cat(work.topk_weights)
        owner = torch.where(self.topk >= 0, self.topk // self.L, R)
        in_rank = torch.zeros(R * T, R + 1, dtype=torch.bool, device=self.topk.device).scatter_(1, owner, True)[:, :R]
        self.flags = in_rank.T.contiguous()  # [dst, src * T + t]
        self.num_rows = int(self.flags.sum())
        self.y = torch.zeros(self.num_rows, H, dtype=torch.bfloat16, device=self.topk.device)
        self.out = torch.empty(R * T, H, dtype=torch.bfloat16, device=self.topk.device)

    static = True  # nonzero_static (capturable); False: plain nonzero (synchronises; eager timing only)

    def dispatch(self) -> None:
        idx = torch.nonzero_static(self.flags, size=self.num_rows) if self.static else self.flags.nonzero()
        dst, src = idx[:, 0], idx[:, 1]
        self.recv = self.rows.index_select(0, src)
        if self.scales is not None:
            self.recv_scales = self.scales.index_select(0, src)
        experts = self.topk.index_select(0, src)
        mine = (experts >= 0) & (experts // self.L == dst.view(-1, 1))
        self.recv_topk = torch.where(mine, experts % self.L, -1)
        self.recv_weights = torch.where(mine, self.weights.index_select(0, src), 0.0)
        self.src = src

    def combine(self) -> None:
        acc = torch.zeros(self.out.shape, dtype=torch.float32, device=self.out.device)
        acc.index_add_(0, self.src, self.y.float())
        self.out.copy_(acc.to(torch.bfloat16))


def replay_on_comm_streams(buffers, graphs) -> None:
    """Replay each rank's graph on its NormalBuffer's comm stream (where it was captured), all of them
    after the current stream's work and concurrently; the current stream then waits for every one."""
    current = torch.cuda.current_stream()
    for b, graph in zip(buffers, graphs):
        b.get_comm_stream().wait_stream(current)
        with torch.cuda.stream(b.get_comm_stream()):
            graph.replay()
    for b in buffers:
        current.wait_stream(b.get_comm_stream())


def _time_concurrent(buffers, step, rounds: int, calls_per_graph: int) -> float:
    """Microseconds per call: every rank's ``step(rank, buffer)`` captured ``calls_per_graph`` times in
    its own graph; the R graphs replayed concurrently on the ranks' streams, timed with events."""
    graphs = []
    for r, b in enumerate(buffers):
        stream = b.get_comm_stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls_per_graph):
                step(r, b)
        graphs.append(graph)
    torch.cuda.synchronize()

    replay_on_comm_streams(buffers, graphs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(rounds):
        start.record()
        replay_on_comm_streams(buffers, graphs)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls_per_graph)
    for b in buffers:
        b.check_status()
    del graphs
    return statistics.median(samples)


def _time_torch(baseline: TorchNormal, rounds: int, time_replays) -> tuple[float, float, str]:
    """The torch reference's dispatch and combine times: graph replays, or eager CUDA-event timing if
    this torch cannot capture ``nonzero_static`` on the GPU (the note says which)."""
    try:
        baseline.dispatch()
        torch.cuda.synchronize()
        return (time_replays(baseline.dispatch, rounds=rounds, calls_per_graph=2).median_us,
                time_replays(baseline.combine, rounds=rounds, calls_per_graph=2).median_us,
                "torch reference: all ranks at once on this GPU, captured in a CUDA graph")
    except RuntimeError as exc:
        note = f"torch reference: eager, timed with events (graph path failed: {str(exc).splitlines()[0][:120]})"
        baseline.static = False
        baseline.dispatch()
        torch.cuda.synchronize()
    times = []
    for fn in (baseline.dispatch, baseline.combine):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(rounds):
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        times.append(statistics.median(samples))
    return times[0], times[1], note


def main(argv=None) -> int:
    args = parse_args(argv)
    fp8 = args.dispatch == "fp8"
    if args.baseline == "deepep":
        from .versus_normal import run

        return run(args)
    if not torch.cuda.is_available():
        tokens = min(args.check_tokens, 32)
        hidden = min(args.hidden, 512)
        print("lowlat.bench normal mode: no CUDA device on this machine; checking the API on virtual CPU ranks "
              f"(emulated engine) at hidden {hidden}, {tokens} tokens per rank.")
        buffers = NormalBuffer.local_group(args.ranks, device="cpu", hidden=hidden, num_experts=args.experts,
                                           max_tokens_per_rank=tokens, max_topk=args.topk)
        work = Workload(args.ranks, tokens, hidden, args.experts, args.topk, "cpu")
        print(check(buffers, work, fp8, tokens))
        print("lowlat's kernels need an NVIDIA GPU (Hopper or newer): no timings are taken on this machine.")
        return 0
    return _one_gpu(args, fp8)


def _one_gpu(args, fp8: bool) -> int:
    from . import report
    from .baselines import copy_bandwidth
    from .timing import time_replays

    device = torch.device("cuda", torch.cuda.current_device())
    env = report.environment()
    R, T, H, E, K = args.ranks, args.tokens, args.hidden, args.experts, args.topk
    print(f"lowlat.bench normal mode on one {env['device']}: {R} virtual ranks (local transport), each on its own stream "
          f"with SMs/R blocks, all ranks' kernels on this GPU (a kernel measurement: nothing crosses NVLink).")
    copy_gbps = copy_bandwidth(device)
    print(f"device copy bandwidth (read + write): {copy_gbps:.0f} GB/s")
    buffers = NormalBuffer.local_group(R, hidden=H, num_experts=E, max_tokens_per_rank=T, max_topk=K, num_sms=args.num_sms)
    work = Workload(R, T, H, E, K, device)
    print(check(buffers, work, fp8, min(args.check_tokens, T)), flush=True)

    worst = R * T
    layouts = [b.get_dispatch_layout(work.topk_idx[r], E) for r, b in enumerate(buffers)]
    results = [None] * R
    ys = [torch.zeros(worst, H, dtype=torch.bfloat16, device=device) for _ in buffers]

    def dispatch(r, b):
        per_rank, per_expert, in_rank, _ = layouts[r]
        results[r] = b.dispatch(work.inputs(r, fp8), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                num_tokens_per_expert=per_expert, topk_idx=work.topk_idx[r], topk_weights=work.topk_weights[r],
                                num_worst_tokens=worst)

    def combine(r, b):
        b.combine(ys[r], results[r][4], topk_weights=results[r][2])

    def eager(*steps):
        """Every rank's steps on its own stream from its own host thread, no host synchronisation in
        between.  Not one thread for all ranks: rank 0's counts would spin while that thread still
        allocates the later ranks' outputs (hundreds of MB at num_worst_tokens), and a cudaMalloc may
        wait for the whole GPU, so the later ranks' sends would come only after the timeout."""
        for b in buffers:
            b.get_comm_stream().wait_stream(torch.cuda.current_stream())
        errors = []

        def work_of(r, b):
            try:
                with torch.cuda.stream(b.get_comm_stream()):
                    for step in steps:
                        step(r, b)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work_of, args=(r, b)) for r, b in enumerate(buffers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        torch.cuda.synchronize()
        if errors:
            raise errors[0]
        for b in buffers:
            b.check_status()

    eager(dispatch, combine)  # warm-up
    recv_rows = [int(res[4].recv_info[0]) for res in results]
    dispatch_us = _time_concurrent(buffers, dispatch, args.rounds, args.calls_per_graph)
    eager(dispatch, combine)  # fresh eager handles for the combine graphs (the dispatch graphs own theirs)
    combine_us = _time_concurrent(buffers, combine, args.rounds, args.calls_per_graph)
    del results[:]

    baseline = TorchNormal(work, E, fp8)
    torch_dispatch_us, torch_combine_us, torch_note = _time_torch(baseline, args.rounds, time_replays)
    del baseline

    row = H + 4 * (H // 128) if fp8 else 2 * H
    total_rows = sum(recv_rows)
    sent_tokens = sum(int((t >= 0).any(dim=1).sum()) for t in work.topk_idx)
    bytes_ = {
        "deepep_dispatch": total_rows * row, "deepep_combine": total_rows * 2 * H,
        "floor_dispatch": sent_tokens * row + total_rows * row, "floor_combine": total_rows * 2 * H + R * T * 2 * H,
    }
    point = {"num_ranks": R, "num_tokens": T, "hidden": H, "topk": K, "experts": E, "dispatch_format": args.dispatch,
             "recv_rows_per_rank": recv_rows, "bytes": bytes_, "copy_bandwidth_gbps": copy_gbps,
             "num_sms_per_rank": buffers[0]._ctx.num_blocks}
    lines = [f"lowlat normal mode, R={R} T={T} H={H} top-{K} E={E} {args.dispatch}/bf16 (median of graph replays, all ranks concurrent)",
             f"{'':>9} {'us':>9} {'GB/s/rank':>10} {'GB/s all':>9} {'floor us':>9} {'x floor':>8} {'torch us':>9} {'x torch':>8}"]
    for op, us, torch_us in (("dispatch", dispatch_us, torch_dispatch_us), ("combine", combine_us, torch_combine_us)):
        floor_us = bytes_[f"floor_{op}"] / (copy_gbps * 1e3)
        aggregate = bytes_[f"deepep_{op}"] / (us * 1e3)
        point[op] = {"us": us, "deepep_gbps_per_rank": aggregate / R, "deepep_gbps_aggregate": aggregate, "floor_us": floor_us,
                     "x_floor": us / floor_us, "torch_us": torch_us, "speedup_vs_torch": torch_us / us}
        lines.append(f"{op:>9} {us:>9.1f} {aggregate / R:>10.1f} {aggregate:>9.0f} {floor_us:>9.1f} {us / floor_us:>7.2f}x "
                     f"{torch_us:>9.1f} {torch_us / us:>7.2f}x")
    print("\n".join(lines))
    stem = f"normal-local-{env['device'].replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(torch_note)
    record = {"kind": "normal-local", "environment": env, "args": vars(args), "points": [point], "torch_reference": torch_note,
              "note": "virtual ranks share one GPU: GB/s per rank is DeepEP's count (received bytes / time) divided among "
                      "ranks that all use this GPU's HBM; the torch reference handles all ranks at once"}
    print(f"wrote {report.write_json(Path(args.out), record, stem)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
