"""The host path on a GPU: DeepEP's harness state (default device and dtype), async_finish with
out=, stats and device num_tokens kept alive, and the CPU emulation cross-checked against the
kernels byte for byte."""

import gc

import pytest
import torch

import lowlat
from conftest import requires_gpu
from helpers import (check_combine, check_dispatch, combine_all, dispatch_all, expert_outputs, make_inputs, reference_combined,
                     reference_for)

pytestmark = [pytest.mark.gpu, requires_gpu]

SHAPE = dict(max_tokens_per_rank=16, hidden=512, num_experts=16, num_topk=4)


def _round_trip_bytes(buffers, inputs, **combine_options):
    results = dispatch_all(buffers, inputs, hook=True, use_fp8=True)
    refs = reference_for(inputs, SHAPE["num_experts"], SHAPE["max_tokens_per_rank"], use_fp8=True)
    ys = expert_outputs(results, refs, use_fp8=True, poison=False)
    outs = combine_all(buffers, inputs, [y.to(buffers[0].device) for y in ys], results, hook=True, **combine_options)
    if buffers[0].device.type == "cuda":
        torch.cuda.synchronize()
    return results, refs, ys, outs


def test_default_device_and_dtype_give_the_same_results():
    """DeepEP's harness state: torch.set_default_device('cuda') + torch.set_default_dtype(bf16)."""
    inputs = make_inputs(2, 16, 512, 16, 4, seed=3, device="cuda")
    plain = lowlat.Buffer.local_group(2, **SHAPE)
    want = [o[0].cpu() for o in _round_trip_bytes(plain, inputs)[3]]
    before = torch.get_default_dtype()
    torch.set_default_device("cuda")
    torch.set_default_dtype(torch.bfloat16)
    try:
        buffers = lowlat.Buffer.local_group(2, **SHAPE)
        results, refs, ys, outs = _round_trip_bytes(buffers, inputs)
        check_dispatch(results, refs, use_fp8=True)
        got = [o[0].cpu() for o in outs]
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(before)
    for g, w in zip(got, want):
        assert torch.equal(g.view(torch.int16), w.view(torch.int16))


