"""Host side of ``kernels/normal_*.cuh``: kernel specialisations and one launcher per kernel.

Every normal-mode kernel is specialised on the NormalBuffer's shapes only (:class:`NormalKernels`);
the choices a call makes (bf16 or FP8 rows, int32 or int64 top-k, with or without weights, scales,
bias) are run-time arguments, so a NormalBuffer compiles seven kernels once, at construction.
"""

from __future__ import annotations

import dataclasses

from ..jit import ArgKind, KernelSpec, Param
from ..ops.context import RANK_PARAM
from .layout import NormalLayout

LAYOUT_SIGNATURE = (
    Param("topk_idx", ArgKind.PTR), Param("topk_int64", ArgKind.BOOL), Param("num_tokens", ArgKind.I32), Param("num_topk", ArgKind.I32),
    Param("num_tokens_per_rank", ArgKind.PTR), Param("num_tokens_per_expert", ArgKind.PTR), Param("is_token_in_rank", ArgKind.PTR),
    RANK_PARAM,
)
PREPARE_SIGNATURE = (
    Param("is_token_in_rank", ArgKind.PTR), Param("num_tokens", ArgKind.I32), Param("send_pos", ArgKind.PTR), Param("num_sent", ArgKind.PTR),
)
SEND_SIGNATURE = (
    Param("x", ArgKind.PTR), Param("data_bytes", ArgKind.I32), Param("x_scales", ArgKind.PTR),
    Param("scale_token_stride", ArgKind.I64), Param("scale_group_stride", ArgKind.I64),
    Param("topk_idx", ArgKind.PTR), Param("topk_int64", ArgKind.BOOL), Param("topk_weights", ArgKind.PTR), Param("num_topk", ArgKind.I32),
    Param("send_pos", ArgKind.PTR), Param("num_sent", ArgKind.PTR), Param("num_tokens_per_expert", ArgKind.PTR),
    Param("num_tokens", ArgKind.I32), RANK_PARAM,
)
COUNTS_SIGNATURE = (
    Param("rank_prefix_matrix", ArgKind.PTR), Param("recv_info", ArgKind.PTR), Param("expert_alignment", ArgKind.I32), RANK_PARAM,
)
COPY_SIGNATURE = (
    Param("recv_x", ArgKind.PTR), Param("recv_scales", ArgKind.PTR), Param("recv_topk_idx", ArgKind.PTR),
    Param("recv_topk_weights", ArgKind.PTR), Param("recv_src_idx", ArgKind.PTR), Param("rank_prefix_matrix", ArgKind.PTR),
    Param("num_rows", ArgKind.I32), Param("data_bytes", ArgKind.I32), Param("num_topk", ArgKind.I32), Param("topk_int64", ArgKind.BOOL),
    RANK_PARAM,
)
COMBINE_SEND_SIGNATURE = (
    Param("x", ArgKind.PTR), Param("topk_weights", ArgKind.PTR), Param("num_topk", ArgKind.I32),
    Param("rank_prefix_matrix", ArgKind.PTR), Param("num_rows", ArgKind.I32), RANK_PARAM,
)
COMBINE_RECV_SIGNATURE = (
    Param("out", ArgKind.PTR), Param("out_weights", ArgKind.PTR), Param("bias_0", ArgKind.PTR), Param("bias_1", ArgKind.PTR),
    Param("send_pos", ArgKind.PTR), Param("num_tokens", ArgKind.I32), Param("num_topk", ArgKind.I32), RANK_PARAM,
)


@dataclasses.dataclass(frozen=True)
class NormalKernels:
    """The seven kernel specialisations of one NormalBuffer shape (block size ``num_warps * 32``)."""

    layout: NormalLayout
    num_warps: int = 16

    def _spec(self, header: str, kernel: str, signature) -> KernelSpec:
        return KernelSpec.make(header, f"lowlat::normal::{kernel}", signature, dict(self.layout.constants(), kNumWarps=self.num_warps))

    @property
    def dispatch_layout(self) -> KernelSpec:
        return self._spec("normal_layout.cuh", "normal_dispatch_layout", LAYOUT_SIGNATURE)

    @property
    def prepare(self) -> KernelSpec:
        return self._spec("normal_dispatch.cuh", "normal_dispatch_prepare", PREPARE_SIGNATURE)

    @property
    def send(self) -> KernelSpec:
        return self._spec("normal_dispatch.cuh", "normal_dispatch_send", SEND_SIGNATURE)

    @property
    def counts(self) -> KernelSpec:
        return self._spec("normal_dispatch.cuh", "normal_dispatch_counts", COUNTS_SIGNATURE)

    @property
    def copy(self) -> KernelSpec:
        return self._spec("normal_dispatch.cuh", "normal_dispatch_copy", COPY_SIGNATURE)

    @property
    def combine_send(self) -> KernelSpec:
        return self._spec("normal_combine.cuh", "normal_combine_send", COMBINE_SEND_SIGNATURE)

    @property
    def combine_recv(self) -> KernelSpec:
        return self._spec("normal_combine.cuh", "normal_combine_recv", COMBINE_RECV_SIGNATURE)

    STEPS = ("dispatch_layout", "prepare", "send", "counts", "copy", "combine_send", "combine_recv")

    def all(self) -> list[KernelSpec]:
        return [getattr(self, step) for step in self.STEPS]

