// The NVSHMEM flavour of kernels/transport.cuh: the same writes to a peer's symmetric region, for
// peers that may not be reachable by pointer.  Included by transport.cuh when the kernel is built
// with LOWLAT_TRANSPORT_NVSHMEM (lowlat/jit/nvcc.py: nvcc -rdc=true, linked against
// libnvshmem_device.a); the module must be initialised with nvshmem.core.library_init before its
// first launch (the module-init hook of lowlat.jit.nvcc does that) and NVSHMEM must be running
// (lowlat.transport.nvshmem).
//
// Each peer is reached one of two ways, chosen per peer by the transport:
//  * pointer: bases[peer] != 0 is the peer's region as mapped into this process (nvshmem_ptr:
//    NVLink or the same GPU); plain stores, exactly as peer_transport.cuh does;
//  * put: bases[peer] == 0; NVSHMEM device-initiated puts to the symmetric address
//    local(offset) on PE `peer` (InfiniBand/RoCE through IBGDA, or NVSHMEM's own P2P path when the
//    transport was built with nvlink=False to exercise this branch on one node).  Sources must be
//    symmetric memory (see put_staged_warp in transport.cuh).
//
// Ordering contract (the same for both paths):
//  * signal: the flag is seen only after every earlier write of the calling thread to that peer.
//    Writes of other threads are covered once they called flush_puts() and a barrier separates them
//    from the signalling thread (what every block does before it counts in).
//  * put_signal_warp: the flag is seen only after the whole message (NVSHMEM put-with-signal).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include "common.cuh"

namespace lowlat {

struct Peers {
    const uint64_t* bases;  // [num_ranks] peer region address by pointer, 0 = NVSHMEM puts; bases[rank] = this PE's region
    int rank;               // this PE (== nvshmem_my_pe(): the transport starts one PE per rank)
    static constexpr bool kMayPut = true;

    __device__ __forceinline__ uint8_t* local(uint64_t offset) const { return reinterpret_cast<uint8_t*>(bases[rank]) + offset; }
    __device__ __forceinline__ bool by_pointer(int peer) const { return bases[peer] != 0; }
    __device__ __forceinline__ uint8_t* remote(int peer, uint64_t offset) const {
        return reinterpret_cast<uint8_t*>(bases[peer]) + offset;
    }
};

// Warp-cooperative message of num_bytes (whole Words, both ends Word-aligned) from `src` to `peer`
// at `dst_offset`.  Non-blocking on the put path: signal() or flush_puts() completes it.
template <class Word = int4>
__device__ __forceinline__ void put_warp(const Peers& peers, int peer, uint64_t dst_offset, const void* src, uint32_t num_bytes) {
    if (peers.by_pointer(peer)) {
        store_warp<Word>(reinterpret_cast<Word*>(peers.remote(peer, dst_offset)), static_cast<const Word*>(src), num_bytes / sizeof(Word));
    } else if (num_bytes != 0) {
        nvshmemx_putmem_nbi_warp(peers.local(dst_offset), src, num_bytes, peer);
    }
}

__device__ __forceinline__ void put_u32(const Peers& peers, int peer, uint64_t dst_offset, uint32_t value) {
    if (peers.by_pointer(peer)) *reinterpret_cast<uint32_t*>(peers.remote(peer, dst_offset)) = value;
    else nvshmem_uint32_p(reinterpret_cast<uint32_t*>(peers.local(dst_offset)), value, peer);
}

__device__ __forceinline__ void put_u64(const Peers& peers, int peer, uint64_t dst_offset, uint64_t value) {
    if (peers.by_pointer(peer)) *reinterpret_cast<uint64_t*>(peers.remote(peer, dst_offset)) = value;
    else nvshmem_uint64_p(reinterpret_cast<uint64_t*>(peers.local(dst_offset)), value, peer);
}

// Set a 64-bit flag at a peer after every earlier write of this thread to that peer (single thread).
// kScope applies to the pointer path (puts complete before the signal whatever the scope).
template <Scope kScope = Scope::kSystem>
__device__ __forceinline__ void signal(const Peers& peers, int peer, uint64_t flag_offset, uint64_t value) {
    if (peers.by_pointer(peer)) {
        st_release<kScope>(reinterpret_cast<uint64_t*>(peers.remote(peer, flag_offset)), value);
    } else {
        nvshmem_fence();
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(peers.local(flag_offset)), value, NVSHMEM_SIGNAL_SET, peer);
    }
}

// A whole message and then its flag, warp-cooperatively: the flag is set only once the message is
// visible at the peer.
__device__ __forceinline__ void put_signal_warp(const Peers& peers, int peer, uint64_t dst_offset, const void* src, uint32_t num_bytes,
                                                uint64_t flag_offset, uint64_t value) {
    if (peers.by_pointer(peer)) {
        put_warp(peers, peer, dst_offset, src, num_bytes);
        __syncwarp();  // the lanes' stores happen before lane 0's release (release is cumulative)
        if (lane_id() == 0) st_release(reinterpret_cast<uint64_t*>(peers.remote(peer, flag_offset)), value);
    } else {
        nvshmemx_putmem_signal_nbi_warp(peers.local(dst_offset), src, num_bytes, reinterpret_cast<uint64_t*>(peers.local(flag_offset)),
                                        value, NVSHMEM_SIGNAL_SET, peer);
    }
}

// Complete this thread's outstanding puts (to every peer); pointer-path stores need only the
// system-scope fence it implies.
__device__ __forceinline__ void flush_puts() { nvshmem_quiet(); }

}  // namespace lowlat