def test_async_finish_with_out_stats_and_device_num_tokens_kept_alive():
    b = lowlat.Buffer.local_group(1, fresh_outputs=True, **SHAPE)[0]
    inputs = make_inputs(1, 16, 512, 16, 4, seed=5, device="cuda")
    refs = reference_for(inputs, 16, 16, use_fp8=True)
    for round_ in range(3):
        x, topk = inputs[0].x.clone(), inputs[0].topk_idx.clone()
        stats = torch.zeros(16, dtype=torch.int32, device="cuda")
        num_tokens = torch.tensor([16], dtype=torch.int32, device="cuda")
        torch.cuda._sleep(2_000_000)  # keep the current stream busy: the comm stream must wait for it
        recv_x, count, handle, event, _ = b.low_latency_dispatch(x, topk, async_finish=True, num_tokens=num_tokens,
                                                                 cumulative_local_expert_recv_stats=stats)
        del x, topk, num_tokens  # the Buffer keeps what the kernels read until they are done
        gc.collect()
        scratch = [torch.full((16, 512), 7, dtype=torch.bfloat16, device="cuda") for _ in range(8)]  # reuse freed memory
        event.current_stream_wait()
        check_dispatch([(recv_x, count, handle)], refs, use_fp8=True)
        assert torch.equal(stats.cpu(), refs[0].recv_count)
        ys = expert_outputs([(recv_x, count, handle)], refs, use_fp8=True, poison=False)
        out = torch.full((16, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
        torch.cuda._sleep(2_000_000)
        combined, event, _ = b.low_latency_combine(ys[0], inputs[0].topk_idx, inputs[0].topk_weights, handle, async_finish=True,
                                                   out=out)
        assert combined.data_ptr() == out.data_ptr()
        del out, scratch, handle  # the handle held the device num_tokens the combine reads
        gc.collect()
        scratch = [torch.full((4,), 99, dtype=torch.int32, device="cuda") for _ in range(64)]  # reuse freed memory
        event.current_stream_wait()
        del scratch
        check_combine([(combined,)], reference_combined(inputs, ys, refs, use_logfmt=False))
    b.synchronize()


def test_async_calls_hold_the_callers_tensors_not_the_pools():
    """Async calls keep the caller's tensors alive, not the Buffer's pooled outputs: rounds whose
    results are dropped leave the pools at their size (no search through held entries), and every
    round's results stay exact although each reuses the outputs of a call that may still be running."""
    b = lowlat.Buffer.local_group(1, fresh_outputs=True, **SHAPE)[0]
    inputs = make_inputs(1, 16, 512, 16, 4, seed=7, device="cuda")
    refs = reference_for(inputs, 16, 16, use_fp8=True)
    sizes = (len(b._output_pool.items), len(b._combine_pool.items))
    for round_ in range(12):
        torch.cuda._sleep(1_000_000)  # keep the current stream busy: the async work queues behind it
        recv_x, count, handle, event, _ = b.low_latency_dispatch(inputs[0].x, inputs[0].topk_idx, async_finish=True)
        event.current_stream_wait()
        check_dispatch([(recv_x, count, handle)], refs, use_fp8=True)
        ys = expert_outputs([(recv_x, count, handle)], refs, use_fp8=True, poison=False)
        combined, event, _ = b.low_latency_combine(ys[0], inputs[0].topk_idx, inputs[0].topk_weights, handle, async_finish=True)
        event.current_stream_wait()
        check_combine([(combined,)], reference_combined(inputs, ys, refs, use_logfmt=False))
        del recv_x, count, handle, combined, ys, event
    assert (len(b._output_pool.items), len(b._combine_pool.items)) == sizes
    b.synchronize()


def test_eager_calls_after_a_captured_async_call():
    """A graph holding async calls leaves no captured event behind for later eager calls to query
    (CUDA forbids querying an event recorded in a capture); replays and eager calls stay exact."""
    b = lowlat.Buffer.local_group(1, **SHAPE)[0]  # static outputs: the eager dispatch reuses the captured sets
    inputs = make_inputs(1, 16, 512, 16, 4, seed=11, device="cuda")
    refs = reference_for(inputs, 16, 16, use_fp8=True)
    first = b.low_latency_dispatch(inputs[0].x, inputs[0].topk_idx)
    ys = expert_outputs([first[:3]], refs, use_fp8=True, poison=False)
    b.low_latency_combine(ys[0], inputs[0].topk_idx, inputs[0].topk_weights, first[2])
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=stream):
        recv_x, count, handle, event, _ = b.low_latency_dispatch(inputs[0].x, inputs[0].topk_idx, async_finish=True)
        event.current_stream_wait()
        combined, event, _ = b.low_latency_combine(ys[0], inputs[0].topk_idx, inputs[0].topk_weights, handle, async_finish=True)
        event.current_stream_wait()
    graph.replay()
    torch.cuda.synchronize()
    check_combine([(combined,)], reference_combined(inputs, ys, refs, use_logfmt=False))
    for _ in range(3):  # eager calls take both static sets, the ones the captured calls used
        eager = b.low_latency_dispatch(inputs[0].x, inputs[0].topk_idx, async_finish=True)
        eager[3].current_stream_wait()
        check_dispatch([eager[:3]], refs, use_fp8=True)
        out, event, _ = b.low_latency_combine(ys[0], inputs[0].topk_idx, inputs[0].topk_weights, eager[2], async_finish=True)
        event.current_stream_wait()
        check_combine([(out,)], reference_combined(inputs, ys, refs, use_logfmt=False))
    b.synchronize()


@pytest.mark.parametrize("use_fp8", [True, False])
def test_cpu_emulation_matches_the_kernels_byte_for_byte(use_fp8):
    """engines/emulated.py is a second implementation of the protocol: same inputs, same region
    bytes (flags, counts, routes, staged messages, combine slots) and same outputs as the kernels."""
    R = 2
    inputs_gpu = make_inputs(R, 16, 512, 16, 4, seed=9, routing="partial", device="cuda")
    inputs_cpu = make_inputs(R, 16, 512, 16, 4, seed=9, routing="partial", device="cpu")
    runs = {}
    for device, inputs in (("cuda", inputs_gpu), ("cpu", inputs_cpu)):
        buffers = lowlat.Buffer.local_group(R, device=device, timeout_s=5.0, **SHAPE)
        results = dispatch_all(buffers, inputs, hook=True, use_fp8=use_fp8)
        refs = reference_for(inputs_cpu, 16, 16, use_fp8=use_fp8)
        ys = [y.to(device) for y in expert_outputs([tuple(t.cpu() if isinstance(t, torch.Tensor) else tuple(u.cpu() for u in t)
                                                          for t in r[:2]) for r in results], refs, use_fp8=use_fp8, poison=False)]
        outs = combine_all(buffers, inputs, ys, results, hook=True)
        if device == "cuda":
            torch.cuda.synchronize()
        layout = buffers[0].layout
        parity = slice(layout.parity_base, layout.parity_base + 2 * layout.parity_bytes)
        runs[device] = dict(
            regions=[b.transport.region[parity].cpu() for b in buffers],
            counts=[r[1].cpu() for r in results],
            outs=[o[0].cpu() for o in outs],
        )
    for r in range(R):
        assert torch.equal(runs["cuda"]["counts"][r], runs["cpu"]["counts"][r])
        assert torch.equal(runs["cuda"]["outs"][r].view(torch.int16), runs["cpu"]["outs"][r].view(torch.int16))
        differ = (runs["cuda"]["regions"][r] != runs["cpu"]["regions"][r]).nonzero().flatten()
        assert differ.numel() == 0, f"rank {r}: {differ.numel()} region bytes differ, first at offset {int(differ[0])}"
