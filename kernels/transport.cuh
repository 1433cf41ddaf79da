// The one path by which lowlat writes into another rank's symmetric region.
//
// Kernels address peers by (rank, byte offset into the region) through a `Peers` value and write
// only through the functions below; the flavour is chosen when the kernel is compiled:
//
//  * peer_transport.cuh (default, NVRTC): every peer is reachable by pointer (virtual ranks on one
//    GPU, CUDA IPC over NVLink); writes are plain stores.
//  * nvshmem_transport.cuh (LOWLAT_TRANSPORT_NVSHMEM, nvcc + NVSHMEM's device library): per peer, a
//    pointer (nvshmem_ptr) or NVSHMEM device-initiated puts (IBGDA across nodes).
//
// What each flavour provides (warp functions are called by all 32 lanes, the others by one thread):
//
//   struct Peers { const uint64_t* bases; int rank; }    bases[r]: rank r's region as mapped here (0: puts only)
//     local(offset)                                      this rank's region
//     by_pointer(peer)                                   whether writes to `peer` are plain stores
//     remote(peer, offset)                               `peer`'s region as mapped here, for writes composed in
//                                                        place (a quantised slice); only where by_pointer(peer)
//     kMayPut                                            false when by_pointer() is always true
//   put_warp<Word>(peers, peer, dst_offset, src, bytes)  a message of whole Words (int4 or uint32_t)
//   put_u32 / put_u64(peers, peer, dst_offset, value)    one word
//   signal<Scope>(peers, peer, flag_offset, value)       a flag, after every earlier write of this thread to `peer`
//                                                        (release at that scope on the pointer path)
//   flush_puts()                                         every thread, before a barrier after which one thread
//                                                        signals on behalf of the block: completes this thread's puts
//
// On the put path a message's source must be symmetric memory (RDMA reads only registered memory):
// put_staged_warp below copies any source through a staging area of this rank's region first.
#pragma once

#include "common.cuh"

#if defined(LOWLAT_TRANSPORT_NVSHMEM)
#include "nvshmem_transport.cuh"
#else
#include "peer_transport.cuh"
#endif

namespace lowlat {

// A warp's message from any local memory (global or shared) to `peer`: straight from `src` when the
// peer is reachable by pointer, else copied to this rank's region at `stage_offset` and put from there.
template <class Word = int4>
__device__ __forceinline__ void put_staged_warp(const Peers& peers, int peer, uint64_t dst_offset, const void* src, uint32_t num_bytes,
                                                uint64_t stage_offset) {
    if (peers.by_pointer(peer)) {
        put_warp<Word>(peers, peer, dst_offset, src, num_bytes);
        return;
    }
    uint8_t* stage = peers.local(stage_offset);
    store_warp<Word>(reinterpret_cast<Word*>(stage), static_cast<const Word*>(src), num_bytes / sizeof(Word));
    __syncwarp();
    put_warp<Word>(peers, peer, dst_offset, stage, num_bytes);
}

}  // namespace lowlat
