"""``python -m lowlat.bench.normal --baseline deepep``: lowlat's normal mode beside DeepEP V1's, same run.

DeepEP's normal (intranode) kernels run one rank per GPU, on 2, 4 or 8 GPUs of one node, so this
needs several GPUs: it spawns one process per GPU (at most 8), and in each process builds both
libraries' Buffers over the same process group and drives them the same way, through DeepEP's API
(lowlat through ``lowlat.compat.deep_ep``):

    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = buffer.dispatch(
        (x_fp8, x_scales) or x, num_tokens_per_rank=..., is_token_in_rank=..., num_tokens_per_expert=...,
        topk_idx=..., topk_weights=...)
    buffer.combine(expert_output_bf16, handle, topk_weights=recv_topk_weights)

Dispatch without ``num_worst_tokens`` waits on the host for the counts, as DeepEP's own test does.
Per rank: the median of ``rounds`` rounds of ``calls`` calls between two CUDA events (ranks aligned
by a barrier before each round), then the slowest rank; GB/s counted DeepEP's way (received bytes per
rank: FP8 ``H + 4H/128`` or bf16 ``2H`` per received token for dispatch, ``2H`` for combine).  Every
run first checks that both libraries received the same rows and combined them to the same values.

With fewer than two GPUs nothing is measured and the command says so (exit code 2).  The session code
(:class:`NormalSession`) is also exercised on virtual CPU ranks against the facade by
``tests/test_bench_versus_normal.py``; the DeepEP side and the timings have not run yet (no
multi-GPU machine has been lent).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

LIBRARIES = ("lowlat", "deepep")


class NormalSession:
    """One rank's inputs and one library's Buffer (``deep_ep.Buffer`` or ``lowlat.compat.deep_ep.Buffer``),
    driven with DeepEP's normal-mode calls.  ``x`` bf16 [n, H]; ``x_fp8`` / ``x_scales``
    its FP8 form (e4m3 [n, H], float32 [n, H/128]); ``topk_idx`` int64 [n, K]; ``topk_weights``
    float32 [n, K]."""

    def __init__(self, buffer, x, x_fp8, x_scales, topk_idx, topk_weights, num_experts: int, *, fp8: bool):
        self.buffer, self.num_experts, self.fp8 = buffer, num_experts, fp8
        self.x, self.topk_idx, self.topk_weights = x, topk_idx, topk_weights
        self.inputs = (x_fp8, x_scales) if fp8 else x
        # The layout is computed once (DeepEP's test times dispatch alone): per rank, per RDMA rank (None
        # intranode), per expert, is_token_in_rank, event.
        self.layout = buffer.get_dispatch_layout(topk_idx, num_experts)[:4]
        self.recv_x = self.handle = self.recv_topk_weights = self.expert_output = None

    def dispatch(self) -> tuple:
        """One dispatch; returns DeepEP's tuple (recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event) and keeps what combine needs."""
        per_rank, per_rdma_rank, per_expert, in_rank = self.layout
        result = self.buffer.dispatch(self.inputs, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank,
                                      is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=self.topk_idx,
                                      topk_weights=self.topk_weights)
        self.recv_x, _, self.recv_topk_weights, _, self.handle, _ = result
        return result

    def make_expert_output(self) -> torch.Tensor:
        """The received rows as bf16 (dequantised when FP8): what an expert would send back."""
        if self.fp8:
            data, scales = self.recv_x
            rows = (data.float().unflatten(-1, (-1, 128)) * scales.float().unsqueeze(-1)).flatten(-2)
        else:
            rows = self.recv_x.float()
        self.expert_output = rows.to(torch.bfloat16).contiguous()
        return self.expert_output

    def combine(self) -> tuple:
        """One combine of the expert output; returns DeepEP's tuple (combined_x, combined_topk_weights, event)."""
        return self.buffer.combine(self.expert_output, self.handle, topk_weights=self.recv_topk_weights)

    def received_bytes(self) -> dict[str, int]:
        rows = self.expert_output.shape[0]
        hidden = self.expert_output.shape[1]
        row = hidden + 4 * (hidden // 128) if self.fp8 else 2 * hidden
        return {"dispatch": rows * row, "combine": rows * 2 * hidden, "rows": rows}


def run(args) -> int:
    """Spawn one process per GPU (at most 8) and print the side-by-side table; 2 with fewer GPUs."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        print(f"lowlat.bench normal --baseline deepep: DeepEP's normal kernels run one rank per GPU (2, 4 or 8 GPUs of one "
              f"node); this machine has {gpus}. Nothing measured.")
        return 2
    import torch.multiprocessing as mp

    from . import report

    world = min(gpus, 8)
    with tempfile.TemporaryDirectory() as folder:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(world, os.path.join(folder, "rendezvous"), vars(args), queue), nprocs=world, join=True)
        record = queue.get()
    env = report.environment()
    record["environment"] = env
    print(record["check"])
    print(table(record))
    stem = f"normal-versus-deepep-{world}x{env['device'].replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"wrote {report.write_json(Path(args.out), record, stem)}")
    return 0


def table(record: dict) -> str:
    lines = [f"normal mode, {record['num_ranks']} ranks (one per GPU), T={record['num_tokens']} H={record['hidden']} "
             f"top-{record['topk']} E={record['experts']} {record['dispatch_format']}/bf16; us per call (slowest rank), "
             "GB/s per rank counted DeepEP's way; ratio = DeepEP / lowlat (> 1: lowlat faster)",
             f"{'':>9} {'lowlat us':>10} {'DeepEP us':>10} {'ratio':>6} {'lowlat GB/s':>12} {'DeepEP GB/s':>12}"]
    for op in ("dispatch", "combine"):
        ours, theirs = record["us"]["lowlat"][op], record["us"]["deepep"][op]
        gbps = {lib: record["bytes_per_rank"][op] / (record["us"][lib][op] * 1e3) for lib in LIBRARIES}
        lines.append(f"{op:>9} {ours:>10.1f} {theirs:>10.1f} {theirs / ours:>5.2f}x {gbps['lowlat']:>12.1f} {gbps['deepep']:>12.1f}")
    return "\n".join(lines)


def _time(call, barrier, *, rounds: int, calls: int) -> float:
    """Median microseconds per call over ``rounds`` rounds of ``calls`` calls between CUDA events."""
    samples = []
    for _ in range(rounds):
        barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)


def _worker(rank: int, world: int, init_file: str, args: dict, queue) -> None:
    import deep_ep  # DeepEP V1, built by bench/gpu_check.sh versus
    import torch.distributed as dist

    from ..compat import deep_ep as lowlat_deep_ep
    from ..normal import NormalBuffer
    from .normal import Workload

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    T, H, E, K = args["tokens"], args["hidden"], args["experts"], args["topk"]
    fp8 = args["dispatch"] == "fp8"
    work = Workload(world, T, H, E, K, device)
    nvl_bytes = max(NormalBuffer.region_bytes(num_ranks=world, hidden=H, num_experts=E, max_tokens_per_rank=T, max_topk=K),
                    int(1e9))  # DeepEP's test_intranode asks for 1e9 bytes of NVLink buffer
    nvl_bytes = -(-nvl_bytes // 128) * 128
    group = dist.new_group(list(range(world)))
    modules = {"lowlat": lowlat_deep_ep, "deepep": deep_ep}
    sessions = {}
    for library, module in modules.items():
        buffer = module.Buffer(group, nvl_bytes, 0, low_latency_mode=False, explicitly_destroy=True)
        sessions[library] = NormalSession(buffer, work.x[rank], work.x_fp8[rank], work.x_scales[rank], work.topk_idx[rank],
                                          work.topk_weights[rank], E, fp8=fp8)

    def barrier():
        torch.cuda.synchronize()
        dist.barrier()

    # Both libraries must agree: the same received rows (as a multiset: DeepEP orders them by channel)
    # and the same combined values (sums of the same bf16 rows; orders may differ, so a bf16 tolerance).
    outs = {}
    for library, session in sessions.items():
        session.dispatch()
        session.make_expert_output()
        outs[library] = session.combine()[0].float()
        barrier()
    rows = {lib: s.expert_output.float().sort(dim=0).values for lib, s in sessions.items()}
    same_rows = torch.equal(rows["lowlat"], rows["deepep"])
    worst = float((outs["lowlat"] - outs["deepep"]).abs().max() / outs["deepep"].abs().max().clamp_min(1e-30))
    check = (f"rank {rank}: received rows {'identical' if same_rows else 'DIFFER'} between lowlat and DeepEP; combined "
             f"outputs agree within {worst:.2e} of the largest value")

    us = {}
    for library, session in sessions.items():
        us[library] = {
            "dispatch": _time(session.dispatch, barrier, rounds=args["rounds"], calls=args["calls"]),
            "combine": _time(session.combine, barrier, rounds=args["rounds"], calls=args["calls"]),
        }
    record = {"rank": rank, "us": us, "bytes": sessions["lowlat"].received_bytes(), "check": check, "ok": same_rows}
    gathered = [None] * world
    dist.all_gather_object(gathered, record)
    if rank == 0:
        queue.put(_merge(gathered, args, world, fp8))
    barrier()
    for session in sessions.values():
        session.buffer.destroy()
    dist.destroy_process_group()


def _merge(records: list[dict], args: dict, world: int, fp8: bool) -> dict:
    """The slowest rank per library and operation (a collective ends when its last rank does)."""
    us = {lib: {op: max(r["us"][lib][op] for r in records) for op in ("dispatch", "combine")} for lib in LIBRARIES}
    bytes_per_rank = {op: statistics.mean(r["bytes"][op] for r in records) for op in ("dispatch", "combine")}
    return {"kind": "normal-versus-deepep", "num_ranks": world, "num_tokens": args["tokens"], "hidden": args["hidden"],
            "topk": args["topk"], "experts": args["experts"], "dispatch_format": "fp8" if fp8 else "bf16", "us": us,
            "bytes_per_rank": bytes_per_rank, "per_rank": records,
            "check": "\n".join(r["check"] for r in records), "all_rows_identical": all(r["ok"] for r in records)}
