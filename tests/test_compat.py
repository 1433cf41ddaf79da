"""lowlat.compat.deep_ep.Buffer driven as DeepEP's users drive it (tests/deepep_conventions.py), here
on virtual CPU ranks (one host thread per rank, like one process per rank) under a bf16 default
dtype; tests/test_gpu_compat.py runs the same session on a GPU, one process and two."""

import pytest
import torch

import lowlat
import lowlat.normal
from lowlat import layout
from lowlat.compat import deep_ep
from lowlat.errors import ArgumentError, ArgumentTypeError, StaleHandleError, UnavailableError
from lowlat.transport.local import LocalWorld
from deepep_conventions import run_rank
from helpers import in_threads

T, H, E, K = 6, 256, 8, 3


def facade_group(num_ranks, *, num_rdma_bytes=None, **kwargs):
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, num_ranks, E)
    world = LocalWorld(num_ranks, 2 * hint, "cpu")
    return [deep_ep.Buffer(world.transport(r), 0, num_rdma_bytes or hint, low_latency_mode=True, num_qps_per_rank=E // num_ranks,
                           timeout_s=20.0, **kwargs) for r in range(num_ranks)]


@pytest.fixture
def bf16_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # DeepEP's harness state (its test utils set it globally)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_deepep_session_on_virtual_cpu_ranks(num_ranks, bf16_default):
    buffers = facade_group(num_ranks)
    checked = in_threads(lambda rank: run_rank(buffers[rank], rank, num_ranks, num_tokens=T, hidden=H, num_experts=E, num_topk=K,
                                               device=torch.device("cpu")), num_ranks)
    assert all(c > 0 for c in checked)


def test_fresh_outputs_never_alias_a_held_result():
    b = facade_group(1)[0]
    x = torch.randn(T, H, dtype=torch.float32, device="cpu").to(torch.bfloat16)
    topk = torch.tensor([[0, 1, 2]] * T, dtype=torch.int64, device="cpu")
    first = b.low_latency_dispatch(x, topk, T, E, use_fp8=False)
    results = [b.low_latency_dispatch(x * 2, topk, T, E, use_fp8=False) for _ in range(3)]
    storages = {r[0].untyped_storage().data_ptr() for r in results} | {first[0].untyped_storage().data_ptr()}
    assert len(storages) == 4, "four held dispatch results need four storages"
    assert torch.equal(first[0][0, : int(first[1][0])].float(), x[:T].float()), "the first result was overwritten"
    handle = first[2]
    del first, results
    again = b.low_latency_dispatch(x, topk, T, E, use_fp8=False)  # reuses a released set, never the held handle's
    assert again[2].outputs is not handle.outputs
    w = torch.ones(T, K, dtype=torch.float32, device="cpu")
    y = torch.ones(E, T, H, dtype=torch.bfloat16, device="cpu")
    out1, _, _ = b.low_latency_combine(y, topk, w, handle)
    out2, _, _ = b.low_latency_combine(y * 2, topk, w, handle)
    assert out1.data_ptr() != out2.data_ptr() and torch.equal(out2.float(), 2 * out1.float())


def test_pools_reuse_what_the_caller_dropped_and_grow_only_for_what_it_holds():
    b = facade_group(1)[0]
    x = torch.zeros(T, H, dtype=torch.bfloat16, device="cpu")
    topk = torch.tensor([[0, 1, 2]] * T, dtype=torch.int64, device="cpu")
    w = torch.ones(T, K, dtype=torch.float32, device="cpu")
    y = torch.zeros(E, T, H, dtype=torch.bfloat16, device="cpu")
    handle = b.low_latency_dispatch(x, topk, T, E)[2]
    inner = b._buffers[(T, H, E, K)]
    for _ in range(10):  # results dropped at once: the same sets serve every call
        b.low_latency_dispatch(x, topk, T, E)
        b.low_latency_combine(y, topk, w, handle)
    assert len(inner._output_pool.items) == 2 and len(inner._combine_pool.items) == 2
    held = [b.low_latency_combine(y, topk, w, handle)[0] for _ in range(4)]
    held_x = [b.low_latency_dispatch(x, topk, T, E)[0] for _ in range(3)]
    assert len(inner._combine_pool.items) == 4 and len(inner._output_pool.items) == 4  # 3 results + the live handle
    rows = held[0][1:]  # something derived from a result keeps it in use too
    del held, held_x
    b.low_latency_combine(y, topk, w, handle)
    assert len(inner._combine_pool.items) == 4
    assert rows.data_ptr() not in {c.tensor.data_ptr() + H * 2 for c in inner._combine_pool.items if not c.busy()}


