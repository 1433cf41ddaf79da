// Per-Buffer device state and the status word the host reads back.  lowlat/layout.py mirrors these
// numbers (tests/test_layout.py checks that they agree).
#pragma once

#include "common.cuh"

namespace lowlat {

// Words of the per-Buffer state array (uint64 each).  Sequence numbers count completed halves of
// each call; the kernels advance them, so replaying a CUDA graph needs no host bookkeeping.
enum StateWord : int {
    kDispatchSendSeq = 0,
    kDispatchRecvSeq = 1,
    kCombineSendSeq = 2,
    kCombineRecvSeq = 3,
    kExchangeSeq = 4,
    kStatusWord = 5,  // first error (device copy; the host reads a mirror in pinned memory)
    kBlocksDone = 8,  // uint32 counters from here on, one per kernel kind (last-block detection)
    kNumStateWords = 16,
};

enum BlocksDoneSlot : int { kDispatchSendDone = 0, kDispatchRecvDone, kCombineSendDone, kCombineRecvDone };

// Status codes (first error wins; the host raises the matching typed exception).
enum StatusCode : int {
    kStatusOk = 0,
    kStatusTimeout = 1,         // rank = the late peer (now masked)
    kStatusOverrun = 2,         // rank = a peer that is two calls ahead of this one
    kStatusTooManyInFlight = 3, // a third send before the first receive
    kStatusRecvWithoutSend = 4,
    kStatusBadExpert = 5,       // value = the bad expert index
    kStatusBadNumTokens = 6,    // value = the bad num_tokens
    kStatusRouteOverflow = 7,   // a token named one expert twice
};

__device__ __forceinline__ unsigned* blocks_done(uint64_t* state, int slot) {
    return reinterpret_cast<unsigned*>(state + kBlocksDone) + slot;
}

// A status is one 64-bit value (code:8 | rank:24 | value:32).  The first error wins a compare-and-
// swap on the device copy in `state`; the winner mirrors it into pinned host memory with a plain
// system-scope store (no host-memory atomics: PCIe need not support them), where the host reads it
// without synchronising.
__device__ __forceinline__ void report(uint64_t* state, unsigned long long* status, int code, int rank, int value) {
    const unsigned long long word = (static_cast<unsigned long long>(code) << 56) |
                                    (static_cast<unsigned long long>(rank & 0xffffff) << 32) |
                                    static_cast<unsigned>(value);
    auto* device_word = reinterpret_cast<unsigned long long*>(state + kStatusWord);
    if (atomicCAS(device_word, 0ull, word) == 0ull) st_relaxed_sys(status, word);
}

}  // namespace lowlat
