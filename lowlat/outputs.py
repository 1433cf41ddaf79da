"""Who owns the tensors a call returns.

* **Static** (the native ``Buffer``'s default, built for CUDA graphs): two dispatch output sets,
  used alternately, allocated at construction.  A set is reused by the next-but-one dispatch; the
  handle carries the generation of its set, and using it after that reuse raises
  :class:`~lowlat.errors.StaleHandleError`.  The tensors ``low_latency_dispatch`` returned are
  overwritten then too: that is the stated rule of the static mode.
* **Fresh** (``Buffer(..., fresh_outputs=True)``, what the DeepEP facade uses): every call returns
  tensors that no earlier call's results alias, as DeepEP does.  Eagerly they come from a pool of
  sets; a set is reused only once nothing refers to it any more: no tensor on its storage (the
  returned views, anything derived from them) and no live handle.  Under graph capture they are
  allocated from the graph's memory pool, like any tensor a captured function creates.

Combine outputs are always fresh (or the caller's ``out=``), so two combines never alias.
Reusing storage follows the caching allocator's rule: it is safe in the order of the stream that
reuses it.  Work an ``async_finish`` call left on the Buffer's comm stream is waited for first by a
user on the caller's stream; the next async call runs on the comm stream itself, after it.
"""

from __future__ import annotations

import sys
import weakref

import torch

from .layout import BufferShape, align
from .ops.dispatch import DispatchOutputs

_use_count = torch._C._storage_Use_Count


class _Reusable:
    """Something a pool hands out again once nothing else refers to its storage."""

    __slots__ = ("_owner", "_cdata", "_baseline", "pending_event", "__weakref__")

    def _seal(self, storage_owner: torch.Tensor) -> None:
        # Every tensor this object itself keeps on the storage exists now: remember the count.
        self._owner = storage_owner
        self._cdata = storage_owner.untyped_storage()._cdata
        self._baseline = _use_count(self._cdata)
        self.pending_event = None  # work on another stream that must finish before reuse

    def busy(self) -> bool:
        return _use_count(self._cdata) != self._baseline

    def claim(self, on_comm_stream: bool = False) -> None:
        """Order the next user after the work an async call left on the Buffer's comm stream.  A
        user on the caller's stream waits for that event (one stream wait: cheap on the device once
        the work is done; a query first would add a driver call).  An async call (``on_comm_stream``)
        needs no wait: it runs on that same comm stream, in order after the call that left the
        event, and its fork orders it after the caller's stream."""
        event, self.pending_event = self.pending_event, None
        if event is not None and not on_comm_stream:
            event.wait()