def test_native_static_outputs_raise_on_a_stale_handle():
    import lowlat
    b = lowlat.Buffer.local_group(1, device="cpu", max_tokens_per_rank=T, hidden=H, num_experts=E, num_topk=K)[0]
    x = torch.zeros(T, H, dtype=torch.bfloat16, device="cpu")
    topk = torch.tensor([[0, 1, 2]] * T, dtype=torch.int64, device="cpu")
    h1 = b.low_latency_dispatch(x, topk)[2]
    h2 = b.low_latency_dispatch(x, topk)[2]
    y = torch.zeros(E, T, H, dtype=torch.bfloat16, device="cpu")
    w = torch.ones(T, K, dtype=torch.float32, device="cpu")
    b.low_latency_combine(y, topk, w, h1)  # two dispatches in flight: both handles valid
    b.low_latency_dispatch(x, topk)
    assert h1.is_stale and not h2.is_stale
    with pytest.raises(StaleHandleError, match="stale"):
        b.low_latency_combine(y, topk, w, h1)
    b.low_latency_combine(y, topk, w, h2)


def test_region_is_set_up_in_the_constructor_and_shapes_are_carved_from_num_rdma_bytes():
    b = facade_group(1)[0]
    assert b.get_local_buffer_tensor(torch.int32, use_rdma_buffer=True).numel() == b.num_rdma_bytes // 4
    view = b.get_local_buffer_tensor(torch.float32, torch.Size([4, 8]), offset=16, use_rdma_buffer=True)
    assert view.shape == (4, 8) and view.dtype == torch.float32
    x = torch.zeros(2, H, dtype=torch.bfloat16, device="cpu")
    topk = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int64, device="cpu")
    b.low_latency_dispatch(x, topk, T, E)
    with pytest.raises(ArgumentError, match="num_rdma_bytes=.* is too small"):
        b.low_latency_dispatch(x, topk, T + 1, E)  # a second shape does not fit next to the first
    assert b.get_local_buffer_tensor(torch.int32).numel() == 0  # num_nvl_bytes=0: an empty NVLink buffer


def test_static_helpers_and_destroy_semantics():
    assert deep_ep.Buffer.is_sm90_compiled() is True
    deep_ep.Buffer.set_num_sms(24)
    assert deep_ep.Buffer.num_sms == 24
    with pytest.raises(ArgumentError, match="even"):
        deep_ep.Buffer.set_num_sms(23)
    deep_ep.Buffer.set_num_sms(20)
    assert deep_ep.topk_idx_t is torch.int64
    implicit = facade_group(1)[0]
    with pytest.raises(ArgumentError, match="explicitly_destroy=True"):
        implicit.destroy()
    explicit = facade_group(1, explicitly_destroy=True)[0]
    explicit.destroy()
    with pytest.raises(UnavailableError, match="destroyed"):
        explicit.low_latency_dispatch(torch.zeros(1, H, dtype=torch.bfloat16, device="cpu"),
                                      torch.zeros(1, K, dtype=torch.int64, device="cpu"), T, E)


