"""Pure-torch ground truth of low-latency dispatch and combine over R ranks (DeepEP-LL semantics).

The functions take every rank's inputs at once and return what every rank should see, so tests can
compare one rank's kernel output against ``result[rank]``.

Routing
    ``num_experts`` E experts are spread evenly: ``num_local_experts`` L = E // R, and global expert
    e lives on rank ``e // L`` as local expert ``e % L``.  Rank s sends its token t to every expert
    named in ``topk_idx_s[t]`` (-1 = no expert); naming an expert twice is an error.

Dispatch
    Receiving rank r gets, for each local expert l, one row per (source rank, source token, top-k
    slot) routed to global expert ``r * L + l``, packed at the front of a ``[L, R * T, hidden]``
    buffer (T = max_tokens_per_rank) in canonical order: source rank ascending, then source token
    ascending.  The kernels may order rows differently; the ``src_*`` fields say which row is which.

Combine
    Each rank's expert outputs ``y`` share the layout of its dispatch result.  Source token t of rank
    s becomes ``sum_k w[t, k] * y_row(s, t, k)`` over its valid slots in ascending k, accumulated in
    float32 as ``acc = acc + (value * w)`` (product rounded first; no FMA), then rounded to bf16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lowlat.errors import ArgumentError, ArgumentTypeError
from lowlat.formats import FP8_GROUP, logfmt_roundtrip, quantize_fp8

@dataclass(frozen=True)
class ReferenceDispatch:
    """What one receiving rank gets from a low-latency dispatch (R ranks, T = max_tokens_per_rank)."""

    recv_count: Tensor  # int32 [L], rows received per local expert
    recv_x: Tensor  # [L, R*T, hidden] bf16 or float8_e4m3fn; zero past recv_count
    recv_scales: Tensor | None  # float32 [L, R*T, hidden/128] scale_inv (fp8 only); zero past count
    src_rank: Tensor  # int32 [L, R*T], -1 past recv_count
    src_token: Tensor  # int32 [L, R*T], -1 past recv_count
    src_topk: Tensor  # int32 [L, R*T], slot k in the source token's topk row, -1 past recv_count


@dataclass(frozen=True)
class _Routes:
    """Every valid (source rank, token, slot) in canonical order, int64 ``[M]`` each."""

    expert: Tensor  # global expert, ascending
    src_rank: Tensor
    src_token: Tensor
    src_topk: Tensor
    row: Tensor  # row within the expert's receive buffer


# -------------------------------------------------------------------------------------- validation

def _check_num_experts(num_experts: int, num_ranks: int) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise ArgumentTypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts <= 0 or num_experts % num_ranks != 0:
        raise ArgumentError(f"num_experts={num_experts} must be a positive multiple of the number of "
                            f"ranks {num_ranks}")
    return num_experts // num_ranks


def _check_topk_idxs(topk_idxs: Sequence[Tensor], num_experts: int) -> int:
    """Validate every rank's ``topk_idx [n_r, K]``; return ``num_topk`` K (the same on every rank)."""
    if len(topk_idxs) == 0:
        raise ArgumentError("topk_idxs must hold one tensor per rank, got an empty sequence")
    num_topk = None
    for rank, topk in enumerate(topk_idxs):
        name = f"topk_idxs[{rank}]"
        if not isinstance(topk, Tensor) or topk.dtype not in (torch.int64, torch.int32):
            raise ArgumentTypeError(f"{name} must be an int64 or int32 tensor, "
                                    f"got {getattr(topk, 'dtype', type(topk).__name__)}")
        if topk.dim() != 2 or (num_topk is not None and topk.shape[1] != num_topk):
            raise ArgumentError(f"{name} must be [num_tokens, {num_topk or 'num_topk'}], "
                                f"got shape {tuple(topk.shape)}")
        num_topk = topk.shape[1]
        bad = ((topk < -1) | (topk >= num_experts)).nonzero()
        if len(bad):
            token, slot = bad[0].tolist()
            raise ArgumentError(f"{name}[{token}, {slot}] = {int(topk[token, slot])} is outside "
                                f"[-1, num_experts={num_experts})")
        ordered = topk.sort(dim=-1).values
        repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).nonzero()
        if len(repeated):
            token, slot = repeated[0].tolist()
            raise ArgumentError(f"{name}: rank {rank} token {token} names expert "
                                f"{int(ordered[token, slot])} more than once")
    return num_topk


