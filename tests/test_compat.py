"""lowlat.compat.deep_ep.Buffer takes DeepEP's signatures (here on virtual CPU ranks)."""

import pytest
import torch

from lowlat.compat import deep_ep
from lowlat.errors import UnavailableError
from lowlat.transport.local import LocalWorld
from lowlat import layout
from helpers import check_combine, check_dispatch, expert_outputs, make_inputs, reference_combined, reference_for


def test_deep_ep_signatures_round_trip():
    T, H, E, K, R = 6, 256, 8, 3, 2
    region = layout.RegionLayout.of(layout.BufferShape(R, E, K, H, T)).total_bytes
    world = LocalWorld(R, region, "cpu")
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, R, E)
    buffers = [deep_ep.Buffer(world.transport(r), 0, hint, low_latency_mode=True, num_qps_per_rank=E // R) for r in range(R)]
    inputs = make_inputs(R, T, H, E, K, seed=1)
    results = []
    for r, b in enumerate(buffers):  # positional, DeepEP order: x, topk_idx, T, num_experts
        results.append(b.low_latency_dispatch(inputs[r].x, inputs[r].topk_idx, T, E, use_fp8=True, return_recv_hook=True))
    for result in results:
        result[-1]()
    refs = reference_for(inputs, E, T, use_fp8=True)
    check_dispatch(results, refs, use_fp8=True)
    handle = results[0][2]
    assert torch.equal(handle[0], handle.packed_recv_src_info) and handle[2:] == (T, H, E)  # DeepEP tuple indexing
    ys = expert_outputs(results, refs, use_fp8=True)
    outs = []
    for r, b in enumerate(buffers):
        target = b.get_next_low_latency_combine_buffer(results[r][2])  # zero-copy path, as DeepEP users write it
        target.copy_(ys[r])
        ys[r] = target
        outs.append(b.low_latency_combine(target, inputs[r].topk_idx, inputs[r].topk_weights, results[r][2], zero_copy=True,
                                          return_recv_hook=True))
    for out in outs:
        out[-1]()
    check_combine(outs, reference_combined(inputs, ys, refs, use_logfmt=False))
    mask = torch.ones(R, dtype=torch.int32)
    buffers[0].low_latency_query_mask_buffer(mask)
    assert mask.tolist() == [0, 0]
    for b in buffers:
        b.clean_low_latency_buffer(T, H, E)


def test_normal_mode_is_refused_clearly():
    with pytest.raises(UnavailableError, match="low_latency_mode=True"):
        deep_ep.Buffer(None, 1 << 20, 0)
