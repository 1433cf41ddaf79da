"""Dispatch and combine kernels against lowlat.reference, with R virtual ranks on one GPU (local
transport).  Dispatch must match bit for bit; combine too for bf16 on the wire (same fp32 operation
order), and within the LogFMT bound (see helpers.logfmt_tolerance) with LogFMT."""

import zlib

import pytest
import torch

import lowlat
from conftest import requires_gpu
from helpers import (check_combine, check_dispatch, combine_all, dispatch_all, expert_outputs, make_inputs, reference_combined,
                     reference_for, run_all)

pytestmark = [pytest.mark.gpu, requires_gpu]

SMALL = dict(max_tokens_per_rank=24, hidden=512, num_experts=32, num_topk=6)
DISPATCH_MODES = {
    "bf16": dict(use_fp8=False),
    "fp8": dict(use_fp8=True),
    "fp8_round": dict(use_fp8=True, round_scale=True),
    "fp8_ue8m0": dict(use_fp8=True, round_scale=True, use_ue8m0=True),
}
COMBINE_MODES = {"bf16": dict(), "logfmt": dict(use_logfmt=True), "zero_copy": dict(zero_copy=True)}
_groups = {}


def local_group(num_ranks, **shape):
    key = (num_ranks, tuple(sorted(shape.items())))
    if key not in _groups:
        _groups[key] = lowlat.Buffer.local_group(num_ranks, timeout_s=3.0, enable_zero_copy=True, **shape)
    return _groups[key]


def round_trip(buffers, inputs, shape, dispatch_mode, combine_mode, *, hook, device_num_tokens=False):
    """One dispatch + combine over all ranks, checked against the reference; returns the outputs."""
    options = DISPATCH_MODES[dispatch_mode]
    use_fp8 = options["use_fp8"]
    for b in buffers:  # poison: stale rows must never be mistaken for received ones
        for out in (o.outputs for o in b._static):
            out.recv_x.fill_(0xFF)
            out.recv_src_info.fill_(-7)
    results = dispatch_all(buffers, inputs, hook=hook, concurrent=not hook, device_num_tokens=device_num_tokens, **options)
    torch.cuda.synchronize()
    for b in buffers:
        b.check_status()
    refs = reference_for(inputs, shape["num_experts"], shape["max_tokens_per_rank"], use_fp8=use_fp8,
                         round_scale=options.get("round_scale", False))
    check_dispatch(results, refs, use_fp8=use_fp8, use_ue8m0=options.get("use_ue8m0", False))
    ys = expert_outputs(results, refs, use_fp8=use_fp8)
    combine_options = dict(COMBINE_MODES[combine_mode])
    if combine_options.get("zero_copy"):
        for r, b in enumerate(buffers):
            buf = b.get_next_low_latency_combine_buffer(results[r][2])
            buf.copy_(ys[r])
            ys[r] = buf
    outs = combine_all(buffers, inputs, ys, results, hook=hook, concurrent=not hook, **combine_options)
    torch.cuda.synchronize()
    for b in buffers:
        b.check_status()
    use_logfmt = combine_options.get("use_logfmt", False)
    expected = reference_combined(inputs, ys, refs, use_logfmt=use_logfmt)
    check_combine(outs, expected, inputs=inputs, ys=ys, refs=refs, use_logfmt=use_logfmt)
    return results, outs


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("dispatch_mode", list(DISPATCH_MODES))
@pytest.mark.parametrize("combine_mode", list(COMBINE_MODES))
@pytest.mark.parametrize("hook", [True, False], ids=["hook", "fused"])
def test_dispatch_combine_matrix(num_ranks, dispatch_mode, combine_mode, hook):
    buffers = local_group(num_ranks, **SMALL)
    seed = zlib.crc32(repr((num_ranks, dispatch_mode, combine_mode, hook)).encode())  # stable across processes
    inputs = make_inputs(num_ranks, SMALL["max_tokens_per_rank"], SMALL["hidden"], SMALL["num_experts"], SMALL["num_topk"],
                         seed=seed, device="cuda")
    round_trip(buffers, inputs, SMALL, dispatch_mode, combine_mode, hook=hook)


