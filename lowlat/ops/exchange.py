"""Host side of ``kernels/exchange.cuh``: all-gather a few 64-bit words through peer memory."""

from __future__ import annotations

from ..jit import ArgKind, KernelSpec, Param
from ..jit.launch import LaunchPlan
from .context import RANK_PARAM, KernelConfig, RankContext

SIGNATURE = (Param("words", ArgKind.PTR), Param("gathered", ArgKind.PTR), RANK_PARAM)
BLOCK_THREADS = 128


def exchange_spec(config: KernelConfig) -> KernelSpec:
    return config.spec("exchange.cuh", "lowlat::exchange_allgather", SIGNATURE)


def plan(ctx: RankContext) -> LaunchPlan:
    """launch(words, gathered): ``words`` int64 [EXCHANGE_WORDS] (device), this rank's contribution;
    ``gathered`` int64 [R, EXCHANGE_WORDS] (device): every rank's words once all have arrived (a rank
    that is masked or times out reads as all ones).  Every rank must launch it; it is also a
    device-side barrier.  One block."""
    return ctx.plan(exchange_spec(ctx.config), grid=1, block=BLOCK_THREADS)
