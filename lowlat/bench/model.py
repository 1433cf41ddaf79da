"""``python -m lowlat.bench.model``: what low-latency EP 8..256 costs, on paper.

For each EP size R (one rank per GPU, 8 GPUs per node) at a decode shape, it computes:

* the bytes one rank sends per call: dispatch puts each token once per distinct destination rank
  (FP8 data + fp32 scales), combine returns one row per (token, k) (bf16 or LogFMT-10), split into
  the part that stays in the node (NVLink) and the part that crosses the network;
* the symmetric memory per rank: lowlat's region (``lowlat.layout.RegionLayout``; past one node with
  the staging the nvshmem transport's puts read from) against DeepEP
  V1's ``get_low_latency_rdma_size_hint`` (its layout as ``../shared/research/deepep.md`` section 2.1
  describes it: two buffers of send, receive and signalling regions);
* an expected latency per call for three fabrics: the bytes over the link's bandwidth plus one
  round trip (the data and then the flag), taking the slower of the NVLink part and the network part.

Expected distinct destinations per token come from routing without replacement (top-k of E experts,
E / R per rank).  Link figures are assumptions stated in ``LINKS`` (the NVLink round trip is the
2.41 us measured on 2x H200 in DESIGN.md; the network ones are typical values, not measurements).
Nothing here is measured: it is a model to set expectations for runs that need several nodes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from ..layout import BufferShape, RegionLayout

GPUS_PER_NODE = 8


@dataclasses.dataclass(frozen=True)
class Link:
    name: str
    gbps: float  # GB/s one way, per GPU
    rtt_us: float  # one put plus its flag, end to end


LINKS = (
    Link("NVLink (H100, NV18)", 450.0, 2.4),
    Link("InfiniBand 400 Gb/s", 50.0, 4.0),
    Link("RoCE 400 Gb/s", 50.0, 6.0),
)


def expected_distinct_ranks(num_ranks: int, num_experts: int, num_topk: int) -> float:
    """Expected number of distinct ranks among a token's top-k experts (k distinct experts out of
    E, each rank owning E / R of them)."""
    local = num_experts // num_ranks
    miss = math.comb(num_experts - local, num_topk) / math.comb(num_experts, num_topk)
    return num_ranks * (1.0 - miss)


def deepep_size_hint(tokens: int, hidden: int, num_experts: int) -> int:
    """DeepEP V1's low-latency buffer: 2 x (send + receive + signalling), sized for bf16."""
    groups = hidden // 128
    message = 16 + max(2 * hidden, hidden + 4 * groups)
    slot = 4 * groups + 2 * hidden
    send = max(tokens * message, num_experts * tokens * slot)
    recv = max(num_experts * tokens * message, num_experts * tokens * slot)
    signals = (num_experts * 4 + 127) // 128 * 128
    return 2 * (send + recv + signals)


def model(num_ranks: int, *, tokens: int, hidden: int, num_experts: int, num_topk: int, logfmt: bool = False) -> dict:
    """Per-rank bytes, memory and expected latency for one dispatch and one combine at EP ``num_ranks``."""
    groups = hidden // 128
    fp8_message = hidden + 4 * groups
    combine_row = hidden * 10 // 8 + 4 * groups if logfmt else 2 * hidden
    node = min(num_ranks, GPUS_PER_NODE)
    distinct = expected_distinct_ranks(num_ranks, num_experts, num_topk)
    # Destinations other than this rank: a share (node - 1) / (R - 1) of them inside the node.
    remote_destinations = distinct * (num_ranks - 1) / num_ranks
    in_node = remote_destinations * (node - 1) / (num_ranks - 1) if num_ranks > 1 else 0.0
    across = remote_destinations - in_node
    rows_out = num_topk * (num_ranks - 1) / num_ranks  # combine rows sent to other ranks, per token
    rows_in_node = rows_out * (node - 1) / (num_ranks - 1) if num_ranks > 1 else 0.0
    shape = BufferShape(num_ranks, num_experts, num_topk, hidden, tokens)
    result = {
        "num_ranks": num_ranks,
        "dispatch_bytes": {"nvlink": tokens * in_node * fp8_message, "network": tokens * across * fp8_message},
        "combine_bytes": {"nvlink": tokens * rows_in_node * combine_row, "network": tokens * (rows_out - rows_in_node) * combine_row},
        "region_bytes": RegionLayout.of(shape, put_staging=num_ranks > GPUS_PER_NODE).total_bytes,
        "deepep_region_bytes": deepep_size_hint(tokens, hidden, num_experts),
        "latency_us": {},
    }
    nvlink, *networks = LINKS
    for network in networks:
        for op in ("dispatch", "combine"):
            parts = result[f"{op}_bytes"]
            inside = parts["nvlink"] / (nvlink.gbps * 1e3) + (nvlink.rtt_us if parts["nvlink"] else 0.0)
            outside = parts["network"] / (network.gbps * 1e3) + (network.rtt_us if parts["network"] else 0.0)
            result["latency_us"][f"{op} ({network.name})"] = max(inside, outside)
    return result


def table(rows: list[dict]) -> str:
    networks = [link.name for link in LINKS[1:]]
    head = (f"{'EP':>4} | {'dispatch KB/rank':>16} {'combine KB/rank':>15} | {'region MiB':>10} {'DeepEP MiB':>10} | "
            + " | ".join(f"{n}: disp / comb us" for n in networks))
    lines = [head, "-" * len(head)]
    for r in rows:
        d, c = r["dispatch_bytes"], r["combine_bytes"]
        lat = " | ".join(f"{r['latency_us'][f'dispatch ({n})']:>9.1f} / {r['latency_us'][f'combine ({n})']:<9.1f}"
                         f"{'':>{max(0, len(n) - 16)}}" for n in networks)
        lines.append(f"{r['num_ranks']:>4} | {(d['nvlink'] + d['network']) / 1e3:>16.0f} {(c['nvlink'] + c['network']) / 1e3:>15.0f} | "
                     f"{r['region_bytes'] / 2**20:>10.0f} {r['deepep_region_bytes'] / 2**20:>10.0f} | {lat}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowlat.bench.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="8,16,32,64,128,256")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--logfmt", action="store_true")
    args = parser.parse_args(argv)
    rows = [model(int(r), tokens=args.tokens, hidden=args.hidden, num_experts=args.experts, num_topk=args.topk, logfmt=args.logfmt)
            for r in args.ranks.split(",")]
    print(f"EP model (not a measurement): T={args.tokens}, hidden {args.hidden}, {args.experts} experts, top-{args.topk}, "
          f"FP8 dispatch, {'LogFMT' if args.logfmt else 'bf16'} combine, {GPUS_PER_NODE} GPUs per node; links: "
          + "; ".join(f"{link.name} {link.gbps:g} GB/s, {link.rtt_us:g} us round trip" for link in LINKS))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
