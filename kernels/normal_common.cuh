// Normal (high-throughput, prefill) mode: device state, status, region addressing and the small
// helpers its kernels share.  lowlat/normal/layout.py mirrors every number here (tests check it).
//
// Protocol of one call (dispatch or combine; both advance the same call counter `seq`):
//   send:    every source writes rows into each destination's staging block of parity seq & 1, at
//            [source][position], plus (dispatch) its counts; its last block releases one flag per
//            destination with the value seq + 1.  A send never waits.
//   receive: waits (bounded by %globaltimer) for every source's flag == seq + 1, reads what arrived,
//            and its last block advances seq.  Nothing is ever reset, so a graph replays as is.
#pragma once

#include "common.cuh"
#include "rank.cuh"
#include "signal.cuh"
#include "transport.cuh"

namespace lowlat::normal {

enum StateWord : int {
    kSeq = 0,         // normal-mode calls completed
    kStatusWord = 1,  // first error (device copy; the host reads a mirror in pinned memory)
    kBlocksDone = 2,  // uint32 counters from here on, one per kernel (last-block detection)
    kNumStateWords = 8,
};

enum BlocksDoneSlot : int { kSendDone = 0, kCopyDone, kCombineSendDone, kCombineRecvDone };

enum StatusCode : int {
    kStatusOk = 0,
    kStatusTimeout = 1,       // rank = the late source
    kStatusOverrun = 2,       // rank = a source two calls ahead
    kStatusBadExpert = 3,     // value = the bad expert index
    kStatusRecvOverflow = 4,  // value = rows that arrived, more than the output holds
};

__device__ __forceinline__ unsigned* blocks_done(uint64_t* state, int slot) {
    return reinterpret_cast<unsigned*>(state + kBlocksDone) + slot;
}

// What every normal-mode kernel starts from, unpacked with a structured binding:
//   const auto [rank, state, status, peers, seq, parity] = this_call(args);
struct Call {
    int rank;                    // this rank
    uint64_t* state;             // its StateWord array
    unsigned long long* status;  // the pinned host mirror of the first error
    Peers peers;
    uint64_t seq;                // calls completed before this one
    int parity;                  // seq & 1: the half of the double-buffered staging this call uses
};

__device__ __forceinline__ Call this_call(const RankArgs& args) {
    const uint64_t seq = args.state[kSeq];
    return Call{args.id, args.state, args.status, args.peers(), seq, static_cast<int>(seq & 1)};
}

// Status = code:8 | rank:24 | value:32.  The first error wins a compare-and-swap on the device word
// and is mirrored into pinned host memory, where the host reads it without synchronising.
__device__ __forceinline__ void report(uint64_t* state, unsigned long long* status, int code, int rank, int value) {
    const unsigned long long word = (static_cast<unsigned long long>(code) << 56) |
                                    (static_cast<unsigned long long>(rank & 0xffffff) << 32) | static_cast<unsigned>(value);
    auto* device_word = reinterpret_cast<unsigned long long*>(state + kStatusWord);
    if (atomicCAS(device_word, 0ull, word) == 0ull) st_relaxed_sys(status, word);
}

// Byte offsets inside a rank's region (from the Cfg constants lowlat/normal/layout.py computed).
template <class Cfg>
struct NormalRegion {
    static constexpr int R = Cfg::kNumRanks, L = Cfg::kNumLocalExperts, T = Cfg::kMaxTokens;

