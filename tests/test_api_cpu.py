"""The whole Buffer API on the CPU: virtual ranks on the local transport, driven by the emulated
engine (the kernels' protocol in PyTorch: same bytes, sequence numbers, flags, masks, status).  These
run in CI; the same checks run against the CUDA kernels in test_gpu_kernels.py."""

import time

import pytest
import torch

import lowlat
from lowlat.errors import ArgumentError, ArgumentTypeError, LowLatencyTimeoutError, RoutingError
from lowlat.layout import StateWord
from helpers import (check_combine, check_dispatch, combine_all, dispatch_all, expert_outputs, make_inputs, reference_combined,
                     reference_for, run_all)

SHAPE = dict(max_tokens_per_rank=6, hidden=256, num_experts=8, num_topk=3)
DISPATCH_MODES = {
    "bf16": dict(use_fp8=False),
    "fp8": dict(use_fp8=True),
    "fp8_round": dict(use_fp8=True, round_scale=True),
    "fp8_ue8m0": dict(use_fp8=True, round_scale=True, use_ue8m0=True),
}
_groups = {}


def cpu_group(num_ranks, **overrides):
    shape = dict(SHAPE, **overrides)
    key = (num_ranks, tuple(sorted(shape.items())))
    if key not in _groups:
        _groups[key] = lowlat.Buffer.local_group(num_ranks, device="cpu", timeout_s=2.0, enable_zero_copy=True, **shape)
    return _groups[key]


def round_trip(buffers, inputs, dispatch_mode, *, use_logfmt=False, zero_copy=False, hook=True, device_num_tokens=False):
    s = buffers[0].shape
    options = DISPATCH_MODES[dispatch_mode]
    results = dispatch_all(buffers, inputs, hook=hook, concurrent=not hook, device_num_tokens=device_num_tokens, **options)
    for b in buffers:
        b.check_status()
    refs = reference_for(inputs, s.num_experts, s.max_tokens_per_rank, use_fp8=options["use_fp8"],
                         round_scale=options.get("round_scale", False))
    check_dispatch(results, refs, use_fp8=options["use_fp8"], use_ue8m0=options.get("use_ue8m0", False))
    ys = expert_outputs(results, refs, use_fp8=options["use_fp8"])
    if zero_copy:
        for r, b in enumerate(buffers):
            target = b.get_next_low_latency_combine_buffer(results[r][2])
            target.copy_(ys[r])
            ys[r] = target
    outs = combine_all(buffers, inputs, ys, results, hook=hook, concurrent=not hook, use_logfmt=use_logfmt, zero_copy=zero_copy)
    for b in buffers:
        b.check_status()
    expected = reference_combined(inputs, ys, refs, use_logfmt=use_logfmt)
    check_combine(outs, expected, inputs=inputs, ys=ys, refs=refs, use_logfmt=use_logfmt)
    return results, outs


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
@pytest.mark.parametrize("dispatch_mode", list(DISPATCH_MODES))
@pytest.mark.parametrize("combine_mode", ["bf16", "logfmt", "zero_copy"])
def test_round_trip_hook_mode(num_ranks, dispatch_mode, combine_mode):
    buffers = cpu_group(num_ranks)
    inputs = make_inputs(num_ranks, 6, 256, 8, 3, seed=num_ranks * 7 + len(dispatch_mode))
    round_trip(buffers, inputs, dispatch_mode, use_logfmt=combine_mode == "logfmt", zero_copy=combine_mode == "zero_copy")


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_round_trip_concurrent_ranks(num_ranks):
    """Non-hook calls: each virtual rank on its own host thread, waiting for the others' flags."""
    buffers = cpu_group(num_ranks)
    for seed in range(3):
        round_trip(buffers, make_inputs(num_ranks, 6, 256, 8, 3, seed=seed), "fp8", hook=False)


@pytest.mark.parametrize("routing", ["one_expert", "all_minus_one", "zero_tokens_rank", "partial"])
def test_adversarial_routing(routing):
    buffers = cpu_group(4)
    inputs = make_inputs(4, 6, 256, 8, 3, seed=3, routing=routing)
    round_trip(buffers, inputs, "fp8")
    round_trip(buffers, inputs, "bf16", use_logfmt=True, device_num_tokens=True)


