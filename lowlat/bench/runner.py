"""Benchmark points: correctness first, then lowlat's dispatch and combine timed by graph replay next
to the same-run baselines (PyTorch reference in a graph, device copy bandwidth -> HBM floor)."""

from __future__ import annotations

import contextlib

import torch

from .. import formats, reference
from ..buffer import Buffer
from .baselines import TorchDispatchCombine
from .timing import kernel_times, time_replays
from .workload import Config, Workload


class LocalRanks:
    """R virtual ranks on this GPU with static inputs.  ``dispatch()`` / ``combine()`` run one call of
    every rank, each rank on its own stream, joined back, capturable in one graph.  In hook mode (used
    for timing) every rank's send is issued and joined before any receive, so no kernel waits for
    another rank; otherwise the fused calls run concurrently and wait for each other."""

    def __init__(self, buffers: list[Buffer], work: Workload):
        self.buffers, self.work = buffers, work
        self.num_tokens = [torch.full((1,), work.config.num_tokens, dtype=torch.int32, device=work.x.device) for _ in buffers]
        self.results = None
        self.ys = None

    @contextlib.contextmanager
    def _rank_stream(self, buffer):
        if len(self.buffers) == 1:
            yield
            return
        stream = buffer.get_comm_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield

    def _join(self):
        if len(self.buffers) > 1:
            for b in self.buffers:
                torch.cuda.current_stream().wait_stream(b.get_comm_stream())

    def dispatch(self, hook: bool = False):
        c, results = self.work.config, []
        for r, b in enumerate(self.buffers):
            with self._rank_stream(b):
                results.append(b.low_latency_dispatch(self.work.x[r], self.work.topk_idx[r], use_fp8=c.use_fp8,
                                                      num_tokens=self.num_tokens[r], return_recv_hook=hook))
        self._join()
        if hook:  # every send has been issued: the receive halves find their data and never wait
            self._receive(results)
        self.results = results
        return results

    def _receive(self, calls) -> None:
        for b, call in zip(self.buffers, calls):
            with self._rank_stream(b):
                call[-1]()
        self._join()

    def make_expert_outputs(self):
        """Static per-rank expert outputs (x0.5 of the received rows, dequantised) for the combine timing."""
        ys = []
        for recv_x, *_ in self.results:
            if self.work.config.use_fp8:
                data, scales = recv_x
                y = (data.float().unflatten(-1, (-1, 128)) * scales.unsqueeze(-1)).flatten(-2)
            else:
                y = recv_x.float()
            ys.append((y * 0.5).to(torch.bfloat16))
        self.ys = ys
        return ys

    def combine(self, hook: bool = False):
        c, outs = self.work.config, []
        for r, b in enumerate(self.buffers):
            with self._rank_stream(b):
                outs.append(b.low_latency_combine(self.ys[r], self.work.topk_idx[r], self.work.topk_weights[r], self.results[r][2],
                                                  use_logfmt=c.use_logfmt, return_recv_hook=hook))
        self._join()
        if hook:
            self._receive(outs)
        return outs


