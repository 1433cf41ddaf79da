"""The DeepEP facade on a GPU, driven as DeepEP's users drive it (tests/deepep_conventions.py) under
DeepEP's harness state (default device cuda, default dtype bf16): one process on the ipc transport,
and two processes sharing the GPU (contexts time-slice: correctness only), over ipc and, with
``allow_nvlink_for_low_latency_mode=False``, over NVSHMEM puts to every peer."""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from conftest import nvshmem_skip_reason, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

SHAPE = dict(num_tokens=32, hidden=512, num_experts=16, num_topk=4)


def _worker(rank, world, init_file, device_count, allow_nvlink):
    import torch.distributed as dist

    from lowlat.compat import deep_ep
    from deepep_conventions import run_rank

    torch.cuda.set_device(rank % device_count)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_default_dtype(torch.bfloat16)  # DeepEP's test harness (tests/utils.py init_dist)
    torch.set_default_device("cuda")
    group = dist.new_group(list(range(world)))
    T, H, E, K = SHAPE["num_tokens"], SHAPE["hidden"], SHAPE["num_experts"], SHAPE["num_topk"]
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, world, E)
    buffer = deep_ep.Buffer(group, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True, num_qps_per_rank=E // world,
                            allow_nvlink_for_low_latency_mode=allow_nvlink, explicitly_destroy=True, timeout_s=60.0)
    assert buffer.transport.kind == ("ipc" if allow_nvlink else "nvshmem")
    if not allow_nvlink:  # DeepEP's meaning: no peer through NVLink pointers, every one by RDMA-style puts
        assert buffer.transport.by_pointer == [r == rank for r in range(world)]
    checked = run_rank(buffer, rank, world, num_tokens=T, hidden=H, num_experts=E, num_topk=K,
                       device=torch.device("cuda", torch.cuda.current_device()))
    assert checked > 0
    mask = torch.zeros((world,), dtype=torch.int, device="cuda")
    buffer.low_latency_query_mask_buffer(mask)
    assert mask.sum().item() == 0
    buffer.destroy()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world, allow_nvlink", [(1, True), (2, True), (2, False)], ids=["1", "2", "2-nvshmem-put"])
def test_deepep_session_on_one_gpu(world, allow_nvlink):
    if not allow_nvlink:
        reason = nvshmem_skip_reason()
        if reason is not None:
            pytest.skip(reason)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world, os.path.join(folder, "rendezvous"), torch.cuda.device_count(), allow_nvlink), nprocs=world,
                 join=True)
