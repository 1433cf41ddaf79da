"""Buffers over process groups: several processes share one GPU (their contexts time-slice, so this
checks correctness, never speed) and talk through a real transport, exchanged over a gloo group
(NCCL refuses two ranks on one GPU):

* ``ipc``: CUDA IPC handles, 2 processes;
* ``nvshmem``: NVSHMEM started by unique id, 2 and 4 PEs, in pointer mode (``nvshmem_ptr``) and in
  forced-put mode (``allow_nvlink=False``: every peer through NVSHMEM device-initiated puts, the code
  that runs over IBGDA across nodes).

Each run checks, bit-exact against ``lowlat.reference``: FP8 (per-group and UE8M0 scales) and bf16
dispatch, bf16 and LogFMT combine (LogFMT within its stated bound), hooks, zero-copy, the receive
statistics, a captured step replayed an odd number of times (any parity), and a rank that stops
sending: the others raise a timeout naming it, nothing hangs, and a clean step recovers.  On a
machine with several GPUs the ranks spread over them."""

import os
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import HAS_GPU, nvshmem_skip_reason

SHAPE = dict(max_tokens_per_rank=16, hidden=1536, num_experts=8, num_topk=3)
TIMEOUT_S = 10.0  # per wait for a peer, on time-sliced contexts: generous
RUN_TIMEOUT_S = 420  # the whole multi-process run; a hang fails the test instead of blocking CI


CASES = [
    pytest.param("ipc", 2, True, id="ipc-2"),
    *[pytest.param("nvshmem", world, nvlink, id=f"nvshmem-{world}-{'pointer' if nvlink else 'put'}")
      for world in (2, 4) for nvlink in (True, False)],
]
# (use_fp8, round_scale, use_ue8m0, hook, use_logfmt, zero_copy, topk dtype, routing)
MATRIX = [
    (True, False, False, True, False, False, torch.int64, "random"),
    (True, True, True, False, True, False, torch.int32, "partial"),
    (False, False, False, False, False, True, torch.int64, "random"),
    (False, False, False, True, True, False, torch.int64, "partial"),
    (True, True, False, False, False, True, torch.int32, "random"),
]


