"""Shared test machinery: inputs every rank can predict from one seed, runners for all ranks of a
local group (hook mode on one stream, or concurrent per-rank streams), and checks against
lowlat.reference."""

from __future__ import annotations

import dataclasses
import threading

import torch

from lowlat import formats, reference

ROUTINGS = ("random", "one_expert", "all_minus_one", "zero_tokens_rank", "partial")


@dataclasses.dataclass
class RankInputs:
    x: torch.Tensor  # bf16 [T, H] (rows past num_tokens are padding)
    topk_idx: torch.Tensor  # int64 [T, K]
    topk_weights: torch.Tensor  # float32 [T, K]
    num_tokens: int  # valid rows


def make_inputs(num_ranks, max_tokens, hidden, num_experts, num_topk, *, seed=0, routing="random", device="cpu",
                topk_dtype=torch.int64) -> list[RankInputs]:
    """Every rank's inputs from one seed.  Values are bf16 normals with a few large and tiny groups,
    so FP8 scales and LogFMT chunks vary; routings cover the adversarial cases."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cpu = dict(dtype=torch.float32, device="cpu")
    ranks = []
    for rank in range(num_ranks):
        n = max_tokens
        if routing == "zero_tokens_rank" and rank == num_ranks // 2:
            n = 0
        if routing == "partial":
            n = int(torch.randint(0, max_tokens + 1, (1,), generator=g, dtype=torch.int64, device="cpu"))
        x = torch.randn(max_tokens, hidden, generator=g, **cpu)
        x[::2, :128] *= 20.0  # even tokens: a group of large values (their LogFMT chunk falls back to bf16)
        x[::3, 128:256] *= 1e-3  # tiny values: FP8 scales and the LogFMT grid vary per group
        x = (x * 0.1).to(torch.bfloat16)
        scores = torch.rand(max_tokens, num_experts, generator=g, **cpu)
        topk = scores.topk(num_topk, dim=1).indices
        if routing == "one_expert":
            topk[:, 0] = num_experts - 1
            topk[:, 1:] = -1
        elif routing == "all_minus_one":
            topk[:] = -1
        else:
            drop = torch.rand(max_tokens, num_topk, generator=g, **cpu) < 0.1
            topk = torch.where(drop, -1, topk)
        weights = torch.rand(max_tokens, num_topk, generator=g, **cpu)
        ranks.append(RankInputs(x.to(device), topk.to(topk_dtype).to(device), weights.to(device), n))
    return ranks


def run_all(buffers, call, *, hook: bool, concurrent: bool = False):
    """Run ``call(rank, buffer, return_recv_hook)`` for every rank and finish the receive halves.

    hook=True: every send, then every receive hook, on the current stream (ranks never wait).
    concurrent: each rank on its own stream (GPU) or host thread (CPU), non-hook mode.
    """
    if hook:
        results = [call(r, b, True) for r, b in enumerate(buffers)]
        for result in results:
            result[-1]()
        return results
    if not concurrent:
        raise ValueError("non-hook runs of several ranks must be concurrent")
    device = buffers[0].device
    if device.type == "cuda":
        current = torch.cuda.current_stream()
        results = []
        for r, b in enumerate(buffers):
            stream = b.get_comm_stream()
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                results.append(call(r, b, False))
        for b in buffers:
            current.wait_stream(b.get_comm_stream())
        return results
    return in_threads(lambda r: call(r, buffers[r], False), len(buffers))


def in_threads(work, count: int) -> list:
    """``[work(0), ..., work(count - 1)]``, each on its own host thread (one per virtual rank, as one
    process per rank would run); the first exception is raised once every thread has ended."""
    results, errors = [None] * count, []

    def run(r):
        try:
            results[r] = work(r)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def dispatch_all(buffers, inputs, *, hook, concurrent=False, device_num_tokens=False, **options):
    def call(r, b, return_recv_hook):
        inp = inputs[r]
        if device_num_tokens:
            num_tokens = torch.tensor([inp.num_tokens], dtype=torch.int32, device=b.device)
            return b.low_latency_dispatch(inp.x, inp.topk_idx, num_tokens=num_tokens, return_recv_hook=return_recv_hook, **options)
        return b.low_latency_dispatch(inp.x[: inp.num_tokens], inp.topk_idx[: inp.num_tokens], return_recv_hook=return_recv_hook, **options)

    return run_all(buffers, call, hook=hook, concurrent=concurrent)


def reference_for(inputs, num_experts, max_tokens, *, use_fp8, round_scale=False):
    xs = [i.x[: i.num_tokens].cpu() for i in inputs]
    topks = [i.topk_idx[: i.num_tokens].cpu().to(torch.int64) for i in inputs]
    return reference.reference_dispatch(xs, topks, num_experts=num_experts, max_tokens_per_rank=max_tokens,
                                        use_fp8=use_fp8, round_scale=round_scale)


def check_dispatch(results, refs, *, use_fp8, use_ue8m0=False):
    """Bit-exact comparison of every rank's received rows, counts and provenance with the reference."""
    for rank, (result, ref) in enumerate(zip(results, refs)):
        recv_x, recv_count, handle = result[0], result[1], result[2]
        count = recv_count.cpu()
        assert torch.equal(count, ref.recv_count), f"rank {rank}: recv_count {count.tolist()} != {ref.recv_count.tolist()}"
        src_info = handle.layout.recv_src_info.cpu()
        src_topk = handle.layout.recv_src_topk.cpu()
        ranges = handle.layout.recv_layout_range.cpu()
        if use_fp8:
            data, scales = (t.cpu() for t in recv_x)
            if use_ue8m0:
                scales = formats.unpack_ue8m0(scales.contiguous(), ref.recv_scales.shape[-1])
        else:
            data, scales = recv_x.cpu(), None
        for l in range(count.numel()):
            c = int(count[l])
            assert torch.equal(src_info[l, :c], ref.src_token[l, :c]), f"rank {rank} expert {l}: source tokens"
            assert torch.equal(src_topk[l, :c], ref.src_topk[l, :c]), f"rank {rank} expert {l}: source top-k slots"
            begins = (ranges[l] >> 32).tolist()
            counts = (ranges[l] & 0xFFFFFFFF).tolist()
            assert sum(counts) == c and begins == [sum(counts[:s]) for s in range(len(counts))]
            ref_src = ref.src_rank[l, :c].tolist()
            assert ref_src == [s for s, n in enumerate(counts) for _ in range(n)], f"rank {rank} expert {l}: layout range"
            got = data[l, :c].contiguous().view(torch.uint8)
            want = ref.recv_x[l, :c].contiguous().view(torch.uint8)
            assert torch.equal(got, want), f"rank {rank} expert {l}: {int((got != want).any(-1).sum())} rows differ"
            if use_fp8:
                want_scales = ref.recv_scales[l, :c]
                if use_ue8m0:  # UE8M0 keeps the exponent only: the reference scales are exact powers of two
                    assert torch.equal(scales[l, :c], want_scales), f"rank {rank} expert {l}: ue8m0 scales"
                else:
                    assert torch.equal(scales[l, :c].view(torch.int32), want_scales.view(torch.int32)), f"rank {rank} expert {l}: scales"


