"""Hand-built cases for lowlat.reference, the pure-torch ground truth of dispatch and combine."""

from __future__ import annotations

import pytest
import torch

from lowlat.errors import ArgumentError, ArgumentTypeError
from lowlat.formats import dequantize_fp8, logfmt_max_relative_error, logfmt_roundtrip, quantize_fp8
from lowlat.reference import reference_combine, reference_dispatch, route_counts

HIDDEN = 128


def idx(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)


def labelled_tokens(rank: int, num_tokens: int, hidden: int = HIDDEN) -> torch.Tensor:
    """Token t of rank r is the constant row 10 * r + t + 1 (exact in bf16 and in fp8)."""
    labels = 10.0 * rank + torch.arange(num_tokens, dtype=torch.float32) + 1
    return labels[:, None].expand(num_tokens, hidden).to(torch.bfloat16)


# R = 2, E = 4 (2 local experts per rank), T = 3.  Rank 1 has only 2 tokens.
TOPK = [idx([[0, 3], [-1, 1], [2, 0]]), idx([[1, 0], [3, -1]])]
XS = [labelled_tokens(0, 3), labelled_tokens(1, 2)]
# Per global expert: (src_rank, src_token, src_topk) in canonical order.
EXPECTED = {0: [(0, 0, 0), (0, 2, 1), (1, 0, 1)], 1: [(0, 1, 1), (1, 0, 0)],
            2: [(0, 2, 0)], 3: [(0, 0, 1), (1, 1, 0)]}


def fp8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    q = quantize_fp8(x)
    return dequantize_fp8(q.data, q.scales)


def received(dispatch, local: int) -> list[tuple[int, int, int]]:
    count = int(dispatch.recv_count[local])
    fields = (dispatch.src_rank[local, :count], dispatch.src_token[local, :count], dispatch.src_topk[local, :count])
    return list(zip(*(f.tolist() for f in fields)))


@pytest.mark.parametrize("use_fp8", [False, True])
def test_small_dispatch(use_fp8):
    out = reference_dispatch(XS, TOPK, num_experts=4, max_tokens_per_rank=3, use_fp8=use_fp8)
    assert [d.recv_count.tolist() for d in out] == [[3, 2], [1, 2]]
    for rank, dispatch in enumerate(out):
        assert dispatch.recv_x.shape == (2, 6, HIDDEN) and dispatch.recv_count.dtype == torch.int32
        assert (dispatch.recv_scales is not None) == use_fp8
        for local in range(2):
            expected = EXPECTED[2 * rank + local]
            assert received(dispatch, local) == expected
            count = len(expected)
            assert (dispatch.src_rank[local, count:] == -1).all() and (dispatch.src_topk[local, count:] == -1).all()
            assert (dispatch.recv_x[local, count:].float() == 0).all()
            labels = torch.tensor([[10.0 * s + t + 1] * HIDDEN for s, t, _ in expected])
            if not use_fp8:
                assert torch.equal(dispatch.recv_x[local, :count].float(), labels)
            else:  # every constant row quantises to 448 with scale_inv = label / 448
                assert (dispatch.recv_x[local, :count].float() == 448.0).all()
                recv = dispatch.recv_x[local, :count], dispatch.recv_scales[local, :count]
                torch.testing.assert_close(dequantize_fp8(*recv), labels, rtol=1e-6, atol=0)
                for row, (s, t, _) in enumerate(expected):  # bit-exact against quantize_fp8
                    q = quantize_fp8(XS[s][t])
                    assert torch.equal(dispatch.recv_x[local, row].view(torch.uint8), q.data.view(torch.uint8))
                    assert torch.equal(dispatch.recv_scales[local, row], q.scales)
                assert (dispatch.recv_scales[local, count:] == 0).all()


def test_fp8_round_scale_matches_quantize():
    xs = [torch.randn(3, 256).to(torch.bfloat16), torch.randn(2, 256).to(torch.bfloat16)]
    out = reference_dispatch(xs, TOPK, num_experts=4, max_tokens_per_rank=3, round_scale=True)
    q = quantize_fp8(xs[0][2], round_scale=True)  # rank 0 token 2 -> expert 2 = rank 1 local 0, row 0
    assert torch.equal(out[1].recv_x[0, 0].view(torch.uint8), q.data.view(torch.uint8))
    assert torch.equal(out[1].recv_scales[0, 0], q.scales)


