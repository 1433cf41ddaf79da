"""The EP model (lowlat/bench/model.py) against independent counts: a Monte-Carlo routing and the
DeepEP buffer sizes worked out in ../shared/research/deepep.md section 2.1."""

import torch

from lowlat.bench import model


def test_expected_distinct_ranks_matches_sampled_routing():
    g = torch.Generator(device="cpu").manual_seed(0)
    for ranks, experts, topk in ((8, 256, 8), (64, 256, 8), (4, 36, 5)):
        scores = torch.rand(20000, experts, generator=g, dtype=torch.float32, device="cpu")
        owners = scores.topk(topk, dim=1).indices // (experts // ranks)
        sampled = float(torch.tensor([len(set(row)) for row in owners.tolist()], dtype=torch.float32, device="cpu").mean())
        assert abs(model.expected_distinct_ranks(ranks, experts, topk) - sampled) < 0.03, (ranks, sampled)


def test_deepep_size_hint_matches_the_research_figures():
    # deepep.md 2.1: T=128, H=7168 gives 2.147 GB with E=288 and 1.91 GB with E=256.
    assert abs(model.deepep_size_hint(128, 7168, 288) / 1e9 - 2.147) < 0.005
    assert abs(model.deepep_size_hint(128, 7168, 256) / 1e9 - 1.91) < 0.005


def test_one_node_sends_nothing_over_the_network_and_bytes_add_up():
    eight = model.model(8, tokens=128, hidden=7168, num_experts=256, num_topk=8)
    assert eight["dispatch_bytes"]["network"] == 0 and eight["combine_bytes"]["network"] == 0
    # Combine at EP 8 returns 7/8 of the 8 rows per token over NVLink, bf16.
    assert abs(eight["combine_bytes"]["nvlink"] - 128 * 8 * 7 / 8 * 2 * 7168) < 1
    big = model.model(256, tokens=128, hidden=7168, num_experts=256, num_topk=8)
    assert big["dispatch_bytes"]["network"] > 10 * big["dispatch_bytes"]["nvlink"]
    assert big["region_bytes"] < big["deepep_region_bytes"]
    # Past one node the region holds the put staging (every row a rank may send back, at most R*T*min(L, K)).
    from lowlat.layout import BufferShape, RegionLayout
    assert eight["region_bytes"] == RegionLayout.of(BufferShape(8, 256, 8, 7168, 128)).total_bytes
    assert big["region_bytes"] == RegionLayout.of(BufferShape(256, 256, 8, 7168, 128), put_staging=True).total_bytes
