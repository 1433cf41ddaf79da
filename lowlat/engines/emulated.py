"""The CPU engine: the kernels' protocol, step for step, in PyTorch.

It reads and writes the same bytes of the same symmetric regions (``lowlat/layout.py``), advances the
same sequence numbers, waits on the same epoch flags (with the Buffer's timeout, polling), masks late
ranks and reports through the same status word.  Virtual ranks driven from several host threads
behave like ranks running concurrently; driven from one thread, hook mode (all sends, then all
receives) is the way to run them, exactly as on the GPU.
"""

from __future__ import annotations

import time

import torch

from .. import formats
from ..layout import StateWord, StatusCode
from ..ops.dispatch import DispatchOutputs
from .base import EmulatedRegions, Engine

_POLL_SECONDS = 50e-6


class EmulatedEngine(EmulatedRegions, Engine):
    """``EmulatedEngine(ctx: RankContext, transport: LocalTransport)``: one rank's four halves on the CPU."""

    # -- region views ------------------------------------------------------------------------------

    def _flags(self, rank: int, parity: int, field: int) -> torch.Tensor:
        return self._bytes(rank, self.layout.parity_offset(parity) + field, 8 * self.shape.num_ranks).view(torch.int64)

    def _dispatch_counts(self, rank: int, parity: int) -> torch.Tensor:  # int32 [L, R]
        s = self.shape
        offset = self.layout.parity_offset(parity) + self.layout.dispatch_count
        return self._bytes(rank, offset, 4 * s.num_local_experts * s.num_ranks).view(torch.int32).view(s.num_local_experts, s.num_ranks)

    def _dispatch_routes(self, rank: int, parity: int) -> torch.Tensor:  # int32 [L, R, T]
        s = self.shape
        offset = self.layout.parity_offset(parity) + self.layout.dispatch_route
        size = 4 * s.num_local_experts * s.num_ranks * s.max_tokens_per_rank
        return self._bytes(rank, offset, size).view(torch.int32).view(s.num_local_experts, s.num_ranks, s.max_tokens_per_rank)

    def _dispatch_messages(self, rank: int, parity: int) -> torch.Tensor:  # uint8 [R, T, stride]
        s = self.shape
        offset = self.layout.parity_offset(parity) + self.layout.dispatch_staging
        return self._bytes(rank, offset, s.num_ranks * s.max_tokens_per_rank * s.message_stride).view(
            s.num_ranks, s.max_tokens_per_rank, s.message_stride)

    def _combine_slots(self, rank: int, parity: int) -> torch.Tensor:  # uint8 [T, K, stride]
        s = self.shape
        offset = self.layout.parity_offset(parity) + self.layout.combine_staging
        return self._bytes(rank, offset, s.max_tokens_per_rank * s.num_topk * s.combine_slot_stride).view(
            s.max_tokens_per_rank, s.num_topk, s.combine_slot_stride)

    # -- protocol helpers ---------------------------------------------------------------------------

    def _seq(self, word: StateWord) -> int:
        return int(self.ctx.state[word])

    def _report(self, code: StatusCode, rank: int, value: int) -> None:
        word = (int(code) << 56) | ((rank & 0xFFFFFF) << 32) | (value & 0xFFFFFFFF)
        if int(self.ctx.state[StateWord.STATUS]) == 0:  # first error wins, mirrored like the kernels do
            self.ctx.state[StateWord.STATUS] = word
            self.ctx.status[0] = word

    def _masked(self) -> list[bool]:
        return [bool(m) for m in self.ctx.rank_mask.tolist()]

    def _signal_all(self, parity: int, field: int, value: int) -> None:
        for peer, masked in enumerate(self._masked()):
            if not masked:
                self._flags(peer, parity, field)[self.ctx.rank] = value

    def _wait_sources(self, parity: int, field: int, expected: int, wait_cost_stats) -> torch.Tensor:
        """bool [R]: which sources' data is valid for this call (the kernels' wait_all_sources)."""
        flags = self._flags(self.ctx.rank, parity, field)
        ok = torch.zeros(self.shape.num_ranks, dtype=torch.bool, device=flags.device)
        timeout_s = self.ctx.timeout_ns * 1e-9
        for src, masked in enumerate(self._masked()):
            if masked:
                continue
            start = time.perf_counter()
            while True:
                value = int(flags[src])
                if value == expected:
                    ok[src] = True
                    break
                if value > expected:
                    self._report(StatusCode.OVERRUN, src, expected)
                    break
                if time.perf_counter() - start > timeout_s:
                    self.ctx.rank_mask[src] = 1
                    self._report(StatusCode.TIMEOUT, src, expected)
                    break
                time.sleep(_POLL_SECONDS)
            if wait_cost_stats is not None:  # nanoseconds here, GPU clock cycles on the device
                wait_cost_stats[src] += int((time.perf_counter() - start) * 1e9)
        return ok

    def _checked_num_tokens(self, num_tokens: int, num_tokens_device) -> int:
        n = int(num_tokens_device.reshape(-1)[0]) if num_tokens_device is not None else num_tokens
        if not 0 <= n <= self.shape.max_tokens_per_rank:
            self._report(StatusCode.BAD_NUM_TOKENS, self.ctx.rank, n)
            return 0
        return n

    # -- dispatch -----------------------------------------------------------------------------------

    def dispatch_send(self, x, topk_idx, num_tokens, num_tokens_device, use_fp8, round_scale, stream=None):
        s, me = self.shape, self.ctx.rank
        seq = self._seq(StateWord.DISPATCH_SEND_SEQ)
        if seq - self._seq(StateWord.DISPATCH_RECV_SEQ) >= 2:
            return self._report(StatusCode.TOO_MANY_IN_FLIGHT, me, seq)
        n = self._checked_num_tokens(num_tokens, num_tokens_device)
        parity = seq & 1
        topk = topk_idx[:n].to(torch.int64)
        bad = (topk < -1) | (topk >= s.num_experts)
        if bool(bad.any()):
            self._report(StatusCode.BAD_EXPERT, me, int(topk[bad][0]))
            topk = torch.where(bad, -1, topk)

        if use_fp8:
            quantized = formats.quantize_fp8(x[:n], round_scale=round_scale)
            messages = torch.cat([quantized.data.view(torch.uint8), quantized.scales.contiguous().view(torch.uint8)], dim=1)
        else:
            messages = x[:n].contiguous().view(torch.uint8)
        dst = torch.where(topk >= 0, topk // s.num_local_experts, -1)
        for peer, masked in enumerate(self._masked()):
            if masked:
                continue
            to_peer = dst == peer
            tokens = to_peer.any(dim=1).nonzero().flatten()
            self._dispatch_messages(peer, parity)[me, tokens, : messages.shape[1]] = messages[tokens]
            # Routing table: (token, k) pairs for each local expert of `peer`, in token order.
            token_idx, k_idx = to_peer.nonzero(as_tuple=True)
            local_expert = topk[token_idx, k_idx] - peer * s.num_local_experts
            order = torch.sort(local_expert, stable=True).indices
            local_expert, token_idx, k_idx = local_expert[order], token_idx[order], k_idx[order]
            counts = torch.bincount(local_expert, minlength=s.num_local_experts)
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(len(local_expert), dtype=torch.int64, device=x.device) - starts[local_expert]
            keep = position < s.max_tokens_per_rank
            if not bool(keep.all()):
                self._report(StatusCode.ROUTE_OVERFLOW, me, int(local_expert[~keep][0]) + peer * s.num_local_experts)
            routes = self._dispatch_routes(peer, parity)
            routes[local_expert[keep], me, position[keep]] = ((token_idx[keep] << 5) | k_idx[keep]).to(torch.int32)
            self._dispatch_counts(peer, parity)[:, me] = counts.clamp_max(s.max_tokens_per_rank).to(torch.int32)
        self._signal_all(parity, self.layout.dispatch_flags, seq + 1)
        self.ctx.state[StateWord.DISPATCH_SEND_SEQ] = seq + 1

    def dispatch_recv(self, out: DispatchOutputs, use_fp8, use_ue8m0, cumulative_recv_stats, wait_cost_stats, stream=None):
        s, me = self.shape, self.ctx.rank
        seq = self._seq(StateWord.DISPATCH_RECV_SEQ)
        if seq >= self._seq(StateWord.DISPATCH_SEND_SEQ):
            out.recv_count.zero_()
            return self._report(StatusCode.RECV_WITHOUT_SEND, me, seq)
        parity = seq & 1
        ok = self._wait_sources(parity, self.layout.dispatch_flags, seq + 1, wait_cost_stats)
        counts = (self._dispatch_counts(me, parity).to(torch.int64) * ok).clamp_max(s.max_tokens_per_rank)  # [L, R]
        begins = torch.cumsum(counts, dim=1) - counts
        totals = counts.sum(dim=1)
        out.recv_count.copy_(totals.to(torch.int32))
        out.recv_layout_range.copy_((begins << 32) | counts)
        if cumulative_recv_stats is not None:
            cumulative_recv_stats += totals.to(cumulative_recv_stats.dtype)
        routes = self._dispatch_routes(me, parity)
        messages = self._dispatch_messages(me, parity)
        data_bytes = s.hidden if use_fp8 else 2 * s.hidden
        rows_bytes = s.num_local_experts * s.rows_per_expert * data_bytes  # fp8 rows are packed at the front
        recv_bytes = out.recv_x.view(-1)[:rows_bytes].view(s.num_local_experts, s.rows_per_expert, data_bytes)
        for local_expert in range(s.num_local_experts):
            for src in range(s.num_ranks):
                count, begin = int(counts[local_expert, src]), int(begins[local_expert, src])
                if count == 0:
                    continue
                entries = routes[local_expert, src, :count].to(torch.int64)
                tokens, ks = (entries >> 5).clamp_max(s.max_tokens_per_rank - 1), entries & 31
                rows = torch.arange(begin, begin + count, dtype=torch.int64, device=out.recv_x.device)
                message = messages[src, tokens]
                recv_bytes[local_expert, rows] = message[:, :data_bytes]
                out.recv_src_info[local_expert, rows] = tokens.to(torch.int32)
                out.recv_src_topk[local_expert, rows] = ks.to(torch.int32)
                if use_fp8:
                    scales = message[:, s.hidden: s.hidden + 4 * s.num_groups].contiguous().view(torch.float32)
                    self._store_scales(out.recv_scales, local_expert, rows, scales, use_ue8m0)
        self.ctx.state[StateWord.DISPATCH_RECV_SEQ] = seq + 1

    def _store_scales(self, storage: torch.Tensor, local_expert: int, rows: torch.Tensor, scales: torch.Tensor, use_ue8m0: bool):
        s = self.shape
        if use_ue8m0:
            words = storage.view(torch.int32).view(-1)[: s.num_local_experts * s.num_ue8m0_words * s.scale_row_stride]
            words.view(s.num_local_experts, s.num_ue8m0_words, s.scale_row_stride)[local_expert][:, rows] = formats.pack_ue8m0(scales).T
        else:
            storage.view(torch.float32).view(s.num_local_experts, s.num_groups, s.scale_row_stride)[local_expert][:, rows] = scales.T

    # -- combine ------------------------------------------------------------------------------------

    def combine_send(self, x, layout: DispatchOutputs, use_logfmt, stream=None):
        s, me = self.shape, self.ctx.rank
        seq = self._seq(StateWord.COMBINE_SEND_SEQ)
        if seq - self._seq(StateWord.COMBINE_RECV_SEQ) >= 2:
            return self._report(StatusCode.TOO_MANY_IN_FLIGHT, me, seq)
        parity = seq & 1
        masked = self._masked()
        ranges = layout.recv_layout_range.to(torch.int64)
        for local_expert in range(s.num_local_experts):
            for src in range(s.num_ranks):
                begin, count = int(ranges[local_expert, src] >> 32), int(ranges[local_expert, src] & 0xFFFFFFFF)
                if count == 0 or masked[src]:
                    continue
                rows = torch.arange(begin, begin + count, dtype=torch.int64, device=x.device)
                tokens = layout.recv_src_info[local_expert, rows].to(torch.int64)
                ks = layout.recv_src_topk[local_expert, rows].to(torch.int64)
                valid = (tokens >= 0) & (tokens < s.max_tokens_per_rank) & (ks >= 0) & (ks < s.num_topk)
                values = x[local_expert, rows[valid]]
                payload = formats.logfmt_pack(formats.logfmt_encode(values)) if use_logfmt else values.contiguous().view(torch.uint8)
                self._combine_slots(src, parity)[tokens[valid], ks[valid], : payload.shape[1]] = payload
        self._signal_all(parity, self.layout.combine_flags, seq + 1)
        self.ctx.state[StateWord.COMBINE_SEND_SEQ] = seq + 1

    def combine_recv(self, out, topk_idx, topk_weights, num_tokens, num_tokens_device, use_logfmt, wait_cost_stats, stream=None):
        s, me = self.shape, self.ctx.rank
        seq = self._seq(StateWord.COMBINE_RECV_SEQ)
        if seq >= self._seq(StateWord.COMBINE_SEND_SEQ):
            return self._report(StatusCode.RECV_WITHOUT_SEND, me, seq)
        parity = seq & 1
        ok = self._wait_sources(parity, self.layout.combine_flags, seq + 1, wait_cost_stats)
        # Like the kernel: the device count is clamped to [0, min(rows of out, T)], never reported (the
        # dispatch send already reported a bad one).
        n = int(num_tokens_device.reshape(-1)[0]) if num_tokens_device is not None else num_tokens
        n = max(0, min(n, out.shape[0], s.max_tokens_per_rank))
        slots = self._combine_slots(me, parity)[:n]
        if use_logfmt:
            values = formats.logfmt_decode(formats.logfmt_unpack(slots[..., : formats.logfmt_slot_bytes(s.hidden)].contiguous(), s.hidden))
        else:
            values = slots[..., : 2 * s.hidden].contiguous().view(torch.bfloat16).float()
        topk = topk_idx[:n].to(torch.int64)
        in_range = (topk >= 0) & (topk < s.num_experts)
        valid = in_range & ok[torch.where(in_range, topk // s.num_local_experts, 0)]
        acc = torch.zeros(n, s.hidden, dtype=torch.float32, device=out.device)
        for k in range(s.num_topk):
            product = values[:, k] * topk_weights[:n, k: k + 1]
            acc = acc + torch.where(valid[:, k: k + 1], product, 0.0)
        out[:n] = acc.to(torch.bfloat16)
        out[n:] = 0
        self.ctx.state[StateWord.COMBINE_RECV_SEQ] = seq + 1
