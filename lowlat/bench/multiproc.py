"""Several processes over a process group (``--transport``: ipc, or nvshmem with ``--no-nvlink`` for
puts to every peer): one per GPU (spawned here, no external launcher), with ranks aligned by a
barrier before every timed round, next to NCCL ``all_to_all_single`` of the same bytes, the peer copy
bandwidth and the flag round trip measured in the same run.  When processes outnumber GPUs
(``--processes 2``, or ``--transport nvshmem`` on one GPU) they share it and their contexts
time-slice: correctness only, no timings."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from .runner import LocalRanks


def run_processes(args, processes: int, env: dict, out: Path) -> int:
    import torch.multiprocessing as mp

    from . import report

    gpus = torch.cuda.device_count()
    share = processes > gpus
    transport = args.transport + (" (puts to every peer)" if args.no_nvlink else "")
    print(f"lowlat.bench: {processes} processes on the {transport} transport over {gpus} GPU(s)"
          + (" (processes share GPUs, their contexts time-slice: correctness only, no timings)" if share else ""))
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.spawn(_worker, args=(processes, gpus, os.path.join(folder, "rendezvous"), vars(args), queue), nprocs=processes, join=True)
        record = queue.get()
    print(record["check"])
    if share:
        return 0
    record["environment"] = env
    points = record["points"]
    print(f"peer copy bandwidth {record['peer_copy_gbps']:.0f} GB/s, flag round trip (device all-gather) "
          f"{record['flag_round_trip_us']:.2f} us, device copy {record['copy_bandwidth_gbps']:.0f} GB/s")
    kind = record["kind"]
    print(report.table(points, f"{kind} transport, {processes} processes on {processes} GPUs"))
    for p in points:
        print(f"  T={p['num_tokens']}: NCCL all_to_all_single dispatch {p['nccl_dispatch_us']:.1f} us "
              f"({p['nccl_dispatch_us'] / p['dispatch']['us']:.1f}x lowlat), combine {p['nccl_combine_us']:.1f} us "
              f"({p['nccl_combine_us'] / p['combine']['us']:.1f}x lowlat)")
    stem = f"{kind}{processes}-{env['device'].replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"wrote {report.write_json(out, record, stem)}")
    plot = report.plot(out, points, f"lowlat on {processes}x {env['device']} ({kind} transport)", stem)
    if plot:
        print(f"wrote {plot}")
    return 0


def _worker(rank: int, world: int, gpus: int, init_file: str, args: dict, queue) -> None:
    import torch.distributed as dist

    from ..buffer import Buffer
    from ..layout import BufferShape
    from ..transport.ipc import _DeviceMemory
    from .baselines import copy_bandwidth
    from .timing import time_replays
    from .workload import Config, Workload

    share = world > gpus
    torch.cuda.set_device(rank % gpus)
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("gloo" if share else "cpu:gloo,cuda:nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    tokens = args["token_list"]
    shape = BufferShape(world, args["experts"], args["topk"], args["hidden"], max(tokens))
    buffer = Buffer(dist.group.WORLD, max_tokens_per_rank=shape.max_tokens_per_rank, hidden=shape.hidden,
                    num_experts=shape.num_experts, num_topk=shape.num_topk, timeout_s=60.0 if share else 10.0,
                    transport=args["transport"], allow_nvlink=not args["no_nvlink"])
    record = {"kind": buffer.transport.kind, "num_ranks": world, "args": args, "points": []}

    def barrier():
        torch.cuda.synchronize()
        dist.barrier()

    for i, n in enumerate(tokens):
        config = Config(shape, n, use_fp8=args["dispatch"] == "fp8", use_logfmt=args["logfmt"])
        work = Workload.make(config, device, seed=i)
        mine = _OneRank(buffer, work, rank)
        if i == 0 or args["check_all"]:
            record["check"] = _check_my_rank(mine, rank, world)
        if share:
            continue
        barrier()
        mine.dispatch()
        mine.make_expert_outputs()
        barrier()
        t_dispatch = time_replays(mine.dispatch, rounds=args["rounds"], calls_per_graph=args["calls_per_graph"], before_round=barrier)
        t_combine = time_replays(mine.combine, rounds=args["rounds"], calls_per_graph=args["calls_per_graph"], before_round=barrier)
        counts = work.byte_counts()
        per_rank = {op: counts[f"deepep_{op}"] // world for op in ("dispatch", "combine")}
        nccl = {op: _time_all_to_all(per_rank[op], world, device, barrier, args["rounds"]) for op in per_rank}
        point = {"num_ranks": world, "num_tokens": n, "label": config.label, "bytes": counts,
                 "timings_us": {"dispatch": t_dispatch.as_dict(), "combine": t_combine.as_dict()},
                 "nccl_dispatch_us": nccl["dispatch"], "nccl_combine_us": nccl["combine"]}
        record["points"].append(point)

    if not share:
        record["copy_bandwidth_gbps"] = copy_bandwidth(device)
        record["peer_copy_gbps"] = _peer_copy_gbps(buffer, rank, barrier, _DeviceMemory)
        words = torch.zeros(4, dtype=torch.int64, device=device)
        record["flag_round_trip_us"] = time_replays(lambda: buffer.exchange_words(words), rounds=args["rounds"],
                                                    calls_per_graph=50, before_round=barrier).median_us
    gathered = [None] * world
    dist.all_gather_object(gathered, record)
    if rank == 0:
        queue.put(_merge(gathered))
    barrier()
    buffer.destroy()
    dist.destroy_process_group()


class _OneRank(LocalRanks):
    """This process's rank of a multi-process run, with the LocalRanks call interface."""

    def __init__(self, buffer, work, rank: int):
        super().__init__([buffer], work)
        self.rank = rank
        import types
        self.work = types.SimpleNamespace(config=work.config, x=work.x[rank: rank + 1], topk_idx=work.topk_idx[rank: rank + 1],
                                          topk_weights=work.topk_weights[rank: rank + 1], full=work)


