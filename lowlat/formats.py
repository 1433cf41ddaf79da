"""Reference encoders and decoders for lowlat's wire formats.

These are the ground truth the CUDA kernels are tested against bit for bit, so every operation below
is spelled out in float32 in the order the kernels perform it (no fused multiply-adds, no fast-math).

FP8 dispatch (DeepEP / DeepGEMM compatible)
    Each token row of ``hidden`` bf16 channels is split into groups of ``FP8_GROUP = 128`` channels.
    A group with absolute maximum ``amax`` (floored at ``FP8_AMAX_FLOOR``) is stored as e4m3 values
    ``x * 448 / amax`` (clamped to +-448, round-to-nearest-even) plus one float32 ``scale_inv =
    amax / 448`` per group, so ``x ~= data * scale_inv``.  With ``round_scale`` the scale is rounded up
    to a power of two, which lets the scales travel as UE8M0 bytes (just the biased exponent), four to
    an int32 (``pack_ue8m0``).

LogFMT-10 combine
    Each 128-channel group carries its bf16 ``(amax, amin)`` of ``|x|``; inside ``[amin, amax]`` (with
    ``amin`` clipped to ``amax * 2**-32``) magnitudes are quantised on a logarithmic grid of 511
    points, a 9-bit code plus a sign bit per channel (10 bits).  Code 0 means zero, code ``c >= 1``
    means ``2**((c - 1) * step + lmin)``.  The encoder rounds to the nearer grid point in the linear
    domain.  Chunks of ``logfmt_chunk_size(hidden)`` channels whose groups do not all fit (an all-zero
    group, a constant-magnitude group, or any ``amax >= 1``) travel as raw bf16 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowlat.errors import ArgumentError, ArgumentTypeError

FP8_MAX = 448.0
FP8_GROUP = 128
FP8_AMAX_FLOOR = float(torch.tensor(1e-4, dtype=torch.float32, device="cpu"))  # the float32 nearest to 1e-4
UE8M0_PER_INT32 = 4

LOGFMT_CODE_MAX = 511  # 9-bit codes; 0 is reserved for zero
LOGFMT_CLIP = 32.0  # lmin is never more than 2**32 below lmax
_LOGFMT_CHUNKS = (1024, 512, 256, 128)
_LOGFMT_UNIT_CHANNELS = 16  # one 20-byte unit holds 16 codes and 16 signs
_LOGFMT_UNIT_BYTES = 20
# (first bit, width) of the 16 codes, then of the 16 signs, inside a unit's 160-bit string.
_UNIT_FIELDS = [(9 * i, 9) for i in range(16)] + [(144 + i, 1) for i in range(16)]

_F32 = torch.float32
_INV_FP8_MAX = torch.tensor(1.0 / FP8_MAX, dtype=_F32, device="cpu")  # kernels multiply by this, never divide


# ----------------------------------------------------------------------------------------- helpers

def _check_dtype(name: str, t: Tensor, dtype: torch.dtype) -> None:
    """Require ``t`` to be a tensor of ``dtype`` with at least one dimension."""
    if not isinstance(t, Tensor) or t.dtype != dtype:
        raise ArgumentTypeError(f"{name} must be a {dtype} tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() < 1:
        raise ArgumentError(f"{name} must have at least one dimension, got {name}.shape={tuple(t.shape)}")


def _check_tokens(name: str, x: Tensor) -> int:
    """Require a bf16 tensor ``[..., hidden]`` with hidden % 128 == 0; return hidden."""
    _check_dtype(name, x, torch.bfloat16)
    return _check_hidden(f"{name}.shape[-1]", x.shape[-1])


def _check_hidden(name: str, hidden: int) -> int:
    if hidden <= 0 or hidden % FP8_GROUP != 0:
        raise ArgumentError(f"{name} must be a positive multiple of {FP8_GROUP}, got {hidden}")
    return hidden


def _f32_from_bits(bits: Tensor) -> Tensor:
    """float32 whose IEEE bits are the low 32 bits of integer tensor ``bits``."""
    return _to_signed(bits, 32).to(torch.int32).view(_F32)


def _to_signed(value: Tensor, width: int) -> Tensor:
    """Reinterpret the low ``width`` bits of an int64 tensor as a two's-complement integer."""
    value = value & ((1 << width) - 1)
    return value - ((value >> (width - 1)) << width)