@pytest.mark.parametrize("routing", ["one_expert", "all_minus_one", "zero_tokens_rank", "partial"])
@pytest.mark.parametrize("num_ranks", [2, 8])
@pytest.mark.parametrize("hook", [True, False], ids=["hook", "fused"])
def test_adversarial_routing(routing, num_ranks, hook):
    buffers = local_group(num_ranks, **SMALL)
    inputs = make_inputs(num_ranks, SMALL["max_tokens_per_rank"], SMALL["hidden"], SMALL["num_experts"], SMALL["num_topk"],
                         seed=7, routing=routing, device="cuda")
    round_trip(buffers, inputs, SMALL, "fp8", "bf16", hook=hook)
    round_trip(buffers, inputs, SMALL, "bf16", "logfmt", hook=hook)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_device_num_tokens_and_int32_topk(num_ranks):
    shape = SMALL
    buffers = local_group(num_ranks, **shape)
    inputs = make_inputs(num_ranks, shape["max_tokens_per_rank"], shape["hidden"], shape["num_experts"], shape["num_topk"],
                         seed=11, routing="partial", device="cuda", topk_dtype=torch.int32)
    round_trip(buffers, inputs, shape, "fp8", "bf16", hook=True, device_num_tokens=True)
    round_trip(buffers, inputs, shape, "fp8_ue8m0", "logfmt", hook=False, device_num_tokens=True)


@pytest.mark.parametrize("hidden,num_topk,num_experts", [(384, 5, 36), (128, 1, 4), (1536, 16, 64)])
def test_awkward_shapes(hidden, num_topk, num_experts):
    shape = dict(max_tokens_per_rank=9, hidden=hidden, num_experts=num_experts, num_topk=num_topk)
    buffers = local_group(4, **shape)
    inputs = make_inputs(4, 9, hidden, num_experts, num_topk, seed=hidden, device="cuda")
    for mode in DISPATCH_MODES:
        round_trip(buffers, inputs, shape, mode, "logfmt", hook=True)
    round_trip(buffers, inputs, shape, "fp8", "bf16", hook=False)


@pytest.mark.parametrize("num_ranks", [1, 8])
def test_standard_shape(num_ranks):
    shape = dict(max_tokens_per_rank=128, hidden=7168, num_experts=256, num_topk=8)
    buffers = local_group(num_ranks, **shape)
    inputs = make_inputs(num_ranks, 128, 7168, 256, 8, seed=3, device="cuda")
    results_1, outs_1 = round_trip(buffers, inputs, shape, "fp8", "bf16", hook=True)
    first = [o[0].clone() for o in outs_1]
    results_2, outs_2 = round_trip(buffers, inputs, shape, "fp8", "bf16", hook=False)
    for a, b in zip(first, outs_2):  # repeated runs: identical bytes
        assert torch.equal(a.view(torch.int16), b[0].view(torch.int16))
    round_trip(buffers, inputs, shape, "fp8_ue8m0", "logfmt", hook=True)


def test_statistics():
    buffers = local_group(4, **SMALL)
    inputs = make_inputs(4, 24, 512, 32, 6, seed=5, device="cuda")
    refs = reference_for(inputs, 32, 24, use_fp8=True)
    recv_stats = [torch.zeros(8, dtype=torch.int32, device="cuda") for _ in buffers]
    dispatch_wait = [torch.zeros(4, dtype=torch.int64, device="cuda") for _ in buffers]
    combine_wait = [torch.zeros(4, dtype=torch.int64, device="cuda") for _ in buffers]
    for _ in range(2):
        def call(r, b, return_recv_hook):
            return b.low_latency_dispatch(inputs[r].x, inputs[r].topk_idx, cumulative_local_expert_recv_stats=recv_stats[r],
                                          dispatch_wait_recv_cost_stats=dispatch_wait[r], return_recv_hook=return_recv_hook)
        results = run_all(buffers, call, hook=False, concurrent=True)
        ys = expert_outputs(results, refs, use_fp8=True)
        hooks = [b.low_latency_combine(ys[r], inputs[r].topk_idx, inputs[r].topk_weights, results[r][2],
                                       combine_wait_recv_cost_stats=combine_wait[r], return_recv_hook=True)[-1]
                 for r, b in enumerate(buffers)]
        for hook in hooks:
            hook()
    torch.cuda.synchronize()
    for r in range(4):
        assert torch.equal(recv_stats[r].cpu(), 2 * refs[r].recv_count)  # cumulative over both calls
        for waited in (dispatch_wait[r], combine_wait[r]):
            assert (waited >= 0).all() and int(waited.sum()) > 0  # clock cycles spent polling flags


