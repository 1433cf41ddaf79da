"""Engines run the seven steps of normal mode for one rank.

``KernelNormalEngine`` launches ``kernels/normal_*.cuh`` on the current stream.
``EmulatedNormalEngine`` is the CPU stand-in: the same steps, the same byte layout of the same
symmetric regions (``lowlat/normal/layout.py``), the same call counter, epoch flags, bounded waits and
status codes, written in PyTorch.  It exists so that the NormalBuffer API, its validation and the
protocol are tested on machines without a GPU; it says nothing about the kernels' speed.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..engines.base import EmulatedRegions
from ..jit import compile_all, get_kernel
from ..jit.launch import address, current_stream_handle, ensure_context
from ..ops.context import RankArgsContext, plan_with_rank
from .layout import NormalLayout, NormalStatus, NormalWord
from .ops import NormalKernels

_POLL_SECONDS = 50e-6
_CPU = torch.device("cpu")  # the emulated engine runs on CPU tensors only


@dataclasses.dataclass(frozen=True)
class NormalContext(RankArgsContext):
    """One rank of one NormalBuffer: its RankArgs (``state`` int64 [8]: call counter, status, block
    counters, :class:`NormalWord`; ``rank_mask`` all zero, normal mode masks no rank) and
    ``kernels``, its kernel specialisations."""

    kernels: NormalKernels = dataclasses.field(kw_only=True)

    @property
    def layout(self) -> NormalLayout:
        return self.kernels.layout


class KernelNormalEngine:
    """Each step is one launch of a plan prepared in :meth:`warmup` (at NormalBuffer construction):
    a call writes its arguments into the plan and launches it on the current stream."""

    def __init__(self, ctx: NormalContext):
        self.ctx = ctx
        self._plans: dict[str, object] = {}

    def warmup(self) -> None:
        kernels = self.ctx.kernels
        compile_all(kernels.all())
        device_index = self._device_index = self.ctx.device_index
        block = kernels.num_warps * 32
        for step in kernels.STEPS:
            kernel = get_kernel(getattr(kernels, step))
            _finish_loading(kernel.load(device_index))
            self._plans[step] = plan_with_rank(kernel, device_index, self.ctx.num_blocks, block, self.ctx.packed)

    def _launch(self, step: str, grid: int, *args) -> None:
        ensure_context(self._device_index)
        self._plans[step].launch_on(current_stream_handle(self._device_index), *map(_word, args), grid=grid)

    def dispatch_layout(self, topk_idx, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, *, num_blocks: int) -> None:
        n, k = topk_idx.shape
        grid = max(1, min(num_blocks, -(-n // self.ctx.kernels.num_warps)))
        self._launch("dispatch_layout", grid, topk_idx, topk_idx.dtype == torch.int64, n, k, num_tokens_per_rank, num_tokens_per_expert,
                     is_token_in_rank)

    def prepare(self, is_token_in_rank, send_pos, num_sent) -> None:
        self._launch("prepare", self.ctx.layout.shape.num_ranks, is_token_in_rank, is_token_in_rank.shape[0], send_pos, num_sent)

    def send(self, x, x_scales, topk_idx, topk_weights, send_pos, num_sent, num_tokens_per_expert, *, num_blocks: int) -> None:
        scale_strides = x_scales.stride() if x_scales is not None else (0, 0)
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        topk_int64 = topk_idx is not None and topk_idx.dtype == torch.int64
        self._launch("send", num_blocks, x, x.shape[1] * x.element_size(), x_scales, scale_strides[0], scale_strides[1], topk_idx,
                     topk_int64, topk_weights, num_topk, send_pos, num_sent, num_tokens_per_expert, x.shape[0])

    def counts(self, rank_prefix_matrix, recv_info, expert_alignment: int) -> None:
        self._launch("counts", 1, rank_prefix_matrix, recv_info, expert_alignment)

    def copy(self, recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, rank_prefix_matrix, *, num_blocks: int) -> None:
        num_topk = recv_topk_idx.shape[1] if recv_topk_idx is not None else 0
        topk_int64 = recv_topk_idx is not None and recv_topk_idx.dtype == torch.int64
        self._launch("copy", num_blocks, recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, rank_prefix_matrix,
                     recv_x.shape[0], recv_x.shape[1] * recv_x.element_size(), num_topk, topk_int64)

    def combine_send(self, x, topk_weights, rank_prefix_matrix, *, num_blocks: int) -> None:
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        self._launch("combine_send", num_blocks, x, topk_weights, num_topk, rank_prefix_matrix, x.shape[0])

    def combine_recv(self, out, out_weights, bias_0, bias_1, send_pos, *, num_blocks: int) -> None:
        num_topk = out_weights.shape[1] if out_weights is not None else 0
        self._launch("combine_recv", num_blocks, out, out_weights, bias_0, bias_1, send_pos, out.shape[0], num_topk)


def _word(value) -> int:
    """A per-call argument as the 64-bit word LaunchPlan.launch_on writes: a bool as 0 or 1, else
    what :func:`lowlat.jit.launch.address` makes of it (a tensor's address, 0 for None, an int)."""
    return int(value) if isinstance(value, bool) else address(value)


class EmulatedNormalEngine(EmulatedRegions):
    """The kernels' steps in PyTorch on the CPU, over the local transport's regions (see module doc).

    Virtual ranks driven from one host thread each behave like ranks running concurrently.
    ``EmulatedNormalEngine(ctx: NormalContext, transport: LocalTransport)``."""

    # -- region views ------------------------------------------------------------------------------

    def _flags(self, rank: int, parity: int) -> torch.Tensor:  # int64 [R]
        return self._bytes(rank, self.layout.parity_offset(parity) + self.layout.flags, 8 * self.shape.num_ranks).view(torch.int64)

    def _counts(self, rank: int, parity: int) -> torch.Tensor:  # int32 [R, R + L]
        width = self.layout.counts_width
        offset = self.layout.parity_offset(parity) + self.layout.counts
        return self._bytes(rank, offset, 4 * self.shape.num_ranks * width).view(torch.int32).view(self.shape.num_ranks, width)

    def _rows(self, rank: int, parity: int) -> torch.Tensor:  # uint8 [R, T, row_stride]
        s, stride = self.shape, self.layout.row.stride
        offset = self.layout.parity_offset(parity) + self.layout.staging
        return self._bytes(rank, offset, s.num_ranks * s.max_tokens_per_rank * stride).view(s.num_ranks, s.max_tokens_per_rank, stride)

    def _field(self, rows: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        """Typed view-copy of ``count`` elements of ``dtype`` at byte ``start`` of each row."""
        size = dtype.itemsize
        return rows[..., start: start + count * size].contiguous().view(dtype)

    # -- protocol helpers ---------------------------------------------------------------------------

    def _seq(self) -> int:
        return int(self.ctx.state[NormalWord.SEQ])

    def _report(self, code: NormalStatus, rank: int, value: int) -> None:
        word = (int(code) << 56) | ((rank & 0xFFFFFF) << 32) | (value & 0xFFFFFFFF)
        if int(self.ctx.state[NormalWord.STATUS]) == 0:
            self.ctx.state[NormalWord.STATUS] = word
            self.ctx.status[0] = word

    def _signal_all(self, parity: int, value: int) -> None:
        for peer in range(self.shape.num_ranks):
            self._flags(peer, parity)[self.ctx.rank] = value

    def _wait_sources(self, parity: int, expected: int) -> list[bool]:
        flags = self._flags(self.ctx.rank, parity)
        ok = []
        timeout_s = self.ctx.timeout_ns * 1e-9
        for src in range(self.shape.num_ranks):
            start = time.perf_counter()
            while True:
                value = int(flags[src])
                if value == expected:
                    ok.append(True)
                    break
                code = NormalStatus.OVERRUN if value > expected else NormalStatus.TIMEOUT
                if value > expected or time.perf_counter() - start > timeout_s:
                    self._report(code, src, expected)
                    ok.append(False)
                    break
                time.sleep(_POLL_SECONDS)
        return ok

    def _source_begins(self, rank_prefix_matrix: torch.Tensor) -> list[int]:
        return [0] + rank_prefix_matrix[:, self.ctx.rank].tolist()

    # -- steps --------------------------------------------------------------------------------------

    def dispatch_layout(self, topk_idx, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, *, num_blocks: int) -> None:
        s = self.shape
        topk = topk_idx.to(torch.int64)
        bad = (topk < -1) | (topk >= s.num_experts)
        if bool(bad.any()):
            self._report(NormalStatus.BAD_EXPERT, self.ctx.rank, int(topk[bad][0]))
            topk = torch.where(bad, -1, topk)
        valid = topk >= 0
        num_tokens_per_expert += torch.bincount(topk[valid], minlength=s.num_experts).to(torch.int32)
        owner = torch.where(valid, topk // s.num_local_experts, s.num_ranks)
        in_rank = torch.zeros(topk.shape[0], s.num_ranks + 1, dtype=torch.bool, device=_CPU).scatter_(1, owner, True)[:, : s.num_ranks]
        is_token_in_rank.copy_(in_rank)
        num_tokens_per_rank += in_rank.sum(0).to(torch.int32)

    def prepare(self, is_token_in_rank, send_pos, num_sent) -> None:
        flags = is_token_in_rank.to(torch.int32)
        before = torch.cumsum(flags, dim=0) - flags
        send_pos.copy_(torch.where(is_token_in_rank, before, -1))
        num_sent.copy_(flags.sum(0))

    def send(self, x, x_scales, topk_idx, topk_weights, send_pos, num_sent, num_tokens_per_expert, *, num_blocks: int) -> None:
        s, lay, me = self.shape, self.layout.row, self.ctx.rank
        seq = self._seq()
        parity = seq & 1
        data = _row_bytes(x)
        topk = None
        if topk_idx is not None:
            topk = topk_idx.to(torch.int64)
            bad = (topk < -1) | (topk >= s.num_experts)
            if bool(bad.any()):
                self._report(NormalStatus.BAD_EXPERT, me, int(topk[bad][0]))
                topk = torch.where(bad, -1, topk)
        for dst in range(s.num_ranks):
            tokens = (send_pos[:, dst] >= 0).nonzero().flatten()
            positions = send_pos[tokens, dst].long()
            rows = self._rows(dst, parity)[me]
            rows[positions, : data.shape[1]] = data[tokens]
            if x_scales is not None:
                rows[positions, lay.scales: lay.scales + 4 * s.num_groups] = x_scales[tokens].contiguous().view(torch.uint8)
            if topk is not None:
                k = topk.shape[1]
                rows[positions, lay.topk: lay.topk + 4 * k] = topk[tokens].to(torch.int32).view(torch.uint8)
                weights = topk_weights[tokens] if topk_weights is not None else torch.zeros(len(tokens), k, dtype=torch.float32, device=_CPU)
                rows[positions, lay.weights: lay.weights + 4 * k] = weights.contiguous().view(torch.uint8)
            rows[positions, lay.source: lay.source + 4] = tokens.to(torch.int32).view(-1, 1).view(torch.uint8)
            counts = self._counts(dst, parity)[me]
            counts[: s.num_ranks] = num_sent
            L = s.num_local_experts
            counts[s.num_ranks:] = num_tokens_per_expert[dst * L: (dst + 1) * L] if num_tokens_per_expert is not None else 0
        self._signal_all(parity, seq + 1)

    def counts(self, rank_prefix_matrix, recv_info, expert_alignment: int) -> None:
        s = self.shape
        seq = self._seq()
        parity = seq & 1
        ok = torch.tensor(self._wait_sources(parity, seq + 1), dtype=torch.int32, device=_CPU)
        counts = self._counts(self.ctx.rank, parity) * ok.view(-1, 1)  # [src, R + L]
        rank_prefix_matrix.copy_(torch.cumsum(counts[:, : s.num_ranks], dim=0))
        per_expert = counts[:, s.num_ranks:].sum(0)
        recv_info[0] = rank_prefix_matrix[-1, self.ctx.rank]
        recv_info[1:] = (per_expert + expert_alignment - 1) // expert_alignment * expert_alignment

    def copy(self, recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, rank_prefix_matrix, *, num_blocks: int) -> None:
        s, lay, me = self.shape, self.layout.row, self.ctx.rank
        seq = self._seq()
        parity = seq & 1
        begin = self._source_begins(rank_prefix_matrix)
        num_rows, num_recv = recv_x.shape[0], begin[-1]
        if num_recv > num_rows:
            self._report(NormalStatus.RECV_OVERFLOW, me, num_recv)
        out_bytes = _row_bytes(recv_x)
        L = s.num_local_experts
        for src in range(s.num_ranks):
            first, last = begin[src], min(begin[src + 1], num_rows)
            if last <= first:
                continue
            rows = self._rows(me, parity)[src, : last - first]
            out_bytes[first:last] = rows[:, : out_bytes.shape[1]]
            recv_src_idx[first:last] = self._field(rows, lay.source, 1, torch.int32).view(-1)
            if recv_scales is not None:
                recv_scales[first:last] = self._field(rows, lay.scales, s.num_groups, torch.float32)
            if recv_topk_idx is not None:
                k = recv_topk_idx.shape[1]
                expert = self._field(rows, lay.topk, k, torch.int32).to(torch.int64)
                mine = (expert >= me * L) & (expert < (me + 1) * L)
                recv_topk_idx[first:last] = torch.where(mine, expert - me * L, -1).to(recv_topk_idx.dtype)
                if recv_topk_weights is not None:
                    recv_topk_weights[first:last] = torch.where(mine, self._field(rows, lay.weights, k, torch.float32), 0.0)
        pad = min(num_recv, num_rows)
        recv_src_idx[pad:] = -1
        if recv_topk_idx is not None:
            recv_topk_idx[pad:] = -1
        if recv_topk_weights is not None:
            recv_topk_weights[pad:] = 0.0
        self.ctx.state[NormalWord.SEQ] = seq + 1

    def combine_send(self, x, topk_weights, rank_prefix_matrix, *, num_blocks: int) -> None:
        s, lay, me = self.shape, self.layout.row, self.ctx.rank
        seq = self._seq()
        parity = seq & 1
        begin = self._source_begins(rank_prefix_matrix)
        data = _row_bytes(x)
        for src in range(s.num_ranks):
            first, last = begin[src], min(begin[src + 1], x.shape[0])
            if last <= first:
                continue
            rows = self._rows(src, parity)[me, : last - first]
            rows[:, : 2 * s.hidden] = data[first:last]
            if topk_weights is not None:
                rows[:, lay.weights: lay.weights + 4 * topk_weights.shape[1]] = topk_weights[first:last].contiguous().view(torch.uint8)
        self._signal_all(parity, seq + 1)

    def combine_recv(self, out, out_weights, bias_0, bias_1, send_pos, *, num_blocks: int) -> None:
        s, lay = self.shape, self.layout.row
        seq = self._seq()
        parity = seq & 1
        ok = self._wait_sources(parity, seq + 1)
        n = out.shape[0]
        acc = torch.zeros(n, s.hidden, dtype=torch.float32, device=_CPU)
        for bias in (bias_0, bias_1):
            if bias is not None:
                acc = acc + bias.float()
        k = out_weights.shape[1] if out_weights is not None else 0
        weights = torch.zeros(n, k, dtype=torch.float32, device=_CPU)
        for src in range(s.num_ranks):
            present = (send_pos[:, src] >= 0) & ok[src]
            tokens = present.nonzero().flatten()
            rows = self._rows(self.ctx.rank, parity)[src, send_pos[tokens, src].long()]
            acc[tokens] = acc[tokens] + self._field(rows, 0, s.hidden, torch.bfloat16).float()
            if k:
                weights[tokens] = weights[tokens] + self._field(rows, lay.weights, k, torch.float32)
        out.copy_(acc.to(torch.bfloat16))
        if out_weights is not None:
            out_weights.copy_(weights)
        self.ctx.state[NormalWord.SEQ] = seq + 1


def _finish_loading(kernel) -> None:
    """Under lazy loading (CUDA_MODULE_LOADING=LAZY, PyTorch's default) make sure the kernel's code is
    on the device now: a first load inside a call may wait for the whole context, and a peer's
    kernel that spins for this rank's launch would hold it until the timeout."""
    from cuda.bindings import driver

    if not hasattr(driver, "cuFuncLoad"):  # CUDA < 12.4: cuKernelGetFunction in Kernel.load is all there is
        return
    err, function = driver.cuKernelGetFunction(kernel.handle)
    if err == driver.CUresult.CUDA_SUCCESS:
        driver.cuFuncLoad(function)


def _row_bytes(t: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, row bytes]`` view of a contiguous 2-D tensor (also with zero rows)."""
    return t.view(torch.uint8).view(t.shape[0], t.shape[1] * t.element_size())