    __device__ __forceinline__ static uint64_t parity(int p) { return static_cast<uint64_t>(p) * Cfg::kParityBytes; }
    __device__ __forceinline__ static uint64_t flag(int p, int src) { return parity(p) + Cfg::kOffFlags + 8ull * src; }
    // int32 [R + L] per source: tokens it sends to every rank, then to each local expert of the owner.
    __device__ __forceinline__ static uint64_t counts(int p, int src) { return parity(p) + Cfg::kOffCounts + 4ull * src * (R + L); }
    __device__ __forceinline__ static uint64_t row(int p, int src, int position) {
        return parity(p) + Cfg::kOffStaging + (static_cast<uint64_t>(src) * T + position) * Cfg::kRowStride;
    }
};

// Every thread with tid < R waits for source tid's flag; ok[src] = 1 when it arrived.  Late and
// overrunning sources are reported and end with ok = 0 (their data is then ignored): nothing hangs.
template <class Cfg>
__device__ __forceinline__ void wait_sources(const Peers& peers, int parity, uint64_t expected, int* ok, long long timeout_ns,
                                             uint64_t* state, unsigned long long* status) {
    for (int src = threadIdx.x; src < Cfg::kNumRanks; src += blockDim.x) {
        long long cycles = 0;
        const auto* flag = reinterpret_cast<const uint64_t*>(peers.local(NormalRegion<Cfg>::flag(parity, src)));
        const WaitResult result = wait_flag(flag, expected, timeout_ns, &cycles);
        if (result == WaitResult::kTimeout) report(state, status, kStatusTimeout, src, static_cast<int>(expected));
        if (result == WaitResult::kOverrun) report(state, status, kStatusOverrun, src, static_cast<int>(expected));
        ok[src] = result == WaitResult::kArrived;
    }
    __syncthreads();
}

// First row of each source's segment in this rank's received rows: begin[s] for s in [0, R], read
// from column `rank` of the inclusive rank prefix matrix.  Called by every thread; syncs the block.
template <int R>
__device__ __forceinline__ void load_source_begins(const int* rank_prefix_matrix, int rank, int* begin) {
    if (threadIdx.x == 0) begin[0] = 0;
    for (int s = threadIdx.x; s < R; s += blockDim.x) begin[s + 1] = __ldg(rank_prefix_matrix + s * R + rank);
    __syncthreads();
}

// Warp-cooperative copy of num_bytes (a multiple of 16, 16-byte aligned) from src to every rank in
// `dst_mask`, where lane d holds the address of rank d's destination (valid for the bits of the
// mask).  Each chunk of the source is loaded once and stored to every destination.
template <int kUnroll = 4, bool kCachedSource = true>
__device__ __forceinline__ void copy_to_each(const void* src, uint8_t* lane_dst, unsigned dst_mask, uint32_t num_bytes) {
    const int lane = lane_id();
    const auto* src4 = static_cast<const int4*>(src);
    const int n = static_cast<int>(num_bytes / 16);
    for (int base = 0; base < n; base += 32 * kUnroll) {
        int4 chunk[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + lane + 32 * u;
            if (i < n) chunk[u] = kCachedSource ? __ldg(src4 + i) : ld_cg(src4 + i);
        }
        for (unsigned mask = dst_mask; mask != 0; mask &= mask - 1) {
            const int d = __ffs(mask) - 1;
            auto* dst4 = reinterpret_cast<int4*>(__shfl_sync(kFullMask, reinterpret_cast<uint64_t>(lane_dst), d));
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int i = base + lane + 32 * u;
                if (i < n) __stcg(dst4 + i, chunk[u]);
            }
        }
    }
}

// bf16 x 8 <-> float x 8, for the reductions.
__device__ __forceinline__ void add_bf16x8(float* acc, int4 packed) {
    const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 v = __bfloat1622float2(pairs[j]);
        acc[2 * j] = __fadd_rn(acc[2 * j], v.x);
        acc[2 * j + 1] = __fadd_rn(acc[2 * j + 1], v.y);
    }
}

__device__ __forceinline__ int4 pack_bf16x8(const float* acc) {
    int4 packed;
    auto* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int j = 0; j < 4; ++j) pairs[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
    return packed;
}

__device__ __forceinline__ long long load_index(const void* topk_idx, bool is_int64, long long i) {
    return is_int64 ? __ldg(static_cast<const long long*>(topk_idx) + i) : __ldg(static_cast<const int*>(topk_idx) + i);
}

__device__ __forceinline__ void store_index(void* topk_idx, bool is_int64, long long i, int value) {
    if (is_int64) static_cast<long long*>(topk_idx)[i] = value;
    else static_cast<int*>(topk_idx)[i] = value;
}

}  // namespace lowlat::normal