def _check_tokens(xs: Sequence[Tensor], topk_idxs: Sequence[Tensor], max_tokens_per_rank: int) -> int:
    """Validate every rank's bf16 ``x [n_r, hidden]`` against its topk rows; return hidden."""
    if len(xs) != len(topk_idxs):
        raise ArgumentError(f"xs and topk_idxs must both have one entry per rank, got {len(xs)} "
                            f"and {len(topk_idxs)}")
    hidden = None
    for rank, (x, topk) in enumerate(zip(xs, topk_idxs)):
        if not isinstance(x, Tensor) or x.dtype != torch.bfloat16:
            raise ArgumentTypeError(f"xs[{rank}] must be a bfloat16 tensor, "
                                    f"got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 2 or x.shape[0] != topk.shape[0] or (hidden is not None and x.shape[1] != hidden):
            raise ArgumentError(f"xs[{rank}] must be [num_tokens={topk.shape[0]}, hidden"
                                f"{'' if hidden is None else '=' + str(hidden)}], got shape {tuple(x.shape)}")
        hidden = x.shape[1]
        if x.shape[0] > max_tokens_per_rank:
            raise ArgumentError(f"xs[{rank}] has {x.shape[0]} tokens, more than "
                                f"max_tokens_per_rank={max_tokens_per_rank}")
    if hidden % FP8_GROUP != 0 or hidden == 0:
        raise ArgumentError(f"hidden must be a positive multiple of {FP8_GROUP}, got xs[0].shape[1]={hidden}")
    return hidden


# ------------------------------------------------------------------------------------------ routing

def _route(topk_idxs: Sequence[Tensor], num_experts: int, max_tokens_per_rank: int) -> _Routes:
    """Flatten every rank's valid (token, slot) pairs and sort them by (expert, rank, token)."""
    num_ranks = len(topk_idxs)
    parts = []
    for rank, topk in enumerate(topk_idxs):
        token, slot = (topk >= 0).nonzero(as_tuple=True)
        parts.append(torch.stack((topk[token, slot].long(), torch.full_like(token, rank), token, slot)))
    expert, src_rank, src_token, src_topk = torch.cat(parts, dim=1)
    # (expert, rank, token) is unique because no token names an expert twice.
    key = (expert * num_ranks + src_rank) * max_tokens_per_rank + src_token
    order = key.sort(stable=True).indices
    expert, src_rank, src_token, src_topk = (v[order] for v in (expert, src_rank, src_token, src_topk))
    rows_per_expert = torch.bincount(expert, minlength=num_experts)
    first_row = torch.cumsum(rows_per_expert, 0) - rows_per_expert
    row = torch.arange(len(expert), dtype=torch.int64, device=expert.device) - first_row[expert]
    return _Routes(expert=expert, src_rank=src_rank, src_token=src_token, src_topk=src_topk, row=row)


def route_counts(topk_idxs: Sequence[Tensor], num_experts: int) -> Tensor:
    """int32 ``[R, E]``: how many tokens rank r sends to expert e (each token counts once per expert)."""
    _check_topk_idxs(topk_idxs, num_experts)
    counts = [torch.bincount(topk[topk >= 0].long(), minlength=num_experts) for topk in topk_idxs]
    return torch.stack(counts).to(torch.int32)


# ----------------------------------------------------------------------------------------- dispatch

def reference_dispatch(xs: Sequence[Tensor], topk_idxs: Sequence[Tensor], *, num_experts: int,
                       max_tokens_per_rank: int, use_fp8: bool = True,
                       round_scale: bool = False) -> list[ReferenceDispatch]:
    """Low-latency dispatch over ``R = len(xs)`` ranks; returns one ``ReferenceDispatch`` per rank.

    ``xs[r]``: bf16 ``[n_r, hidden]`` with ``n_r <= max_tokens_per_rank`` and hidden % 128 == 0.
    ``topk_idxs[r]``: int64 or int32 ``[n_r, num_topk]``, entries in ``[-1, num_experts)``.
    With ``use_fp8`` each source token is quantised once with ``formats.quantize_fp8(x,
    round_scale=round_scale)`` and its data and scales are copied to every expert it names.
    """
    num_ranks = len(xs)
    if num_ranks == 0:
        raise ArgumentError("xs must hold one tensor per rank, got an empty sequence")
    num_local_experts = _check_num_experts(num_experts, num_ranks)
    if max_tokens_per_rank <= 0:
        raise ArgumentError(f"max_tokens_per_rank must be positive, got {max_tokens_per_rank}")
    _check_topk_idxs(topk_idxs, num_experts)
    hidden = _check_tokens(xs, topk_idxs, max_tokens_per_rank)
    routes = _route(topk_idxs, num_experts, max_tokens_per_rank)

    # One payload row per source token, all ranks concatenated; quantised once per token.
    if use_fp8:
        quantised = [quantize_fp8(x, round_scale=round_scale) for x in xs]
        payload = torch.cat([q.data for q in quantised])
        payload_scales = torch.cat([q.scales for q in quantised])
    else:
        payload, payload_scales = torch.cat(list(xs)), None
    device = xs[0].device
    first_token = torch.cumsum(torch.tensor([0] + [len(x) for x in xs[:-1]], dtype=torch.int64, device=device), 0)
    payload_row = first_token[routes.src_rank] + routes.src_token
    rows_per_expert = torch.bincount(routes.expert, minlength=num_experts).to(torch.int32)

    capacity = num_ranks * max_tokens_per_rank
    results = []
    for rank in range(num_ranks):
        mine = routes.expert // num_local_experts == rank
        local, row, src = routes.expert[mine] % num_local_experts, routes.row[mine], payload_row[mine]

        recv_x = torch.zeros(num_local_experts, capacity, hidden, dtype=payload.dtype, device=device)
        recv_x[local, row] = payload[src]
        recv_scales = None
        if payload_scales is not None:
            recv_scales = torch.zeros(num_local_experts, capacity, hidden // FP8_GROUP, dtype=torch.float32, device=device)
            recv_scales[local, row] = payload_scales[src]

        src_rank, src_token, src_topk = (
            torch.full((num_local_experts, capacity), -1, dtype=torch.int32, device=device).index_put_((local, row), v[mine].int())
            for v in (routes.src_rank, routes.src_token, routes.src_topk))
        results.append(ReferenceDispatch(
            recv_count=rows_per_expert[rank * num_local_experts:(rank + 1) * num_local_experts].clone(),
            recv_x=recv_x, recv_scales=recv_scales, src_rank=src_rank, src_token=src_token, src_topk=src_topk))
    return results


# ------------------------------------------------------------------------------------------ combine

def reference_combine(expert_outputs: Sequence[Tensor], dispatches: Sequence[ReferenceDispatch],
                      topk_idxs: Sequence[Tensor], topk_weights: Sequence[Tensor], *,
                      use_logfmt: bool = False) -> list[Tensor]:
    """Low-latency combine; returns bf16 ``[n_s, hidden]`` for every source rank s.

    ``expert_outputs[r]``: bf16 ``[L, R*T, hidden]``, laid out like ``dispatches[r]`` (row j of local
    expert l answers ``(src_rank, src_token, src_topk)[l, j]``).  ``topk_idxs[s]`` / ``topk_weights[s]``:
    the source rank's routing, int ``[n_s, K]`` / float32 ``[n_s, K]``.  With ``use_logfmt`` every
    expert row is replaced by ``formats.logfmt_roundtrip(row)`` (what the wire delivers) before the
    weighted sum.  Tokens with no valid expert come out as zeros.
    """
    num_ranks = len(expert_outputs)
    if not (num_ranks == len(dispatches) == len(topk_idxs) == len(topk_weights)) or num_ranks == 0:
        raise ArgumentError(f"expert_outputs, dispatches, topk_idxs and topk_weights must each hold one "
                            f"entry per rank, got {len(expert_outputs)}, {len(dispatches)}, "
                            f"{len(topk_idxs)} and {len(topk_weights)}")
    hidden, layout = None, tuple(dispatches[0].src_rank.shape)
    for rank, (y, dispatch) in enumerate(zip(expert_outputs, dispatches)):
        if not isinstance(y, Tensor) or y.dtype != torch.bfloat16:
            raise ArgumentTypeError(f"expert_outputs[{rank}] must be a bfloat16 tensor, "
                                    f"got {getattr(y, 'dtype', type(y).__name__)}")
        if y.dim() != 3 or tuple(y.shape[:2]) != layout or tuple(dispatch.src_rank.shape) != layout \
                or (hidden is not None and y.shape[2] != hidden):
            raise ArgumentError(f"expert_outputs[{rank}] must be [L, R*T, hidden] = {layout} + "
                                f"[hidden] like dispatches[0].src_rank, got shape {tuple(y.shape)}")
        hidden = y.shape[2]
    num_local_experts = expert_outputs[0].shape[0]
    num_topk = _check_topk_idxs(topk_idxs, num_ranks * num_local_experts)
    for rank, (topk, weights) in enumerate(zip(topk_idxs, topk_weights)):
        if not isinstance(weights, Tensor) or weights.dtype != torch.float32:
            raise ArgumentTypeError(f"topk_weights[{rank}] must be a float32 tensor, "
                                    f"got {getattr(weights, 'dtype', type(weights).__name__)}")
        if weights.shape != topk.shape:
            raise ArgumentError(f"topk_weights[{rank}] must have shape {tuple(topk.shape)} like "
                                f"topk_idxs[{rank}], got {tuple(weights.shape)}")

    # Where each received row came from: (local expert, row, src rank, src token, src slot) per rank.
    received = []
    coverage = [torch.zeros(topk.shape, dtype=torch.int32, device=topk.device) for topk in topk_idxs]
    for rank, dispatch in enumerate(dispatches):
        local, row = (dispatch.src_rank >= 0).nonzero(as_tuple=True)
        src_rank, src_token, src_topk = (f[local, row].long() for f in
                                         (dispatch.src_rank, dispatch.src_token, dispatch.src_topk))
        for source in src_rank.unique().tolist():
            sel = src_rank == source
            if source >= num_ranks or bool((src_token[sel] >= len(topk_idxs[source])).any()):
                raise ArgumentError(f"dispatches[{rank}] names a source token that does not exist "
                                    f"(src_rank {source}, num_ranks {num_ranks})")
            named = topk_idxs[source][src_token[sel], src_topk[sel]].long()
            if not torch.equal(named, rank * num_local_experts + local[sel]):
                raise ArgumentError(f"dispatches[{rank}] has rows from rank {source} that its "
                                    f"topk_idxs[{source}] does not route to rank {rank}")
            coverage[source].index_put_((src_token[sel], src_topk[sel]),
                                        torch.ones_like(src_token[sel], dtype=torch.int32), accumulate=True)
        received.append((local, row, src_rank, src_token, src_topk))
    for source, topk in enumerate(topk_idxs):
        if not torch.equal(coverage[source], (topk >= 0).to(torch.int32)):
            raise ArgumentError(f"dispatches do not hold every routed (token, slot) of rank {source} "
                                f"exactly once")

    combined = []
    for source, (topk, weights) in enumerate(zip(topk_idxs, topk_weights)):
        values = torch.zeros(topk.shape[0], num_topk, hidden, dtype=torch.float32, device=topk.device)  # [n_s, K, hidden]
        for rank, (local, row, src_rank, src_token, src_topk) in enumerate(received):
            sel = src_rank == source
            rows = expert_outputs[rank][local[sel], row[sel]]
            values[src_token[sel], src_topk[sel]] = logfmt_roundtrip(rows) if use_logfmt else rows.float()
        acc = torch.zeros(topk.shape[0], hidden, dtype=torch.float32, device=topk.device)
        for slot in range(num_topk):
            product = values[:, slot] * weights[:, slot, None]  # rounded to float32 before the add
            acc = torch.where(topk[:, slot, None] >= 0, acc + product, acc)
        combined.append(acc.to(torch.bfloat16))
    return combined


# ====================================================================================== normal mode
# Pure-torch ground truth of normal (high-throughput, prefill) mode, DeepEP intranode semantics:
# every token goes once to every rank owning one of its experts, received token-major in canonical
# order (source rank ascending, then source token ascending); combine sums a token's copies.

@dataclass(frozen=True)
class NormalReferenceDispatch:
    """What one receiving rank gets from a normal-mode dispatch (num_recv rows)."""

    recv_x: Tensor  # [num_recv, hidden], the dtype of x (bf16 or float8_e4m3fn)
    recv_scales: Tensor | None  # float32 [num_recv, hidden/128] (FP8 input only)
    recv_topk_idx: Tensor | None  # int64 [num_recv, K]: local expert index, -1 for other ranks' experts
    recv_topk_weights: Tensor | None  # float32 [num_recv, K]: the weight where recv_topk_idx >= 0, else 0
    recv_src_idx: Tensor  # int32 [num_recv]: the row's token index on its source rank
    recv_src_rank: Tensor  # int32 [num_recv]: its source rank
    rank_prefix_matrix: Tensor  # int32 [R, R]: [s, r] = tokens ranks 0..s send to rank r (inclusive)
    num_recv_tokens_per_expert: list  # [L] ints, rows naming each local expert, rounded up to expert_alignment


def reference_normal_layout(topk_idx: Tensor, num_experts: int, num_ranks: int) -> tuple[Tensor, Tensor, Tensor]:
    """``get_dispatch_layout``: ``(num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E],
    is_token_in_rank bool [n, R])`` for one rank's ``topk_idx`` int ``[n, K]`` (-1 = no expert).
    A token counts once per rank however many of its experts live there; once per (token, slot)
    for experts."""
    num_local = _check_num_experts(num_experts, num_ranks)
    _check_topk_idxs([topk_idx], num_experts)
    topk = topk_idx.long()
    valid = topk >= 0
    per_expert = torch.bincount(topk[valid], minlength=num_experts).to(torch.int32)
    owner = torch.where(valid, topk // num_local, num_ranks)  # num_ranks = "nowhere"
    in_rank = torch.zeros(topk.shape[0], num_ranks + 1, dtype=torch.bool, device=topk.device)
    in_rank.scatter_(1, owner, True)
    in_rank = in_rank[:, :num_ranks].contiguous()
    return in_rank.sum(0).to(torch.int32), per_expert, in_rank


def reference_normal_dispatch(xs: Sequence[Tensor], topk_idxs: Sequence[Tensor] | None, *, num_experts: int,
                              x_scales: Sequence[Tensor] | None = None, topk_weights: Sequence[Tensor] | None = None,
                              is_token_in_ranks: Sequence[Tensor] | None = None,
                              expert_alignment: int = 1) -> list[NormalReferenceDispatch]:
    """Normal-mode dispatch over ``R = len(xs)`` ranks; one :class:`NormalReferenceDispatch` per rank.

    ``xs[s]``: bf16 or float8_e4m3fn ``[n_s, hidden]`` (bytes are moved, never converted);
    ``x_scales[s]``: float32 ``[n_s, hidden/128]`` with FP8 ``xs``; ``topk_idxs[s]``: int ``[n_s, K]``
    with entries in ``[-1, num_experts)`` (None: no top-k travels, as in a cached dispatch, and
    ``is_token_in_ranks`` must be given); ``topk_weights[s]``: float32 ``[n_s, K]``;
    ``is_token_in_ranks[s]``: bool ``[n_s, R]`` (default: from ``topk_idxs``, as get_dispatch_layout).
    """
    num_ranks = len(xs)
    if num_ranks == 0:
        raise ArgumentError("xs must hold one tensor per rank, got an empty sequence")
    num_local = _check_num_experts(num_experts, num_ranks)
    if topk_idxs is not None:
        _check_topk_idxs(topk_idxs, num_experts)
    if is_token_in_ranks is None:
        if topk_idxs is None:
            raise ArgumentError("give topk_idxs or is_token_in_ranks")
        is_token_in_ranks = [reference_normal_layout(t, num_experts, num_ranks)[2] for t in topk_idxs]
    if isinstance(expert_alignment, bool) or not isinstance(expert_alignment, int) or expert_alignment < 1:
        raise ArgumentError(f"expert_alignment must be an int >= 1, got {expert_alignment!r}")
    for s, (x, in_rank) in enumerate(zip(xs, is_token_in_ranks)):
        if not isinstance(x, Tensor) or x.dtype not in (torch.bfloat16, torch.float8_e4m3fn) or x.dim() != 2:
            raise ArgumentTypeError(f"xs[{s}] must be a 2-D bfloat16 or float8_e4m3fn tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if tuple(in_rank.shape) != (x.shape[0], num_ranks) or in_rank.dtype != torch.bool:
            raise ArgumentError(f"is_token_in_ranks[{s}] must be bool [{x.shape[0]}, {num_ranks}], got {in_rank.dtype} {tuple(in_rank.shape)}")
    sent = torch.stack([in_rank.sum(0) for in_rank in is_token_in_ranks]).to(torch.int32)  # [src, dst]
    prefix = torch.cumsum(sent, dim=0).to(torch.int32)

    results = []
    for rank in range(num_ranks):
        rows = {"x": [], "scales": [], "topk": [], "weights": [], "src": [], "src_rank": []}
        per_expert = torch.zeros(num_local, dtype=torch.int64, device=xs[0].device)
        for s in range(num_ranks):
            tokens = is_token_in_ranks[s][:, rank].nonzero().flatten()
            rows["x"].append(xs[s][tokens])
            rows["src"].append(tokens.to(torch.int32))
            rows["src_rank"].append(torch.full_like(tokens, s, dtype=torch.int32))
            if x_scales is not None:
                rows["scales"].append(x_scales[s][tokens].float())
            if topk_idxs is not None:
                global_idx = topk_idxs[s][tokens].long()
                mine = (global_idx >= rank * num_local) & (global_idx < (rank + 1) * num_local)
                rows["topk"].append(torch.where(mine, global_idx - rank * num_local, -1))
                if topk_weights is not None:
                    rows["weights"].append(torch.where(mine, topk_weights[s][tokens].float(), 0.0))
                chosen = topk_idxs[s].long()
                chosen = chosen[(chosen >= rank * num_local) & (chosen < (rank + 1) * num_local)] - rank * num_local
                per_expert += torch.bincount(chosen, minlength=num_local)
        aligned = ((per_expert + expert_alignment - 1) // expert_alignment * expert_alignment).tolist()
        results.append(NormalReferenceDispatch(
            recv_x=torch.cat(rows["x"]),
            recv_scales=torch.cat(rows["scales"]) if x_scales is not None else None,
            recv_topk_idx=torch.cat(rows["topk"]) if topk_idxs is not None else None,
            recv_topk_weights=torch.cat(rows["weights"]) if topk_idxs is not None and topk_weights is not None else None,
            recv_src_idx=torch.cat(rows["src"]), recv_src_rank=torch.cat(rows["src_rank"]),
            rank_prefix_matrix=prefix.clone(), num_recv_tokens_per_expert=aligned))
    return results


def reference_normal_combine(xs: Sequence[Tensor], dispatches: Sequence[NormalReferenceDispatch], num_tokens: Sequence[int], *,
                             topk_weights: Sequence[Tensor] | None = None,
                             biases: Sequence[Sequence[Tensor]] | None = None) -> list[tuple[Tensor, Tensor | None]]:
    """Normal-mode combine; returns ``(combined bf16 [n_s, hidden], weights float32 [n_s, K] or None)``
    per source rank s.

    ``xs[r]``: bf16 ``[num_recv_r, hidden]`` in the row order of ``dispatches[r]``; ``topk_weights[r]``:
    float32 ``[num_recv_r, K]``; ``biases[s]``: 0, 1 or 2 bf16 ``[n_s, hidden]``.  Token t of rank s
    becomes ``bf16(((0 + bias_0) + bias_1) + x_r0 + x_r1 + ...)`` over the ranks r holding a copy, in
    ascending r, each add rounded in float32 (no weights: DeepEP's combine is a plain sum); the
    weights are summed the same way.  Tokens sent nowhere come out as their bias (or zero).
    """
    num_ranks = len(xs)
    if not (num_ranks == len(dispatches) == len(num_tokens)) or num_ranks == 0:
        raise ArgumentError(f"xs, dispatches and num_tokens must each hold one entry per rank, "
                            f"got {len(xs)}, {len(dispatches)} and {len(num_tokens)}")
    hidden = xs[0].shape[1]
    for r, (x, d) in enumerate(zip(xs, dispatches)):
        if not isinstance(x, Tensor) or x.dtype != torch.bfloat16 or tuple(x.shape) != (d.recv_src_idx.numel(), hidden):
            raise ArgumentError(f"xs[{r}] must be bf16 [{d.recv_src_idx.numel()}, {hidden}], "
                                f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    num_topk = topk_weights[0].shape[1] if topk_weights is not None else 0
    results = []
    for s, n in enumerate(num_tokens):
        acc = torch.zeros(n, hidden, dtype=torch.float32, device=xs[0].device)
        for bias in (biases[s] if biases is not None else ()):
            acc = acc + bias.float()
        weights = torch.zeros(n, num_topk, dtype=torch.float32, device=xs[0].device)
        for r in range(num_ranks):
            mine = (dispatches[r].recv_src_rank == s).nonzero().flatten()
            tokens = dispatches[r].recv_src_idx[mine].long()
            acc[tokens] = acc[tokens] + xs[r][mine].float()
            if topk_weights is not None:
                weights[tokens] = weights[tokens] + topk_weights[r][mine].float()
        results.append((acc.to(torch.bfloat16), weights if topk_weights is not None else None))
    return results
