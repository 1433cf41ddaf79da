"""Byte layout of the symmetric region and the Python mirrors of the kernels' enums."""

import re

import pytest

from lowlat.errors import ArgumentError
from lowlat.jit.compiler import kernel_dir
from lowlat.layout import ALIGN, BufferShape, RegionLayout, StateWord, StatusCode


def _cpp_enum(name: str) -> dict[str, int]:
    text = (kernel_dir() / "state.cuh").read_text()
    body = re.search(r"enum %s\s*:\s*int\s*\{(.*?)\};" % name, text, re.S).group(1)
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(k\w+)\s*=\s*(\d+)", body)}


def test_state_words_mirror_the_kernels():
    cpp = _cpp_enum("StateWord")
    assert cpp == {"kDispatchSendSeq": 0, "kDispatchRecvSeq": 1, "kCombineSendSeq": 2, "kCombineRecvSeq": 3,
                   "kExchangeSeq": 4, "kStatusWord": 5, "kBlocksDone": 8, "kNumStateWords": 16}
    python = {w.name: w.value for w in StateWord}
    assert python == {"DISPATCH_SEND_SEQ": 0, "DISPATCH_RECV_SEQ": 1, "COMBINE_SEND_SEQ": 2, "COMBINE_RECV_SEQ": 3,
                      "EXCHANGE_SEQ": 4, "STATUS": 5, "BLOCKS_DONE": 8, "NUM_STATE_WORDS": 16}


def test_status_codes_mirror_the_kernels():
    cpp = _cpp_enum("StatusCode")
    snake = {re.sub(r"(?<!^)(?=[A-Z0-9])", "_", k[len("kStatus"):]).upper(): v for k, v in cpp.items()}
    assert snake == {c.name: c.value for c in StatusCode}


@pytest.mark.parametrize("shape", [BufferShape(8, 256, 8, 7168, 128), BufferShape(1, 4, 1, 128, 1), BufferShape(3, 9, 5, 384, 13)])
def test_regions_are_aligned_disjoint_and_inside(shape):
    layout = RegionLayout.of(shape)
    R, L, T, K = shape.num_ranks, shape.num_local_experts, shape.max_tokens_per_rank, shape.num_topk
    sizes = {
        "dispatch_flags": R * 8, "combine_flags": R * 8, "dispatch_count": L * R * 4, "dispatch_route": L * R * T * 4,
        "dispatch_staging": R * T * shape.message_stride, "combine_staging": T * K * shape.combine_slot_stride,
    }
    spans = []
    for parity in (0, 1):
        for name, size in sizes.items():
            start = layout.parity_offset(parity) + getattr(layout, name)
            assert start % ALIGN == 0, name
            spans.append((start, start + size, f"{name}[{parity}]"))
    spans.append((layout.send_buffer, layout.send_buffer + T * shape.message_stride, "send_buffer"))
    spans.append((0, 2 * layout.exchange_parity_bytes, "exchange"))
    spans.sort()
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{a} overlaps {b}"
    assert spans[-1][1] <= layout.total_bytes and layout.total_bytes % 2**21 == 0


def test_message_and_slot_sizes():
    s = BufferShape(8, 256, 8, 7168, 128)
    assert s.fp8_message_bytes == 7168 + 56 * 4 == 7392  # DeepEP's 7408 minus its 16-byte header
    assert s.message_stride == 2 * 7168 and s.combine_slot_stride == 2 * 7168 + 56 * 4
    assert s.scale_row_stride == 1024 and BufferShape(3, 3, 1, 128, 5).scale_row_stride == 16
    assert s.num_ue8m0_words == 14 and BufferShape(1, 1, 1, 384, 1).num_ue8m0_words == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden=100), "hidden must be a multiple of 128, got 100"),
    (dict(num_experts=10), "num_experts=10 must be divisible by num_ranks=4"),
    (dict(num_experts=4096), "num_experts=4096 exceeds"),
    (dict(num_topk=0), "num_topk must be >= 1"),
    (dict(num_topk=9), r"num_topk=9 must be <= min\(32, num_experts=8\)"),
    (dict(max_tokens_per_rank=True), "max_tokens_per_rank must be an int"),
])
def test_shape_validation(kwargs, match):
    args = dict(num_ranks=4, num_experts=8, num_topk=2, hidden=256, max_tokens_per_rank=4)
    args.update(kwargs)
    with pytest.raises(ArgumentError, match=match):
        BufferShape(**args)
