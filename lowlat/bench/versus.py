"""``python -m lowlat.bench --baseline deepep``: lowlat next to DeepEP V1's low-latency mode, same run,
same GPU, same inputs, same DeepEP-signature calls (lowlat through ``lowlat.compat.deep_ep``).

One process, one rank (EP1: every expert is local, nothing crosses a link), DeepEP's test shape by
default (hidden 7168, 288 experts, top-8, FP8 dispatch, bf16 combine).  For each token count:

* graph: median per call over CUDA-graph replays of ``calls_per_graph`` calls (dispatch alone,
  combine alone, fused mode), the kernel time;
* eager step: wall time of one dispatch + combine issued eagerly (fused mode), synchronised every
  30 steps, what an engine without graphs sees;
* host: CPU time of one eager call (the Python + launch path), per mode, measured with the GPU idle
  enough that the launch queue never blocks; in the two-call modes (a send and its hook, an
  ``async_finish`` call and ``current_stream_wait()``) each call is also timed on its own.

Eager and host figures alternate between the libraries burst by burst (15 bursts each), so that both
see the same host conditions; the median is reported.

DeepEP is a benchmark peer only: it is imported if installed (``bench/gpu_check.sh`` builds it on the
GPU machine from the archive in ``../shared/peers``) and nothing of it is part of lowlat.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable

import torch

from .timing import host_burst, time_replays

LIBRARIES = ("deepep", "lowlat")


def _init_single_rank_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        path = os.path.join(tempfile.mkdtemp(prefix="lowlat-bench-"), "rendezvous")
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    return dist.new_group([0])


class Session:
    """One library's Buffer and the static inputs of one token count, driven with DeepEP's calls."""

    def __init__(self, library: str, buffer, *, tokens: int, max_tokens: int, hidden: int, experts: int, topk: int, seed: int):
        self.library, self.buffer = library, buffer
        self.tokens, self.max_tokens, self.experts = tokens, max_tokens, experts
        g = torch.Generator(device="cpu").manual_seed(seed)
        f32 = dict(dtype=torch.float32, device="cpu")
        self.x = (torch.randn(tokens, hidden, generator=g, **f32) * 0.1).to(torch.bfloat16).cuda()
        scores = torch.randn(tokens, experts, generator=g, **f32).abs() + 1
        topk_idx = torch.topk(scores, topk, dim=-1).indices
        drop = torch.rand(tokens, topk, generator=g, **f32) < 0.01
        self.topk_idx = torch.where(drop, -1, topk_idx).cuda()
        self.topk_weights = torch.rand(tokens, topk, generator=g, **f32).cuda()
        (data, scales), _, self.handle, _, _ = self.dispatch()
        # The expert outputs combine sends: the dequantised rows (what an expert GEMM would read).
        self.y = (data.float().unflatten(-1, (-1, 128)) * scales.float().unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
        torch.cuda.synchronize()

    def dispatch(self, **modes):
        return self.buffer.low_latency_dispatch(self.x, self.topk_idx, self.max_tokens, self.experts, use_fp8=True, **modes)

    def combine(self, **modes):
        return self.buffer.low_latency_combine(self.y, self.topk_idx, self.topk_weights, self.handle, **modes)

    def step(self):
        _, _, handle, _, _ = self.dispatch()
        self.buffer.low_latency_combine(self.y, self.topk_idx, self.topk_weights, handle)


def _bursts(calls: dict[str, Callable[[], object]], *, count: int, repeats: int, wait_for_gpu: bool, split: bool) -> dict[str, list]:
    """Per library, one sample per burst of ``count`` calls: microseconds per call, or with ``split``
    a pair (first part, the rest), each call returning the seconds of its first part.  Bursts
    alternate between the libraries (in ABBA order), each starting on a drained GPU.

    ``wait_for_gpu``: a burst ends when the GPU is done (wall time), else when the host has issued it
    (host time).  Host speed on the shared machines drifts between runs and within one (bursts 1.5x
    apart); alternating the libraries burst by burst gives both the same conditions."""
    samples: dict[str, list] = {name: [] for name in calls}
    order = list(calls.items())
    for repeat in range(repeats):
        for name, call in order if repeat % 2 == 0 else order[::-1]:  # ABBA: neither library always goes first
            samples[name].append(host_burst(call, count, wait_for_gpu=wait_for_gpu, split=split))
    torch.cuda.synchronize()
    return samples


def _interleaved_median_us(calls: dict[str, Callable[[], object]], *, count: int, repeats: int, wait_for_gpu: bool) -> dict[str, float]:
    """Median microseconds per call of each of ``calls`` (by library), over ``repeats`` bursts (see _bursts)."""
    samples = _bursts(calls, count=count, repeats=repeats, wait_for_gpu=wait_for_gpu, split=False)
    return {name: statistics.median(values) for name, values in samples.items()}


def _interleaved_split_us(calls: dict[str, Callable[[], float]], *, count: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Host microseconds per call of each part of two-call modes (each call returns the seconds of its
    first part): medians of (first part, the rest) over ``repeats`` bursts (see _bursts)."""
    samples = _bursts(calls, count=count, repeats=repeats, wait_for_gpu=False, split=True)
    return {name: (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)) for name, pairs in samples.items()}


