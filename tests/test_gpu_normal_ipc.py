"""Normal mode on the ipc transport: two processes share one GPU through CUDA IPC handles (gloo for
the handle exchange).  Their contexts time-slice, so this checks correctness, not speed; on a machine
with two GPUs the same code runs one process per GPU."""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

SHAPE = dict(hidden=512, num_experts=8, max_tokens_per_rank=24, max_topk=4)
WORLD = 2


def _worker(rank, init_file, device_count):
    import torch.distributed as dist

    from lowlat.normal import NormalBuffer

    torch.cuda.set_device(rank % device_count)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    buffer = NormalBuffer(dist.group.WORLD, timeout_s=30.0, **SHAPE)
    assert buffer.transport.kind == "ipc"
    exercise(rank, buffer)
    dist.barrier()
    buffer.destroy()
    dist.destroy_process_group()


def exercise(rank, buffer):
    """One rank's share of four dispatch / cached dispatch / combine rounds (FP8 and bf16, exact and
    num_worst_tokens outputs), each checked against the reference of every rank's inputs.  Every rank
    of ``buffer``'s group runs it at once (processes here; host threads in test_normal_cpu.py)."""
    from lowlat import reference
    from normal_helpers import check_combine, check_dispatch, expert_output, make_inputs, reference_dispatch

    E, T, H = SHAPE["num_experts"], SHAPE["max_tokens_per_rank"], SHAPE["hidden"]
    device = buffer.device

    for step, (fp8, worst) in enumerate([(True, 0), (False, 0), (True, WORLD * T), (False, WORLD * T)]):
        inputs = make_inputs(WORLD, T, H, E, 3, seed=step, routing="partial" if step % 2 else "random", device=device)
        mine = inputs[rank]
        per_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine.topk_idx, E)
        x = (mine.x_fp8, mine.x_scales) if fp8 else mine.x
        result = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                 topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, expert_alignment=4, num_worst_tokens=worst)
        buffer.synchronize()
        refs = reference_dispatch(inputs, E, fp8=fp8, expert_alignment=4)
        check_dispatch([result], [refs[rank]], fp8=fp8, num_worst_tokens=worst)
        cached = buffer.dispatch(x, handle=result[4])
        buffer.synchronize()
        n = refs[rank].recv_x.shape[0]
        same = (cached[0][0], result[0][0]) if fp8 else (cached[0], result[0])
        assert torch.equal(same[0][:n].view(torch.uint8), same[1][:n].view(torch.uint8)), "cached dispatch differs"

        ys = [expert_output(r, (ref.recv_x, ref.recv_scales) if fp8 else ref.recv_x, ref.recv_x.shape[0], fp8=fp8) for r, ref in enumerate(refs)]
        y_mine = expert_output(rank, result[0], n, fp8=fp8)
        bias = torch.ones(mine.num_tokens, H, dtype=torch.bfloat16, device=device)
        out = buffer.combine(y_mine, result[4], topk_weights=result[2], bias=bias)
        buffer.synchronize()
        weights = [ref.recv_topk_weights for ref in refs]
        expected = reference.reference_normal_combine(ys, refs, [i.num_tokens for i in inputs], topk_weights=weights,
                                                      biases=[(torch.ones(i.num_tokens, H, dtype=torch.bfloat16),) for i in inputs])
        check_combine([out], [expected[rank]])


def test_two_processes_share_one_gpu_through_ipc():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(os.path.join(folder, "rendezvous"), torch.cuda.device_count()), nprocs=WORLD, join=True)
