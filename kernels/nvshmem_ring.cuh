// The NVSHMEM transport's smoke test: every PE sends one message to the next PE of a ring and
// receives one from the previous, through kernels/transport.cuh's NVSHMEM flavour (pointer path or puts,
// per peer).  One block of kNumWarps warps.
//
//   1. Fill this PE's send area (symmetric, so it is a valid put source) with ring_word(rank, epoch, i).
//   2. Warp w puts slice w of the message to the next PE with put-with-signal (flag slot w); thread
//      0 then puts a 32-bit header word and sets the header flag (slot kNumWarps) with signal().
//   3. Thread t <= kNumWarps waits, bounded by timeout_ns (%globaltimer), for flag slot t from the
//      previous PE; a late PE is reported as kStatusTimeout naming it (no trap, no hang).
//   4. Copy the received message and header into `received` / `header` (all ones where they did
//      not arrive).
//
// Region (offsets from lowlat/transport/nvshmem_ring.py via Cfg), double-buffered by the parity of
// the call counter state[kExchangeSeq] (the transport smoke tests' slot), so graph replays need no
// host bookkeeping:
//   kOffSend                              : uint8  [kMessageBytes]          this PE's outgoing message
//   kOffRecv   + p * kMessageBytes        : uint8  [kMessageBytes]          message from the previous PE
//   kOffHeader + p * 16                   : uint32                          header word from the previous PE
//   kOffFlags  + p * kFlagBytes           : uint64 [kNumWarps + 1]          epoch flags from the previous PE
#pragma once

#include "common.cuh"
#include "transport.cuh"
#include "signal.cuh"
#include "state.cuh"

namespace lowlat {

// Word i of the message `rank` sends in call `epoch` (epoch >= 1): distinct per source (< 256), call
// (mod 256) and word (< 65536, so messages are at most 256 KiB).
__host__ __device__ constexpr uint32_t ring_word(int rank, uint64_t epoch, uint32_t i) {
    return (static_cast<uint32_t>(rank & 0xff) << 24) | (static_cast<uint32_t>(epoch & 0xff) << 16) | (i & 0xffffu);
}
__host__ __device__ constexpr uint32_t ring_header(int rank, uint64_t epoch) {
    return 0xA5000000u | (static_cast<uint32_t>(rank) << 16) | static_cast<uint32_t>(epoch & 0xffff);
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) nvshmem_ring(const uint64_t* __restrict__ peer_bases,  // [R] 0 = put
                                                                   uint8_t* __restrict__ region,       // this PE's symmetric region
                                                                   int rank,
                                                                   int silent_rank,  // a PE that does not send (-1: none)
                                                                   uint32_t* __restrict__ received,  // [kMessageBytes / 4] out
                                                                   uint32_t* __restrict__ header,    // [1] out
                                                                   uint64_t* __restrict__ state,     // [kNumStateWords]
                                                                   unsigned long long* __restrict__ status,  // [1] first error
                                                                   long long timeout_ns) {
    constexpr int kNumRanks = Cfg::kNumRanks, kNumWarps = Cfg::kNumWarps;
    constexpr uint32_t kMessageBytes = Cfg::kMessageBytes, kSliceBytes = kMessageBytes / kNumWarps;
    static_assert(kMessageBytes % (16 * kNumWarps) == 0, "each warp puts a slice of whole 16-byte chunks");
    static_assert(kMessageBytes <= 256 * 1024 && kNumRanks <= 256, "ring_word tells sources and words apart up to these");
    const Peers peers{peer_bases, rank};  // peer_bases[rank] == region
    const int next = (rank + 1) % kNumRanks, prev = (rank + kNumRanks - 1) % kNumRanks;
    const uint64_t seq = state[kExchangeSeq];
    const uint64_t parity = seq & 1, epoch = seq + 1;
    const uint64_t recv_offset = Cfg::kOffRecv + parity * kMessageBytes;
    const uint64_t header_offset = Cfg::kOffHeader + parity * 16;
    const uint64_t flags_offset = Cfg::kOffFlags + parity * Cfg::kFlagBytes;
    const int warp = static_cast<int>(threadIdx.x / 32);

    // 1. The outgoing message, in symmetric memory.
    auto* send = reinterpret_cast<uint32_t*>(peers.local(Cfg::kOffSend));
    for (uint32_t i = threadIdx.x; i < kMessageBytes / 4; i += blockDim.x) send[i] = ring_word(rank, epoch, i);
    __syncthreads();

    // 2. Send (unless this PE plays the silent one).
    if (rank != silent_rank) {
        put_signal_warp(peers, next, recv_offset + warp * kSliceBytes, peers.local(Cfg::kOffSend + warp * kSliceBytes),
                        kSliceBytes, flags_offset + 8ull * warp, epoch);
        if (threadIdx.x == 0) {
            put_u32(peers, next, header_offset, ring_header(rank, epoch));
            signal(peers, next, flags_offset + 8ull * kNumWarps, epoch);
        }
    }

    // 3. Bounded wait for the previous PE's flags.
    __shared__ int arrived;
    if (threadIdx.x == 0) arrived = 1;
    __syncthreads();
    if (threadIdx.x <= kNumWarps) {
        long long cycles = 0;
        const auto* flag = reinterpret_cast<const uint64_t*>(peers.local(flags_offset)) + threadIdx.x;
        const WaitResult result = wait_flag(flag, epoch, timeout_ns, &cycles);
        if (result != WaitResult::kArrived) {
            arrived = 0;
            report(state, status, result == WaitResult::kTimeout ? kStatusTimeout : kStatusOverrun, prev,
                   static_cast<int>(epoch));
        }
    }
    __syncthreads();

    // 4. Hand out what arrived.
    const auto* recv = reinterpret_cast<const uint32_t*>(peers.local(recv_offset));
    for (uint32_t i = threadIdx.x; i < kMessageBytes / 4; i += blockDim.x) received[i] = arrived ? ld_cg(recv + i) : ~0u;
    if (threadIdx.x == 0) *header = arrived ? ld_cg(reinterpret_cast<const uint32_t*>(peers.local(header_offset))) : ~0u;
    // Every thread completes the puts it took part in before the next call overwrites the send area.
    flush_puts();
    __syncthreads();
    if (threadIdx.x == 0) state[kExchangeSeq] = seq + 1;
}

}  // namespace lowlat
