"""Normal-mode kernels against lowlat.reference, with R virtual ranks on one GPU (local transport):
every rank on its own stream and host thread (the ranks' kernels are co-resident: each uses at most
SMs / R blocks).  Dispatch and combine must match the reference bit for bit (bytes are moved, and
combine adds in the reference's fp32 order)."""

import zlib

import pytest
import torch

from conftest import requires_gpu
from lowlat import reference
from lowlat.bench.normal import replay_on_comm_streams
from lowlat.errors import NormalTimeoutError, RoutingError
from lowlat.normal import NormalBuffer, NormalConfig
from normal_helpers import (assert_same, check_combine, check_dispatch, expert_outputs, make_inputs, reference_dispatch, round_trip,
                            run_ranks)

pytestmark = [pytest.mark.gpu, requires_gpu]

DEVICE = "cuda"  # the CPU dry run of this file's logic (emulated engine) sets "cpu"
SMALL = dict(hidden=512, num_experts=32, max_tokens_per_rank=48, max_topk=8)
_groups = {}


def gpu_group(num_ranks, **shape):
    key = (num_ranks, tuple(sorted(shape.items())))
    if key not in _groups:
        _groups[key] = NormalBuffer.local_group(num_ranks, device=DEVICE, timeout_s=5.0, **shape)
    return _groups[key]


def inputs_for(num_ranks, shape, *, num_topk=6, routing="random", seed=None, topk_dtype=torch.int64):
    seed = zlib.crc32(repr((num_ranks, routing, num_topk, shape["hidden"])).encode()) if seed is None else seed
    return make_inputs(num_ranks, shape["max_tokens_per_rank"], shape["hidden"], shape["num_experts"], num_topk, seed=seed,
                       routing=routing, device=DEVICE, topk_dtype=topk_dtype)


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_round_trip(num_ranks, fp8):
    buffers = gpu_group(num_ranks, **SMALL)
    round_trip(buffers, inputs_for(num_ranks, SMALL, routing="partial"), fp8=fp8, expert_alignment=4, num_biases=2, cached=True)


@pytest.mark.parametrize("routing", ["nowhere", "one_rank", "zero_tokens_rank"])
@pytest.mark.parametrize("num_ranks", [2, 8])
def test_adversarial_routing(routing, num_ranks):
    buffers = gpu_group(num_ranks, **SMALL)
    inputs = inputs_for(num_ranks, SMALL, routing=routing)
    round_trip(buffers, inputs, fp8=True, num_biases=1)
    round_trip(buffers, inputs, fp8=False, expert_alignment=128)


def test_without_topk_int32_indices_and_layout_inside_dispatch():
    buffers = gpu_group(4, **SMALL)
    inputs = inputs_for(4, SMALL, topk_dtype=torch.int32)
    round_trip(buffers, inputs, with_topk=False, cached=True)
    results, _ = round_trip(buffers, inputs, fp8=True, use_layout=False)
    assert all(r[1].dtype == torch.int32 for r in results)


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_get_dispatch_layout_matches_reference_at_prefill_scale(num_ranks):
    shape = dict(hidden=128, num_experts=256, max_tokens_per_rank=4096, max_topk=8)
    (buffer, *_) = gpu_group(num_ranks, **shape)
    g = torch.Generator().manual_seed(num_ranks)
    topk = torch.rand(4096, 256, generator=g).argsort(dim=1)[:, :8].contiguous()
    topk[::7, 3] = -1
    per_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk.to(DEVICE), 256)
    buffer.synchronize()
    want = reference.reference_normal_layout(topk, 256, num_ranks)
    for name, got, expected in zip(("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"), (per_rank, per_expert, in_rank), want):
        assert got.dtype == expected.dtype, f"{name}: dtype {got.dtype}, expected {expected.dtype}"
        assert torch.equal(got.cpu(), expected), f"{name} differs from the reference"


def test_async_finish_previous_event_and_comm_stream_allocation():
    buffers = gpu_group(4, **SMALL)
    round_trip(buffers, inputs_for(4, SMALL), fp8=True, async_finish=True, previous_event=True, num_biases=2)

    inputs = inputs_for(4, SMALL, seed=3)

    def call(r, b):
        ev = b.capture()
        out = b.dispatch(inputs[r].x, topk_idx=inputs[r].topk_idx, topk_weights=inputs[r].topk_weights, previous_event=ev,
                         async_finish=True, allocate_on_comm_stream=True)
        out[-1].current_stream_wait()
        return out

    results = run_ranks(buffers, call)
    check_dispatch(results, reference_dispatch(inputs, SMALL["num_experts"], fp8=False), fp8=False)
    run_ranks(buffers, lambda r, b: b.combine(results[r][0], results[r][4]))


