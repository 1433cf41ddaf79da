"""Host side of ``kernels/dispatch.cuh``: the send and receive halves of low-latency dispatch."""

from __future__ import annotations

import dataclasses

import torch

from ..jit import ArgKind, KernelSpec, Param
from ..jit.launch import LaunchPlan
from .context import RANK_PARAM, KernelConfig, RankContext

SEND_SIGNATURE = (
    Param("x", ArgKind.PTR),
    Param("topk_idx", ArgKind.PTR),
    Param("num_tokens_ptr", ArgKind.PTR),
    Param("num_tokens_host", ArgKind.I32),
    Param("round_scale", ArgKind.BOOL),
    RANK_PARAM,
)
RECV_SIGNATURE = (
    Param("recv_x", ArgKind.PTR),
    Param("recv_scales", ArgKind.PTR),
    Param("recv_count", ArgKind.PTR),
    Param("recv_src_info", ArgKind.PTR),
    Param("recv_src_topk", ArgKind.PTR),
    Param("recv_layout_range", ArgKind.PTR),
    Param("cumulative_recv_stats", ArgKind.PTR),
    Param("wait_cost_stats", ArgKind.PTR),
    RANK_PARAM,
)
# Both halves in one kernel (calls without a receive hook): the send's arguments, then the receive's.
FUSED_SIGNATURE = (*SEND_SIGNATURE[:-1], *RECV_SIGNATURE[:-1], RANK_PARAM)


def send_spec(config: KernelConfig, *, use_fp8: bool, topk_int64: bool) -> KernelSpec:
    return config.spec("dispatch.cuh", "lowlat::dispatch_send", SEND_SIGNATURE, kUseFP8=use_fp8, kTopkInt64=topk_int64)


def recv_spec(config: KernelConfig, *, use_fp8: bool, use_ue8m0: bool) -> KernelSpec:
    return config.spec("dispatch.cuh", "lowlat::dispatch_recv", RECV_SIGNATURE, kUseFP8=use_fp8, kUseUE8M0=use_ue8m0)


def fused_spec(config: KernelConfig, *, use_fp8: bool, use_ue8m0: bool, topk_int64: bool) -> KernelSpec:
    return config.spec("dispatch.cuh", "lowlat::dispatch", FUSED_SIGNATURE, kUseFP8=use_fp8, kUseUE8M0=use_ue8m0,
                       kTopkInt64=topk_int64)


SEND_VARIANTS = [(use_fp8, topk_int64) for use_fp8 in (True, False) for topk_int64 in (True, False)]
RECV_VARIANTS = [(True, False), (True, True), (False, False)]  # (use_fp8, use_ue8m0)
FUSED_VARIANTS = [(f, u, i) for f, u in RECV_VARIANTS for i in (True, False)]  # (use_fp8, use_ue8m0, topk_int64)


def fused_fits(config: KernelConfig) -> bool:
    """Whether the fused kernel's static shared memory (the send's top-k table plus the receive's row
    segments) stays under the 48 KB a block may declare; otherwise calls use two launches."""
    s = config.layout.shape
    topk_table = 4 * s.max_tokens_per_rank * s.num_topk if s.max_tokens_per_rank * s.num_topk <= 8192 else 4
    segments = 4 * (s.num_local_experts + 1 + s.num_experts) + 4 * s.num_ranks
    return topk_table + segments + 256 <= 48 * 1024


def all_specs(config: KernelConfig) -> list[KernelSpec]:
    fused = [fused_spec(config, use_fp8=f, use_ue8m0=u, topk_int64=i) for f, u, i in FUSED_VARIANTS] if fused_fits(config) else []
    return ([send_spec(config, use_fp8=f, topk_int64=i) for f, i in SEND_VARIANTS]
            + [recv_spec(config, use_fp8=f, use_ue8m0=u) for f, u in RECV_VARIANTS] + fused)


def send_plans(ctx: RankContext) -> dict[tuple[bool, bool], LaunchPlan]:
    """Plans keyed by (use_fp8, topk_int64); launch(x, topk_idx, num_tokens_ptr, num_tokens_host, round_scale)."""
    return {(f, i): ctx.plan(send_spec(ctx.config, use_fp8=f, topk_int64=i))
            for f, i in SEND_VARIANTS}


def recv_plans(ctx: RankContext) -> dict[tuple[bool, bool], LaunchPlan]:
    """Plans keyed by (use_fp8, use_ue8m0); launch(recv_x, recv_scales, recv_count, recv_src_info,
    recv_src_topk, recv_layout_range, cumulative_recv_stats, wait_cost_stats)."""
    return {(f, u): ctx.plan(recv_spec(ctx.config, use_fp8=f, use_ue8m0=u))
            for f, u in RECV_VARIANTS}


def fused_plans(ctx: RankContext) -> dict[tuple[bool, bool, bool], LaunchPlan]:
    """Plans keyed by (use_fp8, use_ue8m0, topk_int64), with a grid that is resident at once; launch(
    *send arguments, *receive arguments).  Empty where the fused kernel does not fit."""
    if not fused_fits(ctx.config):
        return {}
    return {(f, u, i): ctx.plan(fused_spec(ctx.config, use_fp8=f, use_ue8m0=u, topk_int64=i), resident=True)
            for f, u, i in FUSED_VARIANTS}


@dataclasses.dataclass(frozen=True)
class DispatchOutputs:
    """Where dispatch_recv writes (shapes for R ranks, L local experts, T tokens, hidden H):

    ``recv_x`` uint8 [L, R*T, 2H] storage for fp8 or bf16 rows; ``recv_scales`` fp32 [L, H/128, S]
    storage (int32 [L, ceil(H/512), S] in its front for UE8M0) with S = R*T rounded up to 4;
    ``recv_count`` int32 [L]; ``recv_src_info`` / ``recv_src_topk`` int32 [L, R*T];
    ``recv_layout_range`` int64 [L, R].
    """

    recv_x: torch.Tensor
    recv_scales: torch.Tensor
    recv_count: torch.Tensor
    recv_src_info: torch.Tensor
    recv_src_topk: torch.Tensor
    recv_layout_range: torch.Tensor

    @staticmethod
    def allocate(shape, device: torch.device) -> "DispatchOutputs":
        s = shape
        return DispatchOutputs(
            recv_x=torch.empty(s.num_local_experts, s.rows_per_expert, 2 * s.hidden, dtype=torch.uint8, device=device),
            recv_scales=torch.empty(s.num_local_experts, s.num_groups, s.scale_row_stride, dtype=torch.float32, device=device),
            recv_count=torch.zeros(s.num_local_experts, dtype=torch.int32, device=device),
            recv_src_info=torch.empty(s.num_local_experts, s.rows_per_expert, dtype=torch.int32, device=device),
            recv_src_topk=torch.empty(s.num_local_experts, s.rows_per_expert, dtype=torch.int32, device=device),
            recv_layout_range=torch.zeros(s.num_local_experts, s.num_ranks, dtype=torch.int64, device=device),
        )

    addresses: tuple = dataclasses.field(init=False, repr=False, compare=False)  # data_ptr() of the six, in order

    def __post_init__(self):
        object.__setattr__(self, "addresses", tuple(t.data_ptr() for t in self.tensors()))

    def tensors(self) -> tuple:
        return (self.recv_x, self.recv_scales, self.recv_count, self.recv_src_info, self.recv_src_topk, self.recv_layout_range)
