// The one path by which lowlat writes into another rank's symmetric region.
//
// Kernels see a device array of R peer base addresses (filled by the transport: virtual ranks on
// one GPU, CUDA IPC over NVLink) and address peers by (rank, byte offset).  Every data write, every
// word write and every signal goes through put_warp / put_u32 / put_u64 / signal below: these are the
// functions a transport whose peers are not reachable by pointer (NVSHMEM puts) has to provide.
#pragma once

#include "common.cuh"

namespace lowlat {

struct Peers {
    const uint64_t* bases;  // [num_ranks] base address of each rank's symmetric region
    int rank;

    __device__ __forceinline__ uint8_t* local(uint64_t offset) const {
        return reinterpret_cast<uint8_t*>(bases[rank]) + offset;
    }
    __device__ __forceinline__ uint8_t* remote(int peer, uint64_t offset) const {
        return reinterpret_cast<uint8_t*>(bases[peer]) + offset;
    }
};

// Warp-cooperative copy of num_bytes (a multiple of 16, both ends 16-byte aligned) from local
// memory (global or shared) to `peer` at `dst_offset`.  The source may have been written by this
// warp just before (after a __syncwarp), so it is read with plain generic loads, never the
// read-only path.
template <int kUnroll = 4>
__device__ __forceinline__ void put_warp(const Peers& peers, int peer, uint64_t dst_offset, const void* src, uint32_t num_bytes) {
    const int lane = lane_id();
    const auto* src4 = static_cast<const int4*>(src);
    auto* dst4 = reinterpret_cast<int4*>(peers.remote(peer, dst_offset));
    const int n = static_cast<int>(num_bytes / 16);
    int i = lane;
    for (; i + 32 * (kUnroll - 1) < n; i += 32 * kUnroll) {
        int4 chunk[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) chunk[u] = src4[i + 32 * u];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) __stcg(dst4 + i + 32 * u, chunk[u]);
    }
    for (; i < n; i += 32) __stcg(dst4 + i, src4[i]);
}

// One 32-bit word to a peer (routing tables, counts, LogFMT metadata).
__device__ __forceinline__ void put_u32(const Peers& peers, int peer, uint64_t dst_offset, uint32_t value) {
    *reinterpret_cast<uint32_t*>(peers.remote(peer, dst_offset)) = value;
}

__device__ __forceinline__ void put_u64(const Peers& peers, int peer, uint64_t dst_offset, uint64_t value) {
    *reinterpret_cast<uint64_t*>(peers.remote(peer, dst_offset)) = value;
}

// Release-store a 64-bit flag at a peer: everything this thread (and, through a preceding fence and
// barrier, its block) wrote before is visible to whoever acquires the flag.
__device__ __forceinline__ void signal(const Peers& peers, int peer, uint64_t flag_offset, uint64_t value) {
    st_release_sys(reinterpret_cast<uint64_t*>(peers.remote(peer, flag_offset)), value);
}

}  // namespace lowlat
