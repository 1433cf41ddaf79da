// All-gather of a few 64-bit words per rank through peer memory: the transport's smoke test and a
// device-side barrier.  One block; thread r < R talks to rank r.
//
// Region (offsets from lowlat/layout.py via Cfg):
//   kOffExchangeWords + p * kExchangeParityBytes : uint64 [R][kNumWords]  words received from each source
//   kOffExchangeFlags + p * kExchangeParityBytes : uint64 [R]             epoch flag of each source
// Double-buffered by the parity of the device-side call counter, like every lowlat exchange.
#pragma once

#include "common.cuh"
#include "rank.cuh"
#include "signal.cuh"
#include "state.cuh"
#include "transport.cuh"

namespace lowlat {

template <class Cfg>
__global__ void __launch_bounds__(128) exchange_allgather(const uint64_t* __restrict__ words,  // [kNumWords] this rank's words
                                                           uint64_t* __restrict__ gathered,    // [R][kNumWords] out
                                                           const RankArgs rank) {
    chain_after_previous_grid();
    constexpr int kNumRanks = Cfg::kNumRanks, kNumWords = Cfg::kNumWords;
    const Peers peers = rank.peers();
    const uint64_t seq = rank.state[kExchangeSeq];
    const uint64_t parity_offset = (seq & 1) * Cfg::kExchangeParityBytes;
    const uint64_t epoch = seq + 1;

    // Send: each thread writes this rank's words into one peer, then releases that peer's flag.
    for (int peer = threadIdx.x; peer < kNumRanks; peer += blockDim.x) {
        if (rank.masked(peer)) continue;
        const uint64_t base = Cfg::kOffExchangeWords + parity_offset + static_cast<uint64_t>(rank.id) * kNumWords * 8;
        for (int w = 0; w < kNumWords; ++w)
            put_u64(peers, peer, base + 8ull * w, words[w]);
        signal<peer_scope<Cfg>()>(peers, peer, Cfg::kOffExchangeFlags + parity_offset + 8ull * rank.id, epoch);
    }

    // Receive: wait for every source's flag, then read what it wrote.
    __shared__ int source_ok[kNumRanks];
    wait_all_sources<kNumRanks, peer_scope<Cfg>()>(peers.local(Cfg::kOffExchangeFlags + parity_offset), epoch, rank, source_ok, nullptr);
    for (int i = threadIdx.x; i < kNumRanks * kNumWords; i += blockDim.x) {
        const int src = i / kNumWords;
        const auto* slot = reinterpret_cast<const uint64_t*>(peers.local(Cfg::kOffExchangeWords + parity_offset));
        gathered[i] = source_ok[src] ? __ldcg(reinterpret_cast<const unsigned long long*>(slot) + i) : ~0ull;
    }
    __syncthreads();
    if (threadIdx.x == 0) rank.state[kExchangeSeq] = seq + 1;
}

}  // namespace lowlat