def test_logfmt_chunks_are_encoded_in_these_inputs():
    """Guard against a vacuous LogFMT test: the test data must contain encodable chunks and raw ones."""
    from lowlat import formats
    buffers = cpu_group(2)
    inputs = make_inputs(2, 6, 256, 8, 3, seed=1)
    results = dispatch_all(buffers, inputs, hook=True, use_fp8=False)
    refs = reference_for(inputs, 8, 6, use_fp8=False)
    ys = expert_outputs(results, refs, use_fp8=False)
    castable = torch.cat([formats.logfmt_encode(torch.nan_to_num(y[l, : int(r[1][l])], nan=0.0)).castable.flatten()
                          for y, r in zip(ys, results) for l in range(4)])
    assert castable.any() and not castable.all()
    outs = combine_all(buffers, inputs, ys, results, hook=True, use_logfmt=True)
    check_combine(outs, reference_combined(inputs, ys, refs, use_logfmt=True), inputs=inputs, ys=ys, refs=refs, use_logfmt=True)


def test_outputs_alternate_between_two_slots_and_handles_stay_valid():
    buffers = cpu_group(2)
    first = make_inputs(2, 6, 256, 8, 3, seed=10)
    second = make_inputs(2, 6, 256, 8, 3, seed=11)
    r1 = dispatch_all(buffers, first, hook=True, use_fp8=False)
    r2 = dispatch_all(buffers, second, hook=True, use_fp8=False)
    assert r1[0][2].slot != r2[0][2].slot
    # Both micro-batches' results are alive at once (two-batch overlap); combine them in either order.
    for inputs, results in ((second, r2), (first, r1)):
        refs = reference_for(inputs, 8, 6, use_fp8=False)
        check_dispatch(results, refs, use_fp8=False)
        ys = expert_outputs(results, refs, use_fp8=False)
        outs = combine_all(buffers, inputs, ys, results, hook=True)
        check_combine(outs, reference_combined(inputs, ys, refs, use_logfmt=False))


def test_statistics_accumulate():
    buffers = cpu_group(2)
    inputs = make_inputs(2, 6, 256, 8, 3, seed=4)
    refs = reference_for(inputs, 8, 6, use_fp8=True)
    recv_stats = [torch.zeros(4, dtype=torch.int32) for _ in buffers]
    waits = [torch.zeros(2, dtype=torch.int64) for _ in buffers]
    for _ in range(3):
        results = run_all(buffers, lambda r, b, h: b.low_latency_dispatch(
            inputs[r].x, inputs[r].topk_idx, cumulative_local_expert_recv_stats=recv_stats[r],
            dispatch_wait_recv_cost_stats=waits[r], return_recv_hook=h), hook=True)
        ys = expert_outputs(results, refs, use_fp8=True)
        combine_all(buffers, inputs, ys, results, hook=True)
        if _ == 0:
            first_waits = [w.clone() for w in waits]
    for r in range(2):
        assert torch.equal(recv_stats[r], 3 * refs[r].recv_count)
        # Waiting costs something on every call (nanoseconds on the CPU engine) and accumulates.
        assert (first_waits[r] > 0).all() and (waits[r] > first_waits[r]).all()


def test_hook_order_and_misuse():
    buffers = cpu_group(2)
    inputs = make_inputs(2, 6, 256, 8, 3, seed=5)
    b = buffers[0]
    first = b.low_latency_dispatch(inputs[0].x, inputs[0].topk_idx, return_recv_hook=True)
    second = b.low_latency_dispatch(inputs[0].x, inputs[0].topk_idx, return_recv_hook=True)
    with pytest.raises(ArgumentError, match="two dispatch receive hooks are pending"):
        b.low_latency_dispatch(inputs[0].x, inputs[0].topk_idx, return_recv_hook=True)
    with pytest.raises(ArgumentError, match="hook is pending"):
        b.low_latency_dispatch(inputs[0].x, inputs[0].topk_idx)
    with pytest.raises(ArgumentError, match="order"):
        second[-1]()
    # Let rank 1 send both so rank 0's receives find their data, then drain in order.
    other = [buffers[1].low_latency_dispatch(inputs[1].x, inputs[1].topk_idx, return_recv_hook=True) for _ in range(2)]
    first[-1]()
    with pytest.raises(ArgumentError, match="already called"):
        first[-1]()
    second[-1]()
    for result in other:
        result[-1]()
    for buffer in buffers:
        buffer.check_status()