def test_rank_without_tokens_and_int32_topk():
    xs = [labelled_tokens(0, 2), torch.empty(0, HIDDEN, dtype=torch.bfloat16)]
    topk = [torch.tensor([[1, -1], [1, 0]], dtype=torch.int32), torch.empty(0, 2, dtype=torch.int32)]
    out = reference_dispatch(xs, topk, num_experts=2, max_tokens_per_rank=2, use_fp8=False)
    assert out[0].recv_count.tolist() == [1] and out[1].recv_count.tolist() == [2]
    assert received(out[1], 0) == [(0, 0, 0), (0, 1, 0)]
    assert route_counts(topk, 2).tolist() == [[1, 2], [0, 0]]


def test_every_token_to_one_expert():
    xs = [labelled_tokens(r, 3) for r in range(2)]
    topk = [idx([[-1, 3]] * 3), idx([[3, -1]] * 3)]
    out = reference_dispatch(xs, topk, num_experts=4, max_tokens_per_rank=3, use_fp8=False)
    assert out[0].recv_count.tolist() == [0, 0] and out[1].recv_count.tolist() == [0, 6]
    assert received(out[1], 1) == [(0, 0, 1), (0, 1, 1), (0, 2, 1), (1, 0, 0), (1, 1, 0), (1, 2, 0)]
    assert out[1].recv_x[1, :, 0].float().tolist() == [1, 2, 3, 11, 12, 13]


def test_bad_routing():
    with pytest.raises(ArgumentError, match="rank 1 token 0 names expert 2"):
        reference_dispatch(XS, [TOPK[0], idx([[2, 2], [3, -1]])], num_experts=4, max_tokens_per_rank=3)
    with pytest.raises(ArgumentError, match=r"topk_idxs\[0\]\[2, 1\] = 4"):
        reference_dispatch(XS, [idx([[0, 3], [-1, 1], [2, 4]]), TOPK[1]], num_experts=4, max_tokens_per_rank=3)
    with pytest.raises(ArgumentError, match="= -2"):
        route_counts([idx([[-2]])], 4)
    with pytest.raises(ArgumentError, match="num_experts=5"):
        reference_dispatch(XS, TOPK, num_experts=5, max_tokens_per_rank=3)
    with pytest.raises(ArgumentError, match="max_tokens_per_rank=2"):
        reference_dispatch(XS, TOPK, num_experts=4, max_tokens_per_rank=2)
    with pytest.raises(ArgumentError, match="multiple of 128"):
        reference_dispatch([x[:, :64] for x in XS], TOPK, num_experts=4, max_tokens_per_rank=3)
    with pytest.raises(ArgumentTypeError, match=r"xs\[0\]"):
        reference_dispatch([x.float() for x in XS], TOPK, num_experts=4, max_tokens_per_rank=3)
    with pytest.raises(ArgumentTypeError, match=r"topk_idxs\[1\]"):
        reference_dispatch(XS, [TOPK[0], TOPK[1].float()], num_experts=4, max_tokens_per_rank=3)
    with pytest.raises(ArgumentError, match=r"xs\[1\]"):
        reference_dispatch(XS, [TOPK[0], TOPK[0]], num_experts=4, max_tokens_per_rank=3)


# ------------------------------------------------------------------------------------------ combine

def expert_rows(dispatches, value_of) -> list[torch.Tensor]:
    """Expert outputs whose row for (s, t, k) is the constant value_of(s, t, k)."""
    outputs = []
    for d in dispatches:
        y = torch.zeros(d.src_rank.shape + (HIDDEN,))
        for local in range(d.src_rank.shape[0]):
            for row, key in enumerate(received(d, local)):
                y[local, row] = value_of(*key)
        outputs.append(y.to(torch.bfloat16))
    return outputs


def test_combine_identity():
    xs = [torch.randn(3, 512).to(torch.bfloat16), torch.randn(2, 512).to(torch.bfloat16)]
    weights = [torch.rand(3, 2), torch.rand(2, 2)]
    for use_fp8 in (False, True):
        out = reference_dispatch(xs, TOPK, num_experts=4, max_tokens_per_rank=3, use_fp8=use_fp8)
        ys = [d.recv_x if not use_fp8 else
              dequantize_fp8(d.recv_x, d.recv_scales).to(torch.bfloat16) for d in out]
        combined = reference_combine(ys, out, TOPK, weights)
        for x, topk, w, got in zip(xs, TOPK, weights, combined):
            source = fp8_roundtrip(x) if use_fp8 else x.float()
            expected = source.to(torch.bfloat16).float() * (w * (topk >= 0)).sum(1, keepdim=True)
            assert got.dtype == torch.bfloat16 and got.shape == x.shape
            assert ((got.float() - expected).abs() <= expected.abs() * 2.0**-8 * (1 + 1e-5) + 1e-30).all()


