"""Shared machinery of the normal-mode tests (CPU and GPU): inputs every rank can predict from one
seed, a runner that drives the virtual ranks of a local group concurrently, and bit-exact checks
against lowlat.reference's normal-mode ground truth."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import torch

from lowlat import formats, reference

@dataclasses.dataclass
class NormalInputs:
    x: torch.Tensor  # bf16 [n, H]
    x_fp8: torch.Tensor  # float8_e4m3fn [n, H]
    x_scales: torch.Tensor  # float32 [n, H/128]
    topk_idx: torch.Tensor  # int64 (or int32) [n, K]
    topk_weights: torch.Tensor  # float32 [n, K]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]


def make_inputs(num_ranks, max_tokens, hidden, num_experts, num_topk, *, seed=0, routing="random", device="cpu",
                topk_dtype=torch.int64) -> list[NormalInputs]:
    """Every rank's inputs from one seed.  Routings: ``random`` (10% of slots -1), ``nowhere`` (a third
    of the tokens routed to no expert), ``one_rank`` (every expert of every token on the last rank),
    ``zero_tokens_rank`` (one rank dispatches nothing), ``partial`` (random token counts)."""
    g = torch.Generator().manual_seed(seed)
    num_local = num_experts // num_ranks
    inputs = []
    for rank in range(num_ranks):
        n = max_tokens
        if routing == "partial":
            n = int(torch.randint(0, max_tokens + 1, (1,), generator=g))
        if routing == "zero_tokens_rank" and rank == num_ranks // 2:
            n = 0
        x = (torch.randn(n, hidden, generator=g) * 0.5).to(torch.bfloat16)
        x[::3, :128] *= 30  # varied FP8 scales
        if routing == "one_rank":
            k = min(num_topk, num_local)
            topk = torch.full((n, num_topk), -1, dtype=torch.int64)
            topk[:, :k] = torch.rand(n, num_local, generator=g).argsort(dim=1)[:, :k] + (num_ranks - 1) * num_local
        else:
            topk = torch.rand(n, num_experts, generator=g).argsort(dim=1)[:, :num_topk]
            topk = torch.where(torch.rand(n, num_topk, generator=g) < 0.1, -1, topk)
            if routing == "nowhere":
                topk[::3] = -1
        weights = torch.rand(n, num_topk, generator=g)
        q = formats.quantize_fp8(x)
        inputs.append(NormalInputs(x.to(device), q.data.to(device), q.scales.to(device), topk.to(topk_dtype).to(device), weights.to(device)))
    return inputs


def run_ranks(buffers, call, *, context=None):
    """Run ``call(rank, buffer)`` for every rank concurrently: one host thread per rank (a dispatch
    without num_worst_tokens waits on the host for its counts), each rank on its own stream on a GPU,
    inside ``context()`` when given (a thread-local context such as ``torch.device('cuda')``).
    Returns the results in rank order; re-raises the first error."""
    results, errors = [None] * len(buffers), []
    cuda = buffers[0].device.type == "cuda"
    if cuda:
        current = torch.cuda.current_stream()
        for b in buffers:
            b.get_comm_stream().wait_stream(current)

    def work(rank, buffer):
        try:
            with context() if context is not None else contextlib.nullcontext():
                with torch.cuda.stream(buffer.get_comm_stream()) if cuda else contextlib.nullcontext():
                    results[rank] = call(rank, buffer)
        except BaseException as exc:  # surfaced below, with its rank
            errors.append((rank, exc))

    threads = [threading.Thread(target=work, args=(r, b)) for r, b in enumerate(buffers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if cuda:
        for b in buffers:
            current.wait_stream(b.get_comm_stream())
        torch.cuda.synchronize()
    if errors:
        rank, exc = errors[0]
        raise AssertionError(f"rank {rank} failed: {type(exc).__name__}: {exc}") from exc
    return results


def reference_dispatch(inputs, num_experts, *, fp8, with_topk=True, expert_alignment=1):
    xs = [i.x_fp8.cpu() if fp8 else i.x.cpu() for i in inputs]
    return reference.reference_normal_dispatch(
        xs, [i.topk_idx.cpu().long() for i in inputs], num_experts=num_experts,
        x_scales=[i.x_scales.cpu() for i in inputs] if fp8 else None,
        topk_weights=[i.topk_weights.cpu() for i in inputs] if with_topk else None, expert_alignment=expert_alignment)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().contiguous().view(torch.uint8)


def assert_same(name, rank, got, want):
    assert got is not None and want is not None, f"rank {rank}: {name}: got {got is not None}, want {want is not None}"
    assert tuple(got.shape) == tuple(want.shape), f"rank {rank}: {name} has shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    if not torch.equal(_bits(got), _bits(want)):
        diff = (_bits(got) != _bits(want)).view(got.shape[0], -1).any(dim=1).nonzero().flatten()[:8].tolist() if got.dim() else []
        raise AssertionError(f"rank {rank}: {name} differs from the reference (first differing rows: {diff})")


def check_dispatch(results, refs, *, fp8, with_topk=True, num_worst_tokens=0):
    """Each rank's dispatch result vs the reference: bit for bit on the received rows; padding rows
    of a num_worst_tokens dispatch carry top-k -1 and weight 0."""
    for rank, (result, ref) in enumerate(zip(results, refs)):
        recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = result
        data, scales = recv_x if fp8 else (recv_x, None)
        num_recv = ref.recv_x.shape[0]
        rows = num_worst_tokens or num_recv
        assert data.shape[0] == rows, f"rank {rank}: recv_x has {data.shape[0]} rows, expected {rows}"
        assert_same("recv_x", rank, data[:num_recv], ref.recv_x)
        if fp8:
            assert_same("recv_x scales", rank, scales[:num_recv], ref.recv_scales)
        assert_same("rank_prefix_matrix", rank, handle.rank_prefix_matrix, ref.rank_prefix_matrix)
        assert_same("recv_src_idx", rank, handle.recv_src_idx[:num_recv], ref.recv_src_idx)
        assert int(handle.recv_info[0]) == num_recv, f"rank {rank}: recv_info[0]={int(handle.recv_info[0])}, expected {num_recv}"
        if num_worst_tokens:
            assert per_expert == [], f"rank {rank}: num_worst_tokens dispatch must return an empty list, got {per_expert}"
            assert handle.num_recv_tokens is None
            assert bool((handle.recv_src_idx[num_recv:] == -1).all()), f"rank {rank}: padding rows need recv_src_idx -1"
        else:
            assert per_expert == ref.num_recv_tokens_per_expert, f"rank {rank}: per-expert {per_expert} vs {ref.num_recv_tokens_per_expert}"
            assert handle.num_recv_tokens == num_recv
        assert handle.recv_info[1:].cpu().tolist() == ref.num_recv_tokens_per_expert
        if with_topk:
            assert_same("recv_topk_idx", rank, recv_topk_idx[:num_recv].long(), ref.recv_topk_idx)
            assert_same("recv_topk_weights", rank, recv_topk_weights[:num_recv], ref.recv_topk_weights)
            if num_worst_tokens:
                assert bool((recv_topk_idx[num_recv:] == -1).all()), f"rank {rank}: padding rows need top-k index -1"
                assert bool((recv_topk_weights[num_recv:] == 0).all()), f"rank {rank}: padding rows need weight 0"
        else:
            assert recv_topk_idx is None and recv_topk_weights is None


def expert_output(rank, recv_x, num_recv, *, fp8):
    """Rank ``rank``'s bf16 [rows, H] combine input: its received tokens (dequantised for FP8) times
    1 + rank / 4, with NaN in the padding rows past ``num_recv`` (which combine must ignore)."""
    data = formats.dequantize_fp8(recv_x[0].cpu(), recv_x[1].cpu()) if fp8 else recv_x.cpu().float()
    y = (data * (1.0 + 0.25 * rank)).to(torch.bfloat16)
    y[num_recv:] = float("nan")
    return y.to(recv_x[0].device if fp8 else recv_x.device)


def expert_outputs(results, refs, *, fp8):
    """Every rank's combine input (see expert_output)."""
    return [expert_output(rank, result[0], ref.recv_x.shape[0], fp8=fp8) for rank, (result, ref) in enumerate(zip(results, refs))]