@pytest.mark.parametrize("num_ranks", [1, 4, 8])
def test_num_worst_tokens_eager_and_graph_replay(num_ranks):
    """num_worst_tokens: static shapes, no host synchronisation, so each rank's dispatch + combine is
    captured in a CUDA graph; replays (with the inputs overwritten in place, interleaved with eager
    calls) match the reference every time."""
    shape = SMALL
    buffers = gpu_group(num_ranks, **shape)
    worst = num_ranks * shape["max_tokens_per_rank"]
    inputs = inputs_for(num_ranks, shape, seed=11)
    round_trip(buffers, inputs, fp8=True, num_worst_tokens=worst, expert_alignment=8, num_biases=2, cached=True)

    # Static inputs the graphs read; each replay refills them.
    static = inputs_for(num_ranks, shape, seed=12)
    ys = [torch.zeros(worst, shape["hidden"], dtype=torch.bfloat16, device="cuda") for _ in buffers]

    def step(r, b):
        i = static[r]
        recv, recv_topk, recv_weights, _, handle, _ = b.dispatch((i.x_fp8, i.x_scales), topk_idx=i.topk_idx, topk_weights=i.topk_weights,
                                                                num_worst_tokens=worst, expert_alignment=8)
        combined, combined_weights, _ = b.combine(ys[r], handle, topk_weights=recv_weights)
        return recv, recv_topk, recv_weights, handle, combined, combined_weights

    graphs, outputs = [], []
    for r, b in enumerate(buffers):
        stream = b.get_comm_stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outputs.append(step(r, b))
        graphs.append(graph)
    torch.cuda.synchronize()

    for replay in range(3):
        fresh = inputs_for(num_ranks, shape, seed=100 + replay, routing="partial" if replay == 1 else "random")
        for mine, new in zip(static, fresh):  # same shapes: partial routing pads with -1 instead of fewer rows
            n = new.num_tokens
            mine.x_fp8.view(torch.uint8).zero_()[:n].copy_(new.x_fp8.view(torch.uint8))
            mine.x_scales.fill_(1.0)[:n].copy_(new.x_scales)
            mine.topk_idx.fill_(-1)[:n].copy_(new.topk_idx)
            mine.topk_weights.zero_()[:n].copy_(new.topk_weights)
        refs = reference_dispatch(static, shape["num_experts"], fp8=True, expert_alignment=8)
        for y, ref in zip(ys, refs):  # expert outputs the graph's combine will read
            y.copy_(torch.randn(worst, shape["hidden"], generator=torch.Generator().manual_seed(replay)).to(torch.bfloat16).cuda())
        replay_on_comm_streams(buffers, graphs)
        torch.cuda.synchronize()
        for b in buffers:
            b.check_status()
        results = [(recv, topk, weights, [], handle, None) for recv, topk, weights, handle, _, _ in outputs]
        check_dispatch(results, refs, fp8=True, num_worst_tokens=worst)
        counts = [ref.recv_x.shape[0] for ref in refs]
        expected = reference.reference_normal_combine(
            [y[:c].cpu() for y, c in zip(ys, counts)], refs, [i.num_tokens for i in static],
            topk_weights=[o[2][:c].cpu() for o, c in zip(outputs, counts)])
        check_combine([(o[4], o[5], None) for o in outputs], expected)
        round_trip(buffers, inputs, fp8=False, num_biases=1)  # an eager call between replays


def test_standard_prefill_shape():
    """DeepSeek-V3 prefill-like shape (smaller token count): 8 ranks, hidden 7168, top-8 of 256."""
    shape = dict(hidden=7168, num_experts=256, max_tokens_per_rank=256, max_topk=8)
    buffers = gpu_group(8, **shape)
    inputs = inputs_for(8, shape, num_topk=8, seed=5)
    _, outs = round_trip(buffers, inputs, fp8=True, cached=True)
    _, outs_again = round_trip(buffers, inputs, fp8=True)
    for a, b in zip(outs, outs_again):  # repeated runs: identical bytes
        assert_same("repeated combined_x", 0, a[0], b[0])
    round_trip(buffers, inputs, fp8=False, num_worst_tokens=8 * 256, num_biases=2)


def test_explicit_config_and_small_grids():
    buffers = gpu_group(2, **SMALL)
    inputs = inputs_for(2, SMALL, seed=9)
    for num_sms in (1, 3):
        config = NormalConfig(num_sms)

        def call(r, b):
            out = b.dispatch(inputs[r].x, topk_idx=inputs[r].topk_idx, topk_weights=inputs[r].topk_weights, config=config)
            return out

        results = run_ranks(buffers, call)
        refs = reference_dispatch(inputs, SMALL["num_experts"], fp8=False)
        check_dispatch(results, refs, fp8=False)
        ys = expert_outputs(results, refs, fp8=False)
        outs = run_ranks(buffers, lambda r, b: b.combine(ys[r], results[r][4], topk_weights=results[r][2], config=config))
        expected = reference.reference_normal_combine([y.cpu() for y in ys], refs, [i.num_tokens for i in inputs],
                                                      topk_weights=[res[2].cpu() for res in results])
        check_combine(outs, expected)


