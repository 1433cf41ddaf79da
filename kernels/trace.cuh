// Phase timing for kernel engineers (Cfg::kTrace; off in every shipped build, where it compiles to
// nothing).  Thread 0 of each block notes clock64() at numbered points of a kernel; at the end,
// every block prints its timeline in SM cycles from point 0, then its start and end on the global
// nanosecond timer (marked "last" for the block that raised the flags):
//
//   lowlat-trace <kernel> block <b> [last]: <point 1> <point 2> ... @ <start ns> <end ns>
//
// clock64 counts on one SM, so the points are exact within their block and not aligned to other
// blocks'; the global timer aligns the blocks (the kernel's span, the block that finishes last) at
// its own, coarser resolution.
#pragma once

#include "common.cuh"

namespace lowlat {

constexpr int kTracePoints = 8;

__device__ __forceinline__ long long* trace_slots() {
    __shared__ long long slots[kTracePoints + 2];  // the points, "this block raised the flags", the start in ns
    return slots;
}

template <class Cfg>
__device__ __forceinline__ void trace_mark(int point) {
    if constexpr (Cfg::kTrace) {
        if (threadIdx.x == 0) {
            trace_slots()[point] = clock64();
            if (point == 0) {
                trace_slots()[kTracePoints] = 0;
                trace_slots()[kTracePoints + 1] = static_cast<long long>(globaltimer_ns());
            }
        }
    }
}

// Called by the block that raised the flags (the last one to count in).
template <class Cfg>
__device__ __forceinline__ void trace_raised_flags() {
    if constexpr (Cfg::kTrace)
        if (threadIdx.x == 0) trace_slots()[kTracePoints] = 1;
}

// Points 1..kNumPoints-1 relative to point 0, and the block's start and end in ns, from every block.
template <class Cfg, int kNumPoints>
__device__ __forceinline__ void trace_print(const char* kernel) {
    static_assert(kNumPoints >= 2 && kNumPoints <= kTracePoints, "trace points 0..kTracePoints-1");
    if constexpr (Cfg::kTrace) {
        const long long* at = trace_slots();
        const bool raised = at[kTracePoints] != 0;
        if (threadIdx.x == 0) {
            const long long end_ns = static_cast<long long>(globaltimer_ns());
            long long d[kTracePoints - 1];
#pragma unroll
            for (int p = 1; p < kTracePoints; ++p) d[p - 1] = p < kNumPoints ? at[p] - at[0] : 0;
            printf("lowlat-trace %s block %d%s: %lld %lld %lld %lld %lld %lld %lld @ %lld %lld\n", kernel, blockIdx.x, raised ? " last" : "",
                   d[0], d[1], d[2], d[3], d[4], d[5], d[6], at[kTracePoints + 1], end_ns);
        }
    }
}

}  // namespace lowlat