def _hooked(session: Session, kind: str):
    """The send call, then its hook: returns the send call's seconds."""
    def call():
        start = time.perf_counter()
        result = session.dispatch(return_recv_hook=True) if kind == "dispatch" else session.combine(return_recv_hook=True)
        sent = time.perf_counter() - start
        result[-1]()
        return sent
    return call


def _async(session: Session, kind: str):
    """The async_finish call, then ``event.current_stream_wait()``: returns the call's seconds."""
    def call():
        start = time.perf_counter()
        result = session.dispatch(async_finish=True) if kind == "dispatch" else session.combine(async_finish=True)
        issued = time.perf_counter() - start
        result[-2].current_stream_wait()
        return issued
    return call


def measure(sessions: dict[str, Session], *, rounds: int, calls_per_graph: int, repeats: int = 15) -> dict[str, dict]:
    """Every figure of one token count for each library's session: graph replays one library after
    the other (GPU time, stable), host and eager-step times interleaved between the libraries."""
    results = {name: {"graph_us": {
        "dispatch": time_replays(s.dispatch, rounds=rounds, calls_per_graph=calls_per_graph).median_us,
        "combine": time_replays(s.combine, rounds=rounds, calls_per_graph=calls_per_graph).median_us,
    }, "host_us": {}} for name, s in sessions.items()}
    steps = _interleaved_median_us({name: s.step for name, s in sessions.items()}, count=30, repeats=repeats, wait_for_gpu=True)
    for name, value in steps.items():
        results[name]["eager_step_us"] = value
    for mode in ("dispatch", "combine"):
        host = _interleaved_median_us({name: getattr(s, mode) for name, s in sessions.items()}, count=40, repeats=repeats,
                                      wait_for_gpu=False)
        for name, value in host.items():
            results[name]["host_us"][mode] = value
    # Two-call modes, each call timed on its own: the send and its hook; the async call and the wait.
    # "<mode>" is the pair (the two parts of the same bursts), "<mode>_first" / "<mode>_second" each call.
    for mode, make in (("dispatch_hook", lambda s: _hooked(s, "dispatch")), ("combine_hook", lambda s: _hooked(s, "combine")),
                       ("dispatch_async", lambda s: _async(s, "dispatch")), ("combine_async", lambda s: _async(s, "combine"))):
        host = _interleaved_split_us({name: make(s) for name, s in sessions.items()}, count=40, repeats=repeats)
        for name, (first, second) in host.items():
            results[name]["host_us"].update({mode: first + second, f"{mode}_first": first, f"{mode}_second": second})
    return results


def run(args, env, out) -> int:
    from . import report

    try:
        import deep_ep
    except ImportError as exc:
        print(f"--baseline deepep: DeepEP is not importable here ({exc}); build it with bench/gpu_check.sh "
              "(see ../shared/peers/build_deepep.sh). Nothing was measured.")
        return 2
    from ..compat import deep_ep as lowlat_deep_ep

    os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    group = _init_single_rank_group()
    hidden, experts, topk = args.hidden, args.experts, args.topk
    max_tokens = max(args.token_list)
    print(f"lowlat vs DeepEP V1 on one {env['device']}: EP1 (one rank owns all {experts} experts), hidden {hidden}, top-{topk}, "
          f"FP8 dispatch, bf16 combine, DeepEP-signature calls, T_max={max_tokens}. Graph: median per call of replays of "
          f"{args.calls_per_graph} calls; eager step: dispatch + combine issued eagerly; host: CPU us per eager call.")
    buffers = {
        "deepep": deep_ep.Buffer(group, num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, 1, experts),
                                 low_latency_mode=True, num_qps_per_rank=experts, explicitly_destroy=True),
        "lowlat": lowlat_deep_ep.Buffer(group, num_rdma_bytes=lowlat_deep_ep.Buffer.get_low_latency_rdma_size_hint(
            max_tokens, hidden, 1, experts), low_latency_mode=True, num_qps_per_rank=experts, explicitly_destroy=True),
    }
    points = []
    for i, tokens in enumerate(args.token_list):
        sessions = {library: Session(library, buffers[library], tokens=tokens, max_tokens=max_tokens, hidden=hidden,
                                     experts=experts, topk=topk, seed=i) for library in LIBRARIES}
        point = {"num_tokens": tokens, **measure(sessions, rounds=args.rounds, calls_per_graph=args.calls_per_graph)}
        del sessions
        d, l = point["deepep"], point["lowlat"]
        point["speedup"] = {  # DeepEP time / lowlat time: > 1 means lowlat is faster
            "graph_dispatch": d["graph_us"]["dispatch"] / l["graph_us"]["dispatch"],
            "graph_combine": d["graph_us"]["combine"] / l["graph_us"]["combine"],
            "eager_step": d["eager_step_us"] / l["eager_step_us"],
        }
        points.append(point)
        print(f"  T={tokens}: graph dispatch {l['graph_us']['dispatch']:.1f} vs {d['graph_us']['dispatch']:.1f} us, "
              f"combine {l['graph_us']['combine']:.1f} vs {d['graph_us']['combine']:.1f} us, eager step "
              f"{l['eager_step_us']:.1f} vs {d['eager_step_us']:.1f} us (lowlat vs DeepEP)", flush=True)
    print(table(points))
    print(per_call_table(points))
    for buffer in buffers.values():
        buffer.destroy()
    stem = f"versus-deepep-{env['device'].replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    record = {"kind": "versus-deepep", "environment": env, "args": vars(args), "points": points,
              "note": "one process, one rank (EP1), NVSHMEM_REMOTE_TRANSPORT=none for DeepEP; speedup = DeepEP time / lowlat time"}
    print(f"wrote {report.write_json(out, record, stem)}")
    plot = _plot(out, points, f"lowlat vs DeepEP V1 on {env['device']} (EP1, H={hidden}, E={experts}, top-{topk})", stem)
    if plot:
        print(f"wrote {plot}")
    return 0


