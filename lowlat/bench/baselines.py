"""Same-run baselines: the pure-PyTorch dispatch and combine of every rank at once (capturable in a
CUDA graph: no host synchronisation, static shapes), and the device copy bandwidth."""

from __future__ import annotations

import torch

from .workload import Workload

_INV_FP8_MAX = 1.0 / 448.0


class TorchDispatchCombine:
    """Dispatch = FP8 cast (DeepEP maths) + scatter into [R, L, R*T, H]; combine = gather of each
    (token, k) row + weighted fp32 sum.  All ranks in one go, as one GPU would do it with torch ops."""

    def __init__(self, work: Workload):
        s, c = work.config.shape, work.config
        self.work, self.shape, self.config = work, s, c
        R, T, H, K, L = s.num_ranks, s.max_tokens_per_rank, s.hidden, s.num_topk, s.num_local_experts
        device = work.x.device
        self.recv = torch.empty(R, L, R * T + 1, H, dtype=torch.float8_e4m3fn if c.use_fp8 else torch.bfloat16, device=device)
        self.recv_scales = torch.empty(R, L, R * T + 1, H // 128, dtype=torch.float32, device=device)
        self.position = torch.empty(R, T, K, dtype=torch.int64, device=device)
        self.y = torch.empty(R, L, R * T + 1, H, dtype=torch.bfloat16, device=device)
        self.out = torch.empty(R, T, H, dtype=torch.bfloat16, device=device)
        token = torch.arange(T, device=device).view(1, T, 1).expand(R, T, K)
        source = torch.arange(R, device=device).view(R, 1, 1).expand(R, T, K)
        self.token, self.source = token.reshape(-1), source.reshape(-1)

    def _quantize(self, x: torch.Tensor):
        groups = x.float().unflatten(-1, (-1, 128))
        amax = groups.abs().amax(-1, keepdim=True).clamp_min(1e-4)
        scaled = (groups * (448.0 / amax)).clamp(-448, 448)
        return scaled.flatten(-2).to(torch.float8_e4m3fn), (amax * _INV_FP8_MAX).squeeze(-1)

    def dispatch(self) -> None:
        s, c = self.shape, self.config
        R, T, K, L = s.num_ranks, s.max_tokens_per_rank, s.num_topk, s.num_local_experts
        topk = self.work.topk_idx
        live = (torch.arange(T, device=topk.device) < c.num_tokens).view(1, T, 1)
        expert = torch.where(live & (topk >= 0), topk, s.num_experts).reshape(-1)  # E = "nowhere"
        # Rows of one expert are ordered by (source rank, token): a stable sort by expert gives that.
        order = torch.sort(expert, stable=True).indices
        sorted_expert = expert[order]
        counts = torch.zeros(s.num_experts + 1, dtype=torch.int64, device=topk.device)
        counts.scatter_add_(0, expert, torch.ones_like(expert))
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(expert)
        position[order] = torch.arange(expert.numel(), device=topk.device) - starts[sorted_expert]
        valid = expert < s.num_experts
        position = torch.where(valid, position, R * T)  # invalid selections land in a spare row
        self.position.copy_(position.view(R, T, K))
        owner = torch.where(valid, expert // L, 0)
        local = torch.where(valid, expert % L, 0)
        if c.use_fp8:
            data, scales = self._quantize(self.work.x)
            self.recv[owner, local, position] = data[self.source, self.token]
            self.recv_scales[owner, local, position] = scales[self.source, self.token]
        else:
            self.recv[owner, local, position] = self.work.x[self.source, self.token]

    def experts(self) -> None:
        self.y.copy_(self.recv.to(torch.bfloat16) if not self.config.use_fp8 else
                     (self.recv.float().unflatten(-1, (-1, 128)) * self.recv_scales.unsqueeze(-1)).flatten(-2).to(torch.bfloat16))

    def combine(self) -> None:
        s = self.shape
        topk = self.work.topk_idx
        valid = topk >= 0
        owner = torch.where(valid, topk // s.num_local_experts, 0)
        local = torch.where(valid, topk % s.num_local_experts, 0)
        rows = self.y[owner, local, self.position].float()  # [R, T, K, H]
        weights = torch.where(valid, self.work.topk_weights, 0.0).unsqueeze(-1)
        self.out.copy_((rows * weights).sum(dim=2).to(torch.bfloat16))


def copy_bandwidth(device, num_bytes: int = 256 * 2**20, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / repeats)
    times.sort()
    return 2 * num_bytes / times[len(times) // 2] / 1e9