def expert_outputs(results, refs, *, use_fp8, poison=True):
    """A deterministic 'expert' per received row: the (dequantised) row times 0.5 * (1 + l / L) for
    local expert l, in bf16, laid out like the dispatch output (small rows stay below 1, so their
    LogFMT chunks are encoded); rows past recv_count are NaN (combine must not read them)."""
    ys = []
    for result, ref in zip(results, refs):
        recv_x, count = result[0], result[1]
        if use_fp8:
            data, scales = recv_x
            groups = data.shape[-1] // 128
            if scales.dtype == torch.int32:  # packed UE8M0 exponents
                scales = formats.unpack_ue8m0(scales.contiguous(), groups)
            full = data.float().unflatten(-1, (groups, 128)) * scales.float().unsqueeze(-1)
            y = full.flatten(-2)
        else:
            y = recv_x.float()
        num_local = y.shape[0]
        y = y * (0.5 * (1 + torch.arange(num_local, device=y.device, dtype=torch.float32) / num_local)).view(-1, 1, 1)
        y = y.to(torch.bfloat16)
        if poison:
            rows = torch.arange(y.shape[1], device=y.device).view(1, -1)
            y = torch.where((rows < count.view(-1, 1).to(rows.device)).unsqueeze(-1), y, torch.full_like(y, float("nan")))
        ys.append(y.contiguous())
    return ys


