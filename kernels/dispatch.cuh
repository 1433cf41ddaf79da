// Low-latency dispatch: send each token to the ranks that own its top-k experts.
//
// dispatch_send (never waits; safe to launch alone in hook mode)
//   - one warp per token: quantise it once (FP8) into the send buffer, then put it once into every
//     distinct destination rank (per-rank deduplication: a token bound for three experts on one rank
//     crosses the link once);
//   - one warp per global expert: scan top-k in token order and write the destination's routing
//     table (token, k) and count for this source;
//   - the last block to finish releases one epoch flag per destination rank.
// dispatch_recv
//   - waits for every source's flag (bounded), turns counts into row segments, and expands each
//     received message into the rows of the local experts that asked for it, in the DeepGEMM
//     "masked" layout [L, R*T, H] with column-major scales.
// dispatch: both halves in one launch, for calls without a receive hook.
// Row order inside a local expert is deterministic: source rank, then source token.
#pragma once

#include "common.cuh"
#include "fp8.cuh"
#include "rank.cuh"
#include "region.cuh"
#include "signal.cuh"
#include "state.cuh"
#include "trace.cuh"
#include "transport.cuh"

namespace lowlat {

namespace dispatch_detail {

// This rank's top-k entries, as the routing scans read them: staged in shared memory (int32) by every
// block when they fit, read from global memory otherwise.
template <class Cfg>
struct TopkTable {
    static constexpr bool kInShared = Cfg::kMaxTokens * Cfg::kNumTopk <= 8192;
    const void* global;
    const int* shared;
    __device__ __forceinline__ long long operator[](int i) const {
        if constexpr (kInShared) return shared[i];
        else return load_expert<Cfg>(global, i);
    }
};

// Scan every (token, k) of this rank for `expert` and publish the matches to its owner.
template <class Cfg>
__device__ __forceinline__ void route_expert(int expert, const TopkTable<Cfg>& topk_idx, int num_tokens, int parity, const RankArgs& rank) {
    using Reg = Region<Cfg>;
    constexpr int K = Cfg::kNumTopk, T = Cfg::kMaxTokens;
    const int lane = lane_id();
    const int dst = expert / Cfg::kNumLocalExperts, local_expert = expert % Cfg::kNumLocalExperts;
    if (rank.masked(dst)) return;
    const Peers peers = rank.peers();
    const uint64_t table = Reg::dispatch_route(parity, local_expert, peers.rank, 0);
    // Entries go straight into the owner's table when it is reachable by pointer; otherwise they are
    // gathered in this rank's staging copy and put in one piece (one work request, not one per entry).
    const bool direct = peers.by_pointer(dst);
    auto* staged = reinterpret_cast<uint32_t*>(peers.local(Reg::route_stage(expert)));
    const int total = num_tokens * K;
    int count = 0;
#pragma unroll 4
    for (int base = 0; base < total; base += 32) {
        const int i = base + lane;
        const bool hit = i < total && topk_idx[i] == expert;
        const unsigned hits = __ballot_sync(kFullMask, hit);
        const int slot = count + __popc(hits & lanes_below(lane));
        if (hit && slot < T) {
            if (direct) put_u32(peers, dst, table + 4ull * slot, route_entry(i / K, i % K));
            else staged[slot] = route_entry(i / K, i % K);
        }
        count += __popc(hits);
    }
    if (!direct) {
        __syncwarp();
        put_warp<uint32_t>(peers, dst, table, staged, 4 * min(count, T));
    }
    if (lane == 0) {
        if (count > T) report(rank.state, rank.status, kStatusRouteOverflow, rank.id, expert);  // a token named `expert` twice
        put_u32(peers, dst, Reg::dispatch_count(parity, local_expert, peers.rank), min(count, T));
    }
}

// Channels per send item: a token is split into slices so that its loads and puts spread over warps.
template <class Cfg>
__host__ __device__ constexpr int slice_channels() {
    return channel_chunk(Cfg::kHidden);
}

// Quantise (or not) channels [slice * kSlice, +kSlice) of one token and put them, with their scales,
// into the staging of each distinct destination rank (one copy per rank, however many of its
// experts the token picked).
template <class Cfg>
__device__ __forceinline__ void send_slice(int token, int slice, const __nv_bfloat16* x, const void* topk_idx, bool round_scale,
                                           int parity, const RankArgs& rank) {
    using Reg = Region<Cfg>;
    constexpr int K = Cfg::kNumTopk, H = Cfg::kHidden, kSlice = slice_channels<Cfg>();
    const int lane = lane_id();
    int dst = -1;
    if (lane < K) {
        const long long expert = load_expert<Cfg>(topk_idx, token * K + lane);
        if (expert < -1 || expert >= Cfg::kNumExperts) {
            if (slice == 0) report(rank.state, rank.status, kStatusBadExpert, rank.id, static_cast<int>(expert));
        } else if (expert >= 0) {
            dst = static_cast<int>(expert) / Cfg::kNumLocalExperts;
            if (rank.masked(dst)) dst = -1;
        }
    }
    // One leader lane per distinct destination rank.
    const unsigned same = __match_any_sync(kFullMask, dst);
    unsigned leaders = __ballot_sync(kFullMask, dst >= 0 && __ffs(same) - 1 == lane);
    if (leaders == 0) return;

    const Peers peers = rank.peers();
    const int first = slice * kSlice;
    const __nv_bfloat16* row = x + static_cast<uint64_t>(token) * H;
    if constexpr (Cfg::kUseFP8 && !Peers::kMayPut) {
        // Every peer is reached by pointer: quantise once, then store straight into each destination's
        // message (no staged copy to write and read back).
        fp8::QuantizedSlice<H, kSlice> quantized;
        quantized.quantize(row, first, round_scale);
        while (leaders != 0) {
            const int peer = __shfl_sync(kFullMask, dst, __ffs(leaders) - 1);
            leaders &= leaders - 1;
            quantized.store(peers.remote(peer, Reg::dispatch_message(parity, peers.rank, token)), first);
        }
        return;
    }
    uint8_t* const staged = peers.local(Reg::send_message(token));  // symmetric: a valid put source
    if constexpr (Cfg::kUseFP8) {
        fp8::quantize_slice<H, kSlice>(row, first, staged, round_scale);
        __syncwarp();
    } else if constexpr (Peers::kMayPut) {
        // bf16 goes straight from x to peers reached by pointer; puts read a staged copy (made once).
        if (__any_sync(kFullMask, dst >= 0 && !peers.by_pointer(dst))) {
            store_warp<int4>(reinterpret_cast<int4*>(staged) + first / 8, reinterpret_cast<const int4*>(row + first), kSlice / 8);
            __syncwarp();
        }
    }
    while (leaders != 0) {
        const int leader = __ffs(leaders) - 1;
        leaders &= leaders - 1;
        const int peer = __shfl_sync(kFullMask, dst, leader);
        const uint64_t message = Reg::dispatch_message(parity, peers.rank, token);
        if constexpr (Cfg::kUseFP8) {
            put_warp(peers, peer, message + first, staged + first, kSlice);
            put_warp<uint32_t>(peers, peer, message + H + 4ull * (first / 128), staged + H + 4 * (first / 128), 4 * (kSlice / 128));
        } else {
            const void* source = peers.by_pointer(peer) ? static_cast<const void*>(row + first) : staged + 2ull * first;
            put_warp(peers, peer, message + 2ull * first, source, 2 * kSlice);
        }
    }
}

// Expand slice `slice` (channels [slice * kSlice, +kSlice) and their scales) of one received message
// into row j of local expert l.
template <class Cfg>
__device__ __forceinline__ void store_slice(const uint8_t* message, int slice, void* recv_x, void* recv_scales, int l, int j) {
    constexpr int H = Cfg::kHidden, G = H / 128, RT = Cfg::kNumRanks * Cfg::kMaxTokens, kSlice = slice_channels<Cfg>();
    constexpr int kBytesPerChannel = Cfg::kUseFP8 ? 1 : 2;
    const int lane = lane_id();
    const uint64_t row = static_cast<uint64_t>(l) * RT + j;
    const int first = slice * kSlice;
    const auto* src = reinterpret_cast<const int4*>(message + first * kBytesPerChannel);
    auto* dst = reinterpret_cast<int4*>(static_cast<uint8_t*>(recv_x) + (row * H + first) * kBytesPerChannel);
    constexpr int kChunks = kSlice * kBytesPerChannel / 16;
    int4 chunk[ceil_div(kChunks, 32)];
#pragma unroll
    for (int u = 0; u * 32 < kChunks; ++u)
        if (lane + 32 * u < kChunks) chunk[u] = ld_cg(src + lane + 32 * u);
#pragma unroll
    for (int u = 0; u * 32 < kChunks; ++u)
        if (lane + 32 * u < kChunks) dst[lane + 32 * u] = chunk[u];
    if constexpr (Cfg::kUseFP8) {
        const int group = first / 128 + lane;
        const bool owns_group = lane < kSlice / 128;
        const auto* scales = reinterpret_cast<const float*>(message + H);
        if constexpr (Cfg::kUseUE8M0) {
            // Each lane writes a whole group's byte; groups past G (padding of the last word) are 0.
            constexpr int W = (G + 3) / 4;
            auto* bytes = static_cast<uint8_t*>(recv_scales);
            auto byte_of = [&](int g) -> uint8_t& { return bytes[((static_cast<uint64_t>(l) * W + g / 4) * Cfg::kScaleRowStride + j) * 4 + g % 4]; };
            if (owns_group) byte_of(group) = fp8::ue8m0_of(ld_cg(scales + group));
            const int padding = G + lane - kSlice / 128;  // the last slice also zeroes the unused bytes of the last word
            if (first + kSlice == H && lane >= kSlice / 128 && padding < 4 * W) byte_of(padding) = 0;
        } else {
            auto* out = static_cast<float*>(recv_scales);
            if (owns_group) out[(static_cast<uint64_t>(l) * G + group) * Cfg::kScaleRowStride + j] = ld_cg(scales + group);
        }
    }
}

}  // namespace dispatch_detail

// The send half after its protocol check: quantise and put every token, route every expert, and
// let the last block raise one epoch flag per destination and advance the send counter (and, in a
// fused launch, the receive counter: every block of the grid has read it by then).
template <class Cfg, bool kFused = false>
__device__ __forceinline__ void dispatch_send_phase(const __nv_bfloat16* __restrict__ x, const void* __restrict__ topk_idx,
                                                    const int* __restrict__ num_tokens_ptr, int num_tokens_host, bool round_scale,
                                                    const RankArgs& rank, uint64_t seq) {
    constexpr int E = Cfg::kNumExperts, T = Cfg::kMaxTokens;
    static_assert(!Peers::kMayPut || Cfg::kCombineSendRows > 0,
                  "puts read staging areas: build the NVSHMEM flavour with RegionLayout.of(shape, put_staging=True)");
    const Peers peers = rank.peers();
    uint64_t* const state = rank.state;
    const int global_warp = blockIdx.x * Cfg::kNumWarps + threadIdx.x / 32;
    const int num_global_warps = gridDim.x * Cfg::kNumWarps;
    int num_tokens = num_tokens_ptr != nullptr ? __ldg(num_tokens_ptr) : num_tokens_host;
    if (num_tokens < 0 || num_tokens > T) {
        if (blockIdx.x == 0 && threadIdx.x == 0) report(state, rank.status, kStatusBadNumTokens, rank.id, num_tokens);
        num_tokens = 0;
    }
    const int parity = static_cast<int>(seq & 1);

    using Topk = dispatch_detail::TopkTable<Cfg>;
    __shared__ int topk_shared[Topk::kInShared ? Cfg::kMaxTokens * Cfg::kNumTopk : 1];
    if constexpr (Topk::kInShared) {
        for (int i = threadIdx.x; i < num_tokens * Cfg::kNumTopk; i += blockDim.x) {
            const long long expert = load_expert<Cfg>(topk_idx, i);
            topk_shared[i] = expert >= 0 && expert < E ? static_cast<int>(expert) : -1;
        }
        __syncthreads();
    }
    const Topk topk_table{topk_idx, topk_shared};
    trace_mark<Cfg>(1);

    // Items [0, E) route one expert each; then one item per (token, slice of channels).
    constexpr int kSlices = Cfg::kHidden / dispatch_detail::slice_channels<Cfg>();
    for (int item = global_warp; item < E + num_tokens * kSlices; item += num_global_warps) {
        if (item < E) {
            dispatch_detail::route_expert<Cfg>(item, topk_table, num_tokens, parity, rank);
        } else {
            const int token = (item - E) / kSlices, slice = (item - E) % kSlices;
            dispatch_detail::send_slice<Cfg>(token, slice, x, topk_idx, round_scale, parity, rank);
        }
    }

    trace_mark<Cfg>(2);
    flush_puts();
    constexpr Scope kScope = peer_scope<Cfg>();
    if (finish_block<kScope>(blocks_done(state, kDispatchSendDone))) {
        trace_raised_flags<Cfg>();
        for (int peer = threadIdx.x; peer < Cfg::kNumRanks; peer += blockDim.x)
            if (!rank.masked(peer)) signal<kScope>(peers, peer, Region<Cfg>::dispatch_flag(parity, rank.id), seq + 1);
        if (threadIdx.x == 0) {
            state[kDispatchSendSeq] = seq + 1;
            if constexpr (kFused) state[kDispatchRecvSeq] = seq + 1;
        }
    }
    trace_mark<Cfg>(3);
}

// The receive half after its protocol check: wait for every source (bounded), then expand the
// messages into the rows of the local experts; the last block advances the receive counter (a
// fused launch's send phase already did).
template <class Cfg, bool kFused = false>
__device__ __forceinline__ void dispatch_recv_phase(void* __restrict__ recv_x, void* __restrict__ recv_scales, int* __restrict__ recv_count,
                                                    int* __restrict__ recv_src_info, int* __restrict__ recv_src_topk,
                                                    long long* __restrict__ recv_layout_range, int* __restrict__ cumulative_recv_stats,
                                                    long long* __restrict__ wait_cost_stats, const RankArgs& rank, uint64_t seq) {
    using Reg = Region<Cfg>;
    constexpr int R = Cfg::kNumRanks, L = Cfg::kNumLocalExperts, T = Cfg::kMaxTokens, RT = R * T;
    const Peers peers = rank.peers();
    const int lane = lane_id();
    const int global_warp = blockIdx.x * Cfg::kNumWarps + threadIdx.x / 32;
    const int num_global_warps = gridDim.x * Cfg::kNumWarps;
    __shared__ int source_ok[R];
    __shared__ RowSegments<L, R> segments;

    const int parity = static_cast<int>(seq & 1);
    wait_all_sources<R, peer_scope<Cfg>()>(peers.local(Reg::dispatch_flag(parity, 0)), seq + 1, rank, source_ok, wait_cost_stats);
    trace_mark<Cfg>(4);
    segments.build([&](int l, int s) { return source_ok[s] ? min(ld_cg(reinterpret_cast<const int*>(peers.local(Reg::dispatch_count(parity, l, s)))), T) : 0; });
    trace_mark<Cfg>(5);

    if (blockIdx.x == 0) {
        for (int l = threadIdx.x; l < L; l += blockDim.x) {
            recv_count[l] = segments.count(l);
            if (cumulative_recv_stats != nullptr) atomicAdd(cumulative_recv_stats + l, segments.count(l));
        }
        for (int i = threadIdx.x; i < L * R; i += blockDim.x)
            recv_layout_range[i] = (static_cast<long long>(segments.source_begin[i]) << 32) | segments.count(i / R, i % R);
    }

    // One item per (received row, slice of channels), so that many loads are in flight at once.
    constexpr int kSlices = Cfg::kHidden / dispatch_detail::slice_channels<Cfg>();
    for (int item = global_warp; item < segments.total() * kSlices; item += num_global_warps) {
        const int row = item / kSlices, slice = item % kSlices;
        int l, j, s, i;
        segments.locate(row, l, j, s, i);
        const uint32_t entry = ld_cg(reinterpret_cast<const uint32_t*>(peers.local(Reg::dispatch_route(parity, l, s, i))));
        const int token = min(route_token(entry), T - 1);
        dispatch_detail::store_slice<Cfg>(peers.local(Reg::dispatch_message(parity, s, token)), slice, recv_x, recv_scales, l, j);
        if (lane == 0 && slice == 0) {
            recv_src_info[static_cast<uint64_t>(l) * RT + j] = token;
            recv_src_topk[static_cast<uint64_t>(l) * RT + j] = route_topk(entry);
        }
    }

    trace_mark<Cfg>(6);
    if constexpr (!kFused)
        if (finish_block<peer_scope<Cfg>()>(blocks_done(rank.state, kDispatchRecvDone)) && threadIdx.x == 0) rank.state[kDispatchRecvSeq] = seq + 1;
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) dispatch_send(const __nv_bfloat16* __restrict__ x,  // [T, H]
                                                                      const void* __restrict__ topk_idx,     // [T, K] int64 or int32
                                                                      const int* __restrict__ num_tokens_ptr,  // device scalar or null
                                                                      int num_tokens_host,
                                                                      bool round_scale,
                                                                      const RankArgs rank) {
    chain_after_previous_grid();
    const uint64_t seq = rank.state[kDispatchSendSeq];
    if (seq - rank.state[kDispatchRecvSeq] >= 2) {  // a third dispatch before the first receive
        if (blockIdx.x == 0 && threadIdx.x == 0) report(rank.state, rank.status, kStatusTooManyInFlight, rank.id, static_cast<int>(seq));
        return;
    }
    dispatch_send_phase<Cfg>(x, topk_idx, num_tokens_ptr, num_tokens_host, round_scale, rank, seq);
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) dispatch_recv(void* __restrict__ recv_x,         // [L, R*T, H] fp8 or bf16
                                                                      void* __restrict__ recv_scales,    // [L, G or W, kScaleRowStride] or null
                                                                      int* __restrict__ recv_count,      // [L]
                                                                      int* __restrict__ recv_src_info,   // [L, R*T] source token
                                                                      int* __restrict__ recv_src_topk,   // [L, R*T] source top-k slot
                                                                      long long* __restrict__ recv_layout_range,  // [L, R] begin << 32 | count
                                                                      int* __restrict__ cumulative_recv_stats,    // [L] or null
                                                                      long long* __restrict__ wait_cost_stats,    // [R] or null
                                                                      const RankArgs rank) {
    chain_after_previous_grid();
    const uint64_t seq = rank.state[kDispatchRecvSeq];
    if (seq >= rank.state[kDispatchSendSeq]) {  // nothing was sent for this receive
        if (blockIdx.x == 0) {
            if (threadIdx.x == 0) report(rank.state, rank.status, kStatusRecvWithoutSend, rank.id, static_cast<int>(seq));
            for (int l = threadIdx.x; l < Cfg::kNumLocalExperts; l += blockDim.x) recv_count[l] = 0;
        }
        return;
    }
    dispatch_recv_phase<Cfg>(recv_x, recv_scales, recv_count, recv_src_info, recv_src_topk, recv_layout_range, cumulative_recv_stats,
                             wait_cost_stats, rank, seq);
}

// Both halves in one launch, for calls without a receive hook: every block sends, then receives.
// The launcher sizes the grid so that every block is resident at once (a block waiting for this
// rank's own flag spins until the last block to finish sending raises it).
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) dispatch(const __nv_bfloat16* __restrict__ x, const void* __restrict__ topk_idx,
                                                                 const int* __restrict__ num_tokens_ptr, int num_tokens_host,
                                                                 bool round_scale, void* __restrict__ recv_x,
                                                                 void* __restrict__ recv_scales, int* __restrict__ recv_count,
                                                                 int* __restrict__ recv_src_info, int* __restrict__ recv_src_topk,
                                                                 long long* __restrict__ recv_layout_range,
                                                                 int* __restrict__ cumulative_recv_stats,
                                                                 long long* __restrict__ wait_cost_stats, const RankArgs rank) {
    chain_after_previous_grid();
    trace_mark<Cfg>(0);
    const uint64_t seq = rank.state[kDispatchSendSeq];
    if (seq != rank.state[kDispatchRecvSeq]) {  // a receive hook is pending; a fused call pairs its own halves
        if (blockIdx.x == 0) {
            if (threadIdx.x == 0) report(rank.state, rank.status, kStatusTooManyInFlight, rank.id, static_cast<int>(seq));
            for (int l = threadIdx.x; l < Cfg::kNumLocalExperts; l += blockDim.x) recv_count[l] = 0;
        }
        return;
    }
    dispatch_send_phase<Cfg, true>(x, topk_idx, num_tokens_ptr, num_tokens_host, round_scale, rank, seq);
    dispatch_recv_phase<Cfg, true>(recv_x, recv_scales, recv_count, recv_src_info, recv_src_topk, recv_layout_range, cumulative_recv_stats,
                             wait_cost_stats, rank, seq);
    // Points: 1 top-k staged, 2 sent, 3 counted in, 4 every flag seen, 5 row map built, 6 rows stored.
    trace_print<Cfg, 7>("dispatch");
}

}  // namespace lowlat