def test_default_device_and_dtype():
    """Engines call the library under torch.set_default_device('cuda') and a bf16 default dtype."""
    inputs = inputs_for(2, SMALL, seed=31)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):  # construction too
            buffers = NormalBuffer.local_group(2, device=DEVICE, timeout_s=5.0, **SMALL)
        round_trip(buffers, inputs, fp8=True, num_biases=2, cached=True, context=lambda: torch.device(DEVICE))
        round_trip(buffers, inputs, fp8=False, num_worst_tokens=96, context=lambda: torch.device(DEVICE))
    finally:
        torch.set_default_dtype(previous)


def test_too_few_worst_tokens_is_reported():
    buffers = gpu_group(2, **SMALL)
    inputs = inputs_for(2, SMALL, routing="one_rank", seed=2)
    results = run_ranks(buffers, lambda r, b: b.dispatch(inputs[r].x, topk_idx=inputs[r].topk_idx, num_worst_tokens=5))
    with pytest.raises(RoutingError, match="rows arrived, more than num_worst_tokens"):
        buffers[1].synchronize()
    assert results[1][4].recv_src_idx.cpu().tolist() == [0, 1, 2, 3, 4]
    run_ranks(buffers, lambda r, b: b.combine(torch.zeros(5, SMALL["hidden"], dtype=torch.bfloat16, device=DEVICE), results[r][4]))
    for b in buffers:
        b.synchronize()
    round_trip(buffers, inputs_for(2, SMALL, seed=4))  # still in step


def test_a_missing_peer_times_out_and_nothing_hangs():
    buffers = NormalBuffer.local_group(2, device=DEVICE, timeout_s=1.0, **SMALL)
    x = torch.zeros(1, SMALL["hidden"], dtype=torch.bfloat16, device=DEVICE)
    topk = torch.zeros(1, 1, dtype=torch.int64, device=DEVICE)
    buffers[0].dispatch(x, topk_idx=topk, num_worst_tokens=4)  # rank 1 never dispatches
    with pytest.raises(NormalTimeoutError, match="rank 1 did not signal"):
        buffers[0].synchronize()
    for b in buffers:
        b.reset()
    round_trip(buffers, inputs_for(2, SMALL, seed=6))


def test_capturing_a_synchronising_dispatch_is_refused_before_any_work():
    if DEVICE != "cuda":
        pytest.skip("graph capture needs CUDA")
    from lowlat.errors import GraphCaptureError

    (buffer,) = gpu_group(1, **SMALL)
    x = torch.zeros(4, SMALL["hidden"], dtype=torch.bfloat16, device="cuda")
    topk = torch.zeros(4, 2, dtype=torch.int64, device="cuda")
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(GraphCaptureError, match="pass num_worst_tokens"):
        with torch.cuda.graph(graph, stream=stream):
            buffer.dispatch(x, topk_idx=topk)
    torch.cuda.synchronize()
    round_trip([buffer], inputs_for(1, SMALL, seed=41))  # the buffer is unharmed


def test_one_region_hosts_a_low_latency_buffer_and_a_normal_buffer():
    """A low-latency Buffer at offset 0 and a NormalBuffer after it in the same regions; a whole normal
    round trip runs between the low-latency sends and their receives."""
    import helpers
    import lowlat
    from lowlat.layout import BufferShape, RegionLayout
    from lowlat.transport.local import LocalWorld

    ll_bytes = RegionLayout.of(BufferShape(2, 32, 4, 512, 16)).total_bytes
    world = LocalWorld(2, ll_bytes + NormalBuffer.region_bytes(num_ranks=2, **SMALL), DEVICE)
    ll = [lowlat.Buffer(world.transport(r), max_tokens_per_rank=16, hidden=512, num_experts=32, num_topk=4, timeout_s=5.0)
          for r in range(2)]
    normal = [NormalBuffer(world.transport(r), timeout_s=5.0, region_offset=ll_bytes, **SMALL) for r in range(2)]
    for step in range(2):
        ll_inputs = helpers.make_inputs(2, 16, 512, 32, 4, seed=step, device=DEVICE)
        sent = [b.low_latency_dispatch(i.x, i.topk_idx, return_recv_hook=True) for b, i in zip(ll, ll_inputs)]
        round_trip(normal, inputs_for(2, SMALL, seed=step), fp8=bool(step), num_biases=1)
        for result in sent:
            result[-1]()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        helpers.check_dispatch(sent, helpers.reference_for(ll_inputs, 32, 16, use_fp8=True), use_fp8=True)


def test_bad_expert_in_dispatch_is_reported_and_the_ranks_stay_in_step():
    buffers = gpu_group(2, **SMALL)
    inputs = inputs_for(2, SMALL, seed=13)
    bad = inputs[0].topk_idx.clone()
    bad[1, 0] = 999  # outside [-1, 32): treated as -1 by the kernels, reported once the call is issued

    def call(r, b):
        return b.dispatch(inputs[r].x, topk_idx=bad if r == 0 else inputs[r].topk_idx)

    with pytest.raises(AssertionError, match="rank 0 failed: RoutingError: .*expert index 999"):
        run_ranks(buffers, call)
    for b in buffers:
        b.synchronize()
    round_trip(buffers, inputs, fp8=True)