def combine_all(buffers, inputs, ys, results, *, hook, concurrent=False, **options):
    def call(r, b, return_recv_hook):
        inp, handle = inputs[r], results[r][2]
        n = handle.num_tokens
        return b.low_latency_combine(ys[r], inp.topk_idx[:n], inp.topk_weights[:n], handle, return_recv_hook=return_recv_hook, **options)

    return run_all(buffers, call, hook=hook, concurrent=concurrent)


def reference_combined(inputs, ys, refs, *, use_logfmt):
    topks = [i.topk_idx[: i.num_tokens].cpu().to(torch.int64) for i in inputs]
    weights = [i.topk_weights[: i.num_tokens].cpu() for i in inputs]
    clean = [torch.nan_to_num(y.cpu(), nan=0.0) for y in ys]
    return reference.reference_combine(clean, refs, topks, weights, use_logfmt=use_logfmt)


def logfmt_tolerance(inputs, ys, refs, rank):
    """Per-element bound on |kernel - reference| for a LogFMT combine: both decode every element
    within ``formats.logfmt_max_relative_error()`` of its true value (the kernel with approximate
    lg2/ex2, the reference with exact log2/exp2), so they differ by at most twice that, weighted;
    plus one bf16 rounding of the output on each side."""
    bound = formats.logfmt_max_relative_error()
    inp = inputs[rank]
    n = inp.num_tokens
    magnitude = torch.zeros(n, ys[0].shape[-1], dtype=torch.float32, device="cpu")
    ref = refs[rank]
    for owner, (y, owner_ref) in enumerate(zip(ys, refs)):
        y = torch.nan_to_num(y.cpu().float(), nan=0.0)
        for l in range(owner_ref.recv_count.numel()):
            for j in range(int(owner_ref.recv_count[l])):
                if int(owner_ref.src_rank[l, j]) != rank:
                    continue
                t, k = int(owner_ref.src_token[l, j]), int(owner_ref.src_topk[l, j])
                magnitude[t] += abs(float(inp.topk_weights[t, k])) * y[l, j].abs()
    del ref
    return 2 * bound * magnitude


def check_combine(outputs, expected, *, inputs=None, ys=None, refs=None, use_logfmt=False):
    for rank, (out, want) in enumerate(zip(outputs, expected)):
        got = out[0].cpu()
        n = want.shape[0]  # with a device num_tokens the output has more rows: those must be zero
        assert got.shape[1:] == want.shape[1:] and got.shape[0] >= n, f"rank {rank}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
        assert (got[n:] == 0).all(), f"rank {rank}: rows past num_tokens must be zero"
        got = got[:n]
        assert not got.isnan().any(), f"rank {rank}: NaN in the combined output"
        if not use_logfmt:
            # Same fp32 operations in the same order (products rounded, then added, in top-k order):
            # the kernels match the reference bit for bit.
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (
                f"rank {rank}: {int((got != want).sum())} elements differ, max {float((got.float() - want.float()).abs().max())}")
        else:
            tolerance = logfmt_tolerance(inputs, ys, refs, rank) + want.float().abs() * 2**-7 + 1e-30
            error = (got.float() - want.float()).abs()
            assert (error <= tolerance).all(), f"rank {rank}: LogFMT error {float((error - tolerance).max())} over the bound"