def _check_my_rank(mine: _OneRank, rank: int, world: int) -> str:
    """Check this rank's dispatch and combine against the reference of every rank's inputs."""
    from .. import reference

    full, c = mine.work.full, mine.work.config
    s, n = c.shape, c.num_tokens
    results = mine.dispatch()
    ys = mine.make_expert_outputs()
    outs = mine.combine()
    torch.cuda.synchronize()
    mine.buffers[0].check_status()
    xs = [full.x[r, :n].cpu() for r in range(world)]
    topks = [full.topk_idx[r, :n].cpu() for r in range(world)]
    refs = reference.reference_dispatch(xs, topks, num_experts=s.num_experts, max_tokens_per_rank=s.max_tokens_per_rank, use_fp8=c.use_fp8)
    ref = refs[rank]
    count = results[0][1].cpu()
    data = results[0][0][0] if c.use_fp8 else results[0][0]
    assert torch.equal(count, ref.recv_count), f"rank {rank}: recv_count differs"
    for l in range(s.num_local_experts):
        k = int(count[l])
        assert torch.equal(data[l, :k].cpu().view(torch.uint8), ref.recv_x[l, :k].view(torch.uint8)), f"rank {rank}: rows differ"
    # Every rank's expert outputs are the same function of its received rows, so each rank can
    # rebuild the others' from the reference dispatch.
    def expert(recv_x, scales):
        y = recv_x.float() if scales is None else (recv_x.float().unflatten(-1, (-1, 128)) * scales.unsqueeze(-1)).flatten(-2)
        return (y * 0.5).to(torch.bfloat16)
    all_ys = [expert(r.recv_x, r.recv_scales) for r in refs]
    weights = [full.topk_weights[r, :n].cpu() for r in range(world)]
    want = reference.reference_combine(all_ys, refs, topks, weights, use_logfmt=c.use_logfmt)[rank]
    got = outs[0][0][:n].cpu()
    if c.use_logfmt:
        from .. import formats
        worst = float((got.float() - want.float()).abs().amax() / want.float().abs().amax().clamp_min(1e-30))
        assert worst <= 4 * formats.logfmt_max_relative_error(), f"rank {rank}: LogFMT combine off by {worst:.3g}"
    else:
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"rank {rank}: combine differs"
    del ys
    return f"correct: every rank's dispatch bit-exact and combine {'within LogFMT bounds' if c.use_logfmt else 'bit-exact'} vs lowlat.reference ({c.label})"


def _time_all_to_all(bytes_per_rank: int, world: int, device, barrier, rounds: int) -> float:
    import torch.distributed as dist

    chunk = max(16, bytes_per_rank // world // 16 * 16)
    send = torch.empty(chunk * world, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    for _ in range(3):
        dist.all_to_all_single(recv, send)
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        barrier()
        start.record()
        for _ in range(10):
            dist.all_to_all_single(recv, send)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / 10)
    samples.sort()
    return samples[len(samples) // 2]


def _peer_copy_gbps(buffer, rank: int, barrier, device_memory) -> float:
    """Rank 0 copies into rank 1's region over the peer mapping (bytes read + written are not both
    counted here: this is the link bandwidth, bytes moved / time)."""
    size = buffer.transport.region_bytes // 2
    result = float("nan")
    barrier()
    if rank == 0 and int(buffer.transport.peer_bases[1]) != 0:  # not for peers reached only by NVSHMEM puts
        peer = torch.as_tensor(device_memory(int(buffer.transport.peer_bases[1]), size), device=buffer.device)
        src = torch.empty(size, dtype=torch.uint8, device=buffer.device)
        peer.copy_(src)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            peer.copy_(src)
        end.record()
        end.synchronize()
        result = size * 20 / (start.elapsed_time(end) / 1e3) / 1e9
    barrier()
    return result


def _merge(records: list[dict]) -> dict:
    """Rank 0's view, with each timing the slowest rank's (a collective ends when its last rank does)."""
    merged = dict(records[0])
    for i, point in enumerate(merged.get("points", [])):
        for op in ("dispatch", "combine"):
            slowest = max(r["points"][i]["timings_us"][op]["median_us"] for r in records)
            point[op] = {"us": slowest, "nccl_us": max(r["points"][i][f"nccl_{op}_us"] for r in records)}
            point[op]["speedup_vs_nccl"] = point[op]["nccl_us"] / slowest
            point[op]["deepep_gbps_per_rank"] = point["bytes"][f"deepep_{op}"] / len(records) / (slowest * 1e3)
            point[op]["torch_us"] = float("nan")
            point[op]["speedup_vs_torch"] = float("nan")
            point[op]["floor_us"] = float("nan")
            point[op]["x_floor"] = float("nan")
            point[op]["deepep_gbps_aggregate"] = point["bytes"][f"deepep_{op}"] / (slowest * 1e3)
    merged["peer_copy_gbps"] = records[0].get("peer_copy_gbps")
    return merged
