"""The graph-first contract (DESIGN.md), each point a test, plus bounded waits and the transport
smoke test, on one GPU with virtual ranks."""

import pytest
import torch

import lowlat
from lowlat.errors import GraphCaptureError, LowLatencyTimeoutError
from conftest import requires_gpu
from helpers import check_dispatch, make_inputs, reference_combined, reference_for

pytestmark = [pytest.mark.gpu, requires_gpu]

SHAPE = dict(max_tokens_per_rank=16, hidden=256, num_experts=16, num_topk=4)


class StaticStep:
    """One decode step over all virtual ranks with static inputs, written for capture: every rank
    dispatches (hook mode), a toy expert (x2 of the dequantised rows) runs, every rank combines."""

    def __init__(self, buffers, num_calls=2, use_fp8=True):
        self.buffers = buffers
        self.use_fp8 = use_fp8
        self.num_calls = num_calls  # 1: dispatch only (an odd number of LL calls in a graph)
        R = len(buffers)
        T, H, K = SHAPE["max_tokens_per_rank"], SHAPE["hidden"], SHAPE["num_topk"]
        self.x = [torch.zeros(T, H, dtype=torch.bfloat16, device="cuda") for _ in range(R)]
        self.topk = [torch.full((T, K), -1, dtype=torch.int64, device="cuda") for _ in range(R)]
        self.weights = [torch.zeros(T, K, dtype=torch.float32, device="cuda") for _ in range(R)]
        self.num_tokens = [torch.zeros(1, dtype=torch.int32, device="cuda") for _ in range(R)]

    def load(self, inputs):
        for r, inp in enumerate(inputs):
            self.x[r].copy_(inp.x)
            self.topk[r].copy_(inp.topk_idx)
            self.weights[r].copy_(inp.topk_weights)
            self.num_tokens[r].fill_(inp.num_tokens)

    def dispatch(self):
        results = [b.low_latency_dispatch(self.x[r], self.topk[r], use_fp8=self.use_fp8, return_recv_hook=True,
                                          num_tokens=self.num_tokens[r]) for r, b in enumerate(self.buffers)]
        for result in results:
            result[-1]()
        return results

    def experts(self, results):
        ys = []
        for recv_x, count, handle, _, _ in results:
            if self.use_fp8:
                data, scales = recv_x
                y = (data.float().unflatten(-1, (-1, 128)) * scales.unsqueeze(-1)).flatten(-2) * 2
            else:
                y = recv_x.float() * 2
            ys.append(y.to(torch.bfloat16))
        return ys

    def combine(self, results, ys):
        outs = [b.low_latency_combine(ys[r], self.topk[r], self.weights[r], results[r][2], return_recv_hook=True)
                for r, b in enumerate(self.buffers)]
        for out in outs:
            out[-1]()
        return [o[0] for o in outs]

    def __call__(self):
        results = self.dispatch()
        ys = self.experts(results)
        if self.num_calls == 1:
            return results, ys, None
        return results, ys, self.combine(results, ys)


def expected(inputs, use_fp8=True):
    refs = reference_for(inputs, SHAPE["num_experts"], SHAPE["max_tokens_per_rank"], use_fp8=use_fp8)
    return refs


def check_step(step, results, ys, outs, inputs):
    refs = expected(inputs, step.use_fp8)
    check_dispatch(results, refs, use_fp8=step.use_fp8)
    if outs is not None:
        want = reference_combined(inputs, [y.clone() for y in ys], refs, use_logfmt=False)
        T = SHAPE["max_tokens_per_rank"]
        for r, (out, w) in enumerate(zip(outs, want)):
            got = out.cpu()
            n = inputs[r].num_tokens
            assert torch.equal(got[:n].view(torch.int16), w.view(torch.int16)), f"rank {r}: combine differs"
            assert (got[n:T] == 0).all(), f"rank {r}: rows past num_tokens must be zero"


def fresh_inputs(R, seed):
    return make_inputs(R, SHAPE["max_tokens_per_rank"], SHAPE["hidden"], SHAPE["num_experts"], SHAPE["num_topk"],
                       seed=seed, routing="partial", device="cuda")


@pytest.fixture(scope="module")
def group4():
    return lowlat.Buffer.local_group(4, timeout_s=3.0, **SHAPE)


def capture(fn):
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            result = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, result


def test_replay_many_times_equals_eager_with_inputs_changed_in_place(group4):
    step = StaticStep(group4)
    step.load(fresh_inputs(4, 0))
    step()  # eager warm-up call
    graph, (results, ys, outs) = capture(step)
    for replay in range(6):
        inputs = fresh_inputs(4, 100 + replay)
        step.load(inputs)  # overwrite the captured inputs in place
        graph.replay()
        torch.cuda.synchronize()
        check_step(step, results, ys, outs, inputs)
        captured = [o.clone() for o in outs]
        eager_results, eager_ys, eager_outs = step()  # the same step, eagerly, on the same inputs
        torch.cuda.synchronize()
        for a, b in zip(captured, eager_outs):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_graph_with_odd_number_of_calls_interleaved_with_eager(group4):
    dispatch_only = StaticStep(group4, num_calls=1)
    graph, (results, ys, _) = capture(dispatch_only)
    full = StaticStep(group4)
    for i in range(5):  # graph (1 LL call) and eager steps (2 calls) interleaved: parity changes every time
        inputs = fresh_inputs(4, 200 + i)
        dispatch_only.load(inputs)
        graph.replay()
        torch.cuda.synchronize()
        check_dispatch(results, expected(inputs), use_fp8=True)
        full.load(inputs)
        check_step(full, *full(), inputs)


