"""One rank's side of a DeepEP-style low-latency session, written the way DeepEP's users write it.

``run_rank`` drives ``lowlat.compat.deep_ep.Buffer`` with DeepEP's conventions: positional
``(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts)``, ``async_finish=not return_recv_hook``
followed by ``hook() if return_recv_hook else event.current_stream_wait()``, the handle indexed as a
tuple (``handle[0]`` source tokens, ``handle[1]`` ``begin << 32 | count`` per source rank), scales made
contiguous before use, expert outputs written into ``get_next_low_latency_combine_buffer(handle)[:, :, :]``
and combined with ``zero_copy=True`` while ``x`` is the caller's own tensor, ``out=`` preallocated,
cumulative receive statistics.  Every rank's inputs follow from one seed, so each rank checks its
results against ``lowlat.reference`` bit for bit (LogFMT within its stated bound).

The caller sets up the harness state DeepEP's tests use (``torch.set_default_device("cuda")``,
``torch.set_default_dtype(torch.bfloat16)``) where there is a GPU.
"""

from __future__ import annotations

import torch

from lowlat import formats, reference

ROWS_TAG = 128  # DeepEP's tests: the last 128 columns of every token hold the token index


def rank_inputs(rank: int, num_tokens: int, hidden: int, num_experts: int, num_topk: int, *, seed: int):
    """DeepEP-style inputs of ``rank`` (CPU tensors, explicit dtypes): x rows are the constant
    ``rank - 128`` with the token index in the last 128 columns; LogFMT-friendly random data
    (|x| < 0.9); routing from the top-k of ``|randn| + 1`` scores with ten entries set to -1."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank)
    f32 = dict(dtype=torch.float32, device="cpu")
    x = torch.full((num_tokens, hidden), rank - 128.0, **f32)
    x[:, -ROWS_TAG:] = torch.arange(num_tokens, **f32).view(-1, 1)
    # |x| < 1 everywhere, so LogFMT chunks encode (values of 1 and above fall back to bf16).
    small = torch.randn(num_tokens, hidden, generator=g, **f32).clamp(-3, 3) * (0.05 + 0.25 * float(torch.rand(1, generator=g, **f32)))
    scores = torch.randn(num_tokens, num_experts, generator=g, **f32).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1).indices
    for _ in range(10):
        t = int(torch.randint(0, num_tokens, (1,), generator=g, dtype=torch.int64, device="cpu"))
        k = int(torch.randint(0, num_topk, (1,), generator=g, dtype=torch.int64, device="cpu"))
        topk_idx[t, k] = -1
    topk_weights = torch.randn(num_tokens, num_topk, generator=g, **f32).abs()
    return [x.to(torch.bfloat16), small.to(torch.bfloat16)], topk_idx, topk_weights


def _cast_back(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """FP8 rows times their per-128-channel scales, in bf16 (what an expert GEMM reads)."""
    groups = data.shape[-1] // 128
    return (data.float().unflatten(-1, (groups, 128)) * scales.float().unsqueeze(-1)).flatten(-2).to(torch.bfloat16)


def run_rank(buffer, rank: int, num_ranks: int, *, num_tokens: int, hidden: int, num_experts: int, num_topk: int,
             device: torch.device, seed: int = 1, wait=None) -> int:
    """Run the session on this rank; returns the number of checked received rows.  ``wait()`` (optional)
    is called where ranks must line up (a barrier between processes)."""
    L = num_experts // num_ranks
    everyone = [rank_inputs(r, num_tokens, hidden, num_experts, num_topk, seed=seed) for r in range(num_ranks)]
    xs_cpu, topk_cpu, weights_cpu = everyone[rank]
    topk_idx = topk_cpu.to(device)
    topk_weights = weights_cpu.to(device)
    all_topk = [e[1] for e in everyone]
    checked = 0
    stats_total = torch.zeros(L, dtype=torch.int32, device=device)
    expected_total = torch.zeros(L, dtype=torch.int32, device="cpu")
    for which, x_cpu in enumerate(xs_cpu):
        x = x_cpu.to(device)
        for return_recv_hook in (False, True):
            for use_fp8, round_scale, use_ue8m0 in ((False, False, False), (True, False, False), (True, True, False), (True, True, True)):
                stats = torch.zeros(L, dtype=torch.int, device=device)
                recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
                    x, topk_idx, num_tokens, num_experts, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
                    cumulative_local_expert_recv_stats=stats, async_finish=not return_recv_hook, return_recv_hook=return_recv_hook)
                hook() if return_recv_hook else event.current_stream_wait()
                stats_total += stats

                refs = reference.reference_dispatch([e[0][which] for e in everyone], all_topk, num_experts=num_experts,
                                                    max_tokens_per_rank=num_tokens, use_fp8=use_fp8, round_scale=round_scale)
                ref = refs[rank]
                expected_total += ref.recv_count
                if use_fp8:
                    recv_x = (recv_x[0], recv_x[1].contiguous())
                    scales = recv_x[1]
                    if use_ue8m0:
                        scales = formats.unpack_ue8m0(scales, hidden // 128)
                    simulated_gemm_x = _cast_back(recv_x[0], scales)
                else:
                    simulated_gemm_x = recv_x.clone()
                count = recv_count.cpu()
                assert torch.equal(count, ref.recv_count), f"rank {rank}: recv_count {count.tolist()}"
                assert torch.equal(stats.cpu(), ref.recv_count), "cumulative_local_expert_recv_stats"
                src_info, layout_range = handle[0].cpu(), handle[1].cpu()
                for i in range(L):
                    n = int(count[i])
                    begins, counts = (layout_range[i] >> 32).tolist(), (layout_range[i] & 0xFFFFFFFF).tolist()
                    assert sum(counts) == n and begins == [sum(counts[:j]) for j in range(num_ranks)], f"expert {i}: layout range"
                    assert torch.equal(src_info[i, :n], ref.src_token[i, :n]), f"expert {i}: handle[0]"
                    data = recv_x[0] if use_fp8 else recv_x
                    got = data[i, :n].cpu().contiguous().view(torch.uint8)
                    assert torch.equal(got, ref.recv_x[i, :n].contiguous().view(torch.uint8)), f"expert {i}: received rows"
                    if use_fp8:
                        assert torch.equal(scales[i, :n].cpu().float(), ref.recv_scales[i, :n]), f"expert {i}: scales"
                    if which == 0 and not use_fp8:  # DeepEP's own check: the tag columns carry the source token
                        assert torch.equal(got.view(torch.bfloat16)[:, -1].float(), src_info[i, :n].float())
                    checked += n

                # Combine: the expert outputs go through the caller's tensor and the zero-copy buffer.
                ys = [_cast_back(r.recv_x, r.recv_scales) if use_fp8 else r.recv_x for r in refs]
                want = reference.reference_combine(ys, refs, all_topk, [e[2] for e in everyone])[rank]
                held = []
                for zero_copy in (False, True):
                    if zero_copy:
                        buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = simulated_gemm_x
                    out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=device)
                    caller_x = simulated_gemm_x if not zero_copy else torch.zeros_like(simulated_gemm_x)
                    combined_x, event, hook = buffer.low_latency_combine(
                        caller_x, topk_idx, topk_weights, handle, zero_copy=zero_copy, async_finish=not return_recv_hook,
                        return_recv_hook=return_recv_hook, out=out)
                    hook() if return_recv_hook else event.current_stream_wait()
                    assert combined_x.data_ptr() == out.data_ptr(), "out= is written in place"
                    held.append(combined_x)
                for combined_x in held:
                    got = combined_x.cpu()
                    assert not got.isnan().any()
                    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"rank {rank}: combine differs"

                if which == 1 and not use_fp8:
                    # LogFMT on data whose chunks encode, next to a bf16 combine of the same handle, both held.
                    castable = formats.logfmt_encode(x_cpu).castable  # this rank's tokens: what comes back to it
                    assert castable.any(), "the LogFMT data must have encodable chunks"
                    plain, _, hook_a = buffer.low_latency_combine(simulated_gemm_x, topk_idx, topk_weights, handle,
                                                                  return_recv_hook=return_recv_hook, async_finish=not return_recv_hook)
                    hook_a() if return_recv_hook else None
                    logfmt, event, hook_b = buffer.low_latency_combine(simulated_gemm_x, topk_idx, topk_weights, handle, use_logfmt=True,
                                                                       return_recv_hook=return_recv_hook,
                                                                       async_finish=not return_recv_hook)
                    hook_b() if return_recv_hook else event.current_stream_wait()
                    torch.cuda.synchronize() if device.type == "cuda" else None
                    assert plain.data_ptr() != logfmt.data_ptr(), "two combines of one handle must not alias"
                    assert torch.equal(plain.cpu().view(torch.int16), want.view(torch.int16))
                    want_logfmt = reference.reference_combine(ys, refs, all_topk, [e[2] for e in everyone], use_logfmt=True)[rank]
                    bound = _logfmt_bound(ys, refs, everyone, rank) + want_logfmt.float().abs() * 2**-7
                    error = (logfmt.cpu().float() - want_logfmt.float()).abs()
                    assert (error <= bound).all(), f"LogFMT error {float((error - bound).max())} over the bound"
                    assert not torch.equal(logfmt.cpu(), plain.cpu()), "LogFMT should change some values"
                if wait is not None:
                    wait()
    assert torch.equal(stats_total.cpu(), expected_total), "cumulative statistics over the session"
    return checked


def _logfmt_bound(ys, refs, everyone, rank):
    """Twice LogFMT's relative error bound, weighted by sum |w * y| per output element (see
    tests/helpers.logfmt_tolerance for why)."""
    weights = everyone[rank][2]
    magnitude = torch.zeros(weights.shape[0], ys[0].shape[-1], dtype=torch.float32, device="cpu")
    for y, ref in zip(ys, refs):
        for l in range(ref.recv_count.numel()):
            for j in range(int(ref.recv_count[l])):
                if int(ref.src_rank[l, j]) == rank:
                    t, k = int(ref.src_token[l, j]), int(ref.src_topk[l, j])
                    magnitude[t] += float(weights[t, k]) * y[l, j].float().abs()
    return 2 * formats.logfmt_max_relative_error() * magnitude
