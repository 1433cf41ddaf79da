"""The GPU engine: each half of a call is one kernel launch on the current stream."""

from __future__ import annotations

from ..jit import compile_all, get_kernel
from ..ops import combine, dispatch, exchange
from ..ops.context import RankContext
from .base import Engine


class KernelEngine(Engine):
    def __init__(self, ctx: RankContext):
        self.ctx = ctx

    def specs(self):
        config = self.ctx.config
        return [exchange.exchange_spec(config), *dispatch.all_specs(config), *combine.all_specs(config)]

    def warmup(self) -> None:
        import torch

        specs = self.specs()
        compile_all(specs)
        device_index = torch.cuda.current_device()
        for spec in specs:
            get_kernel(spec).load(device_index)

    def dispatch_send(self, x, topk_idx, num_tokens, num_tokens_device, *, use_fp8, round_scale):
        dispatch.launch_send(self.ctx, x, topk_idx, num_tokens_device, num_tokens, use_fp8=use_fp8, round_scale=round_scale)

    def dispatch_recv(self, out, *, use_fp8, use_ue8m0, cumulative_recv_stats, wait_cost_stats):
        dispatch.launch_recv(self.ctx, out, use_fp8=use_fp8, use_ue8m0=use_ue8m0,
                             cumulative_recv_stats=cumulative_recv_stats, wait_cost_stats=wait_cost_stats)

    def combine_send(self, x, layout, *, use_logfmt):
        combine.launch_send(self.ctx, x, layout, use_logfmt=use_logfmt)

    def combine_recv(self, out, topk_idx, topk_weights, num_tokens, num_tokens_device, *, use_logfmt, wait_cost_stats):
        combine.launch_recv(self.ctx, out, topk_idx, topk_weights, num_tokens_device, num_tokens,
                            use_logfmt=use_logfmt, wait_cost_stats=wait_cost_stats)
