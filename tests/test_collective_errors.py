"""A mistake on one rank of a process group is an error on every rank, never a hang: Buffer and the
DeepEP facade agree over the group (lowlat.transport.base.agree) on their arguments and on whether
each rank can build the transport before any transport starts.  Two CPU processes over gloo; the
device check is bypassed (the errors under test come before any GPU work)."""

import multiprocessing

import pytest


SHAPE = dict(max_tokens_per_rank=4, hidden=256, num_experts=4, num_topk=2)


def _worker(rank, init_file, case, queue):
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import lowlat
    import lowlat.buffer
    from lowlat.compat import deep_ep

    torch.cuda.is_available = lambda: True  # as on a GPU machine: the errors under test come first
    lowlat.buffer.capturing = lambda: False  # (the CPU wheel has no capture query)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        if case == "shape":  # rank 1 asks for experts that do not divide among the ranks
            lowlat.Buffer(dist.group.WORLD, **dict(SHAPE, num_experts=5 if rank == 1 else 4))
        elif case == "different":  # valid on each rank, but not the same
            lowlat.Buffer(dist.group.WORLD, **dict(SHAPE, hidden=256 * (rank + 1)))
        elif case == "nvcc":  # rank 0 lacks nvcc for the nvshmem kernels
            if rank == 0:
                os.environ["LOWLAT_NVCC"] = "/nonexistent/nvcc"
            lowlat.Buffer(dist.group.WORLD, transport="nvshmem", **SHAPE)
        elif case == "facade":  # rank 1 passes a num_rdma_bytes DeepEP would refuse
            deep_ep.Buffer(dist.group.WORLD, 0, 100 if rank == 1 else 1 << 20, low_latency_mode=True)
        elif case == "setup":  # rank 1's set-up fails after the transport exists (a rank_mask of the wrong shape)
            from lowlat.layout import BufferShape, RegionLayout
            from lowlat.transport.local import LocalWorld

            closed = []
            world = LocalWorld(2, RegionLayout.of(BufferShape(2, 4, 2, 256, 4)).total_bytes, "cpu")
            transport = world.transport(rank)
            transport.close = lambda: closed.append(rank)  # every rank must release what it built
            lowlat.buffer.make_transport = lambda *args: transport  # CPU stand-in for the ipc transport
            mask = torch.zeros(3 if rank == 1 else 2, dtype=torch.int32, device="cpu")
            try:
                lowlat.Buffer(dist.group.WORLD, rank_mask=mask, **SHAPE)
            finally:
                assert closed == [rank], closed
        queue.put((rank, "ok", ""))
    except Exception as exc:
        queue.put((rank, type(exc).__name__, str(exc)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case, error, origin, needle", [
    ("shape", "ArgumentError", 1, "num_experts=5 must be divisible by num_ranks=2"),
    ("different", "ArgumentError", None, "differs across ranks"),
    ("nvcc", "UnavailableError", 0, "LOWLAT_NVCC='/nonexistent/nvcc' is not an executable nvcc"),
    ("facade", "ArgumentError", 1, "num_rdma_bytes must be a non-negative multiple of 128, got 100"),
    ("setup", "ArgumentError", 1, "rank_mask must have shape [2], got (3,)"),
])
def test_one_ranks_mistake_is_raised_on_every_rank(case, error, origin, needle, tmp_path):
    if case == "nvcc":
        pytest.importorskip("nvshmem.core", reason="nvshmem4py not installed (pip install 'lowlat[nvshmem]')")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "rendezvous"), case, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = sorted(queue.get(timeout=120) for _ in procs)  # a hang fails here instead of blocking
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    for rank, kind, message in results:
        assert kind == error, (rank, kind, message)
        assert needle in message, (rank, message)
        if origin is not None and rank != origin:  # relayed: names the rank it came from
            assert message.startswith(f"rank {origin}: "), message