def test_logfmt_wire_bytes_match_reference_encoder():
    """The bytes combine_send puts on the wire decode, with formats.logfmt_unpack, to the reference
    encoder's codes: same chunk decisions, codes within one step (approximate lg2 on the GPU)."""
    from lowlat import formats
    buffers = local_group(2, **SMALL)
    inputs = make_inputs(2, 24, 512, 32, 6, seed=21, device="cuda")
    results = dispatch_all(buffers, inputs, hook=True, use_fp8=False)
    refs = reference_for(inputs, 32, 24, use_fp8=False)
    ys = expert_outputs(results, refs, use_fp8=False)
    hooks = []
    for r, b in enumerate(buffers):
        n = results[r][2].num_tokens
        _, _, hook = b.low_latency_combine(ys[r], inputs[r].topk_idx[:n], inputs[r].topk_weights[:n], results[r][2],
                                           use_logfmt=True, return_recv_hook=True)
        hooks.append(hook)
    torch.cuda.synchronize()
    b0 = buffers[0]
    layout, shape = b0.layout, b0.shape
    parity = int(b0._ctx.state[lowlat.layout.StateWord.COMBINE_SEND_SEQ].item() - 1) & 1
    region = b0.transport.region.cpu()
    start = layout.parity_offset(parity) + layout.combine_staging
    slots = region[start: start + shape.max_tokens_per_rank * shape.num_topk * shape.combine_slot_stride]
    slots = slots.view(shape.max_tokens_per_rank, shape.num_topk, shape.combine_slot_stride)[..., : formats.logfmt_slot_bytes(512)]
    compared = differing = encoded = 0
    for owner, ref in enumerate(refs):
        for l in range(int(ref.recv_count.numel())):
            for j in range(int(ref.recv_count[l])):
                if int(ref.src_rank[l, j]) != 0:
                    continue
                t, k = int(ref.src_token[l, j]), int(ref.src_topk[l, j])
                wire = formats.logfmt_unpack(slots[t, k].contiguous(), 512)
                want = formats.logfmt_encode(ys[owner][l, j].cpu())
                assert torch.equal(wire.castable, want.castable)
                assert torch.equal(wire.meta.view(torch.int16), want.meta.view(torch.int16))
                diff = (wire.codes.int() - want.codes.int()).abs()
                assert int(diff.max()) <= 1 and torch.equal(wire.signs, want.signs)
                compared += diff.numel()
                encoded += int(want.castable.sum())
                differing += int((diff != 0).sum())
    for hook in hooks:
        hook()
    torch.cuda.synchronize()
    assert compared > 0 and encoded > 0 and differing <= 0.01 * compared


def test_two_buffers_interleaved():
    a = local_group(2, **SMALL)
    b = local_group(2, max_tokens_per_rank=16, hidden=256, num_experts=8, num_topk=2)
    ia = make_inputs(2, 24, 512, 32, 6, seed=1, device="cuda")
    ib = make_inputs(2, 16, 256, 8, 2, seed=2, device="cuda")
    for _ in range(3):
        round_trip(a, ia, SMALL, "fp8", "bf16", hook=True)
        round_trip(b, ib, dict(max_tokens_per_rank=16, hidden=256, num_experts=8, num_topk=2), "bf16", "bf16", hook=False)