def _round_trip(buffer, rank, world, seed, config):
    from helpers import check_dispatch, expert_outputs, make_inputs, reference_combined, reference_for

    use_fp8, round_scale, use_ue8m0, hook, use_logfmt, zero_copy, topk_dtype, routing = config
    T, H, E, K = SHAPE["max_tokens_per_rank"], SHAPE["hidden"], SHAPE["num_experts"], SHAPE["num_topk"]
    inputs = make_inputs(world, T, H, E, K, seed=seed, routing=routing, device="cuda")
    mine = inputs[rank]
    n = mine.num_tokens
    refs = reference_for(inputs, E, T, use_fp8=use_fp8, round_scale=round_scale)
    stats = torch.zeros(E // world, dtype=torch.int32, device="cuda")
    wait = torch.zeros(world, dtype=torch.int64, device="cuda")
    result = buffer.low_latency_dispatch(mine.x[:n], mine.topk_idx[:n].to(topk_dtype), use_fp8=use_fp8, round_scale=round_scale,
                                         use_ue8m0=use_ue8m0, return_recv_hook=hook, cumulative_local_expert_recv_stats=stats,
                                         dispatch_wait_recv_cost_stats=wait)
    if hook:
        result[-1]()
    torch.cuda.synchronize()
    buffer.check_status()
    check_dispatch([result], [refs[rank]], use_fp8=use_fp8, use_ue8m0=use_ue8m0)
    assert torch.equal(stats.cpu(), refs[rank].recv_count), "cumulative_local_expert_recv_stats"
    assert (wait.cpu() >= 0).all()

    # Every rank computes every rank's expert outputs from the reference (what its peers will send).
    fake = [((ref.recv_x, ref.recv_scales) if use_fp8 else ref.recv_x, ref.recv_count) for ref in refs]
    ys = expert_outputs(fake, refs, use_fp8=use_fp8, poison=False)
    y_mine = expert_outputs([result], [refs[rank]], use_fp8=use_fp8, poison=False)[0]
    x = y_mine
    if zero_copy:
        buffer.get_next_low_latency_combine_buffer(result[2]).copy_(y_mine)
        x = torch.empty_like(y_mine)  # DeepEP's convention: x only names the shape
    out, _, recv_hook = buffer.low_latency_combine(x, mine.topk_idx[:n].to(topk_dtype), mine.topk_weights[:n], result[2],
                                                   use_logfmt=use_logfmt, zero_copy=zero_copy, return_recv_hook=hook)
    if hook:
        recv_hook()
    torch.cuda.synchronize()
    buffer.check_status()
    want = reference_combined(inputs, ys, refs, use_logfmt=use_logfmt)
    _check_combine(out, want, inputs, ys, refs, rank, use_logfmt)


def _check_combine(out, want, inputs, ys, refs, rank, use_logfmt):
    """This rank's combined output: bit-exact in bf16, within LogFMT's bound otherwise (see
    helpers.logfmt_tolerance)."""
    from helpers import logfmt_tolerance

    got = out.cpu()
    assert got.shape == want[rank].shape and not got.isnan().any(), f"rank {rank}: combine shape or NaN"
    if not use_logfmt:
        assert torch.equal(got.view(torch.int16), want[rank].view(torch.int16)), f"rank {rank}: combine differs"
    else:
        tolerance = logfmt_tolerance(inputs, ys, refs, rank) + want[rank].float().abs() * 2**-7 + 1e-30
        assert ((got.float() - want[rank].float()).abs() <= tolerance).all(), f"rank {rank}: LogFMT error over the bound"


def _graph_replays(buffer, rank, world, dist):
    from helpers import check_dispatch, expert_outputs, make_inputs, reference_combined, reference_for

    T, H, E, K = SHAPE["max_tokens_per_rank"], SHAPE["hidden"], SHAPE["num_experts"], SHAPE["num_topk"]
    x = torch.zeros(T, H, dtype=torch.bfloat16, device="cuda")
    topk = torch.full((T, K), -1, dtype=torch.int64, device="cuda")
    weights = torch.zeros(T, K, dtype=torch.float32, device="cuda")

    def step():
        recv_x, count, handle, _, hook = buffer.low_latency_dispatch(x, topk, return_recv_hook=True)
        hook()
        y = expert_outputs([(recv_x, count)], [None], use_fp8=True, poison=False)[0]
        out, _, hook = buffer.low_latency_combine(y, topk, weights, handle, return_recv_hook=True)
        hook()
        return recv_x, count, handle, out

    def load(seed):
        inputs = make_inputs(world, T, H, E, K, seed=seed, device="cuda")
        x.copy_(inputs[rank].x); topk.copy_(inputs[rank].topk_idx); weights.copy_(inputs[rank].topk_weights)
        torch.cuda.synchronize()
        dist.barrier()
        return inputs

    load(50)
    step()  # warm-up: an odd number of calls before capture, so the replays start on the other parity
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, count, handle, out = step()
    for replay in range(3):
        inputs = load(60 + replay)
        graph.replay()
        torch.cuda.synchronize()
        buffer.check_status()
        refs = reference_for(inputs, E, T, use_fp8=True)
        check_dispatch([(recv_x, count, handle)], [refs[rank]], use_fp8=True)
        fake = [((ref.recv_x, ref.recv_scales), ref.recv_count) for ref in refs]
        want = reference_combined(inputs, expert_outputs(fake, refs, use_fp8=True, poison=False), refs, use_logfmt=False)[rank]
        assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16)), f"rank {rank}: replay {replay} combine differs"


