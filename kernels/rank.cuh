// What every kernel knows about the rank it runs for, passed by value as its last parameter.
//
// lowlat/ops/context.py packs the same 48 bytes (RankArgs there); the static_assert below and the
// ABI letter 'R' (kernels/abi.cuh) keep the two in step.
#pragma once

#include "common.cuh"
#include "transport.cuh"

namespace lowlat {

struct RankArgs {
    const uint64_t* peer_bases;  // [R] base address of every rank's symmetric region, as seen from here
    uint64_t* state;             // [kNumStateWords] sequence numbers, block counters, status (state.cuh)
    int* mask;                   // [R] 1 for ranks excluded after a timeout
    unsigned long long* status;  // pinned host mirror of the first error
    long long timeout_ns;        // bound of every wait for a peer
    int id;                      // this rank
    int reserved;

    __device__ __forceinline__ Peers peers() const { return Peers{peer_bases, id}; }
    __device__ __forceinline__ bool masked(int peer) const { return ld_cg(mask + peer) != 0; }
};
static_assert(sizeof(RankArgs) == 48, "lowlat/ops/context.py packs RankArgs as 48 bytes");

// The scope of a Buffer's flags and fences (common.cuh): kGpu when every rank runs on this GPU
// (Cfg::kPeersOnDevice: virtual ranks, or a group of one), kSystem otherwise.
template <class Cfg>
__host__ __device__ constexpr Scope peer_scope() {
    return Cfg::kPeersOnDevice ? Scope::kGpu : Scope::kSystem;
}

}  // namespace lowlat