def test_two_graphs_share_one_buffer(group4):
    a, b = StaticStep(group4), StaticStep(group4, use_fp8=False)
    graph_a, out_a = capture(a)
    graph_b, out_b = capture(b)
    for i in range(4):
        ia, ib = fresh_inputs(4, 300 + i), fresh_inputs(4, 400 + i)
        a.load(ia)
        b.load(ib)
        (graph_a if i % 2 else graph_b).replay()
        (graph_b if i % 2 else graph_a).replay()
        torch.cuda.synchronize()
        check_step(a, *out_a, ia)
        check_step(b, *out_b, ib)


def test_non_hook_graph_with_rank_streams(group4):
    """Fused (non-hook) calls of all ranks captured as parallel branches of one graph."""
    step = StaticStep(group4)

    def fused():
        current = torch.cuda.current_stream()
        results, outs = [None] * 4, [None] * 4
        for r, b in enumerate(group4):
            s = b.get_comm_stream()
            s.wait_stream(current)
            with torch.cuda.stream(s):
                results[r] = b.low_latency_dispatch(step.x[r], step.topk[r], num_tokens=step.num_tokens[r])
        for b in group4:
            current.wait_stream(b.get_comm_stream())
        ys = step.experts(results)
        for r, b in enumerate(group4):
            s = b.get_comm_stream()
            s.wait_stream(current)
            with torch.cuda.stream(s):
                outs[r] = b.low_latency_combine(ys[r], step.topk[r], step.weights[r], results[r][2])[0]
        for b in group4:
            current.wait_stream(b.get_comm_stream())
        return results, ys, outs

    step.load(fresh_inputs(4, 1))
    fused()
    graph, outputs = capture(fused)
    for i in range(3):
        inputs = fresh_inputs(4, 500 + i)
        step.load(inputs)
        graph.replay()
        torch.cuda.synchronize()
        check_step(step, *outputs, inputs)


def test_lowlat_graphs_capture_helper(group4):
    """lowlat.graphs.capture: eager warm-up, then one captured step whose outputs follow new inputs."""
    import lowlat.graphs
    step = StaticStep(group4)
    step.load(fresh_inputs(4, 600))
    captured = lowlat.graphs.capture(step, warmup=1)
    for i in range(3):
        inputs = fresh_inputs(4, 601 + i)
        step.load(inputs)
        results, ys, outs = captured.replay()
        torch.cuda.synchronize()
        check_step(step, results, ys, outs, inputs)


def test_nothing_compiles_or_allocates_during_capture():
    buffers = lowlat.Buffer.local_group(2, **SHAPE)
    with pytest.raises(GraphCaptureError):
        capture(lambda: lowlat.Buffer.local_group(2, max_tokens_per_rank=8, hidden=128, num_experts=2, num_topk=1))
    spec = lowlat.ops.exchange.exchange_spec(lowlat.ops.context.KernelConfig(lowlat.layout.RegionLayout.of(
        lowlat.BufferShape(3, 3, 1, 128, 1))))
    from lowlat.jit import get_kernel
    with pytest.raises(GraphCaptureError, match="warmup"):
        capture(lambda: get_kernel(spec))
    with pytest.raises(GraphCaptureError):
        capture(buffers[0].warmup)


def test_exchange_allgather_eager_and_replayed():
    for R in (2, 4, 8):
        buffers = lowlat.Buffer.local_group(R, max_tokens_per_rank=4, hidden=128, num_experts=R, num_topk=1)
        words = [torch.zeros(4, dtype=torch.int64, device="cuda") for _ in range(R)]

        def all_ranks():
            current = torch.cuda.current_stream()
            outs = []
            for r, b in enumerate(buffers):
                s = b.get_comm_stream()
                s.wait_stream(current)
                with torch.cuda.stream(s):
                    outs.append(b.exchange_words(words[r]))
            for b in buffers:
                current.wait_stream(b.get_comm_stream())
            return outs

        def expect(round_):
            return torch.tensor([[round_ * 1000 + r * 10 + i for i in range(4)] for r in range(R)], dtype=torch.int64)

        for r in range(R):
            words[r].copy_(expect(0)[r])
        outs = all_ranks()
        torch.cuda.synchronize()
        for out in outs:
            assert torch.equal(out.cpu(), expect(0))
        graph, outs = capture(all_ranks)
        for round_ in range(1, 6):
            for r in range(R):
                words[r].copy_(expect(round_)[r])
            graph.replay()
            torch.cuda.synchronize()
            for out in outs:
                assert torch.equal(out.cpu(), expect(round_))
        for b in buffers:
            b.check_status()


def test_timeout_names_the_late_rank_and_recovers():
    buffers = lowlat.Buffer.local_group(2, timeout_s=0.3, **SHAPE)
    inputs = fresh_inputs(2, 9)
    import time
    start = time.perf_counter()
    buffers[0].low_latency_dispatch(inputs[0].x, inputs[0].topk_idx)  # rank 1 never sends
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    with pytest.raises(LowLatencyTimeoutError) as info:
        buffers[0].check_status()
    assert info.value.rank == 1
    mask = torch.zeros(2, dtype=torch.int32, device="cuda")
    buffers[0].low_latency_query_mask_buffer(mask)
    assert mask.tolist() == [0, 1]
    for b in buffers:  # the way back: a collective reset
        b.clean_low_latency_buffer()
    step = StaticStep(buffers)
    inputs = fresh_inputs(2, 10)
    step.load(inputs)
    check_step(step, *step(), inputs)
