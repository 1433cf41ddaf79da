"""Hand-checked cases for lowlat.formats, the bit-exact ground truth of the FP8 and LogFMT wire formats."""

from __future__ import annotations

import struct

import pytest
import torch

from lowlat.errors import ArgumentError, ArgumentTypeError
from lowlat.formats import (
    FP8_AMAX_FLOOR, FP8_MAX, LogFMTEncoded, dequantize_fp8, logfmt_chunk_size, logfmt_decode,
    logfmt_encode, logfmt_max_relative_error, logfmt_pack, logfmt_roundtrip, logfmt_slot_bytes,
    logfmt_unpack, pack_ue8m0, quantize_fp8, unpack_ue8m0,
)

F32 = torch.float32
INV_448 = torch.tensor(1 / 448, dtype=F32)


def bf16(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=F32).to(torch.bfloat16)


def f32_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def random_tokens(num_tokens: int, hidden: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(torch.randint(-12, 4, (num_tokens, hidden // 128, 1), generator=gen).float())
    return (torch.randn(num_tokens, hidden // 128, 128, generator=gen) * magnitude).flatten(-2).to(torch.bfloat16)


# --------------------------------------------------------------------------------------------- FP8

def test_constants():
    assert FP8_AMAX_FLOOR == struct.unpack("<f", struct.pack("<f", 1e-4))[0]
    assert FP8_MAX == 448.0


def test_powers_of_two_exact():
    # Group 0: amax 2**3 and elements 2**k; group 1: amax 2**-5.
    k = torch.arange(3, -13, -1).float()
    row = torch.zeros(256)
    row[: len(k)] = torch.exp2(k)
    row[128:131] = torch.tensor([2.0**-5, -(2.0**-6), 2.0**-7])
    x = row.to(torch.bfloat16)[None]
    q = quantize_fp8(x)
    assert torch.equal(q.scales, torch.tensor([[8.0, 2.0**-5]]) * INV_448)
    # x * 448 / 2**3 = 7 * 2**(k + 3): 448, 224, ... down to 7 * 2**-9, the e4m3 subnormal 0.875 * 2**-6.
    assert q.data[0, : len(k)].float().tolist() == (7.0 * torch.exp2(k + 3)).tolist()
    assert q.data[0, 128:131].float().tolist() == [448.0, -224.0, 112.0]
    assert (q.data[0, len(k):128].float() == 0).all()
    # round_scale: scale_inv = 2**(m - 8), the amax lands on 256 and every 2**k comes back exactly.
    qr = quantize_fp8(x, round_scale=True)
    assert qr.scales.tolist() == [[2.0**-5, 2.0**-13]]
    assert q.data.float()[0, 0] == 448.0 and qr.data.float()[0, 0] == 256.0
    assert torch.equal(dequantize_fp8(qr.data, qr.scales), row[None])


def test_saturation_at_448():
    gen = torch.Generator().manual_seed(1)
    amax = (torch.rand(4096, generator=gen) * 10 + 1e-3).to(torch.bfloat16)
    x = torch.zeros(4096, 128, dtype=torch.bfloat16)
    x[:, 7] = amax
    x[:, 9] = -amax * 0.5
    q = quantize_fp8(x)
    assert (q.data[:, 7].float() == 448.0).all()
    # Some amax * (448 / amax) round above 448 in float32: the clamp keeps them at 448, never NaN.
    scaled = amax.float() * (torch.tensor(448.0) / amax.float())
    assert (scaled > 448.0).any()
    assert (q.data[scaled > 448.0, 7].float() == 448.0).all()
    assert (quantize_fp8(-x).data[:, 7].float() == -448.0).all()


def test_amax_floor():
    q = quantize_fp8(torch.zeros(2, 256, dtype=torch.bfloat16))
    floor_scale = torch.tensor(FP8_AMAX_FLOOR, dtype=F32) * INV_448
    assert torch.equal(f32_bits(q.scales), f32_bits(floor_scale.expand(2, 2)))
    assert (q.data.float() == 0).all()
    # Values below the floor are scaled by 448 / 1e-4, not by their own amax.
    tiny = bf16([[1e-6, -3e-5] + [0.0] * 126])
    qt = quantize_fp8(tiny)
    assert torch.equal(f32_bits(qt.scales), f32_bits(floor_scale.reshape(1, 1)))
    scale = torch.tensor(448.0) / torch.tensor(FP8_AMAX_FLOOR, dtype=F32)
    expected = (tiny.float() * scale).to(torch.float8_e4m3fn)
    assert torch.equal(qt.data.view(torch.uint8), expected.view(torch.uint8))
    assert qt.data[0, 1].float() < 0 and qt.data[0, 0].float() > 0


def test_negative_symmetry():
    x = random_tokens(8, 512)
    for round_scale in (False, True):
        pos, neg = quantize_fp8(x, round_scale=round_scale), quantize_fp8(-x, round_scale=round_scale)
        assert torch.equal(neg.data.float(), -pos.data.float())
        assert torch.equal(neg.scales, pos.scales)


def test_nan_stays_nan():
    x = bf16([[float("nan"), 2.0, -1.0] + [0.0] * 125])
    q = quantize_fp8(x)
    assert torch.isnan(q.data[0, 0].float())
    assert q.data[0, 1].float() == 448.0 and q.scales[0, 0] == 2.0 * INV_448


def test_round_scale_powers_of_two():
    x = random_tokens(16, 1024, seed=3)
    q = quantize_fp8(x, round_scale=True)
    bits = f32_bits(q.scales)
    assert ((bits & 0x7FFFFF) == 0).all() and (bits > 0).all()
    unrounded = quantize_fp8(x).scales  # amax * float32(1/448)
    assert (q.scales >= unrounded).all() and (q.scales < 2 * unrounded).all()
    batched = quantize_fp8(x.view(4, 4, 1024), round_scale=True)  # any leading shape [..., hidden]
    assert torch.equal(batched.scales.view(16, 8), q.scales)


def test_dequantize_error_bound():
    x = random_tokens(32, 1024, seed=4).float()
    for round_scale in (False, True):
        q = quantize_fp8(x.to(torch.bfloat16), round_scale=round_scale)
        deq = dequantize_fp8(q.data, q.scales)
        scale_inv = q.scales.repeat_interleave(128, dim=-1)
        # e4m3 keeps 3 mantissa bits: half an ulp is 2**-4 relative for normals and 2**-10 absolute
        # (in units of scale_inv) for subnormals; 1e-6 covers the float32 products around it.
        bound = torch.maximum(x.abs() * 2.0**-4, scale_inv * 2.0**-10) + x.abs() * 1e-6
        assert ((deq - x).abs() <= bound).all()


def test_ue8m0_hand_packed():
    packed = pack_ue8m0(torch.tensor([1.0, 2.0, 0.5, 4.0]))
    # bytes 127, 128, 126, 129 little-endian = 0x817E807F, which is negative as an int32
    assert packed.dtype == torch.int32
    assert packed.tolist() == [0x817E807F - 2**32]
    assert unpack_ue8m0(packed, 4).tolist() == [1.0, 2.0, 0.5, 4.0]
    # 5 groups: the second int holds only group 4 (16 = 2**4 -> byte 131), bytes 1..3 are zero.
    odd = pack_ue8m0(torch.tensor([[1.0, 1.0, 1.0, 1.0, 16.0]]))
    assert odd.tolist() == [[0x7F7F7F7F, 131]]
    assert unpack_ue8m0(odd, 5).tolist() == [[1.0, 1.0, 1.0, 1.0, 16.0]]
    assert unpack_ue8m0(torch.tensor([0], dtype=torch.int32), 1).tolist() == [0.0]  # byte 0 -> 0.0


@pytest.mark.parametrize("hidden", [128, 640, 7168])
def test_ue8m0_roundtrip(hidden):
    scales = quantize_fp8(random_tokens(4, hidden, seed=5), round_scale=True).scales
    packed = pack_ue8m0(scales)
    assert packed.shape == (4, -(-hidden // 512))
    assert torch.equal(f32_bits(unpack_ue8m0(packed, hidden // 128)), f32_bits(scales))


def test_ue8m0_bad_inputs():
    with pytest.raises(ArgumentError, match="powers of two"):
        pack_ue8m0(torch.tensor([1.0, 3.0]))
    with pytest.raises(ArgumentError, match="powers of two"):
        pack_ue8m0(torch.tensor([0.0]))
    with pytest.raises(ArgumentTypeError, match="scales"):
        pack_ue8m0(torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(ArgumentError, match="num_groups=9"):
        unpack_ue8m0(torch.zeros(2, dtype=torch.int32), 9)


def test_fp8_bad_inputs():
    with pytest.raises(ArgumentError, match="100"):
        quantize_fp8(torch.zeros(2, 100, dtype=torch.bfloat16))
    with pytest.raises(ArgumentTypeError, match="float32"):
        quantize_fp8(torch.zeros(2, 128))
    q = quantize_fp8(torch.zeros(2, 256, dtype=torch.bfloat16))
    with pytest.raises(ArgumentError, match="scales.shape"):
        dequantize_fp8(q.data, q.scales[:, :1])


# ---------------------------------------------------------------------------------------- LogFMT-10

def small_tokens(num_tokens: int, hidden: int, seed: int = 0) -> torch.Tensor:
    """Rows whose groups are all castable: |x| < 1, no zeros, a spread of magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    exponent = torch.rand(num_tokens, hidden, generator=gen) * -12 - 0.01
    sign = torch.where(torch.rand(num_tokens, hidden, generator=gen) < 0.5, -1.0, 1.0)
    return (sign * torch.exp2(exponent)).to(torch.bfloat16)


@pytest.mark.parametrize("hidden, chunk", [(7168, 1024), (3584, 512), (384, 128), (768, 256),
                                           (128, 128), (2048, 1024)])
def test_chunk_size(hidden, chunk):
    assert logfmt_chunk_size(hidden) == chunk
    assert logfmt_slot_bytes(hidden) == 4 * (hidden // 128) + 2 * hidden


def test_fallback_value_at_least_one():
    x = small_tokens(1, 2048)
    x[0, 1500] = 1.0  # lmax = 0 is not < 0: the whole second chunk travels raw
    x[0, 10] = 0.99
    enc = logfmt_encode(x)
    assert enc.castable.tolist() == [[True, False]]
    assert (enc.codes[0, 1024:] == 0).all() and not enc.signs[0, 1024:].any()
    decoded = logfmt_decode(enc)
    assert torch.equal(decoded[0, 1024:], x[0, 1024:].float())
    assert not torch.equal(decoded[0, :1024], x[0, :1024].float())


def test_fallback_zero_and_constant_groups():
    x = small_tokens(1, 384)
    x[0, 128:256] = 0.0  # all-zero group: lmax = -inf
    x[0, 256:384] = bf16([0.25, -0.25] * 64)  # amin == amax: lmin == lmax
    enc = logfmt_encode(x)
    assert enc.castable.tolist() == [[True, False, False]]
    assert torch.equal(logfmt_roundtrip(x)[0, 128:], x[0, 128:].float())


def test_castable_codes():
    x = small_tokens(1, 256, seed=2).float()
    x = x.sign() * x.abs().clamp(2.0**-10, 0.5)
    x[0, 3], x[0, 4] = 0.75, -(2.0**-10)  # amax and amin of group 0: lmin = -10 > lmax - 32
    x[0, 130], x[0, 131], x[0, 132] = 0.0, -0.0, -0.5  # group 1 has zeros: lmin = lmax - 32
    x = x.to(torch.bfloat16)
    enc = logfmt_encode(x)
    assert enc.castable.all()
    assert enc.meta[0, 0].float().tolist() == [0.75, 2.0**-10]
    assert enc.meta[0, 1, 1].float() == 0.0
    assert enc.codes[0, 3] == 511 and enc.codes[0, 4] == 1 and enc.codes[0, 132] == 511
    assert enc.codes[0, 130] == 0 and enc.codes[0, 131] == 0
    assert enc.signs[0].tolist() == (x[0].view(torch.int16) < 0).tolist()  # -0.0 included
    decoded = logfmt_decode(enc)[0]
    assert decoded[4] == -(2.0**-10)  # code 1 decodes to exactly 2**lmin
    assert decoded[130] == 0 and torch.signbit(decoded[131]) and decoded[131] == 0
    assert torch.equal(torch.signbit(decoded), torch.signbit(x[0].float()))


def test_relative_error_bound():
    x = small_tokens(64, 7168, seed=3)
    x[::2, ::128] = 0.0  # half of the groups clip lmin to lmax - 32, the widest step
    enc = logfmt_encode(x)
    assert enc.castable.all()
    amax, amin = enc.meta.float().unbind(-1)
    lmin = torch.maximum(torch.log2(amin), torch.log2(amax) - 32).repeat_interleave(128, dim=-1)
    checked = x.float().abs() >= torch.exp2(lmin)
    rel = ((logfmt_decode(enc) - x.float()).abs() / x.float().abs())[checked]
    bound = logfmt_max_relative_error()
    assert 0.0217 < bound < 0.0218
    assert rel.max() <= bound
    assert rel.max() > 0.02  # the bound is nearly reached: it is not a loose one


def test_pack_hand_checked_unit():
    codes = torch.zeros(128, dtype=torch.int16)
    codes[:16] = torch.arange(1, 17, dtype=torch.int16)
    signs = torch.zeros(128, dtype=torch.bool)
    signs[1:16:2] = True
    enc = LogFMTEncoded(meta=bf16([[0.5, 0.25]]), castable=torch.tensor([True]), codes=codes,
                        signs=signs, raw=torch.zeros(128, dtype=torch.bfloat16))
    slot = logfmt_pack(enc)
    assert slot.shape == (256 + 4,)
    assert slot[256:].tolist() == [0x00, 0x3F, 0x80, 0x3E]  # meta last: bf16 0.5 = 0x3F00, 0.25 = 0x3E80
    c, s16, mask = list(range(1, 17)), 0xAAAA, 0xFFFFFFFF
    words = [c[0] | c[1] << 9 | c[2] << 18 | c[3] << 27,
             c[3] >> 5 | c[4] << 4 | c[5] << 13 | c[6] << 22 | c[7] << 31,
             c[7] >> 1 | c[8] << 8 | c[9] << 17 | c[10] << 26,
             c[10] >> 6 | c[11] << 3 | c[12] << 12 | c[13] << 21 | c[14] << 30,
             c[14] >> 2 | c[15] << 7 | s16 << 16]
    unit = bytes(slot[0:20].tolist())
    assert unit == struct.pack("<5I", *(w & mask for w in words))
    bits = int.from_bytes(unit, "little")
    assert [bits >> (9 * i) & 0x1FF for i in range(16)] == c
    assert [bits >> (144 + i) & 1 for i in range(16)] == [i % 2 for i in range(16)]
    assert (slot[20:256] == 0).all()  # the other units are all-zero codes, then the unused tail
    back = logfmt_unpack(slot, 128)
    assert torch.equal(back.codes, codes) and torch.equal(back.signs, signs)


def assert_same_encoding(a: LogFMTEncoded, b: LogFMTEncoded) -> None:
    assert torch.equal(a.meta.view(torch.int16), b.meta.view(torch.int16))
    assert torch.equal(a.castable, b.castable)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.signs, b.signs)
    raw_chunks = (~a.castable).repeat_interleave(a.codes.shape[-1] // a.castable.shape[-1], dim=-1)
    assert torch.equal(a.raw.view(torch.int16)[raw_chunks], b.raw.view(torch.int16)[raw_chunks])


@pytest.mark.parametrize("hidden", [128, 384, 1024, 1536, 7168])
def test_pack_unpack_roundtrip(hidden):
    x = small_tokens(24, hidden, seed=hidden)
    x[::3] = random_tokens(8, hidden, seed=hidden)  # some groups reach >= 1: raw chunks
    x[1::6, :128] = 0.0
    enc = logfmt_encode(x)
    assert enc.castable.any() and not enc.castable.all()
    slot = logfmt_pack(enc)
    assert slot.dtype == torch.uint8 and slot.shape == (24, logfmt_slot_bytes(hidden))
    back = logfmt_unpack(slot, hidden)
    assert_same_encoding(enc, back)
    assert torch.equal(f32_bits(logfmt_decode(back)), f32_bits(logfmt_decode(enc)))
    # The tail of a castable chunk's area is not part of the format: garbage there changes nothing.
    chunk = logfmt_chunk_size(hidden)
    areas = slot[:, : 2 * hidden].unflatten(-1, (-1, 2 * chunk))
    areas[..., chunk * 10 // 8:][enc.castable] = 0xAB
    assert_same_encoding(enc, logfmt_unpack(slot, hidden))


def test_pack_chunk_offsets():
    x = small_tokens(1, 384, seed=9)
    x[0, 200] = 2.0
    enc = logfmt_encode(x)
    assert enc.castable.tolist() == [[True, False, True]]
    slot = logfmt_pack(enc)[0]
    data = 0  # chunk c starts at 256 * c; the meta follows the data at 2 * hidden
    assert bytes(slot[data + 256: data + 512].tolist()) == x[0, 128:256].view(torch.int16).numpy().tobytes()
    alone = logfmt_pack(logfmt_encode(x[:, 256:]))[0]
    assert torch.equal(slot[data + 512: data + 512 + 160], alone[0:160])
    assert torch.equal(slot[768 + 8: 768 + 12], alone[256:260])  # group 2's meta
    assert (slot[data + 160: data + 256] == 0).all()


def test_logfmt_bad_inputs():
    with pytest.raises(ArgumentError, match="100"):
        logfmt_encode(torch.zeros(1, 100, dtype=torch.bfloat16))
    with pytest.raises(ArgumentTypeError, match="float16"):
        logfmt_encode(torch.zeros(1, 128, dtype=torch.float16))
    with pytest.raises(ArgumentError, match="hidden"):
        logfmt_chunk_size(100)
    with pytest.raises(ArgumentError, match="logfmt_slot_bytes"):
        logfmt_unpack(torch.zeros(1, 100, dtype=torch.uint8), 128)
    with pytest.raises(ArgumentTypeError, match="slot"):
        logfmt_unpack(torch.zeros(1, 260, dtype=torch.int8), 128)
