"""Host side of ``kernels/combine.cuh``: the send and receive halves of low-latency combine."""

from __future__ import annotations

import torch

from ..jit import ArgKind, KernelSpec, Param
from .context import RANK_PARAMS, TIMEOUT_PARAM, KernelConfig, RankContext
from .dispatch import DispatchOutputs

SEND_SIGNATURE = (
    Param("x", ArgKind.PTR),
    Param("recv_count", ArgKind.PTR),
    Param("recv_src_info", ArgKind.PTR),
    Param("recv_src_topk", ArgKind.PTR),
    Param("recv_layout_range", ArgKind.PTR),
    *RANK_PARAMS,
)
RECV_SIGNATURE = (
    Param("out", ArgKind.PTR),
    Param("topk_idx", ArgKind.PTR),
    Param("topk_weights", ArgKind.PTR),
    Param("num_tokens_ptr", ArgKind.PTR),
    Param("num_tokens_host", ArgKind.I32),
    Param("num_out_rows", ArgKind.I32),
    Param("wait_cost_stats", ArgKind.PTR),
    *RANK_PARAMS,
    TIMEOUT_PARAM,
)


def send_spec(config: KernelConfig, *, use_logfmt: bool) -> KernelSpec:
    return config.spec("combine.cuh", "lowlat::combine_send", SEND_SIGNATURE, kUseLogFMT=use_logfmt)


def recv_spec(config: KernelConfig, *, use_logfmt: bool, topk_int64: bool) -> KernelSpec:
    return config.spec("combine.cuh", "lowlat::combine_recv", RECV_SIGNATURE, kUseLogFMT=use_logfmt, kTopkInt64=topk_int64)


def all_specs(config: KernelConfig) -> list[KernelSpec]:
    return [send_spec(config, use_logfmt=f) for f in (False, True)] + [
        recv_spec(config, use_logfmt=f, topk_int64=i) for f in (False, True) for i in (True, False)
    ]


def launch_send(ctx: RankContext, x: torch.Tensor, layout: DispatchOutputs, *, use_logfmt: bool) -> None:
    args = (x, layout.recv_count, layout.recv_src_info, layout.recv_src_topk, layout.recv_layout_range, *ctx.rank_args())
    ctx.launch(send_spec(ctx.config, use_logfmt=use_logfmt), args)


def launch_recv(ctx: RankContext, out, topk_idx, topk_weights, num_tokens_ptr, num_tokens_host: int, *,
                use_logfmt: bool, wait_cost_stats=None) -> None:
    spec = recv_spec(ctx.config, use_logfmt=use_logfmt, topk_int64=topk_idx.dtype == torch.int64)
    args = (out, topk_idx, topk_weights, num_tokens_ptr, num_tokens_host, out.shape[0], wait_cost_stats,
            *ctx.rank_args(), ctx.timeout_ns)
    ctx.launch(spec, args)