def test_construction_errors_are_clear():
    with pytest.raises(ArgumentTypeError, match="group must be"):
        deep_ep.Buffer(None, 1 << 20, 0)  # normal mode
    with pytest.raises(ArgumentTypeError, match="group must be"):
        deep_ep.Buffer(None, 0, 1 << 20, low_latency_mode=True)
    world = LocalWorld(1, 2**21, "cpu")
    two = LocalWorld(2, 2**21, "cpu")
    with pytest.raises(ArgumentError, match="allow_nvlink_for_low_latency_mode=False needs a transport"):
        deep_ep.Buffer(two.transport(0), 0, 1 << 20, low_latency_mode=True, allow_nvlink_for_low_latency_mode=False)
    with pytest.raises(ArgumentError, match="num_rdma_bytes must be a non-negative multiple of 128"):
        deep_ep.Buffer(world.transport(0), 0, 100, low_latency_mode=True)


def test_size_hint_covers_every_topk():
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    for k in (1, 8, 32):
        assert layout.RegionLayout.of(layout.BufferShape(8, 256, k, 7168, 128)).total_bytes <= hint



@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_normal_mode_with_deepep_signatures(fp8):
    """DeepEP's intranode normal mode through the facade on virtual CPU ranks: layout, dispatch (then a
    cached one) and combine, as DeepEP's users call them, bit-exact against lowlat.reference; the
    low-latency mode keeps working on the same Buffer."""
    from normal_helpers import check_combine, check_dispatch, expert_outputs, make_inputs, reference_dispatch, run_ranks
    from lowlat import reference

    R, n, hidden, experts, topk = 2, 12, 256, 8, 3
    nvl = lowlat.normal.NormalBuffer.region_bytes(num_ranks=R, hidden=hidden, num_experts=experts, max_tokens_per_rank=64,
                                                  max_topk=topk)
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, H, R, E)
    world = LocalWorld(R, rdma + nvl, "cpu")
    buffers = [deep_ep.Buffer(world.transport(r), nvl, rdma, low_latency_mode=True, timeout_s=20.0) for r in range(R)]
    inputs = make_inputs(R, n, hidden, experts, topk, seed=3)

    def dispatch(r, b):
        i = inputs[r]
        per_rank, per_rdma_rank, per_expert, in_rank, event = b.get_dispatch_layout(i.topk_idx, experts)
        assert per_rdma_rank is None
        want = reference.reference_normal_layout(i.topk_idx, experts, R)
        for got, ref in zip((per_rank, per_expert, in_rank), want):
            assert torch.equal(got, ref)
        x = (i.x_fp8, i.x_scales) if fp8 else i.x
        return b.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                          topk_idx=i.topk_idx, topk_weights=i.topk_weights, config=deep_ep.Buffer.get_dispatch_config(R))

    results = run_ranks(buffers, dispatch)
    refs = reference_dispatch(inputs, experts, fp8=fp8)
    check_dispatch(results, refs, fp8=fp8)
    again = run_ranks(buffers, lambda r, b: b.dispatch((inputs[r].x_fp8, inputs[r].x_scales) if fp8 else inputs[r].x,
                                                       handle=results[r][4]))
    assert all(a[1:5] == (None, None, None, None) for a in again)  # DeepEP's cached dispatch returns recv_x and the event
    ys = expert_outputs(results, refs, fp8=fp8)
    outs = run_ranks(buffers, lambda r, b: b.combine(ys[r], results[r][4], topk_weights=results[r][2]))
    counts = [ref.recv_x.shape[0] for ref in refs]
    want = reference.reference_normal_combine([y[:c] for y, c in zip(ys, counts)], refs, [i.num_tokens for i in inputs],
                                              topk_weights=[res[2][:c] for res, c in zip(results, counts)])
    check_combine(outs, want)
    with pytest.raises(UnavailableError, match="internode"):
        buffers[0].dispatch(inputs[0].x, num_tokens_per_rdma_rank=torch.zeros(1, dtype=torch.int32, device="cpu"))
    assert buffers[0].get_local_buffer_tensor(torch.uint8).numel() == nvl
    # The low-latency mode on the same Buffers, in the region before the normal mode's.
    in_threads(lambda r: run_rank(buffers[r], r, R, num_tokens=T, hidden=H, num_experts=E, num_topk=K, device=torch.device("cpu")), R)
