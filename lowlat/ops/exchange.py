"""Host side of ``kernels/exchange.cuh``: all-gather a few 64-bit words through peer memory."""

from __future__ import annotations

import torch

from ..jit import ArgKind, KernelSpec, Param
from ..layout import EXCHANGE_WORDS
from .context import RANK_PARAMS, TIMEOUT_PARAM, KernelConfig, RankContext

SIGNATURE = (Param("words", ArgKind.PTR), Param("gathered", ArgKind.PTR), *RANK_PARAMS, TIMEOUT_PARAM)
BLOCK_THREADS = 128


def exchange_spec(config: KernelConfig) -> KernelSpec:
    return config.spec("exchange.cuh", "lowlat::exchange_allgather", SIGNATURE)


def allgather_words(ctx: RankContext, words: torch.Tensor, gathered: torch.Tensor) -> None:
    """Launch the all-gather on the current stream.

    ``words`` int64 [EXCHANGE_WORDS] (device): this rank's contribution; ``gathered`` int64
    [R, EXCHANGE_WORDS] (device): every rank's words once all have arrived (a rank that is masked or
    times out reads as all ones).  Every rank must launch it; it is also a device-side barrier.
    """
    assert words.numel() == EXCHANGE_WORDS and gathered.numel() == ctx.layout.shape.num_ranks * EXCHANGE_WORDS
    ctx.launch(exchange_spec(ctx.config), (words, gathered, *ctx.rank_args(), ctx.timeout_ns), grid=1, block=BLOCK_THREADS)