def test_virtual_ranks_use_gpu_scope_flags_and_no_pdl():
    """Virtual ranks all run on one device: flags and fences at GPU scope; no programmatic dependent
    launch, since their kernels must be co-resident (and the CPU has none)."""
    for buffer in cpu_group(2):
        assert buffer._ctx.config.peers_on_device is True and buffer._ctx.pdl is False


def test_timeout_names_the_late_rank_masks_it_and_recovers():
    buffers = lowlat.Buffer.local_group(2, device="cpu", timeout_s=0.2, **SHAPE)
    inputs = make_inputs(2, 6, 256, 8, 3, seed=6)
    start = time.perf_counter()
    buffers[0].low_latency_dispatch(inputs[0].x, inputs[0].topk_idx)  # rank 1 never sends
    assert time.perf_counter() - start < 2.0
    with pytest.raises(LowLatencyTimeoutError) as info:
        buffers[0].check_status()
    assert info.value.rank == 1 and "rank 1" in str(info.value)
    mask = torch.zeros(2, dtype=torch.int32)
    buffers[0].low_latency_query_mask_buffer(mask)
    assert mask.tolist() == [0, 1]
    # Rank 0 goes on alone: nothing is sent to or awaited from the masked rank.
    recv_x, count, handle, _, _ = buffers[0].low_latency_dispatch(inputs[0].x, inputs[0].topk_idx, use_fp8=False)
    buffers[0].check_status()
    ref = reference_for([inputs[0], make_inputs(2, 6, 256, 8, 3, seed=6, routing="all_minus_one")[1]], 8, 6, use_fp8=False)
    assert torch.equal(count, ref[0].recv_count)
    for b in buffers:  # the collective way back
        b.clean_low_latency_buffer()
    round_trip(buffers, make_inputs(2, 6, 256, 8, 3, seed=7), "fp8")


def test_bad_expert_index_is_reported_by_the_kernel_path():
    buffers = cpu_group(2)
    inputs = make_inputs(2, 6, 256, 8, 3, seed=8)
    inputs[0].topk_idx[0, 0] = 99
    hooks = [b.low_latency_dispatch(inputs[r].x, inputs[r].topk_idx, return_recv_hook=True)[-1] for r, b in enumerate(buffers)]
    with pytest.raises(RoutingError, match="99"):  # surfaces at rank 0's next check: its receive hook
        hooks[0]()
    hooks[1]()
    for b in buffers:
        b.check_status()


