// The pointer flavour of kernels/transport.cuh: every peer's region is mapped into this process
// (virtual ranks on one GPU, CUDA IPC over NVLink), so every write is a plain store.  NVRTC-compiled.
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
    static constexpr bool kMayPut = false;  // no peer is ever reached by puts
    __host__ __device__ static constexpr bool by_pointer(int) { return true; }
};

// Warp-cooperative copy of num_bytes (whole Words, both ends Word-aligned) from local memory (global
// or shared) to `peer` at `dst_offset`.  The source may have been written by this warp just before
// (after a __syncwarp), so it is read with plain generic loads, never the read-only path.
template <class Word = int4>
__device__ __forceinline__ void put_warp(const Peers& peers, int peer, uint64_t dst_offset, const void* src, uint32_t num_bytes) {
    store_warp<Word>(reinterpret_cast<Word*>(peers.remote(peer, dst_offset)), static_cast<const Word*>(src), num_bytes / sizeof(Word));
}

// One 32-bit word to a peer (routing tables, counts, LogFMT metadata).
__device__ __forceinline__ void put_u32(const Peers& peers, int peer, uint64_t dst_offset, uint32_t value) {
    *reinterpret_cast<uint32_t*>(peers.remote(peer, dst_offset)) = value;
}

__device__ __forceinline__ void put_u64(const Peers& peers, int peer, uint64_t dst_offset, uint64_t value) {
    *reinterpret_cast<uint64_t*>(peers.remote(peer, dst_offset)) = value;
}

// Release-store a 64-bit flag at a peer: everything this thread (and, through a preceding fence and
// barrier, its block) wrote before is visible to whoever acquires the flag at kScope.
template <Scope kScope = Scope::kSystem>
__device__ __forceinline__ void signal(const Peers& peers, int peer, uint64_t flag_offset, uint64_t value) {
    st_release<kScope>(reinterpret_cast<uint64_t*>(peers.remote(peer, flag_offset)), value);
}

// Stores need no completion step: the fence before a block counts in orders them.
__device__ __forceinline__ void flush_puts() {}

}  // namespace lowlat