def test_combine_exact_weighted_sums():
    dispatches = reference_dispatch(XS, TOPK, num_experts=4, max_tokens_per_rank=3, use_fp8=False)
    ys = expert_rows(dispatches, lambda s, t, k: 1.0 if k == 0 else 2.0)
    weights = [torch.tensor([[0.5, 0.25]]).expand(3, 2).contiguous(), torch.tensor([[0.5, 0.25]] * 2)]
    combined = reference_combine(ys, dispatches, TOPK, weights)
    # Rank 0: token 0 = 0.5 * 1 + 0.25 * 2, token 1 = 0.25 * 2 (slot 0 is -1), token 2 = 1.0.
    assert combined[0][:, 0].tolist() == [1.0, 0.5, 1.0]
    assert combined[1][:, 0].tolist() == [1.0, 0.5]  # token 1 only has slot 0
    assert all((c == c[:, :1]).all() for c in combined)


def test_combine_token_without_experts_is_zero():
    topk = [idx([[-1, -1], [0, 1]]), idx([[-1, -1]])]
    xs = [labelled_tokens(0, 2), labelled_tokens(1, 1)]
    dispatches = reference_dispatch(xs, topk, num_experts=2, max_tokens_per_rank=2, use_fp8=False)
    combined = reference_combine([d.recv_x for d in dispatches], dispatches, topk,
                                 [torch.full((2, 2), float("nan")), torch.ones(1, 2)])
    assert (combined[0][0] == 0).all() and (combined[1] == 0).all()


def test_combine_order_and_no_fma():
    # One token, four slots, weight 1: ascending k gives ((1 + 2**-24) + 2**-24) + 2**-8 = 1 + 2**-8 in
    # float32, a bf16 tie that rounds to 1.0; summing in descending k would give 1 + 2**-7.
    xs = [labelled_tokens(0, 1), torch.empty(0, HIDDEN, dtype=torch.bfloat16)]
    topk = [idx([[0, 1, 2, 3]]), torch.empty(0, 4, dtype=torch.int64)]
    dispatches = reference_dispatch(xs, topk, num_experts=4, max_tokens_per_rank=1, use_fp8=False)
    values = [1.0, 2.0**-24, 2.0**-24, 2.0**-8]
    ys = expert_rows(dispatches, lambda s, t, k: values[k])
    combined = reference_combine(ys, dispatches, topk, [torch.ones(1, 4), torch.ones(0, 4)])
    assert (combined[0] == 1.0).all()
    # -(1 + 2**-7) * w + (1 + 2**-7) * w with w = 1 + 2**-17: each product rounds the same way to
    # float32, so the sum is 0; an FMA would keep the exact second product and give 2**-24.
    topk = [idx([[0, 3]]), torch.empty(0, 2, dtype=torch.int64)]
    dispatches = reference_dispatch(xs, topk, num_experts=4, max_tokens_per_rank=1, use_fp8=False)
    ys = expert_rows(dispatches, lambda s, t, k: -(1 + 2.0**-7) if k == 0 else 1 + 2.0**-7)
    w = torch.tensor([[1 + 2.0**-17, 1 + 2.0**-17]])
    first = (torch.tensor(-(1 + 2.0**-7)) * w[0, 0]).double()
    assert first + (1 + 2.0**-7) * (1 + 2.0**-17) == 2.0**-24  # what an FMA would produce
    combined = reference_combine(ys, dispatches, topk, [w, torch.ones(0, 2)])
    assert (combined[0] == 0).all()


def test_combine_logfmt_within_bound():
    gen = torch.Generator().manual_seed(7)
    dispatches = reference_dispatch(XS, TOPK, num_experts=4, max_tokens_per_rank=3, use_fp8=False)
    ys = [torch.exp2(torch.rand(d.recv_x.shape, generator=gen) * -6 - 0.5).to(torch.bfloat16) for d in dispatches]
    weights = [torch.rand(3, 2, generator=gen), torch.rand(2, 2, generator=gen)]
    plain = reference_combine(ys, dispatches, TOPK, weights)
    logfmt = reference_combine(ys, dispatches, TOPK, weights, use_logfmt=True)
    # Positive terms: the relative error of the sum is at most that of its worst term, plus bf16.
    tolerance = (logfmt_max_relative_error() + 2.0**-7) * 1.01
    for a, b in zip(plain, logfmt):
        assert ((a.float() - b.float()).abs() <= tolerance * a.float().abs()).all()
        assert not torch.equal(a, b)
    # Rank 0 token 2 names experts 2 (slot 0) and 0 (slot 1): rebuild it by hand.
    row0 = logfmt_roundtrip(ys[1][0, 0])  # expert 2 = rank 1 local 0, row 0
    row1 = logfmt_roundtrip(ys[0][0, 1])  # expert 0 = rank 0 local 0, row 1
    expected = (row0 * weights[0][2, 0] + row1 * weights[0][2, 1]).to(torch.bfloat16)
    assert torch.equal(logfmt[0][2], expected)


