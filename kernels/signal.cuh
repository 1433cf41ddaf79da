// Epoch flags with bounded waits, and last-block detection.
//
// A flag holds the sequence number (+1) of the call that last wrote the data it guards; a receiver
// waits for exactly the value its own call expects.  Nothing ever resets a flag, so no cleaning
// pass is needed and a graph replays correctly any number of times.
#pragma once

#include "common.cuh"
#include "rank.cuh"
#include "state.cuh"

namespace lowlat {

enum class WaitResult { kArrived, kOverrun, kTimeout };

// Spin until *flag == expected.  A larger value means the peer ran two calls ahead and reused the
// buffer (reported as an overrun); no change for timeout_ns means the peer is late.
template <Scope kScope = Scope::kSystem>
__device__ __forceinline__ WaitResult wait_flag(const uint64_t* flag, uint64_t expected, long long timeout_ns, long long* waited_cycles) {
    const long long start_cycles = clock64();
    const uint64_t start_ns = globaltimer_ns();
    WaitResult result = WaitResult::kArrived;
    while (true) {
        const uint64_t value = ld_acquire<kScope>(flag);
        if (value == expected) break;
        if (value > expected) { result = WaitResult::kOverrun; break; }
        if (static_cast<long long>(globaltimer_ns() - start_ns) > timeout_ns) { result = WaitResult::kTimeout; break; }
    }
    *waited_cycles = clock64() - start_cycles;
    return result;
}

// Called by every thread of every block at the end of a kernel.  The block synchronises, then one
// thread fences at kScope (cumulative: it orders the writes of every thread that reached the
// barrier, the pattern CUTLASS's semaphore uses) and counts the block in.  Returns true, in all
// threads of that block, in the last block to finish, which may then publish the kernel's results
// with release stores.  The last block also resets the counter for the next launch.
template <Scope kScope = Scope::kSystem>
__device__ __forceinline__ bool finish_block(unsigned* counter) {
    __shared__ bool is_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        fence_acq_rel<kScope>();
        const unsigned done = atomicAdd(counter, 1u) + 1u;
        is_last = done == gridDim.x;
        if (is_last) {
            *counter = 0u;
            fence_acq_rel<kScope>();
        }
    }
    __syncthreads();
    return is_last;
}

// Wait for the flag of every source rank (threads stride over ranks).  Sources masked before the
// call, late ones (masked now, reported), and overrunning ones end with source_ok[s] == 0.
template <int kNumRanks, Scope kScope = Scope::kSystem>
__device__ __forceinline__ void wait_all_sources(const uint8_t* flags_base, uint64_t expected, const RankArgs& rank, int* source_ok,
                                                 long long* wait_cost_stats) {
    for (int src = threadIdx.x; src < kNumRanks; src += blockDim.x) {
        int ok = 0;
        if (!rank.masked(src)) {
            long long cycles = 0;
            const auto flag = reinterpret_cast<const uint64_t*>(flags_base) + src;
            const WaitResult result = wait_flag<kScope>(flag, expected, rank.timeout_ns, &cycles);
            ok = result == WaitResult::kArrived;
            if (result == WaitResult::kTimeout) {
                atomicExch(rank.mask + src, 1);
                report(rank.state, rank.status, kStatusTimeout, src, static_cast<int>(expected));
            } else if (result == WaitResult::kOverrun) {
                report(rank.state, rank.status, kStatusOverrun, src, static_cast<int>(expected));
            }
            if (wait_cost_stats != nullptr && blockIdx.x == 0) atomicAdd(reinterpret_cast<unsigned long long*>(wait_cost_stats + src), cycles);
        }
        source_ok[src] = ok;
    }
    __syncthreads();
}

}  // namespace lowlat
