// Addresses inside a rank's symmetric region, from the offsets lowlat/layout.py put into Cfg.
#pragma once

#include "common.cuh"

namespace lowlat {

template <class Cfg>
struct Region {
    static constexpr int R = Cfg::kNumRanks, L = Cfg::kNumLocalExperts, T = Cfg::kMaxTokens, K = Cfg::kNumTopk;

    __device__ __forceinline__ static uint64_t parity(int p) { return Cfg::kOffParityBase + static_cast<uint64_t>(p) * Cfg::kParityBytes; }

    __device__ __forceinline__ static uint64_t dispatch_flag(int p, int src) { return parity(p) + Cfg::kOffDispatchFlags + 8ull * src; }
    __device__ __forceinline__ static uint64_t combine_flag(int p, int src) { return parity(p) + Cfg::kOffCombineFlags + 8ull * src; }

    __device__ __forceinline__ static uint64_t dispatch_count(int p, int local_expert, int src) {
        return parity(p) + Cfg::kOffDispatchCount + 4ull * (static_cast<uint64_t>(local_expert) * R + src);
    }
    __device__ __forceinline__ static uint64_t dispatch_route(int p, int local_expert, int src, int i) {
        return parity(p) + Cfg::kOffDispatchRoute + 4ull * ((static_cast<uint64_t>(local_expert) * R + src) * T + i);
    }
    __device__ __forceinline__ static uint64_t dispatch_message(int p, int src, int token) {
        return parity(p) + Cfg::kOffDispatchStaging + (static_cast<uint64_t>(src) * T + token) * Cfg::kMessageStride;
    }
    __device__ __forceinline__ static uint64_t combine_slot(int p, int token, int k) {
        return parity(p) + Cfg::kOffCombineStaging + (static_cast<uint64_t>(token) * K + k) * Cfg::kCombineSlotStride;
    }
    __device__ __forceinline__ static uint64_t send_message(int token) {
        return Cfg::kOffSendBuffer + static_cast<uint64_t>(token) * Cfg::kMessageStride;
    }
    // Put staging (nvshmem transport only): what puts read, since they read only symmetric memory.
    __device__ __forceinline__ static uint64_t route_stage(int expert) {
        return Cfg::kOffRouteStaging + 4ull * static_cast<uint64_t>(expert) * T;
    }
    __device__ __forceinline__ static uint64_t combine_send_stage(int row) {
        return Cfg::kOffCombineSendStaging + static_cast<uint64_t>(row) * Cfg::kCombineSlotStride;
    }
};

// A route entry names a source token and its top-k slot.
__device__ __forceinline__ uint32_t route_entry(int token, int k) { return (static_cast<uint32_t>(token) << 5) | static_cast<uint32_t>(k); }
__device__ __forceinline__ int route_token(uint32_t entry) { return static_cast<int>(entry >> 5); }
__device__ __forceinline__ int route_topk(uint32_t entry) { return static_cast<int>(entry & 31u); }

template <class Cfg>
__device__ __forceinline__ long long load_expert(const void* topk_idx, int i) {
    if constexpr (Cfg::kTopkInt64) return __ldg(static_cast<const long long*>(topk_idx) + i);
    else return __ldg(static_cast<const int*>(topk_idx) + i);
}

// The rows a rank received, viewed as segments: local expert l owns rows [expert_begin[l],
// expert_begin[l+1]) of the flattened list, and inside it source s owns the rows starting at
// source_begin[l*R + s].  Built in shared memory by every block from per-(expert, source) counts.
template <int L, int R>
struct RowSegments {
    int expert_begin[L + 1];
    int source_begin[L * R];

    // counts(l, s) -> rows of local expert l from source s.  One thread per expert sums over
    // sources, then warp 0 turns the expert totals into a prefix.
    template <class Counts>
    __device__ __forceinline__ void build(Counts counts) {
        for (int l = threadIdx.x; l < L; l += blockDim.x) {
            int running = 0;
            for (int s = 0; s < R; ++s) {
                source_begin[l * R + s] = running;
                running += counts(l, s);
            }
            expert_begin[l + 1] = running;
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            const int lane = threadIdx.x;
            int carry = 0;
            for (int base = 0; base < L; base += 32) {
                int value = base + lane < L ? expert_begin[base + lane + 1] : 0;
#pragma unroll
                for (int offset = 1; offset < 32; offset *= 2) {
                    const int up = __shfl_up_sync(kFullMask, value, offset);
                    if (lane >= offset) value += up;
                }
                if (base + lane < L) expert_begin[base + lane + 1] = value + carry;
                carry += __shfl_sync(kFullMask, value, 31);
            }
            if (lane == 0) expert_begin[0] = 0;
        }
        __syncthreads();
    }

    __device__ __forceinline__ int total() const { return expert_begin[L]; }
    __device__ __forceinline__ int count(int l) const { return expert_begin[l + 1] - expert_begin[l]; }
    __device__ __forceinline__ int count(int l, int s) const {
        return (s + 1 < R ? source_begin[l * R + s + 1] : count(l)) - source_begin[l * R + s];
    }

    // Flattened row -> (local expert, row inside the expert, source rank, index inside the source).
    __device__ __forceinline__ void locate(int row, int& l, int& j, int& s, int& i) const {
        l = find_segment(expert_begin, L, row);
        j = row - expert_begin[l];
        s = find_segment(source_begin + l * R, R, j);
        i = j - source_begin[l * R + s];
    }
};

}  // namespace lowlat
