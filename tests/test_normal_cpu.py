"""Normal (prefill) mode without a GPU: the region layout and its mirrors of the kernels' enums, NVRTC
compiles of the normal kernels for sm_90, the pure-torch reference on hand-computed cases, and the
whole NormalBuffer API on virtual CPU ranks (the emulated engine: the kernels' protocol in PyTorch)
against the reference, bit for bit.  The same round trips run on the CUDA kernels in
test_gpu_normal.py."""

import re
import threading
import time

import pytest
import torch

from lowlat import reference
from lowlat.errors import ArgumentError, ArgumentTypeError, GraphCaptureError, NormalTimeoutError, RoutingError
from lowlat.jit import Compiler
from lowlat.jit.compiler import kernel_dir
from lowlat.jit.registry import NORMAL_SHAPES, shipped_specs
from lowlat.normal import NormalBuffer, NormalConfig, NormalHandle, NormalLayout, NormalShape, region_bytes
from lowlat.normal.layout import NormalStatus, NormalWord
from lowlat.normal.ops import NormalKernels
from lowlat.transport.local import LocalWorld
from normal_helpers import make_inputs, round_trip, run_ranks

SHAPE = dict(hidden=256, num_experts=16, max_tokens_per_rank=10, max_topk=6)
_groups = {}


def cpu_group(num_ranks, **overrides):
    shape = dict(SHAPE, **overrides)
    key = (num_ranks, tuple(sorted(shape.items())))
    if key not in _groups:
        _groups[key] = NormalBuffer.local_group(num_ranks, device="cpu", timeout_s=2.0, **shape)
    return _groups[key]


def inputs_for(num_ranks, *, seed, routing="random", num_topk=4, topk_dtype=torch.int64, **overrides):
    shape = dict(SHAPE, **overrides)
    return make_inputs(num_ranks, shape["max_tokens_per_rank"], shape["hidden"], shape["num_experts"], num_topk, seed=seed,
                       routing=routing, topk_dtype=topk_dtype)


# ------------------------------------------------------------------------------------------- layout

def _cpp_enum(name: str) -> dict[str, int]:
    text = (kernel_dir() / "normal_common.cuh").read_text()
    body = re.search(r"enum %s\s*:\s*int\s*\{(.*?)\};" % name, text, re.S).group(1)
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(k\w+)\s*=\s*(\d+)", body)}


def test_state_words_and_status_codes_mirror_the_kernels():
    assert _cpp_enum("StateWord") == {"kSeq": 0, "kStatusWord": 1, "kBlocksDone": 2, "kNumStateWords": 8}
    assert {w.name: w.value for w in NormalWord} == {"SEQ": 0, "STATUS": 1, "BLOCKS_DONE": 2, "NUM_WORDS": 8}
    snake = {re.sub(r"(?<!^)(?=[A-Z0-9])", "_", k[len("kStatus"):]).upper(): v for k, v in _cpp_enum("StatusCode").items()}
    assert snake == {c.name: c.value for c in NormalStatus}


@pytest.mark.parametrize("shape", [*NORMAL_SHAPES, NormalShape(2, 2, 128, 1, 1)])
def test_region_is_aligned_disjoint_and_inside(shape):
    layout = NormalLayout.of(shape)
    R, L, T = shape.num_ranks, shape.num_local_experts, shape.max_tokens_per_rank
    row = layout.row
    assert row.data == 0 and row.scales == 2 * shape.hidden and row.topk == row.scales + 4 * shape.num_groups
    assert row.weights == row.topk + 4 * shape.max_topk and row.source == row.weights + 4 * shape.max_topk
    assert row.stride % 16 == 0 and row.stride >= row.source + 4
    fields = sorted([(layout.flags, 8 * R), (layout.counts, 4 * R * (R + L)), (layout.staging, R * T * row.stride)])
    for (start, size), (next_start, _) in zip(fields, fields[1:]):
        assert start % 128 == 0 and start + size <= next_start
    assert fields[-1][0] + fields[-1][1] <= layout.parity_bytes
    assert layout.total_bytes >= 2 * layout.parity_bytes and layout.total_bytes % 2**21 == 0
    assert region_bytes(num_ranks=R, num_experts=shape.num_experts, hidden=shape.hidden, max_tokens_per_rank=T,
                        max_topk=shape.max_topk) == layout.total_bytes


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_ranks=33), "num_ranks=33 exceeds"),
    (dict(hidden=100), "hidden must be a multiple of 128, got 100"),
    (dict(num_experts=6), "num_experts=6 must be divisible by num_ranks=4"),
    (dict(max_topk=33), "max_topk=33 exceeds"),
    (dict(max_tokens_per_rank=0), "max_tokens_per_rank must be >= 1, got 0"),
    (dict(hidden=256.0), "hidden must be an int, got 256.0"),
])
def test_shape_rejects_bad_sizes(kwargs, match):
    base = dict(num_ranks=4, num_experts=16, hidden=256, max_tokens_per_rank=8, max_topk=4)
    with pytest.raises(ArgumentError, match=match):
        NormalShape(**dict(base, **kwargs))


