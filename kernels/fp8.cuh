// FP8 e4m3 quantisation of bf16 tokens, one fp32 scale per 128 channels (DeepEP / DeepGEMM format).
// lowlat/formats.py holds the reference; tests compare the two bit for bit.
#pragma once

#include "common.cuh"

namespace lowlat::fp8 {

constexpr float kAmaxFloor = 1e-4f;
constexpr float kMax = 448.0f;
constexpr float kInvMax = 1.0f / 448.0f;

__device__ __forceinline__ float pow2(int exponent) {  // exponent in [-126, 127]
    return __uint_as_float(static_cast<uint32_t>(exponent + 127) << 23);
}

__device__ __forceinline__ int log2_ceil(float value) {  // value > 0, normal
    const uint32_t bits = __float_as_uint(value);
    return static_cast<int>((bits >> 23) & 0xff) - 127 + ((bits & 0x7fffff) != 0);
}

// scale multiplies the data into fp8 range; scale_inv (what is stored) multiplies it back.
__device__ __forceinline__ void scales_for(float amax, bool round_scale, float& scale, float& scale_inv) {
    if (round_scale) {
        const int exponent = log2_ceil(amax * kInvMax);
        scale = pow2(-exponent);
        scale_inv = pow2(exponent);
    } else {
        scale_inv = amax * kInvMax;
        scale = kMax / amax;
    }
}

__device__ __forceinline__ uint8_t ue8m0_of(float scale_inv) { return static_cast<uint8_t>(__float_as_uint(scale_inv) >> 23); }

// Channels [first, first + kSlice) of one bf16 token row, quantised and held in registers, ready to
// be stored into any number of messages (kHidden fp8 bytes, then kHidden/128 fp32 scales).
// Warp-cooperative: each lane takes 8 channels per 256-channel step and half a warp spans one
// 128-channel group; every load of the slice is issued before the first one is used.
template <int kHidden, int kSlice>
struct QuantizedSlice {
    static_assert(kHidden % 128 == 0 && kSlice % 128 == 0, "channels come in groups of 128");
    static constexpr int kSteps = static_cast<int>(ceil_div(kSlice, 256));
    uint2 packed[kSteps];     // this lane's 8 fp8 channels per step
    float scale_inv[kSteps];  // its 128-channel group's stored scale per step

    __device__ __forceinline__ void quantize(const __nv_bfloat16* __restrict__ row, int first, bool round_scale) {
        const int lane = lane_id();
        const auto* row4 = reinterpret_cast<const int4*>(row);
        int4 raw[kSteps];
#pragma unroll
        for (int step = 0; step < kSteps; ++step) {
            const int offset = step * 256 + lane * 8;  // inside the slice
            raw[step] = offset < kSlice ? __ldg(row4 + (first + offset) / 8) : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int step = 0; step < kSteps; ++step) {
            const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw[step]);
            float values[8];
            float amax = kAmaxFloor;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 v = __bfloat1622float2(pairs[j]);
                values[2 * j] = v.x;
                values[2 * j + 1] = v.y;
                amax = fmaxf(amax, fmaxf(fabsf(v.x), fabsf(v.y)));
            }
            amax = group_reduce<16>(amax, MaxOp{});
            float scale;
            scales_for(amax, round_scale, scale, scale_inv[step]);
            uint32_t words[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const auto lo = __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(values[4 * j], scale), __fmul_rn(values[4 * j + 1], scale)), __NV_SATFINITE, __NV_E4M3);
                const auto hi = __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(values[4 * j + 2], scale), __fmul_rn(values[4 * j + 3], scale)), __NV_SATFINITE, __NV_E4M3);
                words[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
            }
            packed[step] = make_uint2(words[0], words[1]);
        }
    }

    // Into one message (the upper half-warp idles on a trailing 128-group).
    __device__ __forceinline__ void store(uint8_t* message, int first) const {
        const int lane = lane_id();
        auto* scales = reinterpret_cast<float*>(message + kHidden);
#pragma unroll
        for (int step = 0; step < kSteps; ++step) {
            const int offset = step * 256 + lane * 8;
            if (offset < kSlice) {
                const int channel = first + offset;
                if ((lane & 15) == 0) scales[channel / 128] = scale_inv[step];
                *reinterpret_cast<uint2*>(message + channel) = packed[step];
            }
        }
    }
};

// Quantise channels [first, first + kSlice) of one bf16 token row into the message `out`.
template <int kHidden, int kSlice>
__device__ __forceinline__ void quantize_slice(const __nv_bfloat16* __restrict__ row, int first, uint8_t* out, bool round_scale) {
    QuantizedSlice<kHidden, kSlice> slice;
    slice.quantize(row, first, round_scale);
    slice.store(out, first);
}

}  // namespace lowlat::fp8
