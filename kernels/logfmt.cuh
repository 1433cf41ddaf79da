// LogFMT-10, the optional combine wire format (DeepEP's maths): per 16 channels a 20-byte unit of
// nine-bit log codes plus sign bits, with (amax, amin) per 128 channels as metadata and a per-chunk
// fallback to raw bf16 when a chunk's range does not suit the log grid.
//
// Slot layout (lowlat/formats.py logfmt_pack / logfmt_unpack is the reference):
//   [0, 2*H)            data; chunk c at byte c*2*kChunk, either kChunk bf16 values or kChunk/16 units
//   [2*H, 2*H + 4*H/128) metadata: one (amax, amin) bf16 pair per 128-channel group
// Lane mapping: lane l owns units l, l + 32, ... of a chunk (a unit is 16 consecutive channels), so an
// aligned group of 8 lanes covers one 128-channel group.
#pragma once

#include "common.cuh"

namespace lowlat::logfmt {

constexpr float kMinClip = 32.0f;  // at most 2^32 of dynamic range inside one group
constexpr int kMaxCode = 511;      // nine bits; code 0 is zero

__host__ __device__ constexpr int chunk_size(int hidden) { return channel_chunk(hidden); }

__device__ __forceinline__ float lg2(float x) { float y; asm("lg2.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ float ex2(float x) { float y; asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }

// log2 range of one 128-channel group, and whether it suits the log grid.
struct GroupRange {
    float log_amax, log_amin;
    bool usable;
    __device__ __forceinline__ static GroupRange of(float amax, float amin) {
        GroupRange g;
        g.log_amax = lg2(amax);
        g.log_amin = amin == 0.0f ? g.log_amax - kMinClip : fmaxf(lg2(amin), g.log_amax - kMinClip);
        g.usable = g.log_amax < 0.0f && g.log_amin < g.log_amax;
        return g;
    }
};

template <int kChunk>
struct Chunk {
    static constexpr int kUnits = kChunk / 16;
    static constexpr int kUnitsPerLane = kUnits >= 32 ? kUnits / 32 : 1;
    static constexpr int kEncodedBytes = kUnits * 20;
    static_assert(kChunk % 128 == 0 && kChunk <= 1024, "chunk must be 128..1024 channels");

    __device__ __forceinline__ static bool unit_active(int unit) { return unit < kUnits; }

    // Encode chunk `src` (kChunk bf16, global memory) into `encoded` (shared memory, kEncodedBytes)
    // and write the group metadata words (bf16 amax | bf16 amin << 16) to `meta[0 .. kChunk/128)`.
    // Returns whether the chunk was encoded; when not, the caller sends the raw bf16 values.
    __device__ __forceinline__ static bool encode(const __nv_bfloat16* src, uint8_t* encoded, uint32_t* meta) {
        const int lane = lane_id();
        uint32_t words[kUnitsPerLane][8];
        GroupRange range[kUnitsPerLane];
        bool usable = true;
#pragma unroll
        for (int j = 0; j < kUnitsPerLane; ++j) {
            const int unit = lane + 32 * j;
            float amax = 0.0f, amin = __int_as_float(0x7f800000);  // +inf
            if (unit_active(unit)) {
                const auto* src4 = reinterpret_cast<const int4*>(src + unit * 16);
                const int4 a = __ldg(src4), b = __ldg(src4 + 1);
                const int4 both[2] = {a, b};
#pragma unroll
                for (int w = 0; w < 8; ++w) words[j][w] = reinterpret_cast<const uint32_t*>(both)[w];
#pragma unroll
                for (int w = 0; w < 8; ++w) {
                    const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[j][w]));
                    amax = fmaxf(amax, fmaxf(fabsf(v.x), fabsf(v.y)));
                    amin = fminf(amin, fminf(fabsf(v.x), fabsf(v.y)));
                }
            }
            amax = group_reduce<8>(amax, MaxOp{});
            amin = group_reduce<8>(amin, MinOp{});
            range[j] = GroupRange::of(amax, amin);
            if (unit_active(unit)) {
                usable = usable && range[j].usable;
                if (unit % 8 == 0) {
                    const __nv_bfloat162 pair = __floats2bfloat162_rn(amax, amin);  // exact: both are bf16 values
                    meta[unit / 8] = *reinterpret_cast<const uint32_t*>(&pair);
                }
            }
        }
        if (!__all_sync(kFullMask, usable)) return false;
#pragma unroll
        for (int j = 0; j < kUnitsPerLane; ++j) {
            const int unit = lane + 32 * j;
            if (!unit_active(unit)) continue;
            const float step = (range[j].log_amax - range[j].log_amin) / static_cast<float>(kMaxCode - 1);
            const float step_inv = 1.0f / step;
            const float rounding = 2.0f - lg2((1.0f + ex2(step)) * 0.5f) * step_inv;
            const float fused = rounding - range[j].log_amin * step_inv;
            uint32_t codes[16], signs = 0;
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const uint32_t half = (words[j][i / 2] >> (16 * (i % 2))) & 0xffffu;
                signs |= ((half >> 15) & 1u) << i;
                const float magnitude = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(half & 0x7fffu)));
                codes[i] = min(__float2uint_rd(fmaxf(lg2(magnitude) * step_inv + fused, 0.0f)), static_cast<unsigned>(kMaxCode));
            }
            auto* out = reinterpret_cast<uint32_t*>(encoded + unit * 20);
            out[0] = codes[0] | (codes[1] << 9) | (codes[2] << 18) | (codes[3] << 27);
            out[1] = (codes[3] >> 5) | (codes[4] << 4) | (codes[5] << 13) | (codes[6] << 22) | (codes[7] << 31);
            out[2] = (codes[7] >> 1) | (codes[8] << 8) | (codes[9] << 17) | (codes[10] << 26);
            out[3] = (codes[10] >> 6) | (codes[11] << 3) | (codes[12] << 12) | (codes[13] << 21) | (codes[14] << 30);
            out[4] = (codes[14] >> 2) | (codes[15] << 7) | (signs << 16);
        }
        return true;
    }

    // Receiver side, one unit per lane: whether chunk `chunk_idx` was encoded (recomputed from all
    // of the chunk's groups, as the sender decided) and the range of the group holding `unit`.
    __device__ __forceinline__ static bool plan_unit(const uint32_t* slot_meta, int chunk_idx, int unit, GroupRange& range) {
        constexpr int kGroups = kChunk / 128;
        const int lane = lane_id();
        bool usable = true;
        if (lane < kGroups) {
            const uint32_t word = ld_cg(slot_meta + chunk_idx * kGroups + lane);
            const float2 pair = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&word));
            usable = GroupRange::of(pair.x, pair.y).usable;
        }
        const bool encoded = __all_sync(kFullMask, usable);
        if (encoded && unit_active(unit)) {
            const uint32_t word = ld_cg(slot_meta + chunk_idx * kGroups + unit / 8);
            const float2 pair = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&word));
            range = GroupRange::of(pair.x, pair.y);
        }
        return encoded;
    }

    // acc[i] += weight * value_i for the 16 channels of encoded unit `unit` (products rounded to
    // fp32 before the add, as the reference does).
    __device__ __forceinline__ static void accumulate_encoded(const uint8_t* unit_bytes, const GroupRange& range, float weight, float (&acc)[16]) {
        uint32_t w[5];
#pragma unroll
        for (int i = 0; i < 5; ++i) w[i] = ld_cg(reinterpret_cast<const uint32_t*>(unit_bytes) + i);
        const float step = (range.log_amax - range.log_amin) / static_cast<float>(kMaxCode - 1);
        const uint32_t signs = w[4] >> 16;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int bit = 9 * i, word = bit / 32, shift = bit % 32;
            uint32_t code = w[word] >> shift;
            if (shift > 23) code |= w[word + 1] << (32 - shift);
            code &= 0x1ffu;
            float value = code == 0 ? 0.0f : ex2(static_cast<float>(code - 1) * step + range.log_amin);
            if ((signs >> i) & 1u) value = -value;
            acc[i] = __fadd_rn(acc[i], __fmul_rn(value, weight));
        }
    }
};

// acc[i] += weight * value_i for 16 raw bf16 channels already in registers.
__device__ __forceinline__ void accumulate_bf16(const int4 (&halves)[2], float weight, float (&acc)[16]) {
    const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(halves);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float2 v = __bfloat1622float2(pairs[i]);
        acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(v.x, weight));
        acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(v.y, weight));
    }
}

// acc[i] += weight * value_i for 16 raw bf16 channels in (peer-written) global memory.
__device__ __forceinline__ void accumulate_raw(const uint8_t* bytes, float weight, float (&acc)[16]) {
    const auto* src4 = reinterpret_cast<const int4*>(bytes);
    const int4 halves[2] = {ld_cg(src4), ld_cg(src4 + 1)};
    accumulate_bf16(halves, weight, acc);
}

}  // namespace lowlat::logfmt