def test_memory_report_matches_estimate_and_beats_deepep():
    buffers = lowlat.Buffer.local_group(2, device="cpu", enable_zero_copy=True, **SHAPE)  # as constructed: no pool growth yet
    assert buffers[0].memory_report() == lowlat.MemoryReport.estimate(buffers[0].shape, enable_zero_copy=True)
    # Standard shape: DeepEP's LL buffer (research/deepep.md section 2.1) is 2 x (send + recv + signals).
    T, H, E, R, K = 128, 7168, 256, 8, 8
    S = H // 128
    msg, slot = 16 + max(2 * H, H + 4 * S), 4 * S + 2 * H
    deepep = 2 * (max(T * msg, E * T * slot) + max(E * T * msg, E * T * slot) + E * 4)
    ours = lowlat.MemoryReport.estimate(lowlat.BufferShape(R, E, K, H, T))
    assert ours.total < deepep, (ours.total, deepep)
    with_zero_copy = lowlat.MemoryReport.estimate(lowlat.BufferShape(R, E, K, H, T), enable_zero_copy=True)
    deepep_outputs = 2 * (E // R * R * T * (H + S * 4))  # two live FP8 results, which DeepEP allocates per call
    assert with_zero_copy.total < deepep + deepep_outputs


# -- bad input: every misuse raises ValueError/TypeError naming the argument, before anything runs --

def _dispatch(**overrides):
    def call():
        b = cpu_group(1)[0]
        args = dict(x=torch.zeros(4, 256, dtype=torch.bfloat16), topk_idx=torch.zeros(4, 3, dtype=torch.int64))
        args.update(overrides)
        return b.low_latency_dispatch(args.pop("x"), args.pop("topk_idx"), **args)
    return call


def _combine(**overrides):
    def call():
        b = cpu_group(1)[0]
        topk = torch.tensor([[0, 1, 2]] * 4)
        _, _, handle, _, _ = b.low_latency_dispatch(torch.zeros(4, 256, dtype=torch.bfloat16), topk)
        args = dict(x=torch.zeros(8, 6, 256, dtype=torch.bfloat16), topk_idx=topk, topk_weights=torch.ones(4, 3), handle=handle)
        args.update(overrides)
        return b.low_latency_combine(args.pop("x"), args.pop("topk_idx"), args.pop("topk_weights"), args.pop("handle"), **args)
    return call


def _build(**overrides):
    args = dict(max_tokens_per_rank=4, hidden=256, num_experts=8, num_topk=2)
    args.update(overrides)
    return lambda: lowlat.Buffer.local_group(2, device="cpu", **args)


BAD_INPUTS = [
    ("x dtype", _dispatch(x=torch.zeros(4, 256)), ArgumentTypeError, "x must have dtype bfloat16"),
    ("x hidden", _dispatch(x=torch.zeros(4, 128, dtype=torch.bfloat16)), ArgumentError, r"x must have shape \[\*, 256\]"),
    ("x rank", _dispatch(x=torch.zeros(4, 1, 256, dtype=torch.bfloat16)), ArgumentError, "x must be 2-D"),
    ("x device", _dispatch(x=torch.zeros(4, 256, dtype=torch.bfloat16, device="meta")), ArgumentError, "x must be on cpu"),
    ("x strided", _dispatch(x=torch.zeros(256, 4, dtype=torch.bfloat16).t()), ArgumentError, "x must be contiguous"),
    ("too many tokens", _dispatch(x=torch.zeros(7, 256, dtype=torch.bfloat16)), ArgumentError, "max_tokens_per_rank=6"),
    ("topk dtype", _dispatch(topk_idx=torch.zeros(4, 3)), ArgumentTypeError, "topk_idx must have dtype int64 or int32"),
    ("topk width", _dispatch(topk_idx=torch.zeros(4, 2, dtype=torch.int64)), ArgumentError, r"topk_idx must have shape \[4, 3\]"),
    ("topk rows", _dispatch(topk_idx=torch.zeros(3, 3, dtype=torch.int64)), ArgumentError, "topk_idx"),
    ("round_scale without fp8", _dispatch(use_fp8=False, round_scale=True), ArgumentError, "round_scale"),
    ("ue8m0 without round_scale", _dispatch(use_ue8m0=True), ArgumentError, "use_ue8m0"),
    ("async + hook", _dispatch(async_finish=True, return_recv_hook=True), ArgumentError, "async_finish"),
    ("flag type", _dispatch(use_fp8=1), ArgumentTypeError, "use_fp8 must be a bool"),
    ("num_tokens range", _dispatch(num_tokens=5), ArgumentError, "num_tokens=5"),
    ("num_tokens type", _dispatch(num_tokens=2.0), ArgumentTypeError, "num_tokens"),
    ("num_tokens dtype", _dispatch(num_tokens=torch.tensor([2])), ArgumentTypeError, "num_tokens must have dtype int32"),
    ("recv stats dtype", _dispatch(cumulative_local_expert_recv_stats=torch.zeros(8, dtype=torch.int64)), ArgumentTypeError,
     "cumulative_local_expert_recv_stats"),
    ("wait stats shape", _dispatch(dispatch_wait_recv_cost_stats=torch.zeros(3, dtype=torch.int64)), ArgumentError,
     "dispatch_wait_recv_cost_stats"),
    ("handle type", _combine(handle=(1, 2)), ArgumentTypeError, "handle must be the DispatchHandle"),
    ("zero_copy + logfmt", _combine(zero_copy=True, use_logfmt=True), ArgumentError, "zero_copy"),
    ("zero_copy x shape", _combine(zero_copy=True, x=torch.zeros(8, 5, 256, dtype=torch.bfloat16)), ArgumentError,
     "x must have shape"),
    ("zero_copy x dtype", _combine(zero_copy=True, x=torch.zeros(8, 6, 256)), ArgumentTypeError, "x must have dtype bfloat16"),
    ("combine x shape", _combine(x=torch.zeros(8, 5, 256, dtype=torch.bfloat16)), ArgumentError, "x must have shape"),
    ("weights dtype", _combine(topk_weights=torch.ones(4, 3, dtype=torch.float64)), ArgumentTypeError, "topk_weights"),
    ("weights shape", _combine(topk_weights=torch.ones(3, 3)), ArgumentError, "topk_weights"),
    ("out shape", _combine(out=torch.zeros(3, 256, dtype=torch.bfloat16)), ArgumentError, "out must have shape"),
    ("out dtype", _combine(out=torch.zeros(4, 256)), ArgumentTypeError, "out must have dtype"),
    ("hidden", _build(hidden=200), ArgumentError, "hidden must be a multiple of 128, got 200"),
    ("experts", _build(num_experts=7), ArgumentError, "num_experts=7 must be divisible by num_ranks=2"),
    ("topk", _build(num_topk=33), ArgumentError, "num_topk=33"),
    ("timeout", _build(timeout_s=0), ArgumentError, "timeout_s"),
    ("num_sms", _build(num_sms=0), ArgumentError, "num_sms"),
    ("group", lambda: lowlat.Buffer("world", max_tokens_per_rank=4, hidden=256, num_experts=8, num_topk=2), ArgumentTypeError,
     "group must be"),
]


@pytest.mark.parametrize("name,call,error,match", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_raises_before_anything_runs(name, call, error, match):
    b = cpu_group(1)[0]
    with pytest.raises(error, match=match):
        call()
    # Nothing was launched for the rejected call: every send is paired with its receive.
    state = b._ctx.state
    assert int(state[StateWord.DISPATCH_SEND_SEQ]) == int(state[StateWord.DISPATCH_RECV_SEQ])
    assert int(state[StateWord.COMBINE_SEND_SEQ]) == int(state[StateWord.COMBINE_RECV_SEQ])
    assert not any(b._pending.values())


def test_handle_from_another_buffer_is_rejected():
    a, b = cpu_group(1)[0], cpu_group(1, max_tokens_per_rank=5)[0]
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    topk = torch.tensor([[0, 1, 2]] * 4)
    _, _, handle, _, _ = a.low_latency_dispatch(x, topk)
    with pytest.raises(ArgumentError, match="not from this Buffer"):
        b.low_latency_combine(torch.zeros(8, 5, 256, dtype=torch.bfloat16), topk, torch.ones(4, 3), handle)
    a.low_latency_combine(torch.zeros(8, 6, 256, dtype=torch.bfloat16), topk, torch.ones(4, 3), handle)


def test_validate_routing_checks_range_and_duplicates_on_the_host():
    b = lowlat.Buffer.local_group(1, device="cpu", validate_routing=True, **SHAPE)[0]
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ArgumentError, match=r"topk_idx\[1, 2\]=8 is outside \[-1, 8\)"):
        b.low_latency_dispatch(x, torch.tensor([[0, 1, 2], [3, 4, 8]]))
    with pytest.raises(ArgumentError, match="names an expert twice"):
        b.low_latency_dispatch(x, torch.tensor([[0, 1, 1], [3, 4, 5]]))
    assert int(b._ctx.state[StateWord.DISPATCH_SEND_SEQ]) == 0


def test_size_hint_and_repr():
    hint = lowlat.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256, num_topk=8)
    assert hint < 2**27  # ~64 MiB of symmetric memory at the standard shape (DeepEP: ~1.9 GB)
    # A region of exactly the hint hosts a Buffer of those shapes; one 128 bytes short is refused.
    small = dict(max_tokens_per_rank=6, hidden=256, num_experts=8, num_topk=3)
    size = lowlat.Buffer.get_low_latency_rdma_size_hint(6, 256, 2, 8, num_topk=3)
    world = lowlat.transport.LocalWorld(2, size, "cpu")
    lowlat.Buffer(world.transport(0), **small)
    short = lowlat.transport.LocalWorld(2, size - 128, "cpu")
    with pytest.raises(lowlat.ArgumentError, match="region has"):
        lowlat.Buffer(short.transport(0), **small)
    assert "transport=local" in repr(cpu_group(2)[0])


