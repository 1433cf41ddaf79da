"""What the benchmark sends: every rank's tokens and routing from one seed, and the bytes counted
three ways (DeepEP's per-selection count, bytes that cross between ranks, the HBM floor)."""

from __future__ import annotations

import dataclasses

import torch

from ..layout import BufferShape


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark point: shapes and options (``num_tokens`` <= ``shape.max_tokens_per_rank``)."""

    shape: BufferShape
    num_tokens: int
    use_fp8: bool = True
    use_logfmt: bool = False

    @property
    def label(self) -> str:
        s = self.shape
        wire = "fp8" if self.use_fp8 else "bf16"
        combine = "logfmt" if self.use_logfmt else "bf16"
        return f"R={s.num_ranks} T={self.num_tokens} H={s.hidden} top-{s.num_topk} E={s.num_experts} {wire}/{combine}"


@dataclasses.dataclass
class Workload:
    """Inputs of every rank: x bf16 [R, T, H], topk_idx int64 [R, T, K] (about 1% of entries -1, as in
    DeepEP's test), topk_weights float32 [R, T, K]; rows past num_tokens are padding."""

    config: Config
    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor

    @staticmethod
    def make(config: Config, device, seed: int = 0) -> "Workload":
        s = config.shape
        g = torch.Generator(device="cpu").manual_seed(seed)
        R, T, H, E, K = s.num_ranks, s.max_tokens_per_rank, s.hidden, s.num_experts, s.num_topk
        cpu = torch.device("cpu")
        x = (torch.randn(R, T, H, generator=g, dtype=torch.float32, device=cpu) * 0.1).to(torch.bfloat16)
        scores = torch.rand(R, T, E, generator=g, dtype=torch.float32, device=cpu).abs() + 1
        topk = scores.topk(K, dim=-1).indices
        topk = torch.where(torch.rand(R, T, K, generator=g, dtype=torch.float32, device=cpu) < 0.01, -1, topk)
        weights = torch.rand(R, T, K, generator=g, dtype=torch.float32, device=cpu)
        return Workload(config, x.to(device), topk.to(device), weights.to(device))

    def valid_topk(self) -> torch.Tensor:
        """int64 [R, n, K]: the routing of the tokens that are actually sent."""
        return self.topk_idx[:, : self.config.num_tokens].cpu()

    def byte_counts(self) -> dict[str, int]:
        """Bytes of one dispatch and one combine over all ranks, counted three ways:

        ``deepep_*``: per valid (token, expert) selection, DeepEP's count (FP8: H + 4H/128 + 16 bytes,
        bf16: 2H; combine 2H, LogFMT H*10/8 + 4H/128), local selections included;
        ``cross_*``: what leaves a rank for another one (lowlat sends a token once per destination rank);
        ``floor_*``: what a kernel must read and write in HBM (inputs once, outputs once).
        """
        s, c = self.config.shape, self.config
        topk = self.valid_topk()
        valid = topk >= 0
        pairs = int(valid.sum())
        groups = s.hidden // 128
        wire = s.hidden + 4 * groups if c.use_fp8 else 2 * s.hidden
        combine_wire = s.hidden * 10 // 8 + 4 * groups if c.use_logfmt else 2 * s.hidden
        owner = torch.where(valid, topk // s.num_local_experts, -1)
        source = torch.arange(s.num_ranks, dtype=torch.int64, device=topk.device).view(-1, 1, 1)
        remote = valid & (owner != source)
        distinct_remote_ranks = sum(
            int((owner[r, t][remote[r, t]].unique()).numel()) for r in range(s.num_ranks) for t in range(c.num_tokens))
        tokens = s.num_ranks * c.num_tokens
        return {
            "selections": pairs,
            "deepep_dispatch": pairs * (wire + (16 if c.use_fp8 else 0)),
            "deepep_combine": pairs * combine_wire,
            "cross_dispatch": distinct_remote_ranks * wire,
            "cross_combine": int(remote.sum()) * combine_wire,
            "floor_dispatch": tokens * 2 * s.hidden + pairs * wire,
            "floor_combine": pairs * 2 * s.hidden + tokens * 2 * s.hidden,
        }