def table(points: list[dict]) -> str:
    head = (f"{'T':>4} | {'graph dispatch':>21} {'graph combine':>21} | {'eager step':>21} | "
            f"{'host us/call lowlat (DeepEP)':>48}")
    sub = (f"{'':>4} | {'lowlat':>6} {'DeepEP':>6} {'ratio':>6} {'lowlat':>6} {'DeepEP':>6} {'ratio':>6} | "
           f"{'lowlat':>6} {'DeepEP':>6} {'ratio':>6} | {'disp':>6} {'comb':>6} {'hook d':>7} {'hook c':>7} {'async d':>8} {'async c':>8}")
    lines = ["lowlat vs DeepEP V1 (us; ratio = DeepEP / lowlat, > 1: lowlat faster)", head, sub, "-" * len(sub)]
    for p in points:
        l, d, s = p["lowlat"], p["deepep"], p["speedup"]
        h, hd = l["host_us"], d["host_us"]
        lines.append(
            f"{p['num_tokens']:>4} | {l['graph_us']['dispatch']:>6.1f} {d['graph_us']['dispatch']:>6.1f} {s['graph_dispatch']:>5.2f}x "
            f"{l['graph_us']['combine']:>6.1f} {d['graph_us']['combine']:>6.1f} {s['graph_combine']:>5.2f}x | "
            f"{l['eager_step_us']:>6.1f} {d['eager_step_us']:>6.1f} {s['eager_step']:>5.2f}x | "
            f"{h['dispatch']:>6.1f} {h['combine']:>6.1f} {h['dispatch_hook']:>7.1f} {h['combine_hook']:>7.1f} "
            f"{h['dispatch_async']:>8.1f} {h['combine_async']:>8.1f}")
        lines.append(f"{'':>4} | {'':>21} {'':>21} | {'':>21} | DeepEP: {hd['dispatch']:.1f} {hd['combine']:.1f} "
                     f"{hd['dispatch_hook']:.1f} {hd['combine_hook']:.1f} {hd['dispatch_async']:.1f} {hd['combine_async']:.1f}")
    return "\n".join(lines)


def per_call_table(points: list[dict]) -> str:
    """Host us of each call in the two-call modes: a send and its hook, an async call and its wait."""
    modes = (("dispatch_hook", "send", "hook"), ("combine_hook", "send", "hook"), ("dispatch_async", "call", "wait"),
             ("combine_async", "call", "wait"))
    head = f"{'T':>4} | " + " | ".join(f"{mode + ': ' + a + ' / ' + b:>27}" for mode, a, b in modes)
    lines = ["host us per call in the two-call modes, lowlat (DeepEP)", head, "-" * len(head)]
    for p in points:
        l, d = p["lowlat"]["host_us"], p["deepep"]["host_us"]
        cells = [f"{l[m + '_first']:.1f} / {l[m + '_second']:.1f} ({d[m + '_first']:.1f} / {d[m + '_second']:.1f})" for m, _, _ in modes]
        lines.append(f"{p['num_tokens']:>4} | " + " | ".join(f"{c:>27}" for c in cells))
    return "\n".join(lines)


def _plot(out, points, title, stem):
    from .report import pyplot, save_figure, style_axis

    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    tokens = [p["num_tokens"] for p in points]
    for ax, (label, pick) in zip(axes, (("dispatch (graph)", lambda r: r["graph_us"]["dispatch"]),
                                         ("combine (graph)", lambda r: r["graph_us"]["combine"]),
                                         ("eager dispatch + combine", lambda r: r["eager_step_us"]))):
        for library, style in (("lowlat", "o-"), ("deepep", "s--")):
            ax.plot(tokens, [pick(p[library]) for p in points], style, label="DeepEP V1" if library == "deepep" else "lowlat")
        style_axis(ax, label)
    return save_figure(plt, fig, out, title, stem)