def test_graph_capture_helper_needs_cuda():
    import lowlat.graphs
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/test_gpu_graphs.py covers lowlat.graphs.capture")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        lowlat.graphs.capture(lambda: None)


def test_round_trip_under_a_bf16_default_dtype():
    """Engines run with torch.set_default_dtype(torch.bfloat16): the CPU engine and the reference name
    every dtype, so fp32 accumulators stay fp32 and the results stay bit-exact."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        buffers = lowlat.Buffer.local_group(2, device="cpu", timeout_s=2.0, enable_zero_copy=True, **SHAPE)
        inputs = make_inputs(2, 6, 256, 8, 3, seed=21)
        round_trip(buffers, inputs, "fp8", use_logfmt=True)
        round_trip(buffers, inputs, "bf16")
    finally:
        torch.set_default_dtype(before)


class _FakeEvent:
    """Stands for a RawEvent on the CPU: counts the driver calls an async call's bookkeeping makes."""

    calls: list = []

    def __init__(self, done: bool):
        self.done = done

    def query(self) -> bool:
        _FakeEvent.calls.append("query")
        return self.done

    def synchronize(self) -> None:
        _FakeEvent.calls.append("synchronize")
        self.done = True


def test_async_calls_are_released_in_order_with_one_query_per_batch():
    """Async calls finish in order on the comm stream: the newest held one is queried every
    _PRUNE_EVERY calls and, when done, releases all; at _KEEP_ALIVE_LIMIT the oldest is waited for."""
    from lowlat import buffer as buffer_module

    buffer = cpu_group(1)[0]
    every, limit = buffer_module._PRUNE_EVERY, buffer_module._KEEP_ALIVE_LIMIT
    _FakeEvent.calls = []
    buffer._in_flight.clear()
    held = [torch.zeros(1, dtype=torch.float32, device="cpu") for _ in range(every)]
    for i in range(every):  # the first batch: nothing is looked at
        buffer._hold_until_done(_FakeEvent(done=True), (held[i],))
    assert _FakeEvent.calls == [] and len(buffer._in_flight) == every
    buffer._hold_until_done(_FakeEvent(done=False), ())  # the newest of the batch was done: all released
    assert _FakeEvent.calls == ["query"] and len(buffer._in_flight) == 1

    _FakeEvent.calls = []
    while len(buffer._in_flight) < limit:  # a GPU that never catches up: one query per batch, nothing released
        buffer._hold_until_done(_FakeEvent(done=False), ())
    assert _FakeEvent.calls == ["query"] * (limit // every - 1)
    _FakeEvent.calls = []
    oldest = buffer._in_flight[0][0]
    buffer._hold_until_done(_FakeEvent(done=False), ())  # at the limit: the oldest is waited for, then dropped
    assert _FakeEvent.calls == ["synchronize"] and oldest.done and len(buffer._in_flight) == limit
    assert all(entry[0] is not oldest for entry in buffer._in_flight)
    buffer._in_flight.clear()  # the group is shared with other tests


class _WaitedEvent:
    def __init__(self):
        self.waits = 0

    def wait(self, stream=None) -> None:
        self.waits += 1


def test_a_pooled_output_left_by_an_async_call_is_waited_for_only_off_the_comm_stream():
    """The next user of an object an async call left behind waits for that call's event on the
    caller's stream; an async user runs on the same comm stream, in order, and does not."""
    from lowlat.outputs import CombineOutput, Pool

    shape = cpu_group(1)[0].shape
    pool = Pool(lambda: CombineOutput(shape, torch.device("cpu")), [CombineOutput(shape, torch.device("cpu"))])
    for on_comm_stream, waits in ((False, 1), (True, 0)):
        event = _WaitedEvent()
        pool.items[0].pending_event = event
        assert pool.acquire(on_comm_stream) is pool.items[0]
        assert event.waits == waits and pool.items[0].pending_event is None


class _RecordedEvent(_WaitedEvent):
    def __init__(self):
        super().__init__()
        self.recorded_on = []

    def record(self, stream) -> None:
        self.recorded_on.append(stream)

    def query(self) -> bool:
        return True


def test_async_calls_fork_to_the_comm_stream_and_hand_back_an_event(monkeypatch):
    """The async wiring without a GPU: a Buffer made to look like one (raw events and streams faked)
    launches each async call with the comm stream, forks that stream after the caller's, holds the
    caller's tensors and leaves the call's event on its own outputs."""
    from lowlat import buffer as buffer_module

    buffer = cpu_group(1)[0]
    monkeypatch.setattr(buffer, "_device_index", 0)
    monkeypatch.setattr(buffer, "_comm_handle", 1234, raising=False)
    fork, done = _RecordedEvent(), _RecordedEvent()
    monkeypatch.setattr(buffer, "_fork", fork, raising=False)
    monkeypatch.setattr(buffer, "_events", type("Ring", (), {"next": staticmethod(lambda: done)})(), raising=False)
    monkeypatch.setattr(buffer_module, "current_stream_handle", lambda index: 77)
    probes = []  # the capture probe is a call into the driver on a GPU: an async call asks it once
    monkeypatch.setattr(buffer_module, "capturing", lambda: probes.append(1) is None and False)
    monkeypatch.setattr(buffer, "run", lambda call, *args, **kwargs: call(*args, **kwargs))
    launches = []
    monkeypatch.setattr(buffer._engine, "dispatch", lambda *args, stream=None: launches.append(("dispatch", stream)))
    monkeypatch.setattr(buffer._engine, "combine", lambda *args, stream=None: launches.append(("combine", stream)))
    inputs = make_inputs(1, SHAPE["max_tokens_per_rank"], SHAPE["hidden"], SHAPE["num_experts"], SHAPE["num_topk"], seed=3)[0]
    buffer._in_flight.clear()
    try:
        _, _, handle, event, hook = buffer.low_latency_dispatch(inputs.x, inputs.topk_idx, async_finish=True)
        assert hook is None and event.event is done and event.extra_tensors[0] is inputs.x
        assert fork.recorded_on == [77] and fork.waits == 1 and done.recorded_on == [1234]
        assert handle.outputs.pending_event is done and buffer._in_flight[-1][0] is done
        assert len(probes) == 1
        y = torch.zeros(buffer.shape.num_local_experts, buffer.shape.rows_per_expert, buffer.shape.hidden, dtype=torch.bfloat16,
                        device="cpu")
        out, event, hook = buffer.low_latency_combine(y, inputs.topk_idx, inputs.topk_weights, handle, async_finish=True)
        assert hook is None and event.event is done and any(t is y for t in event.extra_tensors)
        assert launches == [("dispatch", 1234), ("combine", 1234)] and len(probes) == 2
        buffer.low_latency_dispatch(inputs.x, inputs.topk_idx)  # a plain call: the caller's stream
        assert launches[-1] == ("dispatch", None)
        # The static set the first call used comes round again (every other dispatch).  An async
        # call takes it without a wait (it runs after that event on the same comm stream) and leaves
        # its own event there; a plain call on the caller's stream waits for that event first.
        assert done.waits == 0
        _, _, again, _, _ = buffer.low_latency_dispatch(inputs.x, inputs.topk_idx, async_finish=True)
        assert again.outputs is handle.outputs and done.waits == 0 and again.outputs.pending_event is done
        buffer.low_latency_dispatch(inputs.x, inputs.topk_idx)
        _, _, last, _, _ = buffer.low_latency_dispatch(inputs.x, inputs.topk_idx)
        assert last.outputs is handle.outputs and done.waits == 1 and last.outputs.pending_event is None
    finally:
        buffer._in_flight.clear()
        for outputs in buffer._static:
            outputs.pending_event = None
