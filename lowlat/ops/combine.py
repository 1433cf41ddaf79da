"""Host side of ``kernels/combine.cuh``: the send and receive halves of low-latency combine."""

from __future__ import annotations

from ..jit import ArgKind, KernelSpec, Param
from ..jit.launch import LaunchPlan
from .context import RANK_PARAM, KernelConfig, RankContext

SEND_SIGNATURE = (
    Param("x", ArgKind.PTR),
    Param("recv_count", ArgKind.PTR),
    Param("recv_src_info", ArgKind.PTR),
    Param("recv_src_topk", ArgKind.PTR),
    Param("recv_layout_range", ArgKind.PTR),
    RANK_PARAM,
)
RECV_SIGNATURE = (
    Param("out", ArgKind.PTR),
    Param("topk_idx", ArgKind.PTR),
    Param("topk_weights", ArgKind.PTR),
    Param("num_tokens_ptr", ArgKind.PTR),
    Param("num_tokens_host", ArgKind.I32),
    Param("num_out_rows", ArgKind.I32),
    Param("wait_cost_stats", ArgKind.PTR),
    RANK_PARAM,
)
FUSED_SIGNATURE = (*SEND_SIGNATURE[:-1], *RECV_SIGNATURE[:-1], RANK_PARAM)  # both halves in one kernel
RECV_VARIANTS = [(use_logfmt, topk_int64) for use_logfmt in (False, True) for topk_int64 in (True, False)]


def send_spec(config: KernelConfig, *, use_logfmt: bool) -> KernelSpec:
    return config.spec("combine.cuh", "lowlat::combine_send", SEND_SIGNATURE, kUseLogFMT=use_logfmt)


def recv_spec(config: KernelConfig, *, use_logfmt: bool, topk_int64: bool) -> KernelSpec:
    return config.spec("combine.cuh", "lowlat::combine_recv", RECV_SIGNATURE, kUseLogFMT=use_logfmt, kTopkInt64=topk_int64)


def fused_spec(config: KernelConfig, *, use_logfmt: bool, topk_int64: bool) -> KernelSpec:
    return config.spec("combine.cuh", "lowlat::combine", FUSED_SIGNATURE, kUseLogFMT=use_logfmt, kTopkInt64=topk_int64)


def all_specs(config: KernelConfig) -> list[KernelSpec]:
    return [send_spec(config, use_logfmt=f) for f in (False, True)] + [
        recv_spec(config, use_logfmt=f, topk_int64=i) for f, i in RECV_VARIANTS] + [
        fused_spec(config, use_logfmt=f, topk_int64=i) for f, i in RECV_VARIANTS]


def fused_plans(ctx: RankContext) -> dict[tuple[bool, bool], LaunchPlan]:
    """Plans keyed by (use_logfmt, topk_int64), with a grid resident at once; launch(*send arguments,
    *receive arguments)."""
    return {(f, i): ctx.plan(fused_spec(ctx.config, use_logfmt=f, topk_int64=i), resident=True)
            for f, i in RECV_VARIANTS}


def send_plans(ctx: RankContext) -> dict[bool, LaunchPlan]:
    """Plans keyed by use_logfmt; launch(x, recv_count, recv_src_info, recv_src_topk, recv_layout_range)."""
    return {f: ctx.plan(send_spec(ctx.config, use_logfmt=f)) for f in (False, True)}


def recv_plans(ctx: RankContext) -> dict[tuple[bool, bool], LaunchPlan]:
    """Plans keyed by (use_logfmt, topk_int64); launch(out, topk_idx, topk_weights, num_tokens_ptr,
    num_tokens_host, num_out_rows, wait_cost_stats)."""
    return {(f, i): ctx.plan(recv_spec(ctx.config, use_logfmt=f, topk_int64=i))
            for f, i in RECV_VARIANTS}