def check_against_reference(ranks: LocalRanks) -> str:
    """One eager dispatch + combine checked against lowlat.reference: dispatch bit for bit, combine
    bit for bit (bf16 wire) or within the LogFMT bound.  Returns a one-line verdict; raises on error."""
    work, c = ranks.work, ranks.work.config
    s = c.shape
    results = ranks.dispatch(hook=True)
    ys = ranks.make_expert_outputs()
    outs = ranks.combine(hook=True)
    if work.x.is_cuda:
        torch.cuda.synchronize()
    for b in ranks.buffers:
        b.check_status()
    n = c.num_tokens
    xs = [work.x[r, :n].cpu() for r in range(s.num_ranks)]
    topks = [work.topk_idx[r, :n].cpu() for r in range(s.num_ranks)]
    refs = reference.reference_dispatch(xs, topks, num_experts=s.num_experts, max_tokens_per_rank=s.max_tokens_per_rank,
                                        use_fp8=c.use_fp8)
    rows = 0
    for r, (result, ref) in enumerate(zip(results, refs)):
        count = result[1].cpu()
        if not torch.equal(count, ref.recv_count):
            raise AssertionError(f"rank {r}: recv_count differs from the reference")
        data = result[0][0] if c.use_fp8 else result[0]
        for l in range(s.num_local_experts):
            k = int(count[l])
            rows += k
            got, want = data[l, :k].cpu().view(torch.uint8), ref.recv_x[l, :k].view(torch.uint8)
            if not torch.equal(got, want):
                raise AssertionError(f"rank {r} expert {l}: dispatched rows differ from the reference")
            if c.use_fp8 and not torch.equal(result[0][1][l, :k].cpu(), ref.recv_scales[l, :k]):
                raise AssertionError(f"rank {r} expert {l}: scales differ from the reference")
    weights = [work.topk_weights[r, :n].cpu() for r in range(s.num_ranks)]
    expected = reference.reference_combine([y.cpu() for y in ys], refs, topks, weights, use_logfmt=c.use_logfmt)
    worst = 0.0
    for r, (out, want) in enumerate(zip(outs, expected)):
        got = out[0][:n].cpu()
        if c.use_logfmt:
            scale = want.float().abs().amax().clamp_min(1e-30)
            worst = max(worst, float((got.float() - want.float()).abs().amax() / scale))
            if worst > 4 * formats.logfmt_max_relative_error():
                raise AssertionError(f"rank {r}: LogFMT combine is off by {worst:.3g} of the row scale")
        elif not torch.equal(got.view(torch.int16), want.view(torch.int16)):
            raise AssertionError(f"rank {r}: combined tokens differ from the reference")
    combine_check = f"combine within {worst:.2g} (LogFMT)" if c.use_logfmt else "combine bit-exact"
    return f"correct: {rows} dispatched rows bit-exact, {combine_check} vs lowlat.reference ({c.label})"


def measure_local(ranks: LocalRanks, *, copy_gbps: float, hook_breakdown: bool, rounds: int, calls_per_graph: int) -> dict:
    """Time one benchmark point on virtual ranks: lowlat (every rank's send, then every rank's
    receive), the PyTorch baseline, the HBM floor."""
    work = ranks.work
    ranks.dispatch(hook=True)
    ranks.make_expert_outputs()
    torch.cuda.synchronize()
    timings = {
        "dispatch": time_replays(lambda: ranks.dispatch(hook=True), rounds=rounds, calls_per_graph=calls_per_graph),
        "combine": time_replays(lambda: ranks.combine(hook=True), rounds=rounds, calls_per_graph=calls_per_graph),
    }
    baseline = TorchDispatchCombine(work)
    baseline.dispatch()
    baseline.experts()
    timings["torch_dispatch"] = time_replays(baseline.dispatch, rounds=rounds, calls_per_graph=4)
    timings["torch_combine"] = time_replays(baseline.combine, rounds=rounds, calls_per_graph=4)
    del baseline
    point = {"timings_us": {k: v.as_dict() for k, v in timings.items()}}
    if hook_breakdown:
        halves = kernel_times(lambda: (ranks.dispatch(hook=True), ranks.combine(hook=True)),
                              ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv"))
        point["kernel_us_per_rank"] = halves
    counts = work.byte_counts()
    point["bytes"] = counts
    point["copy_bandwidth_gbps"] = copy_gbps
    for op in ("dispatch", "combine"):
        t = timings[op].median_us
        floor_us = counts[f"floor_{op}"] / (copy_gbps * 1e3)
        point[op] = {
            "us": t,
            "deepep_gbps_aggregate": counts[f"deepep_{op}"] / (t * 1e3),
            "floor_us": floor_us,
            "x_floor": t / floor_us,
            "torch_us": timings[f"torch_{op}"].median_us,
            "speedup_vs_torch": timings[f"torch_{op}"].median_us / t,
        }
    return point


def run_cpu_reference(config: Config) -> str:
    """No GPU: run the whole API on virtual CPU ranks (the emulated engine) and check it."""
    s = config.shape
    buffers = Buffer.local_group(s.num_ranks, device="cpu", max_tokens_per_rank=s.max_tokens_per_rank, hidden=s.hidden,
                                 num_experts=s.num_experts, num_topk=s.num_topk)
    work = Workload.make(config, "cpu")
    ranks = _CpuRanks(buffers, work)
    return check_against_reference(ranks)


class _CpuRanks(LocalRanks):
    """Virtual CPU ranks: hook mode (every send, then every receive) on the one host thread."""

    def dispatch(self, hook: bool = True):
        return super().dispatch(hook=True)

    def combine(self, hook: bool = True):
        return super().combine(hook=True)

    @contextlib.contextmanager
    def _rank_stream(self, buffer):
        yield

    def _join(self):
        return None