def test_combine_bad_inputs():
    dispatches = reference_dispatch(XS, TOPK, num_experts=4, max_tokens_per_rank=3, use_fp8=False)
    ys = [d.recv_x for d in dispatches]
    weights = [torch.ones(3, 2), torch.ones(2, 2)]
    with pytest.raises(ArgumentTypeError, match=r"topk_weights\[1\]"):
        reference_combine(ys, dispatches, TOPK, [weights[0], weights[1].double()])
    with pytest.raises(ArgumentError, match=r"topk_weights\[0\]"):
        reference_combine(ys, dispatches, TOPK, [weights[0][:2], weights[1]])
    with pytest.raises(ArgumentTypeError, match=r"expert_outputs\[0\]"):
        reference_combine([ys[0].float(), ys[1]], dispatches, TOPK, weights)
    with pytest.raises(ArgumentError, match="route"):
        reference_combine(ys, dispatches, [TOPK[0], idx([[1, 0], [2, -1]])], weights)


# --------------------------------------------------------------------------------------- randomised

def random_routing(num_ranks, num_experts, max_tokens, num_topk, seed):
    gen = torch.Generator().manual_seed(seed)
    topks = []
    for _ in range(num_ranks):
        num_tokens = int(torch.randint(0, max_tokens + 1, (1,), generator=gen))
        scores = torch.rand(num_tokens, num_experts, generator=gen)
        topk = scores.topk(num_topk, dim=-1).indices
        topk[torch.rand(topk.shape, generator=gen) < 0.2] = -1
        topks.append(topk)
    return topks


def test_randomised_consistency():
    num_ranks, num_experts, max_tokens, num_topk = 4, 16, 32, 4
    topks = random_routing(num_ranks, num_experts, max_tokens, num_topk, seed=11)
    xs = [torch.randn(len(t), 256).to(torch.bfloat16) for t in topks]
    out = reference_dispatch(xs, topks, num_experts=num_experts, max_tokens_per_rank=max_tokens)
    counts = route_counts(topks, num_experts)
    assert counts.dtype == torch.int32
    assert torch.equal(torch.cat([d.recv_count for d in out]), counts.sum(0, dtype=torch.int32))

    seen = []
    for rank, d in enumerate(out):
        for local in range(num_experts // num_ranks):
            rows = received(d, local)
            assert rows == sorted(rows)  # canonical order: source rank, then token
            for row, (s, t, k) in enumerate(rows):
                assert int(topks[s][t, k]) == rank * (num_experts // num_ranks) + local
                assert torch.equal(d.recv_scales[local, row], quantize_fp8(xs[s][t]).scales)
            seen += rows
    expected = [(s, t, k) for s, topk in enumerate(topks) for t, k in (topk >= 0).nonzero().tolist()]
    assert sorted(seen) == sorted(expected) and len(set(seen)) == len(seen)

    weights = [torch.rand(t.shape) for t in topks]
    ys = [dequantize_fp8(d.recv_x, d.recv_scales).to(torch.bfloat16) for d in out]
    combined = reference_combine(ys, out, topks, weights)
    for x, topk, w, got in zip(xs, topks, weights, combined):
        deq = fp8_roundtrip(x).to(torch.bfloat16).float()
        expected = deq * (w * (topk >= 0)).sum(1, keepdim=True)
        assert ((got.float() - expected).abs() <= expected.abs() * 2.0**-8 * (1 + 1e-5) + 1e-30).all()


def test_full_size_runs():
    """R=8, T=128, hidden=7168, top-8 (E=16 keeps the receive buffers small): just completes."""
    num_ranks, num_experts, max_tokens, hidden = 8, 16, 128, 7168
    gen = torch.Generator().manual_seed(0)
    topks = [torch.rand(max_tokens, num_experts, generator=gen).topk(8, dim=-1).indices for _ in range(num_ranks)]
    xs = [torch.randn(max_tokens, hidden, generator=gen).to(torch.bfloat16) for _ in range(num_ranks)]
    out = reference_dispatch(xs, topks, num_experts=num_experts, max_tokens_per_rank=max_tokens)
    ys = [dequantize_fp8(d.recv_x, d.recv_scales).to(torch.bfloat16) for d in out]
    weights = [torch.rand(max_tokens, 8, generator=gen) for _ in range(num_ranks)]
    combined = reference_combine(ys, out, topks, weights, use_logfmt=True)
    assert sum(int(d.recv_count.sum()) for d in out) == num_ranks * max_tokens * 8
    assert all(c.shape == (max_tokens, hidden) for c in combined)