def _le_bytes(value: Tensor, num_bytes: int) -> Tensor:
    """Little-endian bytes of int64 ``value [...]`` -> uint8 ``[..., num_bytes]``."""
    shifts = torch.arange(0, 8 * num_bytes, 8, dtype=torch.int64, device=value.device)
    return ((value.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


def _from_le_bytes(data: Tensor) -> Tensor:
    """uint8 ``[..., n]`` -> int64 ``[...]``, the unsigned little-endian value of the n bytes."""
    shifts = torch.arange(0, 8 * data.shape[-1], 8, dtype=torch.int64, device=data.device)
    return (data.to(torch.int64) << shifts).sum(-1)


# --------------------------------------------------------------------------------------------- FP8

@dataclass(frozen=True)
class FP8Tokens:
    """Tokens quantised to FP8 e4m3 with one scale per 128 channels."""

    data: Tensor  # float8_e4m3fn [..., hidden]
    scales: Tensor  # float32 [..., hidden / 128], scale_inv (x ~= data * scale_inv), row-major


def quantize_fp8(x: Tensor, *, round_scale: bool = False) -> FP8Tokens:
    """Quantise bf16 ``x [..., hidden]`` per token and per 128-channel group.

    Returns ``FP8Tokens(data float8_e4m3fn [..., hidden], scales float32 [..., hidden/128])``.
    ``round_scale`` rounds ``scale_inv`` up to a power of two (for UE8M0 scales).  NaN elements stay
    NaN and are ignored by the group maximum, as CUDA's ``fmaxf`` ignores them.  Inputs must be
    finite apart from NaN.
    """
    hidden = _check_tokens("x", x)
    groups = x.float().unflatten(-1, (hidden // FP8_GROUP, FP8_GROUP))
    magnitude = torch.where(groups.isnan(), 0.0, groups.abs())
    amax = magnitude.amax(-1).clamp_min(FP8_AMAX_FLOOR)
    if round_scale:
        # ceil(log2(amax / 448)) from the float32 bits: exponent, plus one unless the mantissa is 0.
        bits = (amax * _INV_FP8_MAX).view(torch.int32).to(torch.int64)
        exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int64)
        scale_inv = _f32_from_bits((exponent + 127) << 23)
        scale = _f32_from_bits((127 - exponent) << 23)
    else:
        scale_inv = amax * _INV_FP8_MAX
        scale = torch.tensor(FP8_MAX, dtype=_F32, device=amax.device) / amax
    # Clamp then round-to-nearest-even equals CUDA's __NV_SATFINITE conversion.
    scaled = (groups * scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    data = scaled.to(torch.float8_e4m3fn).flatten(-2)
    return FP8Tokens(data=data, scales=scale_inv)


def dequantize_fp8(data: Tensor, scales: Tensor) -> Tensor:
    """float32 ``[..., hidden]`` = ``data`` (float8_e4m3fn ``[..., hidden]``) times the per-group
    ``scales`` (float32 ``[..., hidden/128]``, scale_inv)."""
    _check_dtype("data", data, torch.float8_e4m3fn)
    _check_dtype("scales", scales, _F32)
    hidden = _check_hidden("data.shape[-1]", data.shape[-1])
    expected = (*data.shape[:-1], hidden // FP8_GROUP)
    if tuple(scales.shape) != expected:
        raise ArgumentError(f"scales.shape must be {expected} for data.shape={tuple(data.shape)}, "
                            f"got {tuple(scales.shape)}")
    groups = data.float().unflatten(-1, (hidden // FP8_GROUP, FP8_GROUP))
    return (groups * scales.unsqueeze(-1)).flatten(-2)


def pack_ue8m0(scales: Tensor) -> Tensor:
    """Pack power-of-two float32 ``scales [..., G]`` as UE8M0 bytes -> int32 ``[..., ceil(G/4)]``.

    The byte of group g is its biased float32 exponent; group ``4p + k`` is byte k (little-endian)
    of int32 p, and the bytes past G are 0.  Scales must be exact positive powers of two (as
    produced by ``quantize_fp8(..., round_scale=True)``).
    """
    _check_dtype("scales", scales, _F32)
    bits = scales.view(torch.int32).to(torch.int64)
    exponent = (bits >> 23) & 0xFF
    is_power_of_two = (bits > 0) & ((bits & 0x7FFFFF) == 0) & (exponent != 0) & (exponent != 0xFF)
    if not bool(is_power_of_two.all()):
        bad = scales[~is_power_of_two][0].item()
        raise ArgumentError(f"scales must be positive finite powers of two for UE8M0, got a scale of {bad!r}")
    exponent = torch.nn.functional.pad(exponent, (0, -scales.shape[-1] % UE8M0_PER_INT32))  # byte 0 past G
    words = _from_le_bytes(exponent.unflatten(-1, (-1, UE8M0_PER_INT32)))
    return _to_signed(words, 32).to(torch.int32)


def unpack_ue8m0(packed: Tensor, num_groups: int) -> Tensor:
    """Unpack int32 ``packed [..., ceil(num_groups/4)]`` -> float32 scales ``[..., num_groups]``.

    Byte b decodes to ``2**(b - 127)``, built from the bits ``b << 23``; byte 0 therefore decodes to
    0.0, not 2**-127.
    """
    _check_dtype("packed", packed, torch.int32)
    if num_groups < 0 or -(-num_groups // UE8M0_PER_INT32) != packed.shape[-1]:
        raise ArgumentError(f"num_groups={num_groups} does not fit packed.shape={tuple(packed.shape)} "
                            f"(need ceil(num_groups / {UE8M0_PER_INT32}) == packed.shape[-1])")
    exponent = _le_bytes(packed.to(torch.int64), UE8M0_PER_INT32).to(torch.int64).flatten(-2)
    return _f32_from_bits(exponent[..., :num_groups] << 23)


# ---------------------------------------------------------------------------------------- LogFMT-10

@dataclass(frozen=True)
class LogFMTEncoded:
    """One or more token rows in LogFMT-10.  ``codes`` and ``signs`` are only meaningful in castable
    chunks and are 0 / False elsewhere."""

    meta: Tensor  # bf16 [..., G, 2], (amax, amin) of |x| per 128-channel group
    castable: Tensor  # bool [..., hidden / chunk]
    codes: Tensor  # int16 [..., hidden], 0..511 (0 where not castable)
    signs: Tensor  # bool [..., hidden], sign bit of the bf16 input (False where not castable)
    raw: Tensor  # bf16 [..., hidden], the input row (used where not castable)


def logfmt_chunk_size(hidden: int) -> int:
    """Channels per LogFMT chunk: the largest of 1024, 512, 256, 128 that divides ``hidden``."""
    _check_hidden("hidden", hidden)
    return next(chunk for chunk in _LOGFMT_CHUNKS if hidden % chunk == 0)


def logfmt_slot_bytes(hidden: int) -> int:
    """Bytes of one packed LogFMT token: 2 bytes per channel of data, then 4 bytes of meta per group."""
    _check_hidden("hidden", hidden)
    return 4 * (hidden // FP8_GROUP) + 2 * hidden


@dataclass(frozen=True)
class _LogGrid:
    """Per-group parameters of the logarithmic grid, float32 ``[..., G]``."""

    lmin: Tensor
    step: Tensor
    castable: Tensor  # bool [..., hidden / chunk]


def _log_grid(meta: Tensor, hidden: int) -> _LogGrid:
    amax, amin = meta.float().unbind(-1)
    lmax = torch.log2(amax)
    # log2(0) = -inf, so an all-zero amin falls back to the clip; an all-zero group gets lmin = -inf.
    lmin = torch.maximum(torch.log2(amin), lmax - LOGFMT_CLIP)
    group_fits = (lmax < 0) & (lmin < lmax)
    groups_per_chunk = logfmt_chunk_size(hidden) // FP8_GROUP
    castable = group_fits.unflatten(-1, (-1, groups_per_chunk)).all(-1)
    step = (lmax - lmin) / (LOGFMT_CODE_MAX - 1)
    return _LogGrid(lmin=lmin, step=step, castable=castable)


def _per_channel(per_group_or_chunk: Tensor, hidden: int) -> Tensor:
    """Broadcast ``[..., n]`` (one value per group or per chunk) to ``[..., hidden]``."""
    return per_group_or_chunk.repeat_interleave(hidden // per_group_or_chunk.shape[-1], dim=-1)


def logfmt_encode(x: Tensor) -> LogFMTEncoded:
    """Encode bf16 ``x [..., hidden]`` (hidden % 128 == 0) to LogFMT-10; see ``LogFMTEncoded``."""
    hidden = _check_tokens("x", x)
    magnitude = x.abs().unflatten(-1, (-1, FP8_GROUP))  # exact in bf16
    meta = torch.stack((magnitude.amax(-1), magnitude.amin(-1)), dim=-1)
    grid = _log_grid(meta, hidden)

    step_inv = 1.0 / grid.step
    # Offsetting by log2((1 + 2**step) / 2) moves the rounding point to the linear-domain midpoint.
    rounding = 2.0 - torch.log2((1.0 + torch.exp2(grid.step)) * 0.5) * step_inv
    fused = rounding - grid.lmin * step_inv
    log_x = torch.log2(x.float().abs()).unflatten(-1, (-1, FP8_GROUP))
    code = torch.floor((log_x * step_inv.unsqueeze(-1) + fused.unsqueeze(-1)).clamp_min(0.0))
    code = code.clamp_max(LOGFMT_CODE_MAX).flatten(-2)

    in_castable = _per_channel(grid.castable, hidden)
    codes = torch.where(in_castable, code, 0.0).to(torch.int16)
    signs = in_castable & (x.view(torch.int16) < 0)  # the bf16 sign bit, so -0.0 counts as negative
    return LogFMTEncoded(meta=meta, castable=grid.castable, codes=codes, signs=signs, raw=x)


def logfmt_decode(enc: LogFMTEncoded) -> Tensor:
    """Decode to float32 ``[..., hidden]``; non-castable chunks decode to their bf16 values exactly."""
    hidden = enc.codes.shape[-1]
    grid = _log_grid(enc.meta, hidden)
    code = enc.codes.float().unflatten(-1, (-1, FP8_GROUP))
    exponent = (code - 1.0) * grid.step.unsqueeze(-1) + grid.lmin.unsqueeze(-1)
    magnitude = torch.where(code == 0, 0.0, torch.exp2(exponent)).flatten(-2)
    value = torch.where(enc.signs, -magnitude, magnitude)
    return torch.where(_per_channel(grid.castable, hidden), value, enc.raw.float())


def logfmt_roundtrip(x: Tensor) -> Tensor:
    """``logfmt_decode(logfmt_encode(x))``: bf16 ``[..., hidden]`` -> float32 ``[..., hidden]``."""
    return logfmt_decode(logfmt_encode(x))


def _pack_units(fields: Tensor) -> Tensor:
    """int64 ``[..., 32]`` (16 codes, 16 signs) -> uint8 ``[..., 20]``, the 160-bit little-endian unit."""
    words = [torch.zeros_like(fields[..., 0]) for _ in range(_LOGFMT_UNIT_BYTES // 4)]
    for index, (first_bit, width) in enumerate(_UNIT_FIELDS):
        word, shift = divmod(first_bit, 32)
        words[word] |= fields[..., index] << shift
        if shift + width > 32:  # the field straddles two words
            words[word + 1] |= fields[..., index] >> (32 - shift)
    return _le_bytes(torch.stack(words, dim=-1) & 0xFFFFFFFF, 4).flatten(-2)


def _unpack_units(units: Tensor) -> Tensor:
    """uint8 ``[..., 20]`` -> int64 ``[..., 32]`` (16 codes, 16 signs); inverse of ``_pack_units``."""
    words = _from_le_bytes(units.unflatten(-1, (-1, 4)))
    fields = []
    for first_bit, width in _UNIT_FIELDS:
        word, shift = divmod(first_bit, 32)
        value = words[..., word] >> shift
        if shift + width > 32:
            value = value | (words[..., word + 1] << (32 - shift))
        fields.append(value & ((1 << width) - 1))
    return torch.stack(fields, dim=-1)


def logfmt_pack(enc: LogFMTEncoded) -> Tensor:
    """Lay ``enc`` out as wire slots: uint8 ``[..., logfmt_slot_bytes(hidden)]``.

    Slot = the data area, where chunk c owns ``2 * chunk`` bytes at offset ``2 * chunk * c``, then
    G x (amax, amin) bf16 pairs (little-endian) at offset ``2 * hidden``.  Data first keeps every
    chunk 16-byte aligned for any hidden size.  A raw chunk holds its bf16 values; a castable chunk
    holds one 20-byte unit per 16 channels and leaves the rest of its area zero.
    """
    hidden = enc.codes.shape[-1]
    chunk = logfmt_chunk_size(hidden)
    meta_bytes = _le_bytes(enc.meta.view(torch.int16).to(torch.int64), 2).flatten(-3)
    raw_area = _le_bytes(enc.raw.view(torch.int16).to(torch.int64), 2).flatten(-2)
    raw_area = raw_area.unflatten(-1, (-1, 2 * chunk))

    fields = torch.cat((enc.codes.to(torch.int64).unflatten(-1, (-1, _LOGFMT_UNIT_CHANNELS)),
                        enc.signs.to(torch.int64).unflatten(-1, (-1, _LOGFMT_UNIT_CHANNELS))), dim=-1)
    unit_bytes = _pack_units(fields).flatten(-2).unflatten(-1, (hidden // chunk, -1))
    log_area = torch.nn.functional.pad(unit_bytes, (0, 2 * chunk - unit_bytes.shape[-1]))

    data_area = torch.where(enc.castable.unsqueeze(-1), log_area, raw_area).flatten(-2)
    return torch.cat((data_area, meta_bytes), dim=-1)


def logfmt_unpack(slot: Tensor, hidden: int) -> LogFMTEncoded:
    """Read wire slots uint8 ``[..., logfmt_slot_bytes(hidden)]`` back into a ``LogFMTEncoded``.

    ``castable`` is recomputed from the meta; ``raw`` holds the bf16 values of raw chunks and zeros
    elsewhere; the unused tail of each castable chunk's area is ignored.
    """
    slot_bytes = logfmt_slot_bytes(hidden)
    _check_dtype("slot", slot, torch.uint8)
    if slot.shape[-1] != slot_bytes:
        raise ArgumentError(f"slot.shape[-1] must be logfmt_slot_bytes({hidden})={slot_bytes}, "
                            f"got slot.shape={tuple(slot.shape)}")
    chunk = logfmt_chunk_size(hidden)
    num_groups = hidden // FP8_GROUP

    def bf16_from_bytes(data: Tensor) -> Tensor:
        return _to_signed(_from_le_bytes(data.unflatten(-1, (-1, 2))), 16).to(torch.int16).view(torch.bfloat16)

    meta = bf16_from_bytes(slot[..., 2 * hidden:]).unflatten(-1, (num_groups, 2))
    castable = _log_grid(meta, hidden).castable
    data_area = slot[..., : 2 * hidden].unflatten(-1, (hidden // chunk, 2 * chunk))

    in_castable = _per_channel(castable, hidden)
    raw = bf16_from_bytes(data_area.flatten(-2))
    raw = torch.where(in_castable, torch.zeros_like(raw), raw)

    units = data_area[..., : chunk // _LOGFMT_UNIT_CHANNELS * _LOGFMT_UNIT_BYTES]
    fields = _unpack_units(units.unflatten(-1, (-1, _LOGFMT_UNIT_BYTES))).flatten(-3, -2)
    codes = fields[..., :_LOGFMT_UNIT_CHANNELS].flatten(-2)
    signs = fields[..., _LOGFMT_UNIT_CHANNELS:].flatten(-2)
    codes = torch.where(in_castable, codes, 0).to(torch.int16)
    signs = in_castable & (signs != 0)
    return LogFMTEncoded(meta=meta, castable=castable, codes=codes, signs=signs, raw=raw)


def logfmt_max_relative_error() -> float:
    """Tolerance for ``|decode - x| / |x|`` of a castable element with ``|x| >= 2**lmin``.

    Neighbouring grid values a and ``a * 2**s`` are split at their midpoint, so the worst case is an
    x at the midpoint: ``(2**s - 1) / (2**s + 1)`` (about 0.02174), largest at the widest step
    ``s = 32 / 510``.  On top of that comes float32 rounding: the code is computed from
    ``log2|x| / s`` (up to ~2600 in magnitude, so ~2**-13 of a code) and the decoded exponent is a
    float32 of magnitude up to ~165 (half an ulp is 2**-17), each worth ~ln(2) * error in relative
    terms; an exhaustive sweep over bf16 inputs measures up to 1.2e-5 beyond the exact bound (2.6e-6
    for amax >= 2**-8).  The slack of 2**-15 covers that with room for the GPU's log2/exp2.
    """
    widest_step = LOGFMT_CLIP / (LOGFMT_CODE_MAX - 1)
    return (2.0 ** widest_step - 1.0) / (2.0 ** widest_step + 1.0) + 2.0 ** -15
