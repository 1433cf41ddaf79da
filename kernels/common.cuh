// Device-side basics shared by every lowlat kernel: warp arithmetic, memory-ordering PTX, timers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda/std/cstdint>

namespace lowlat {

using cuda::std::int64_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;
using cuda::std::uint8_t;

constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ constexpr long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

// Channels one warp handles at a time along a token (a dispatch slice, a combine/LogFMT chunk): the
// largest of 1024, 512, 256, 128 that divides the hidden size.
__host__ __device__ constexpr int channel_chunk(int hidden) {
    return hidden % 1024 == 0 ? 1024 : hidden % 512 == 0 ? 512 : hidden % 256 == 0 ? 256 : 128;
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x & 31); }
__device__ __forceinline__ unsigned lanes_below(int lane) { return (1u << lane) - 1u; }

// Reduce over aligned groups of kLanes lanes (kLanes a power of two <= 32); every lane gets the result.
template <int kLanes, class T, class Op>
__device__ __forceinline__ T group_reduce(T value, Op op) {
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(kFullMask, value, offset));
    return value;
}
struct MaxOp { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct MinOp { __device__ float operator()(float a, float b) const { return fminf(a, b); } };

// ---- memory ordering ---------------------------------------------------------------------------
// Flags are 64-bit words written with release and read with acquire, so the data a peer wrote
// before its flag is visible once the flag is.  The scope is the narrowest that holds every peer:
// kGpu when all ranks run on this GPU (virtual ranks, a one-rank group), kSystem when a peer is
// another GPU (NVLink) or the host reads what is published.

enum class Scope { kGpu, kSystem };

template <Scope kScope = Scope::kSystem>
__device__ __forceinline__ uint64_t ld_acquire(const uint64_t* ptr) {
    uint64_t value;
    if constexpr (kScope == Scope::kGpu) asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
    else asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
    return value;
}

template <Scope kScope = Scope::kSystem>
__device__ __forceinline__ void st_release(uint64_t* ptr, uint64_t value) {
    if constexpr (kScope == Scope::kGpu) asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
    else asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

template <Scope kScope = Scope::kSystem>
__device__ __forceinline__ void fence_acq_rel() {
    if constexpr (kScope == Scope::kGpu) asm volatile("fence.acq_rel.gpu;" ::: "memory");
    else asm volatile("fence.acq_rel.sys;" ::: "memory");
}

// The status mirror in pinned host memory is always written at system scope.
__device__ __forceinline__ void st_relaxed_sys(unsigned long long* ptr, unsigned long long value) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Loads of data that peers wrote during this kernel's lifetime go through L2 (never the
// non-coherent path), after the acquire of the flag that published them.
__device__ __forceinline__ int4 ld_cg(const int4* ptr) { return __ldcg(ptr); }
__device__ __forceinline__ int ld_cg(const int* ptr) { return __ldcg(ptr); }
__device__ __forceinline__ float ld_cg(const float* ptr) { return __ldcg(ptr); }
__device__ __forceinline__ uint32_t ld_cg(const uint32_t* ptr) { return __ldcg(ptr); }

// A warp copies n Words (int4 or uint32_t) from src to dst, kUnroll loads in flight per lane.  The
// stores go through L2 (__stcg): the destination is usually a peer's memory or a staging area.
template <class Word, int kUnroll = 4>
__device__ __forceinline__ void store_warp(Word* dst, const Word* src, int n) {
    int i = lane_id();
    for (; i + 32 * (kUnroll - 1) < n; i += 32 * kUnroll) {
        Word chunk[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) chunk[u] = src[i + 32 * u];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) __stcg(dst + i + 32 * u, chunk[u]);
    }
    for (; i < n; i += 32) __stcg(dst + i, src[i]);
}

// Programmatic dependent launch (sm_90+; both instructions are no-ops for a launch that did not ask
// for it).  The kernel first lets the next kernel on its stream be scheduled as soon as every one
// of its own blocks runs, then waits until the previous kernel has finished and its writes are
// visible.  Every low-latency kernel calls this before anything else, so nothing it reads is stale
// and the launch gap hides behind the previous kernel's tail.
__device__ __forceinline__ void chain_after_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ uint64_t globaltimer_ns() {
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    return now;
}

// Index of the last element of sorted `begin[0..n)` that is <= value (begin[0] <= value assumed).
__device__ __forceinline__ int find_segment(const int* begin, int n, int value) {
    int lo = 0, hi = n;  // answer in [lo, hi)
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (begin[mid] <= value) lo = mid; else hi = mid;
    }
    return lo;
}

}  // namespace lowlat
