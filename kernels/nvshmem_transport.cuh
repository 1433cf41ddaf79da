// The NVSHMEM flavour of kernels/transport.cuh: the same three writes (a warp's message, a 32-bit
// word, a 64-bit flag) to a peer's symmetric region, for peers that may not be reachable by pointer.
//
// Compiled with nvcc -rdc=true and linked against libnvshmem_device.a (lowlat/jit/nvcc.py); the
// module must be initialised with nvshmem.core.library_init before its first launch (the module-init
// hook of lowlat.jit.nvcc does that), and NVSHMEM must be running (lowlat.transport.nvshmem).
//
// Each peer is reached one of two ways, chosen per peer by the transport:
//  * pointer: peer_bases[peer] != 0 is the peer's region as mapped into this process (nvshmem_ptr:
//    NVLink or the same GPU); plain stores, exactly as transport.cuh does;
//  * put: peer_bases[peer] == 0; NVSHMEM device-initiated puts to the symmetric address
//    local_base + offset on PE `peer` (over InfiniBand/RoCE with IBGDA, or NVSHMEM's own P2P path
//    when the transport was built with nvlink=False to exercise this branch on one node).
//
// Ordering contract (the same for both paths):
//  * put_signal_warp: the flag is seen only after the whole message (NVSHMEM put-with-signal).
//  * signal: the flag is seen only after every earlier write of the calling thread to that peer.
//    Writes of other threads are covered only after they called quiet() and a barrier separates
//    them from the signalling thread (the pattern a block uses before it counts in).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include "common.cuh"

namespace lowlat {

struct NvshmemPeers {
    const uint64_t* bases;  // [num_ranks] peer region address by pointer, 0 = use NVSHMEM puts
    uint8_t* local_base;    // this PE's region (also the symmetric address NVSHMEM puts target)
    int rank;               // this PE (== nvshmem_my_pe(): the transport initialises one PE per rank)

    __device__ __forceinline__ uint8_t* local(uint64_t offset) const { return local_base + offset; }
    __device__ __forceinline__ bool by_pointer(int peer) const { return bases[peer] != 0; }
    __device__ __forceinline__ uint8_t* remote(int peer, uint64_t offset) const {
        return reinterpret_cast<uint8_t*>(bases[peer]) + offset;
    }
    // The address NVSHMEM puts take: the symmetric object as named on this PE.
    __device__ __forceinline__ void* symmetric(uint64_t offset) const { return local_base + offset; }
};

// Warp-cooperative copy of num_bytes (a multiple of 16, both ends 16-byte aligned) from `src` to
// `peer` at `dst_offset`.  On the put path `src` must be symmetric memory (a region offset) for
// transports that register only the symmetric heap (IBGDA); the pointer path accepts any source.
// Non-blocking on the put path: follow with signal()/quiet() before anyone relies on the data.
__device__ __forceinline__ void put_warp(const NvshmemPeers& peers, int peer, uint64_t dst_offset, const void* src,
                                         uint32_t num_bytes) {
    if (peers.by_pointer(peer)) {
        const int lane = lane_id();
        const auto* src4 = static_cast<const int4*>(src);
        auto* dst4 = reinterpret_cast<int4*>(peers.remote(peer, dst_offset));
        for (int i = lane; i < static_cast<int>(num_bytes / 16); i += 32) __stcg(dst4 + i, src4[i]);
    } else {
        nvshmemx_putmem_nbi_warp(peers.symmetric(dst_offset), src, num_bytes, peer);
    }
}

// One 32-bit word to a peer (single thread).
__device__ __forceinline__ void put_u32(const NvshmemPeers& peers, int peer, uint64_t dst_offset, uint32_t value) {
    if (peers.by_pointer(peer)) {
        *reinterpret_cast<uint32_t*>(peers.remote(peer, dst_offset)) = value;
    } else {
        nvshmem_uint32_p(static_cast<uint32_t*>(peers.symmetric(dst_offset)), value, peer);
    }
}

// Set a 64-bit flag at a peer after every earlier write of this thread to that peer (single thread).
__device__ __forceinline__ void signal(const NvshmemPeers& peers, int peer, uint64_t flag_offset, uint64_t value) {
    if (peers.by_pointer(peer)) {
        st_release_sys(reinterpret_cast<uint64_t*>(peers.remote(peer, flag_offset)), value);
    } else {
        nvshmem_fence();
        nvshmemx_signal_op(static_cast<uint64_t*>(peers.symmetric(flag_offset)), value, NVSHMEM_SIGNAL_SET, peer);
    }
}

// A whole message and then its flag, warp-cooperatively: the flag is set only once the message is
// visible at the peer.
__device__ __forceinline__ void put_signal_warp(const NvshmemPeers& peers, int peer, uint64_t dst_offset, const void* src,
                                                uint32_t num_bytes, uint64_t flag_offset, uint64_t value) {
    if (peers.by_pointer(peer)) {
        put_warp(peers, peer, dst_offset, src, num_bytes);
        __syncwarp();  // the lanes' stores happen before lane 0's release (release is cumulative)
        if (lane_id() == 0) st_release_sys(reinterpret_cast<uint64_t*>(peers.remote(peer, flag_offset)), value);
    } else {
        nvshmemx_putmem_signal_nbi_warp(peers.symmetric(dst_offset), src, num_bytes,
                                        static_cast<uint64_t*>(peers.symmetric(flag_offset)), value, NVSHMEM_SIGNAL_SET,
                                        peer);
    }
}

// Complete this thread's outstanding puts (to every peer).  Pointer-path stores need only the
// system-scope fence it implies.
__device__ __forceinline__ void quiet() { nvshmem_quiet(); }

}  // namespace lowlat
