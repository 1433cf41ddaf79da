"""The NVSHMEM transport on one GPU: 2 and 4 processes (time-sliced contexts, no MPS) start NVSHMEM
by unique id over a gloo group, and the ring kernel (kernels/nvshmem_ring.cuh) moves exact data
between them through the pointer path (nvshmem_ptr) and through NVSHMEM puts (nvlink=False),
eagerly and from a replayed CUDA graph; a PE that does not send is reported by its successor as a
timeout naming it.  On a machine with several GPUs the ranks spread over them."""

import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port, nvshmem_skip_reason


SKIP = nvshmem_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=f"{SKIP}")]

MESSAGE_BYTES, NUM_WARPS = 16 * 1024, 4
RUN_TIMEOUT_S = 300  # the whole multi-process run; a hang fails the test instead of blocking
CALL_TIMEOUT_NS = 10_000_000_000  # a ring call on time-sliced contexts: generous
SILENT_TIMEOUT_NS = 1_000_000_000  # the bounded wait for the PE that never sends


def _worker(rank, world, port, nvlink):
    import torch.distributed as dist

    from lowlat.errors import UnavailableError
    from lowlat.jit import Kernel
    from lowlat.jit.nvcc import NvshmemCompiler
    from lowlat.transport.nvshmem import NvshmemTransport
    from lowlat.transport.nvshmem_ring import STATUS_TIMEOUT, Ring, RingLayout, decode_status, ring_spec

    device_index = rank % torch.cuda.device_count()
    torch.cuda.set_device(device_index)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    layout = RingLayout(world, MESSAGE_BYTES, NUM_WARPS)
    compiled = NvshmemCompiler().compile(ring_spec(layout))  # from the disk cache the parent filled
    kernel = Kernel(compiled)
    with pytest.raises(UnavailableError, match="NVSHMEM is not running"):
        kernel.load(device_index)  # the loader runs the cubin's module hook, which needs NVSHMEM up

    transport = NvshmemTransport(dist.group.WORLD, layout.region_bytes + 4096, nvlink=nvlink)
    assert (transport.rank, transport.num_ranks, transport.pe) == (rank, world, rank)
    assert transport.region.dtype == torch.uint8 and transport.region.device == torch.device("cuda", device_index)
    assert transport.region_bytes == layout.region_bytes + 4096 and not transport.region.any()
    assert transport.peer_bases.dtype == torch.int64 and transport.peer_bases.device == transport.region.device
    assert int(transport.peer_bases[rank]) == transport.region.data_ptr()
    # One node: NVSHMEM maps every peer (P2P); nvlink=False keeps only this rank's own entry.
    want_pointer = [True] * world if nvlink else [r == rank for r in range(world)]
    assert transport.by_pointer == want_pointer, f"rank {rank}: peer_bases {transport.peer_bases.tolist()}"

    # Kernel.load binds NVSHMEM to the module now that it runs; the hook is idempotent.
    loaded = kernel.load(device_index)
    compiled.module_init(loaded, device_index)
    ring = Ring(transport, layout, kernel, timeout_ns=CALL_TIMEOUT_NS)

    def check(epoch, *, late=None):
        torch.cuda.synchronize()
        code, who, value = decode_status(int(ring.status.item()) & (2**64 - 1))
        if late is not None and rank == (late + 1) % world:
            assert (code, who, value) == (STATUS_TIMEOUT, late, epoch), f"rank {rank}: status {(code, who, value)}"
            assert bool((ring.received == -1).all()) and int(ring.header.item()) == -1
            ring.reset_status()
            return
        assert (code, who, value) == (0, 0, 0), f"rank {rank} call {epoch}: status {(code, who, value)}"
        words, header = ring.expected(epoch)
        got = ring.received.cpu()
        bad = (got != words).nonzero()
        assert bad.numel() == 0, (f"rank {rank} call {epoch}: {bad.numel()} words differ, first at {int(bad[0])}: "
                                  f"{int(got[bad[0]]):#x} != {int(words[bad[0]]):#x}")
        assert int(ring.header.item()) == header, f"rank {rank} call {epoch}: header {int(ring.header.item()):#x}"

    # Eager calls.
    for epoch in (1, 2, 3):
        ring.received.fill_(0)
        transport.barrier()
        ring.launch()
        check(epoch)

    # A captured call, replayed: every per-call value lives on the device.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ring.launch()
    for epoch in (4, 5, 6):
        ring.received.fill_(0)
        torch.cuda.synchronize()
        transport.barrier()
        graph.replay()
        check(epoch)
    assert ring.calls() == 6

    # A PE that does not send: its successor reports a timeout naming it, the others go on.
    silent = 1
    ring.timeout_ns = SILENT_TIMEOUT_NS
    transport.barrier()
    start = time.perf_counter()
    ring.launch(silent_rank=silent)
    check(7, late=silent)
    assert time.perf_counter() - start < 30, "the bounded wait did not end"

    transport.barrier()
    transport.close()
    transport.close()  # idempotent
    dist.destroy_process_group()


@pytest.mark.parametrize("nvlink", [True, False], ids=["pointer", "put"])
@pytest.mark.parametrize("world", [2, 4])
def test_ring_across_processes_on_one_gpu(world, nvlink):
    from lowlat.jit.nvcc import NvshmemCompiler
    from lowlat.transport.nvshmem_ring import RingLayout, ring_spec

    # Compile once here, so the workers load from the disk cache instead of running nvcc together.
    NvshmemCompiler().compile(ring_spec(RingLayout(world, MESSAGE_BYTES, NUM_WARPS)))
    context = mp.start_processes(_worker, args=(world, free_port(), nvlink), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not context.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world} NVSHMEM processes (nvlink={nvlink}) did not finish within {RUN_TIMEOUT_S} s")