# --------------------------------------------------------------------------------------------- JIT

def test_normal_kernels_are_in_the_check_list_and_compile_for_sm90(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWLAT_CACHE_DIR", str(tmp_path))
    names = {s.kernel for s in shipped_specs()}
    family = {s.kernel for s in NormalKernels(NormalLayout.of(NORMAL_SHAPES[0])).all()}
    assert family == {f"lowlat::normal::{k}" for k in ("normal_dispatch_layout", "normal_dispatch_prepare", "normal_dispatch_send",
                                                       "normal_dispatch_counts", "normal_dispatch_copy", "normal_combine_send",
                                                       "normal_combine_recv")}
    assert family <= names
    compiler = Compiler("sm_90")
    for spec in NormalKernels(NormalLayout.of(NORMAL_SHAPES[-1])).all():
        compiled = compiler.compile(spec)
        assert compiled.cubin[:4] == b"\x7fELF", spec.display_name


# ------------------------------------------------------------------------------------------ reference

def test_reference_layout_hand_computed():
    topk = torch.tensor([[0, 5, -1], [7, 6, 4], [-1, -1, -1], [1, 2, 3]])  # 8 experts on 2 ranks (4 each)
    per_rank, per_expert, in_rank = reference.reference_normal_layout(topk, 8, 2)
    assert per_rank.tolist() == [2, 2]
    assert per_expert.tolist() == [1, 1, 1, 1, 1, 1, 1, 1]
    assert in_rank.tolist() == [[True, True], [False, True], [False, False], [True, False]]


def test_reference_dispatch_and_combine_hand_computed():
    # 2 ranks, 4 experts (2 each); rank 0 has 3 tokens, rank 1 has 2.
    x0 = torch.tensor([[1.0] * 128, [2.0] * 128, [3.0] * 128], dtype=torch.bfloat16)
    x1 = torch.tensor([[4.0] * 128, [5.0] * 128], dtype=torch.bfloat16)
    t0 = torch.tensor([[0, 3], [1, -1], [2, 3]])
    t1 = torch.tensor([[-1, -1], [3, 0]])
    w0 = torch.tensor([[0.5, 0.25], [1.0, 0.0], [0.125, 2.0]])
    w1 = torch.tensor([[9.0, 9.0], [3.0, 4.0]])
    refs = reference.reference_normal_dispatch([x0, x1], [t0, t1], num_experts=4, topk_weights=[w0, w1], expert_alignment=2)
    r0, r1 = refs
    # Rank 0 gets tokens 0 and 1 of rank 0, then token 1 of rank 1; rank 1 gets tokens 0, 2 of rank 0 and 1 of rank 1.
    assert r0.recv_x[:, 0].tolist() == [1.0, 2.0, 5.0] and r1.recv_x[:, 0].tolist() == [1.0, 3.0, 5.0]
    assert r0.recv_src_idx.tolist() == [0, 1, 1] and r0.recv_src_rank.tolist() == [0, 0, 1]
    assert r0.recv_topk_idx.tolist() == [[0, -1], [1, -1], [-1, 0]] and r1.recv_topk_idx.tolist() == [[-1, 1], [0, 1], [1, -1]]
    assert r0.recv_topk_weights.tolist() == [[0.5, 0.0], [1.0, 0.0], [0.0, 4.0]]
    assert r0.rank_prefix_matrix.tolist() == [[2, 2], [3, 3]]
    assert r0.num_recv_tokens_per_expert == [2, 2] and r1.num_recv_tokens_per_expert == [2, 4]  # [2, 1] and [1, 3] aligned to 2
    ys = [r.recv_x.float().mul(10).to(torch.bfloat16) for r in refs]
    weights = [r.recv_topk_weights for r in refs]
    bias = [(torch.ones(3, 128, dtype=torch.bfloat16),), (torch.ones(2, 128, dtype=torch.bfloat16),)]
    (c0, cw0), (c1, cw1) = reference.reference_normal_combine(ys, refs, [3, 2], topk_weights=weights, biases=bias)
    assert c0[:, 0].tolist() == [21.0, 21.0, 31.0] and c1[:, 0].tolist() == [1.0, 101.0]  # 1 + copies * 10x
    assert cw0.tolist() == [[0.5, 0.25], [1.0, 0.0], [0.125, 2.0]] and cw1.tolist() == [[0.0, 0.0], [3.0, 4.0]]


# ------------------------------------------------------------------------- NormalBuffer on the CPU

@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_round_trip(num_ranks, fp8):
    buffers = cpu_group(num_ranks)
    round_trip(buffers, inputs_for(num_ranks, seed=num_ranks * 2 + fp8, routing="partial"), fp8=fp8, expert_alignment=4, num_biases=2)


@pytest.mark.parametrize("routing", ["nowhere", "one_rank", "zero_tokens_rank", "random"])
def test_adversarial_routing(routing):
    round_trip(cpu_group(4), inputs_for(4, seed=5, routing=routing), fp8=True, num_biases=1, cached=True)


def test_cached_dispatch_without_topk_and_int32_indices():
    buffers = cpu_group(2)
    inputs = inputs_for(2, seed=8, topk_dtype=torch.int32)
    round_trip(buffers, inputs, with_topk=False, cached=True)
    results, _ = round_trip(buffers, inputs, fp8=True, use_layout=False)  # layout computed inside dispatch
    assert all(r[1].dtype == torch.int32 for r in results)


@pytest.mark.parametrize("num_worst_tokens", [40, 23])
def test_num_worst_tokens_pads_and_never_synchronises(num_worst_tokens):
    buffers = cpu_group(4)
    inputs = inputs_for(4, seed=num_worst_tokens, routing="partial")
    refs_max = max(r.recv_x.shape[0] for r in reference.reference_normal_dispatch([i.x for i in inputs], [i.topk_idx for i in inputs],
                                                                                   num_experts=SHAPE["num_experts"]))
    assert num_worst_tokens >= refs_max
    round_trip(buffers, inputs, fp8=True, num_worst_tokens=num_worst_tokens, expert_alignment=8, cached=True, num_biases=2)


def test_repeated_calls_and_async_options_alternate_parities():
    buffers = cpu_group(2)
    for seed in range(3):
        round_trip(buffers, inputs_for(2, seed=100 + seed), fp8=bool(seed % 2), async_finish=True, previous_event=True)


def test_too_few_worst_tokens_is_reported_and_nothing_hangs():
    buffers = cpu_group(2)
    inputs = inputs_for(2, seed=3, routing="one_rank")  # rank 1 receives every token: 20 rows

    def call(r, b):
        return b.dispatch(inputs[r].x, topk_idx=inputs[r].topk_idx, num_worst_tokens=5)

    results = run_ranks(buffers, call)
    with pytest.raises(RoutingError, match="20 rows arrived, more than num_worst_tokens"):
        buffers[1].check_status()
    buffers[0].check_status()
    assert results[1][4].recv_src_idx.tolist() == list(range(5))  # the first five rows: rank 0's tokens 0..4
    # The ranks stay in step: a combine and a full round trip still work.
    run_ranks(buffers, lambda r, b: b.combine(torch.zeros(5, SHAPE["hidden"], dtype=torch.bfloat16), results[r][4]))
    round_trip(buffers, inputs_for(2, seed=4))


def test_bad_expert_is_reported_by_the_layout_step():
    (buffer,) = cpu_group(1)
    topk = torch.tensor([[0, 99]])
    buffer.get_dispatch_layout(topk, SHAPE["num_experts"])
    with pytest.raises(RoutingError, match="expert index 99"):
        buffer.check_status()


def test_a_synchronising_dispatch_launches_no_wait_before_every_peer_sent():
    """The GPU failure this guards against: with one host thread per virtual rank, a late thread's
    host work before its send (an allocation, a kernel load) can wait for the whole GPU while an
    early rank's counts kernel spins for that send.  The ranks meet on the host first: no rank's
    counts step starts before every rank's send was issued, however late a thread is."""
    buffers = NormalBuffer.local_group(4, device="cpu", timeout_s=5.0, **SHAPE)
    inputs = inputs_for(4, seed=21)
    events, lock = [], threading.Lock()
    for rank, b in enumerate(buffers):
        for step in ("send", "counts"):
            original = getattr(b._engine, step)

            def logged(*args, _original=original, _step=step, _rank=rank, **kwargs):
                with lock:
                    events.append((_step, _rank))
                return _original(*args, **kwargs)

            setattr(b._engine, step, logged)

    def call(r, b):
        if r == 3:
            time.sleep(0.3)  # the late thread
        return b.dispatch(inputs[r].x, topk_idx=inputs[r].topk_idx, topk_weights=inputs[r].topk_weights)

    run_ranks(buffers, call)
    steps = [step for step, _ in events]
    assert steps == ["send"] * 4 + ["counts"] * 4, events


def test_rendezvous_times_out_without_breaking_later_meetings():
    world = LocalWorld(2, 1024, "cpu")
    start = time.perf_counter()
    assert world.rendezvous("alone", 0.05) is False  # rank 1 never comes: the caller goes on
    assert time.perf_counter() - start < 1.0
    results = []
    threads = [threading.Thread(target=lambda: results.append(world.rendezvous("both", 5.0))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True, True]
    assert world.rendezvous("alone", 0.05) is True  # the late rank of the first meeting finds it complete
    assert not world._arrived


def test_a_missing_peer_times_out_with_a_typed_error():
    buffers = NormalBuffer.local_group(2, device="cpu", timeout_s=0.2, **SHAPE)
    x = torch.zeros(1, SHAPE["hidden"], dtype=torch.bfloat16)
    with pytest.raises(NormalTimeoutError, match="rank 1 did not signal"):
        buffers[0].dispatch(x, topk_idx=torch.tensor([[0]]))  # rank 1 never dispatches
    buffers[0].reset()
    buffers[1].reset()
    round_trip(buffers, inputs_for(2, seed=1))  # back in step


# ---------------------------------------------------------------------------------- bad input table

def _x(n=2, dtype=torch.bfloat16, hidden=SHAPE["hidden"]):
    return torch.zeros(n, hidden, dtype=dtype)


_TOPK = torch.zeros(2, 3, dtype=torch.int64)
BAD_DISPATCH = [
    ("x float32", dict(x=_x(dtype=torch.float32)), ArgumentTypeError, "x must have dtype bfloat16, got float32"),
    ("x hidden", dict(x=_x(hidden=128)), ArgumentError, r"x must have shape \[\*, 256\], got \(2, 128\)"),
    ("x too many tokens", dict(x=_x(n=11), topk_idx=torch.zeros(11, 3, dtype=torch.int64)), ArgumentError,
     "x has 11 tokens, more than max_tokens_per_rank=10"),
    ("x not contiguous", dict(x=_x(n=4)[::2]), ArgumentError, "x must be contiguous"),
    ("x 3-tuple", dict(x=(_x(), _x(), _x())), ArgumentError, r"x as a tuple must be \(fp8 data, fp32 scales\), got 3"),
    ("fp8 data dtype", dict(x=(_x(), torch.zeros(2, 2))), ArgumentTypeError, r"x\[0\] must have dtype float8_e4m3fn, got bfloat16"),
    ("fp8 scales shape", dict(x=(_x(dtype=torch.float8_e4m3fn), torch.zeros(2, 3))), ArgumentError,
     r"x\[1\] must have shape \[2, 2\], got \(2, 3\)"),
    ("topk float", dict(topk_idx=torch.zeros(2, 3)), ArgumentTypeError, "topk_idx must have dtype int64 or int32, got float32"),
    ("topk rows", dict(topk_idx=torch.zeros(3, 3, dtype=torch.int64)), ArgumentError, r"topk_idx must have shape \[2, \*\], got \(3, 3\)"),
    ("topk too wide", dict(topk_idx=torch.zeros(2, 7, dtype=torch.int64)), ArgumentError, "topk_idx has 7 columns; 1 to max_topk=6"),
    ("weights without topk", dict(topk_idx=None, topk_weights=torch.zeros(2, 3), is_token_in_rank=torch.zeros(2, 1, dtype=torch.bool)),
     ArgumentError, "topk_weights needs topk_idx"),
    ("weights dtype", dict(topk_weights=torch.zeros(2, 3, dtype=torch.float64)), ArgumentTypeError,
     "topk_weights must have dtype float32, got float64"),
    ("no routing", dict(topk_idx=None), ArgumentError, "dispatch needs is_token_in_rank"),
    ("is_token_in_rank dtype", dict(is_token_in_rank=torch.zeros(2, 1, dtype=torch.int32)), ArgumentTypeError,
     "is_token_in_rank must have dtype bool, got int32"),
    ("is_token_in_rank shape", dict(is_token_in_rank=torch.zeros(2, 3, dtype=torch.bool)), ArgumentError,
     r"is_token_in_rank must have shape \[2, 1\], got \(2, 3\)"),
    ("num_tokens_per_rank dtype", dict(num_tokens_per_rank=torch.zeros(1, dtype=torch.int64)), ArgumentTypeError,
     "num_tokens_per_rank must have dtype int32, got int64"),
    ("num_tokens_per_expert shape", dict(num_tokens_per_expert=torch.zeros(8, dtype=torch.int32)), ArgumentError,
     r"num_tokens_per_expert must have shape \[16\], got \(8,\)"),
    ("expert_alignment 0", dict(expert_alignment=0), ArgumentError, r"expert_alignment must be an int in \[1, 2\*\*31\), got 0"),
    ("num_worst_tokens -1", dict(num_worst_tokens=-1), ArgumentError, r"num_worst_tokens must be an int in \[0, 2\*\*31\), got -1"),
    ("num_worst_tokens float", dict(num_worst_tokens=4.0), ArgumentError, "num_worst_tokens must be an int .* got 4.0"),
    ("async_finish not bool", dict(async_finish=1), ArgumentTypeError, "async_finish must be a bool, got 1"),
    ("allocate without event", dict(allocate_on_comm_stream=True, async_finish=True), ArgumentError,
     "allocate_on_comm_stream=True needs previous_event and async_finish=True"),
    ("previous_event type", dict(previous_event="now"), ArgumentTypeError, "previous_event must be an EventOverlap"),
    ("config type", dict(config={"num_sms": 4}), ArgumentTypeError, "config must be a lowlat.normal.NormalConfig or None, got dict"),
    ("handle type", dict(topk_idx=None, handle=(1, 2)), ArgumentTypeError, "handle must be the NormalHandle"),
]


@pytest.mark.parametrize("case", BAD_DISPATCH, ids=[c[0] for c in BAD_DISPATCH])
def test_dispatch_rejects_bad_input_before_any_work(case):
    _, overrides, error, match = case
    (buffer,) = _single()
    seq = int(buffer._ctx.state[NormalWord.SEQ])
    kwargs = dict(topk_idx=_TOPK)
    kwargs.update({k: v for k, v in overrides.items() if k != "x"})
    x = overrides.get("x", _x())
    with pytest.raises(error, match=match):
        buffer.dispatch(x, **kwargs)
    assert int(buffer._ctx.state[NormalWord.SEQ]) == seq, "a rejected call must not have run any step"


def _single():
    """A fresh one-rank group (a list of one buffer)."""
    return NormalBuffer.local_group(1, device="cpu", timeout_s=1.0, **SHAPE)


def test_handle_rules_and_combine_rejects_bad_input():
    (buffer,) = _single()
    x = torch.randn(3, 256).to(torch.bfloat16)
    topk = torch.tensor([[0, 1], [2, -1], [-1, -1]])
    _, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk)
    assert isinstance(handle, NormalHandle) and handle.num_rows == 2 and handle[0] is handle.rank_prefix_matrix
    with pytest.raises(IndexError, match="only DeepEP's handle"):
        handle[1]
    rows = torch.zeros(2, 256, dtype=torch.bfloat16)
    (other,) = _single()
    cases = [
        (lambda: buffer.dispatch(x, handle=handle, topk_idx=topk), ArgumentError, "a cached dispatch .* do not pass topk_idx"),
        (lambda: buffer.dispatch(x[:2], handle=handle), ArgumentError, "x has 2 tokens but the handle's dispatch had 3"),
        (lambda: other.combine(rows, handle), ArgumentError, r"handle comes from NormalBuffer #\d+, not from this one"),
        (lambda: buffer.combine(rows, "handle"), ArgumentTypeError, "handle must be the NormalHandle"),
        (lambda: buffer.combine(rows[:1], handle), ArgumentError, r"x must have shape \[2, 256\], got \(1, 256\)"),
        (lambda: buffer.combine(rows.float(), handle), ArgumentTypeError, "x must have dtype bfloat16, got float32"),
        (lambda: buffer.combine(rows, handle, topk_weights=torch.zeros(2, 9)), ArgumentError, "topk_weights has 9 columns"),
        (lambda: buffer.combine(rows, handle, topk_weights=torch.zeros(3, 2)), ArgumentError, r"topk_weights must have shape \[2, \*\]"),
        (lambda: buffer.combine(rows, handle, bias=torch.zeros(3, 256)), ArgumentTypeError, r"bias\[0\] must have dtype bfloat16"),
        (lambda: buffer.combine(rows, handle, bias=(x, x, x)), ArgumentTypeError, "bias must be None, a tensor or a tuple of up to two"),
        (lambda: buffer.combine(rows, handle, bias=torch.zeros(2, 256, dtype=torch.bfloat16)), ArgumentError,
         r"bias\[0\] must have shape \[3, 256\], got \(2, 256\)"),
        (lambda: buffer.get_dispatch_layout(topk, 32), ArgumentError, "num_experts=32 differs from this NormalBuffer's 16"),
        (lambda: buffer.get_dispatch_layout(topk.float(), 16), ArgumentTypeError, "topk_idx must have dtype int64 or int32"),
        (lambda: NormalConfig(num_sms=0), ArgumentError, "num_sms must be None or a positive int, got 0"),
        (lambda: NormalBuffer(buffer.transport, hidden=256, num_experts=16, max_tokens_per_rank=10, region_offset=64), ArgumentError,
         "region_offset must be a non-negative multiple of 128, got 64"),
        (lambda: NormalBuffer(buffer.transport, hidden=256, num_experts=16, max_tokens_per_rank=10**6), ArgumentError,
         "the transport's region has"),
        (lambda: NormalBuffer(buffer.transport, hidden=256, num_experts=16, max_tokens_per_rank=10, timeout_s=0), ArgumentError,
         "timeout_s must be > 0, got 0"),
    ]
    seq = int(buffer._ctx.state[NormalWord.SEQ])
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert int(buffer._ctx.state[NormalWord.SEQ]) == seq
    out, weights, _ = buffer.combine(rows, handle)
    assert weights is None and out.shape == (3, 256) and bool((out[2] == 0).all())  # token 2 went nowhere


def test_graph_capture_without_num_worst_tokens_is_refused(monkeypatch):
    (buffer,) = _single()
    monkeypatch.setattr("lowlat.normal.buffer.capturing", lambda: True)
    with pytest.raises(GraphCaptureError, match="pass num_worst_tokens"):
        buffer.dispatch(_x(), topk_idx=_TOPK)


def test_configs_and_region_size_up_front():
    assert NormalBuffer.get_dispatch_config(8) == NormalConfig(24) == NormalBuffer.get_combine_config(8)
    size = NormalBuffer.region_bytes(num_ranks=8, hidden=7168, num_experts=256, max_tokens_per_rank=4096, max_topk=8)
    assert size == region_bytes(num_ranks=8, hidden=7168, num_experts=256, max_tokens_per_rank=4096, max_topk=8)
    assert size >= 2 * 8 * 4096 * (2 * 7168 + 4 * 56) and size % 2**21 == 0


def test_bf16_default_dtype_changes_nothing():
    """Every tensor the library creates names its dtype (engines run under a bf16 default)."""
    buffers = cpu_group(2)
    inputs = inputs_for(2, seed=77)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        round_trip(buffers, inputs, fp8=True, num_worst_tokens=25, num_biases=1)
    finally:
        torch.set_default_dtype(previous)


def test_bench_without_gpu_checks_against_the_reference(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the bench runs its GPU path there (bench/gpu_check.sh runs it)")
    from lowlat.bench import normal as bench

    assert bench.main(["--ranks", "2", "--experts", "16", "--hidden", "256", "--topk", "4"]) == 0
    out = capsys.readouterr().out
    assert "correct: " in out and "bit-exact vs lowlat.reference" in out and "no timings are taken" in out


def test_main_bench_forwards_mode_normal_with_its_options(monkeypatch):
    from lowlat.bench import __main__ as entry, normal as bench

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
    assert entry.main(["--mode", "normal", "--ranks", "2"]) == 0
    assert entry.main(["--tokens", "64", "--mode=normal"]) == 0
    assert seen == [["--ranks", "2"], ["--tokens", "64"]]
    with pytest.raises(SystemExit):  # argparse refuses a mode it does not know
        entry.main(["--mode", "prefill"])


def test_bench_torch_reference_matches_the_reference():
    from lowlat.bench.normal import TorchNormal, Workload

    work = Workload(4, 16, 256, 32, 4, "cpu", seed=1)
    baseline = TorchNormal(work, 32, fp8=True)
    baseline.dispatch()
    refs = reference.reference_normal_dispatch(work.x_fp8, work.topk_idx, num_experts=32, x_scales=work.x_scales,
                                               topk_weights=work.topk_weights)
    assert torch.equal(baseline.recv, torch.cat([r.recv_x.view(torch.uint8) for r in refs]))
    assert torch.equal(baseline.recv_scales, torch.cat([r.recv_scales for r in refs]))
    assert torch.equal(baseline.recv_topk, torch.cat([r.recv_topk_idx for r in refs]))


def test_ipc_test_logic_on_cpu_ranks():
    """test_gpu_normal_ipc.py's per-rank exercise, run by host threads on virtual CPU ranks."""
    from test_gpu_normal_ipc import SHAPE as IPC_SHAPE, WORLD, exercise

    buffers = NormalBuffer.local_group(WORLD, device="cpu", timeout_s=5.0, **IPC_SHAPE)
    run_ranks(buffers, exercise)


def test_one_region_hosts_a_low_latency_buffer_and_a_normal_buffer():
    """The facade's layout: a low-latency Buffer at offset 0 and a NormalBuffer after it in the same
    transport region; interleaved calls of both stay correct."""
    import helpers
    import lowlat
    from lowlat.layout import BufferShape, RegionLayout
    from lowlat.transport.local import LocalWorld

    ll_shape = dict(max_tokens_per_rank=6, hidden=256, num_experts=16, num_topk=3)
    ll_bytes = RegionLayout.of(BufferShape(2, 16, 3, 256, 6)).total_bytes
    normal_bytes = NormalBuffer.region_bytes(num_ranks=2, **SHAPE)
    world = LocalWorld(2, ll_bytes + normal_bytes, "cpu")
    ll = [lowlat.Buffer(world.transport(r), timeout_s=2.0, **ll_shape) for r in range(2)]
    normal = [NormalBuffer(world.transport(r), timeout_s=2.0, region_offset=ll_bytes, **SHAPE) for r in range(2)]
    for step in range(2):
        ll_inputs = helpers.make_inputs(2, 6, 256, 16, 3, seed=step)
        # Low-latency sends land in the peers' regions; a whole normal round trip runs before the receives.
        sent = [b.low_latency_dispatch(i.x, i.topk_idx, return_recv_hook=True) for b, i in zip(ll, ll_inputs)]
        round_trip(normal, inputs_for(2, seed=step), fp8=bool(step), num_biases=1)
        for result in sent:
            result[-1]()
        helpers.check_dispatch(sent, helpers.reference_for(ll_inputs, 16, 6, use_fp8=True), use_fp8=True)


def test_bad_expert_in_dispatch_is_reported_and_the_ranks_stay_in_step():
    buffers = cpu_group(2)
    inputs = inputs_for(2, seed=13)
    bad = inputs[0].topk_idx.clone()
    bad[1, 0] = 99  # outside [-1, 16): treated as -1 by the kernels, reported after the call

    def call(r, b):
        return b.dispatch(inputs[r].x, topk_idx=bad if r == 0 else inputs[r].topk_idx)

    with pytest.raises(AssertionError, match="rank 0 failed: RoutingError: .*expert index 99"):
        run_ranks(buffers, call)
    for b in buffers:
        b.check_status()
    # Every step of that call was issued on both ranks: the next calls are in step (the call counters agree).
    assert int(buffers[0]._ctx.state[NormalWord.SEQ]) == int(buffers[1]._ctx.state[NormalWord.SEQ])
    round_trip(buffers, inputs, fp8=True)
