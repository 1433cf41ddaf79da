// Low-latency combine: bring expert outputs back to the ranks that own the tokens and reduce them
// with the top-k weights.
//
// combine_send (never waits): one warp per received row (from the dispatch handle) puts the bf16
//   row, or its LogFMT encoding, into slot (token, k) of the source rank; the last block releases
//   one epoch flag per rank.
// combine_recv: waits for every rank's flag (bounded), then for each (token, chunk of channels)
//   accumulates weight * value over the top-k slots in k order, in fp32 with products rounded
//   before the add (so it matches lowlat.reference bit for bit), and stores bf16.
// combine: both halves in one launch, for calls without a receive hook.
#pragma once

#include "common.cuh"
#include "logfmt.cuh"
#include "rank.cuh"
#include "region.cuh"
#include "signal.cuh"
#include "state.cuh"
#include "trace.cuh"
#include "transport.cuh"

namespace lowlat {

// The send half after its protocol check: put every received row (or its LogFMT encoding) into its
// (token, k) slot at the source rank; the last block raises the flags and advances the counter (in a
// fused launch, the receive counter too).
template <class Cfg, bool kFused = false>
__device__ __forceinline__ void combine_send_phase(const __nv_bfloat16* __restrict__ x, const long long* __restrict__ recv_layout_range,
                                                   const int* __restrict__ recv_src_info, const int* __restrict__ recv_src_topk,
                                                   const RankArgs& rank, uint64_t seq) {
    using Reg = Region<Cfg>;
    using Chunk = logfmt::Chunk<logfmt::chunk_size(Cfg::kHidden)>;
    constexpr int R = Cfg::kNumRanks, L = Cfg::kNumLocalExperts, T = Cfg::kMaxTokens, K = Cfg::kNumTopk, H = Cfg::kHidden;
    constexpr int RT = R * T, kChunk = logfmt::chunk_size(H), kNumChunks = H / kChunk;
    static_assert(!Peers::kMayPut || Cfg::kCombineSendRows > 0,
                  "puts read staging areas: build the NVSHMEM flavour with RegionLayout.of(shape, put_staging=True)");
    const Peers peers = rank.peers();
    uint64_t* const state = rank.state;
    const int lane = lane_id(), warp = threadIdx.x / 32;
    const int global_warp = blockIdx.x * Cfg::kNumWarps + warp;
    const int num_global_warps = gridDim.x * Cfg::kNumWarps;
    __shared__ RowSegments<L, R> segments;

    const int parity = static_cast<int>(seq & 1);
    segments.build([&](int l, int s) {
        const long long range = __ldg(recv_layout_range + l * R + s);
        return min(static_cast<int>(range & 0xffffffff), RT);
    });
    trace_mark<Cfg>(1);

    // One item per (received row, chunk of channels): many rows' loads in flight at once.
    for (int item = global_warp; item < segments.total() * kNumChunks; item += num_global_warps) {
        const int row = item / kNumChunks, c = item % kNumChunks;
        int l, j, s, i;
        segments.locate(row, l, j, s, i);
        const int token = __ldg(recv_src_info + static_cast<uint64_t>(l) * RT + j);
        const int k = __ldg(recv_src_topk + static_cast<uint64_t>(l) * RT + j);
        if (rank.masked(s) || token < 0 || token >= T || k < 0 || k >= K) continue;
        const __nv_bfloat16* src = x + (static_cast<uint64_t>(l) * RT + j) * H + c * kChunk;
        const uint64_t chunk_offset = Reg::combine_slot(parity, token, k) + 2ull * kChunk * c;
        // Puts read a staged copy in the slot's layout (data, then metadata words); pointers read src.
        const uint64_t stage = Reg::combine_send_stage(row);
        if constexpr (!Cfg::kUseLogFMT) {
            put_staged_warp(peers, s, chunk_offset, src, 2 * kChunk, stage + 2ull * kChunk * c);
        } else {
            // Encode through shared memory; a chunk that does not suit the log grid goes raw from x.
            __shared__ __align__(16) uint8_t encoded[Cfg::kNumWarps][Chunk::kEncodedBytes];
            __shared__ __align__(16) uint32_t meta[Cfg::kNumWarps][kChunk / 128];
            const bool encoded_ok = Chunk::encode(src, encoded[warp], meta[warp]);
            __syncwarp();
            if (encoded_ok) put_staged_warp(peers, s, chunk_offset, encoded[warp], Chunk::kEncodedBytes, stage + 2ull * kChunk * c);
            else put_staged_warp(peers, s, chunk_offset, src, 2 * kChunk, stage + 2ull * kChunk * c);
            const uint64_t meta_words = 2ull * H + 4ull * (c * (kChunk / 128));
            put_staged_warp<uint32_t>(peers, s, Reg::combine_slot(parity, token, k) + meta_words, meta[warp], 4 * (kChunk / 128),
                                      stage + meta_words);
            __syncwarp();
        }
    }

    trace_mark<Cfg>(2);
    flush_puts();
    constexpr Scope kScope = peer_scope<Cfg>();
    if (finish_block<kScope>(blocks_done(state, kCombineSendDone))) {
        trace_raised_flags<Cfg>();
        for (int peer = threadIdx.x; peer < R; peer += blockDim.x)
            if (!rank.masked(peer)) signal<kScope>(peers, peer, Reg::combine_flag(parity, rank.id), seq + 1);
        if (threadIdx.x == 0) {
            state[kCombineSendSeq] = seq + 1;
            if constexpr (kFused) state[kCombineRecvSeq] = seq + 1;
        }
    }
    trace_mark<Cfg>(3);
}

// The receive half after its protocol check: wait for every source (bounded), then reduce each
// token's top-k slots in k order; the last block advances the receive counter (a fused launch's send
// phase already did).
template <class Cfg, bool kFused = false>
__device__ __forceinline__ void combine_recv_phase(__nv_bfloat16* __restrict__ out, const void* __restrict__ topk_idx,
                                                   const float* __restrict__ topk_weights, const int* __restrict__ num_tokens_ptr,
                                                   int num_tokens_host, int num_out_rows, long long* __restrict__ wait_cost_stats,
                                                   const RankArgs& rank, uint64_t seq) {
    using Reg = Region<Cfg>;
    constexpr int R = Cfg::kNumRanks, L = Cfg::kNumLocalExperts, K = Cfg::kNumTopk, H = Cfg::kHidden;
    constexpr int kChunk = logfmt::chunk_size(H), kNumChunks = H / kChunk;
    using Chunk = logfmt::Chunk<kChunk>;
    constexpr int kUnitsPerLane = Chunk::kUnitsPerLane;
    const Peers peers = rank.peers();
    uint64_t* const state = rank.state;
    const int lane = lane_id();
    const int global_warp = blockIdx.x * Cfg::kNumWarps + threadIdx.x / 32;
    const int num_global_warps = gridDim.x * Cfg::kNumWarps;
    __shared__ int source_ok[R];

    const int parity = static_cast<int>(seq & 1);
    wait_all_sources<R, peer_scope<Cfg>()>(peers.local(Reg::combine_flag(parity, 0)), seq + 1, rank, source_ok, wait_cost_stats);
    trace_mark<Cfg>(4);
    int num_tokens = num_tokens_ptr != nullptr ? __ldg(num_tokens_ptr) : num_tokens_host;
    num_tokens = max(0, min(num_tokens, min(num_out_rows, Cfg::kMaxTokens)));

    // One item per (token, chunk, part): each lane owns one 16-channel unit of the chunk.
    constexpr int kParts = kUnitsPerLane;
    for (int item = global_warp; item < num_out_rows * kNumChunks * kParts; item += num_global_warps) {
        const int token = item / (kNumChunks * kParts), c = item / kParts % kNumChunks, part = item % kParts;
        const int unit = lane + 32 * part;
        float acc[16];
#pragma unroll
        for (int v = 0; v < 16; ++v) acc[v] = 0.0f;

        // Top-k slots in groups of kBatch: every valid slot's loads are issued before any is used,
        // then they are accumulated in k order (the reference's order).
        constexpr int kBatch = 4;
        for (int k0 = 0; token < num_tokens && k0 < K; k0 += kBatch) {
            bool valid[kBatch];
            float weight[kBatch];
            const uint8_t* chunk[kBatch];
#pragma unroll
            for (int q = 0; q < kBatch; ++q) {
                const int k = k0 + q;
                const long long expert = k < K ? load_expert<Cfg>(topk_idx, token * K + k) : -1;
                valid[q] = expert >= 0 && expert < Cfg::kNumExperts && source_ok[expert / L];
                weight[q] = valid[q] ? __ldg(topk_weights + token * K + k) : 0.0f;
                chunk[q] = peers.local(Reg::combine_slot(parity, token, valid[q] ? k : 0)) + 2ull * kChunk * c;
            }
            if constexpr (!Cfg::kUseLogFMT) {
                int4 raw[kBatch][2];
#pragma unroll
                for (int q = 0; q < kBatch; ++q)
                    if (valid[q] && Chunk::unit_active(unit)) {
                        raw[q][0] = ld_cg(reinterpret_cast<const int4*>(chunk[q] + unit * 32));
                        raw[q][1] = ld_cg(reinterpret_cast<const int4*>(chunk[q] + unit * 32) + 1);
                    }
#pragma unroll
                for (int q = 0; q < kBatch; ++q)
                    if (valid[q] && Chunk::unit_active(unit)) logfmt::accumulate_bf16(raw[q], weight[q], acc);
            } else {
#pragma unroll
                for (int q = 0; q < kBatch; ++q) {
                    if (!valid[q]) continue;  // warp-uniform
                    const uint8_t* slot = chunk[q] - 2ull * kChunk * c;
                    logfmt::GroupRange range;
                    const bool encoded = Chunk::plan_unit(reinterpret_cast<const uint32_t*>(slot + 2ull * H), c, unit, range);
                    if (!Chunk::unit_active(unit)) continue;
                    if (encoded) Chunk::accumulate_encoded(chunk[q] + unit * 20, range, weight[q], acc);
                    else logfmt::accumulate_raw(chunk[q] + unit * 32, weight[q], acc);
                }
            }
        }

        if (Chunk::unit_active(unit)) {
            __nv_bfloat162 packed[8];
#pragma unroll
            for (int v = 0; v < 8; ++v) packed[v] = __floats2bfloat162_rn(acc[2 * v], acc[2 * v + 1]);
            auto* dst = reinterpret_cast<int4*>(out + static_cast<uint64_t>(token) * H + c * kChunk + unit * 16);
            dst[0] = reinterpret_cast<const int4*>(packed)[0];
            dst[1] = reinterpret_cast<const int4*>(packed)[1];
        }
    }

    trace_mark<Cfg>(5);
    if constexpr (!kFused)
        if (finish_block<peer_scope<Cfg>()>(blocks_done(state, kCombineRecvDone)) && threadIdx.x == 0) state[kCombineRecvSeq] = seq + 1;
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) combine_send(const __nv_bfloat16* __restrict__ x,  // [L, R*T, H] expert outputs
                                                                     const int* __restrict__ recv_count,  // [L]       from the dispatch handle
                                                                     const int* __restrict__ recv_src_info,      // [L, R*T]
                                                                     const int* __restrict__ recv_src_topk,      // [L, R*T]
                                                                     const long long* __restrict__ recv_layout_range,  // [L, R]
                                                                     const RankArgs rank) {
    chain_after_previous_grid();
    const uint64_t seq = rank.state[kCombineSendSeq];
    if (seq - rank.state[kCombineRecvSeq] >= 2) {
        if (blockIdx.x == 0 && threadIdx.x == 0) report(rank.state, rank.status, kStatusTooManyInFlight, rank.id, static_cast<int>(seq));
        return;
    }
    combine_send_phase<Cfg>(x, recv_layout_range, recv_src_info, recv_src_topk, rank, seq);
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) combine_recv(__nv_bfloat16* __restrict__ out,         // [num_out_rows, H]
                                                                     const void* __restrict__ topk_idx,       // [>= num_tokens, K]
                                                                     const float* __restrict__ topk_weights,  // [>= num_tokens, K]
                                                                     const int* __restrict__ num_tokens_ptr,  // device scalar or null
                                                                     int num_tokens_host,
                                                                     int num_out_rows,
                                                                     long long* __restrict__ wait_cost_stats,  // [R] or null
                                                                     const RankArgs rank) {
    chain_after_previous_grid();
    const uint64_t seq = rank.state[kCombineRecvSeq];
    if (seq >= rank.state[kCombineSendSeq]) {
        if (blockIdx.x == 0 && threadIdx.x == 0) report(rank.state, rank.status, kStatusRecvWithoutSend, rank.id, static_cast<int>(seq));
        return;
    }
    combine_recv_phase<Cfg>(out, topk_idx, topk_weights, num_tokens_ptr, num_tokens_host, num_out_rows, wait_cost_stats, rank, seq);
}

// Both halves in one launch, for calls without a receive hook (see lowlat::dispatch: the grid is
// sized so that every block is resident at once).
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) combine(const __nv_bfloat16* __restrict__ x, const int* __restrict__ recv_count,
                                                                const int* __restrict__ recv_src_info, const int* __restrict__ recv_src_topk,
                                                                const long long* __restrict__ recv_layout_range,
                                                                __nv_bfloat16* __restrict__ out, const void* __restrict__ topk_idx,
                                                                const float* __restrict__ topk_weights,
                                                                const int* __restrict__ num_tokens_ptr, int num_tokens_host,
                                                                int num_out_rows, long long* __restrict__ wait_cost_stats,
                                                                const RankArgs rank) {
    chain_after_previous_grid();
    trace_mark<Cfg>(0);
    const uint64_t seq = rank.state[kCombineSendSeq];
    if (seq != rank.state[kCombineRecvSeq]) {  // a receive hook is pending; a fused call pairs its own halves
        if (blockIdx.x == 0 && threadIdx.x == 0) report(rank.state, rank.status, kStatusTooManyInFlight, rank.id, static_cast<int>(seq));
        return;
    }
    combine_send_phase<Cfg, true>(x, recv_layout_range, recv_src_info, recv_src_topk, rank, seq);
    combine_recv_phase<Cfg, true>(out, topk_idx, topk_weights, num_tokens_ptr, num_tokens_host, num_out_rows, wait_cost_stats, rank, seq);
    // Points: 1 row map built, 2 sent, 3 counted in, 4 every flag seen, 5 tokens reduced.
    trace_print<Cfg, 6>("combine");
}

}  // namespace lowlat