class OutputSet(_Reusable):
    """One set of dispatch outputs, carved from a single allocation, plus the views a call returns.

    ``outputs`` are the kernel's targets (see :class:`~lowlat.ops.dispatch.DispatchOutputs`);
    ``zero_copy`` is the bf16 ``[L, R*T, H]`` buffer ``get_next_low_latency_combine_buffer`` hands out
    for handles of this set (allocated on first request unless ``with_zero_copy``)."""

    __slots__ = ("shape", "device", "index", "generation", "outputs", "zero_copy", "_views", "_handle", "_returned", "_refs")

    def __init__(self, shape: BufferShape, device: torch.device, *, index: int = -1, with_zero_copy: bool = False):
        s = self.shape = shape
        self.device, self.index, self.generation = device, index, 0
        parts, offsets, total = self.carve(s)
        blob = torch.empty(total, dtype=torch.uint8, device=device)
        self.outputs = DispatchOutputs(**{name: blob[offsets[name]: offsets[name] + size].view(dtype).view(dims)
                                          for name, (size, dtype, dims) in parts.items()})
        self.outputs.recv_count.zero_()
        self.outputs.recv_layout_range.zero_()
        self._views = self._make_views()
        self.zero_copy = None
        if with_zero_copy:
            self.ensure_zero_copy()
        self._handle = None
        # The objects calls hand out; the set is busy while a caller holds one of them (Python
        # references) or anything derived from them (references to the storage).
        self._returned = (*self._views.values(), *self._views[True, False], self._views[True, True][1], self.outputs.recv_count)
        self._refs = self._refcounts()
        self._seal(blob)

    def _refcounts(self) -> list[int]:
        return list(map(sys.getrefcount, self._returned))

    @staticmethod
    def carve(s: BufferShape):
        """``(parts, offsets, total_bytes)``: each output's (bytes, dtype, shape) and byte offset in the set."""
        L, RT, R = s.num_local_experts, s.rows_per_expert, s.num_ranks
        parts = {
            "recv_x": (L * RT * 2 * s.hidden, torch.uint8, (L, RT, 2 * s.hidden)),
            "recv_scales": (L * s.num_groups * s.scale_row_stride * 4, torch.float32, (L, s.num_groups, s.scale_row_stride)),
            "recv_count": (L * 4, torch.int32, (L,)),
            "recv_src_info": (L * RT * 4, torch.int32, (L, RT)),
            "recv_src_topk": (L * RT * 4, torch.int32, (L, RT)),
            "recv_layout_range": (L * R * 8, torch.int64, (L, R)),
        }
        offsets, cursor = {}, 0
        for name, (size, _, _) in parts.items():
            offsets[name] = cursor
            cursor = align(cursor + size, 256)
        return parts, offsets, cursor

    def _make_views(self) -> dict:
        s, out = self.shape, self.outputs
        L, RT = s.num_local_experts, s.rows_per_expert
        data = out.recv_x.view(-1)[: L * RT * s.hidden].view(torch.float8_e4m3fn).view(L, RT, s.hidden)
        words = out.recv_scales.view(torch.int32).view(-1)[: L * s.num_ue8m0_words * s.scale_row_stride]
        ue8m0 = words.view(L, s.num_ue8m0_words, s.scale_row_stride)[:, :, :RT].transpose(1, 2)
        fp32 = out.recv_scales[:, :, :RT].transpose(1, 2)
        return {
            (False, False): out.recv_x.view(torch.bfloat16),
            (True, False): (data, fp32),
            (True, True): (data, ue8m0),
        }

    def recv_x(self, use_fp8: bool, use_ue8m0: bool):
        """``recv_x`` as the call returns it: bf16 ``[L, R*T, H]``, or ``(fp8 [L, R*T, H], scales)``
        with fp32 ``[L, R*T, H/128]`` or int32 UE8M0 ``[L, R*T, ceil(H/512)]`` scales, column-major
        in the last two dimensions."""
        return self._views[use_fp8, use_ue8m0]

    def attach(self, handle) -> None:
        """The set is in use while ``handle`` lives."""
        self._handle = weakref.ref(handle)

    def busy(self) -> bool:
        handle = self._handle
        if handle is not None and handle() is not None:
            return True
        return _use_count(self._cdata) != self._baseline or self._refcounts() != self._refs

    def ensure_zero_copy(self) -> torch.Tensor:
        if self.zero_copy is None:
            s = self.shape
            self.zero_copy = torch.empty(s.expert_rows_shape, dtype=torch.bfloat16, device=self.device)
        return self.zero_copy

    @property
    def num_bytes(self) -> int:
        """Bytes of the dispatch outputs (the zero-copy buffer not included)."""
        return self.carve(self.shape)[2]


class CombineOutput(_Reusable):
    """A bf16 ``[T, H]`` combine output; a call returns its first n rows (a view made once per n)."""

    __slots__ = ("tensor", "_rows", "_refs")

    def __init__(self, shape: BufferShape, device: torch.device):
        self.tensor = torch.empty(shape.max_tokens_per_rank, shape.hidden, dtype=torch.bfloat16, device=device)
        self._rows: dict[int, torch.Tensor] = {}
        self._refs = {}
        self._seal(self.tensor)

    def rows(self, n: int) -> torch.Tensor:
        if n not in self._rows:  # a new view holds the storage too: count it in the baselines
            self._rows[n] = self.tensor[:n]
            self._refs[n] = self._refcount(n)
            self._baseline = _use_count(self._cdata)
        return self._rows[n]

    def _refcount(self, n: int) -> int:
        # Measured the same way whenever it is measured: the dict's reference plus the argument's.
        return sys.getrefcount(self._rows[n])

    def busy(self) -> bool:
        for n in self._rows:
            if self._refcount(n) != self._refs[n]:
                return True
        return _use_count(self._cdata) != self._baseline


class Pool:
    """Objects made by ``factory`` and handed out again once not ``busy()`` (eager calls only)."""

    def __init__(self, factory, items=()):
        self._factory = factory
        self.items = list(items)
        self._next = 0  # where the search starts: after the item handed out last (they are used in turn)

    def acquire(self, on_comm_stream: bool = False):
        """An object nothing else refers to, claimed for a user on the caller's stream or, for an
        async call, on the comm stream (see ``_Reusable.claim``)."""
        items, count = self.items, len(self.items)
        for step in range(count):
            index = (self._next + step) % count
            item = items[index]
            if not item.busy():
                if item.pending_event is not None:
                    item.claim(on_comm_stream)
                self._next = index + 1
                return item
        item = self._factory()
        items.append(item)
        self._next = 0
        return item
