"""Host side of ``kernels/dispatch.cuh``: the send and receive halves of low-latency dispatch."""

from __future__ import annotations

import dataclasses

import torch

from ..jit import ArgKind, KernelSpec, Param
from .context import RANK_PARAMS, TIMEOUT_PARAM, KernelConfig, RankContext

SEND_SIGNATURE = (
    Param("x", ArgKind.PTR),
    Param("topk_idx", ArgKind.PTR),
    Param("num_tokens_ptr", ArgKind.PTR),
    Param("num_tokens_host", ArgKind.I32),
    Param("round_scale", ArgKind.BOOL),
    *RANK_PARAMS,
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
    *RANK_PARAMS,
    TIMEOUT_PARAM,
)


def send_spec(config: KernelConfig, *, use_fp8: bool, topk_int64: bool) -> KernelSpec:
    return config.spec("dispatch.cuh", "lowlat::dispatch_send", SEND_SIGNATURE, kUseFP8=use_fp8, kTopkInt64=topk_int64)


def recv_spec(config: KernelConfig, *, use_fp8: bool, use_ue8m0: bool) -> KernelSpec:
    return config.spec("dispatch.cuh", "lowlat::dispatch_recv", RECV_SIGNATURE, kUseFP8=use_fp8, kUseUE8M0=use_ue8m0)


def all_specs(config: KernelConfig) -> list[KernelSpec]:
    sends = [send_spec(config, use_fp8=f, topk_int64=i) for f in (True, False) for i in (True, False)]
    recvs = [recv_spec(config, use_fp8=f, use_ue8m0=u) for f, u in ((True, False), (True, True), (False, False))]
    return sends + recvs


@dataclasses.dataclass(frozen=True)
class DispatchOutputs:
    """Where dispatch_recv writes (shapes for R ranks, L local experts, T tokens, hidden H):

    ``recv_x`` [L, R*T, H] fp8 or bf16; ``recv_scales`` fp32 [L, H/128, S] or int32 [L, ceil(H/512), S]
    storage with S = R*T rounded up to 4 (None for bf16); ``recv_count`` int32 [L];
    ``recv_src_info`` / ``recv_src_topk`` int32 [L, R*T]; ``recv_layout_range`` int64 [L, R].
    """

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_count: torch.Tensor
    recv_src_info: torch.Tensor
    recv_src_topk: torch.Tensor
    recv_layout_range: torch.Tensor


def launch_send(ctx: RankContext, x, topk_idx, num_tokens_ptr, num_tokens_host: int, *, use_fp8: bool, round_scale: bool) -> None:
    spec = send_spec(ctx.config, use_fp8=use_fp8, topk_int64=topk_idx.dtype == torch.int64)
    ctx.launch(spec, (x, topk_idx, num_tokens_ptr, num_tokens_host, round_scale, *ctx.rank_args()))


def launch_recv(ctx: RankContext, out: DispatchOutputs, *, use_fp8: bool, use_ue8m0: bool,
                cumulative_recv_stats=None, wait_cost_stats=None) -> None:
    spec = recv_spec(ctx.config, use_fp8=use_fp8, use_ue8m0=use_ue8m0)
    args = (out.recv_x, out.recv_scales, out.recv_count, out.recv_src_info, out.recv_src_topk, out.recv_layout_range,
            cumulative_recv_stats, wait_cost_stats, *ctx.rank_args(), ctx.timeout_ns)
    ctx.launch(spec, args)
