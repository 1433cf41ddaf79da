// Phase timing for kernel engineers (Cfg::kTrace; off in every shipped build, where it compiles to
// nothing).  Thread 0 of each block notes clock64() at numbered points of a kernel; at the end,
// block 0 and the block that raised the flags print their timelines in SM cycles from point 0:
//
//   lowlat-trace <kernel> block <b> [last]: <point 1> <point 2> ...
//
// clock64 counts on one SM, so a line is exact within its block; lines are not aligned to each other.
#pragma once

#include "common.cuh"

namespace lowlat {

constexpr int kTracePoints = 8;

__device__ __forceinline__ long long* trace_slots() {
    __shared__ long long slots[kTracePoints + 1];  // the points, then "this block raised the flags"
    return slots;
}

template <class Cfg>
__device__ __forceinline__ void trace_mark(int point) {
    if constexpr (Cfg::kTrace) {
        if (threadIdx.x == 0) {
            trace_slots()[point] = clock64();
            if (point == 0) trace_slots()[kTracePoints] = 0;
        }
    }
}

// Called by the block that raised the flags (the last one to count in).
template <class Cfg>
__device__ __forceinline__ void trace_raised_flags() {
    if constexpr (Cfg::kTrace)
        if (threadIdx.x == 0) trace_slots()[kTracePoints] = 1;
}

// Points 1..kNumPoints-1 relative to point 0, from block 0 and the block that raised the flags.
template <class Cfg, int kNumPoints>
__device__ __forceinline__ void trace_print(const char* kernel) {
    static_assert(kNumPoints >= 2 && kNumPoints <= kTracePoints, "trace points 0..kTracePoints-1");
    if constexpr (Cfg::kTrace) {
        const long long* at = trace_slots();
        const bool raised = at[kTracePoints] != 0;
        if (threadIdx.x == 0 && (blockIdx.x == 0 || raised)) {
            long long d[kTracePoints - 1];
#pragma unroll
            for (int p = 1; p < kTracePoints; ++p) d[p - 1] = p < kNumPoints ? at[p] - at[0] : 0;
            printf("lowlat-trace %s block %d%s: %lld %lld %lld %lld %lld %lld %lld\n", kernel, blockIdx.x, raised ? " last" : "", d[0], d[1],
                   d[2], d[3], d[4], d[5], d[6]);
        }
    }
}

}  // namespace lowlat