def check_combine(outputs, expected):
    for rank, ((out, out_weights, _), (want, want_weights)) in enumerate(zip(outputs, expected)):
        assert_same("combined_x", rank, out, want)
        if want_weights is None:
            assert out_weights is None, f"rank {rank}: combine without topk_weights must return None weights"
        else:
            assert_same("combined_topk_weights", rank, out_weights, want_weights)


def make_biases(inputs, hidden, count, *, seed=0):
    """``count`` (0, 1 or 2) bf16 [n, hidden] bias tensors per rank, on the inputs' device."""
    g = torch.Generator().manual_seed(seed + 1000)
    return [tuple((torch.randn(i.num_tokens, hidden, generator=g) * 0.1).to(torch.bfloat16).to(i.x.device) for _ in range(count))
            for i in inputs]


def round_trip(buffers, inputs, *, fp8=False, with_topk=True, use_layout=True, expert_alignment=1, num_worst_tokens=0,
               num_biases=0, cached=False, async_finish=False, previous_event=False, seed=0, context=None):
    """One dispatch (plus, with ``cached``, a cached re-dispatch) and one combine over every rank,
    each checked bit for bit against lowlat.reference.  Returns ``(dispatch results, combine outputs)``."""
    s = buffers[0].shape

    def finish(out):
        if async_finish:
            out[-1].current_stream_wait()
        return out

    def dispatch(r, b):
        i = inputs[r]
        kwargs = {}
        if use_layout:
            per_rank, per_expert, in_rank, _ = b.get_dispatch_layout(i.topk_idx, s.num_experts)
            kwargs.update(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        if with_topk:
            kwargs.update(topk_idx=i.topk_idx, topk_weights=i.topk_weights)
        x = (i.x_fp8, i.x_scales) if fp8 else i.x
        return finish(b.dispatch(x, expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, async_finish=async_finish,
                                 previous_event=b.capture() if previous_event else None, **kwargs))

    results = run_ranks(buffers, dispatch, context=context)
    for b in buffers:
        b.check_status()
    refs = reference_dispatch(inputs, s.num_experts, fp8=fp8, with_topk=with_topk, expert_alignment=expert_alignment)
    check_dispatch(results, refs, fp8=fp8, with_topk=with_topk, num_worst_tokens=num_worst_tokens)

    if cached:  # the handle's layout again: same rows, no routing arguments, no host synchronisation
        def again(r, b):
            x = (inputs[r].x_fp8, inputs[r].x_scales) if fp8 else inputs[r].x
            return finish(b.dispatch(x, handle=results[r][4], async_finish=async_finish))

        for rank, (first, second, ref) in enumerate(zip(results, run_ranks(buffers, again, context=context), refs)):
            assert second[1] is None and second[2] is None and second[3] is None, f"rank {rank}: a cached dispatch returns no top-k"
            assert second[4] is first[4], f"rank {rank}: a cached dispatch returns the handle it was given"
            rows = ref.recv_x.shape[0]
            for name, a, b in (("recv_x", first[0], second[0]),) if not fp8 else (("recv_x", first[0][0], second[0][0]),
                                                                                   ("scales", first[0][1], second[0][1])):
                assert a.shape == b.shape, f"rank {rank}: cached {name} has shape {tuple(b.shape)}, first {tuple(a.shape)}"
                assert_same(f"cached {name}", rank, b[:rows], a[:rows])

    ys = expert_outputs(results, refs, fp8=fp8)
    biases = make_biases(inputs, s.hidden, num_biases, seed=seed)

    def combine(r, b):
        bias = {0: None, 1: biases[r][0] if num_biases else None, 2: biases[r]}[num_biases]  # every form combine accepts
        return finish(b.combine(ys[r], results[r][4], topk_weights=results[r][2] if with_topk else None, bias=bias,
                                async_finish=async_finish, previous_event=b.capture() if previous_event else None))

    outs = run_ranks(buffers, combine, context=context)
    for b in buffers:
        b.check_status()
    counts = [ref.recv_x.shape[0] for ref in refs]
    expected = reference.reference_normal_combine(
        [y[:c].cpu() for y, c in zip(ys, counts)], refs, [i.num_tokens for i in inputs],
        topk_weights=[res[2][:c].cpu() for res, c in zip(results, counts)] if with_topk else None,
        biases=[tuple(b.cpu() for b in bs) for bs in biases])
    check_combine(outs, expected)
    return results, outs
