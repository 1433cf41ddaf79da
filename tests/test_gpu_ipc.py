"""The ipc transport across processes: two processes share one GPU through CUDA IPC handles
(exchanged over a gloo group; NCCL refuses two ranks on one GPU).  Their contexts time-slice, so
this checks correctness, not speed.  On a machine with two GPUs the same code runs one process per GPU."""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

SHAPE = dict(max_tokens_per_rank=16, hidden=512, num_experts=8, num_topk=3)
WORLD = 2


def _reference_outputs(refs, use_fp8):
    from helpers import expert_outputs

    fake = [((ref.recv_x, ref.recv_scales) if use_fp8 else ref.recv_x, ref.recv_count) for ref in refs]
    return expert_outputs(fake, refs, use_fp8=use_fp8, poison=False)


def _worker(rank, init_file, device_count):
    import torch.distributed as dist

    import lowlat
    from helpers import check_dispatch, expert_outputs, make_inputs, reference_combined, reference_for

    torch.cuda.set_device(rank % device_count)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    buffer = lowlat.Buffer(dist.group.WORLD, timeout_s=30.0, **SHAPE)
    assert buffer.transport.kind == "ipc"

    # Device-side all-gather through the opened IPC handles.
    words = torch.arange(4, dtype=torch.int64, device="cuda") + 100 * rank
    gathered = buffer.exchange_words(words)
    assert gathered.cpu().tolist() == [[100 * r + i for i in range(4)] for r in range(WORLD)]

    T, H, E, K = SHAPE["max_tokens_per_rank"], SHAPE["hidden"], SHAPE["num_experts"], SHAPE["num_topk"]
    for step, (hook, use_logfmt) in enumerate([(True, False), (False, False), (True, True), (False, True)]):
        inputs = make_inputs(WORLD, T, H, E, K, seed=step, routing="partial" if step % 2 else "random", device="cuda")
        mine = inputs[rank]
        refs = reference_for(inputs, E, T, use_fp8=True)
        result = buffer.low_latency_dispatch(mine.x[: mine.num_tokens], mine.topk_idx[: mine.num_tokens], return_recv_hook=hook)
        if hook:
            result[-1]()
        torch.cuda.synchronize()
        buffer.check_status()
        check_dispatch([result], [refs[rank]], use_fp8=True)
        ys = _reference_outputs(refs, use_fp8=True)
        y_mine = expert_outputs([result], [refs[rank]], use_fp8=True, poison=False)[0]
        n = mine.num_tokens
        out, _, recv_hook = buffer.low_latency_combine(y_mine, mine.topk_idx[:n], mine.topk_weights[:n], result[2],
                                                        use_logfmt=use_logfmt, return_recv_hook=hook)
        if hook:
            recv_hook()
        torch.cuda.synchronize()
        buffer.check_status()
        want = reference_combined(inputs, ys, refs, use_logfmt=use_logfmt)[rank]
        if use_logfmt:
            from helpers import logfmt_tolerance
            tolerance = logfmt_tolerance(inputs, ys, refs, rank) + want.float().abs() * 2**-7
            assert ((out.cpu().float() - want.float()).abs() <= tolerance).all()
        else:
            assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16))

    # A captured step replayed with new inputs.
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

    inputs = make_inputs(WORLD, T, H, E, K, seed=50, device="cuda")
    x.copy_(inputs[rank].x); topk.copy_(inputs[rank].topk_idx); weights.copy_(inputs[rank].topk_weights)
    step()
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, count, handle, out = step()
    for replay in range(3):
        inputs = make_inputs(WORLD, T, H, E, K, seed=60 + replay, device="cuda")
        x.copy_(inputs[rank].x); topk.copy_(inputs[rank].topk_idx); weights.copy_(inputs[rank].topk_weights)
        torch.cuda.synchronize()
        dist.barrier()
        graph.replay()
        torch.cuda.synchronize()
        buffer.check_status()
        refs = reference_for(inputs, E, T, use_fp8=True)
        check_dispatch([(recv_x, count, handle)], [refs[rank]], use_fp8=True)
        want = reference_combined(inputs, _reference_outputs(refs, use_fp8=True), refs, use_logfmt=False)[rank]
        assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16))
    dist.barrier()
    buffer.destroy()
    dist.destroy_process_group()


def test_two_processes_share_one_gpu_through_ipc():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(os.path.join(folder, "rendezvous"), torch.cuda.device_count()), nprocs=WORLD, join=True)