def _silent_rank_times_out(buffer, rank, world, dist):
    """The last rank skips a dispatch: every other rank raises a timeout naming it within the bound,
    and after the collective clean a checked round trip works again."""
    from helpers import make_inputs

    from lowlat.errors import LowLatencyTimeoutError

    silent = world - 1
    T, H, E, K = SHAPE["max_tokens_per_rank"], SHAPE["hidden"], SHAPE["num_experts"], SHAPE["num_topk"]
    dist.barrier()
    if rank != silent:
        mine = make_inputs(world, T, H, E, K, seed=70, device="cuda")[rank]
        start = time.perf_counter()
        buffer.low_latency_dispatch(mine.x, mine.topk_idx)
        torch.cuda.synchronize()
        assert time.perf_counter() - start < TIMEOUT_S + 20
        with pytest.raises(LowLatencyTimeoutError) as info:
            buffer.check_status()
        assert info.value.rank == silent and f"rank {silent}" in str(info.value)
        mask = torch.zeros(world, dtype=torch.int32, device="cuda")
        buffer.low_latency_query_mask_buffer(mask)
        assert mask.tolist()[silent] == 1
    dist.barrier()
    buffer.clean_low_latency_buffer()
    _round_trip(buffer, rank, world, 71, MATRIX[0])


def _worker(rank, world, init_file, transport, nvlink, device_count):
    import torch.distributed as dist

    import lowlat
    from lowlat.errors import ArgumentError

    torch.cuda.set_device(rank % device_count)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # Shapes that differ across ranks are refused on every rank before the transport starts (no hang).
    wrong = dict(SHAPE, max_tokens_per_rank=SHAPE["max_tokens_per_rank"] + rank)
    with pytest.raises(ArgumentError, match=r"\(shape, transport, allow_nvlink\) differs across ranks \(rank 0: "):
        lowlat.Buffer(dist.group.WORLD, transport=transport, allow_nvlink=nvlink, **wrong)
    buffer = lowlat.Buffer(dist.group.WORLD, transport=transport, allow_nvlink=nvlink, timeout_s=TIMEOUT_S,
                           enable_zero_copy=True, **SHAPE)
    assert buffer.transport.kind == transport
    # The kernels are built for the transport: NVSHMEM's flavour of kernels/transport.cuh, or plain stores.
    assert buffer._ctx.config.transport == ("nvshmem" if transport == "nvshmem" else "peer")
    # Ranks on several GPUs (here: processes, each a GPU of its own as far as the kernels know) use
    # system-scope flags, and launch with programmatic dependent launch on sm_90+.
    assert buffer._ctx.config.peers_on_device is False
    assert buffer._ctx.pdl == (torch.cuda.get_device_capability()[0] >= 9)
    if transport == "nvshmem":
        want = [True] * world if nvlink else [r == rank for r in range(world)]
        assert buffer.transport.by_pointer == want, f"rank {rank}: peer_bases {buffer.transport.peer_bases.tolist()}"

    words = torch.arange(4, dtype=torch.int64, device="cuda") + 100 * rank
    gathered = buffer.exchange_words(words)
    assert gathered.cpu().tolist() == [[100 * r + i for i in range(4)] for r in range(world)]
    for step, config in enumerate(MATRIX):
        _round_trip(buffer, rank, world, step, config)
        dist.barrier()
    _graph_replays(buffer, rank, world, dist)
    _silent_rank_times_out(buffer, rank, world, dist)
    dist.barrier()
    buffer.destroy()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("transport, world, nvlink", CASES)
def test_processes_share_one_gpu(transport, world, nvlink):
    if not HAS_GPU:
        pytest.skip("needs an NVIDIA GPU: this machine has no CUDA device (runs on the GPU machines via bench/gpu_check.sh)")
    if transport == "nvshmem":
        reason = nvshmem_skip_reason()
        if reason is not None:
            pytest.skip(reason)
        # Fill the disk cache here (nvcc, in parallel) rather than in every worker at once.
        from lowlat.jit import compile_all
        from lowlat.jit.registry import low_latency_specs
        from lowlat.layout import BufferShape

        compile_all(low_latency_specs(BufferShape(world, SHAPE["num_experts"], SHAPE["num_topk"], SHAPE["hidden"],
                                                  SHAPE["max_tokens_per_rank"]), "nvshmem"))
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(_worker, args=(world, os.path.join(folder, "rendezvous"), transport, nvlink,
                                                    torch.cuda.device_count()), nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{transport} with {world} processes ran past {RUN_TIMEOUT_S} s")
