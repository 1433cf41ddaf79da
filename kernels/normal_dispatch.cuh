// Normal mode dispatch: every token once per destination rank, token-major, with its metadata.
//
// normal_dispatch_prepare  (local)  send_pos[t, r] = position of token t among the tokens this rank
//                                   sends to rank r (exclusive prefix over t), -1 where not sent;
//                                   num_sent[r] = how many.  One block per destination rank.
// normal_dispatch_send     (never waits)  one warp per token: its row (bf16 or fp8 bytes), scales,
//                                   top-k indices and weights and its index go once to every rank it
//                                   is bound for, at staging [this rank][send_pos]; the last block
//                                   writes this rank's counts into every destination and releases
//                                   their flags.
// normal_dispatch_counts   (waits)  one block: waits for every source, builds the inclusive rank
//                                   prefix matrix [R, R] and this rank's receive totals
//                                   (rows, per-local-expert counts aligned to expert_alignment).
// normal_dispatch_copy     (local)  received row i (source s = the segment of i in the prefix
//                                   matrix, position i - begin[s]) from staging into the outputs;
//                                   rows past the received count are padding (top-k -1, weight 0,
//                                   source -1).  Its last block advances the call counter.
// Received rows are ordered by source rank, then source token.
#pragma once

#include "normal_common.cuh"

namespace lowlat::normal {

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) normal_dispatch_prepare(const bool* __restrict__ is_token_in_rank,  // [n, R]
                                                                                int num_tokens,
                                                                                int* __restrict__ send_pos,  // [n, R] out
                                                                                int* __restrict__ num_sent) {  // [R] out
    constexpr int R = Cfg::kNumRanks, kWarps = Cfg::kNumWarps;
    __shared__ int warp_totals[kWarps];
    const int dst = blockIdx.x, lane = lane_id(), warp = threadIdx.x / 32;
    int carry = 0;  // tokens sent to dst before this chunk
    for (int base = 0; base < num_tokens; base += blockDim.x) {
        const int token = base + threadIdx.x;
        const bool sent = token < num_tokens && is_token_in_rank[static_cast<long long>(token) * R + dst];
        const unsigned votes = __ballot_sync(kFullMask, sent);
        if (lane == 0) warp_totals[warp] = __popc(votes);
        __syncthreads();
        int before = carry + __popc(votes & lanes_below(lane)), chunk_total = 0;
        for (int w = 0; w < kWarps; ++w) {
            before += w < warp ? warp_totals[w] : 0;
            chunk_total += warp_totals[w];
        }
        if (token < num_tokens) send_pos[static_cast<long long>(token) * R + dst] = sent ? before : -1;
        carry += chunk_total;
        __syncthreads();  // warp_totals is rewritten by the next chunk
    }
    if (threadIdx.x == 0) num_sent[dst] = carry;
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) normal_dispatch_send(const void* __restrict__ x,  // [n, data_bytes]
                                                                             int data_bytes,              // 2H (bf16) or H (fp8)
                                                                             const float* __restrict__ x_scales,  // fp8 scales or null
                                                                             long long scale_token_stride,
                                                                             long long scale_group_stride,
                                                                             const void* __restrict__ topk_idx,  // [n, K] or null
                                                                             bool topk_int64,
                                                                             const float* __restrict__ topk_weights,  // [n, K] or null
                                                                             int num_topk,
                                                                             const int* __restrict__ send_pos,  // [n, R]
                                                                             const int* __restrict__ num_sent,  // [R]
                                                                             const int* __restrict__ num_tokens_per_expert,  // [E] or null
                                                                             int num_tokens,
                                                                             const RankArgs args) {
    using Reg = NormalRegion<Cfg>;
    constexpr int R = Cfg::kNumRanks, L = Cfg::kNumLocalExperts, E = Cfg::kNumExperts, G = Cfg::kHidden / 128;
    const auto [rank, state, status, peers, seq, parity] = this_call(args);
    const int lane = lane_id();

    for (int token = blockIdx.x * Cfg::kNumWarps + threadIdx.x / 32; token < num_tokens; token += gridDim.x * Cfg::kNumWarps) {
        const int position = lane < R ? __ldg(send_pos + static_cast<long long>(token) * R + lane) : -1;
        const unsigned dst_mask = __ballot_sync(kFullMask, position >= 0);
        if (dst_mask == 0) continue;
        uint8_t* row = position >= 0 ? peers.remote(lane, Reg::row(parity, rank, position)) : nullptr;
        copy_to_each(static_cast<const uint8_t*>(x) + static_cast<long long>(token) * data_bytes, row, dst_mask, data_bytes);

        // Metadata: lane-strided scales, one lane per top-k slot, the token index.
        for (unsigned mask = dst_mask; mask != 0; mask &= mask - 1) {
            uint8_t* dst = reinterpret_cast<uint8_t*>(__shfl_sync(kFullMask, reinterpret_cast<uint64_t>(row), __ffs(mask) - 1));
            if (x_scales != nullptr)
                for (int g = lane; g < G; g += 32)
                    reinterpret_cast<float*>(dst + Cfg::kOffRowScales)[g] = __ldg(x_scales + token * scale_token_stride + g * scale_group_stride);
            if (topk_idx != nullptr && lane < num_topk) {
                const long long i = static_cast<long long>(token) * num_topk + lane;
                long long expert = load_index(topk_idx, topk_int64, i);
                if (expert < -1 || expert >= E) {
                    if (mask == dst_mask) report(state, status, kStatusBadExpert, rank, static_cast<int>(expert));
                    expert = -1;
                }
                reinterpret_cast<int*>(dst + Cfg::kOffRowTopk)[lane] = static_cast<int>(expert);
                reinterpret_cast<float*>(dst + Cfg::kOffRowWeights)[lane] = topk_weights != nullptr ? __ldg(topk_weights + i) : 0.0f;
            }
            if (lane == 0) *reinterpret_cast<int*>(dst + Cfg::kOffRowSource) = token;
        }
    }

    if (finish_block(blocks_done(state, kSendDone))) {
        // This rank's counts into every destination, then (after a fence) the flags.
        for (int i = threadIdx.x; i < R * (R + L); i += blockDim.x) {
            const int dst = i / (R + L), j = i % (R + L);
            int value = 0;
            if (j < R) value = __ldg(num_sent + j);
            else if (num_tokens_per_expert != nullptr) value = __ldg(num_tokens_per_expert + dst * L + (j - R));
            put_u32(peers, dst, Reg::counts(parity, rank) + 4ull * j, static_cast<uint32_t>(value));
        }
        __syncthreads();
        if (threadIdx.x == 0) fence_acq_rel();
        __syncthreads();
        for (int dst = threadIdx.x; dst < R; dst += blockDim.x) signal(peers, dst, Reg::flag(parity, rank), seq + 1);
    }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) normal_dispatch_counts(int* __restrict__ rank_prefix_matrix,  // [R, R] out
                                                                               int* __restrict__ recv_info,  // [1 + L] out
                                                                               int expert_alignment,
                                                                               const RankArgs args) {
    using Reg = NormalRegion<Cfg>;
    constexpr int R = Cfg::kNumRanks, L = Cfg::kNumLocalExperts;
    const auto [rank, state, status, peers, seq, parity] = this_call(args);
    __shared__ int ok[R];
    wait_sources<Cfg>(peers, parity, seq + 1, ok, args.timeout_ns, state, status);

    auto count = [&, peers = peers, parity = parity](int src, int j) {  // (C++17 lambdas cannot capture structured bindings by reference)
        return ok[src] ? ld_cg(reinterpret_cast<const int*>(peers.local(Reg::counts(parity, src))) + j) : 0;
    };
    for (int dst = threadIdx.x; dst < R; dst += blockDim.x) {
        int running = 0;
        for (int src = 0; src < R; ++src) {
            running += count(src, dst);
            rank_prefix_matrix[src * R + dst] = running;
        }
        if (dst == rank) recv_info[0] = running;
    }
    for (int l = threadIdx.x; l < L; l += blockDim.x) {
        int total = 0;
        for (int src = 0; src < R; ++src) total += count(src, R + l);
        recv_info[1 + l] = (total + expert_alignment - 1) / expert_alignment * expert_alignment;
    }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) normal_dispatch_copy(void* __restrict__ recv_x,  // [num_rows, data_bytes]
                                                                             float* __restrict__ recv_scales,  // [num_rows, G] or null
                                                                             void* __restrict__ recv_topk_idx,  // [num_rows, K] or null
                                                                             float* __restrict__ recv_topk_weights,  // [num_rows, K] or null
                                                                             int* __restrict__ recv_src_idx,  // [num_rows]
                                                                             const int* __restrict__ rank_prefix_matrix,  // [R, R]
                                                                             int num_rows,
                                                                             int data_bytes,
                                                                             int num_topk,
                                                                             bool topk_int64,
                                                                             const RankArgs args) {
    using Reg = NormalRegion<Cfg>;
    constexpr int R = Cfg::kNumRanks, L = Cfg::kNumLocalExperts, G = Cfg::kHidden / 128;
    const auto [rank, state, status, peers, seq, parity] = this_call(args);
    const int lane = lane_id();
    __shared__ int begin[R + 1];
    load_source_begins<R>(rank_prefix_matrix, rank, begin);
    const int num_recv = begin[R];
    if (num_recv > num_rows && blockIdx.x == 0 && threadIdx.x == 0) report(state, status, kStatusRecvOverflow, rank, num_recv);

    for (int i = blockIdx.x * Cfg::kNumWarps + threadIdx.x / 32; i < num_rows; i += gridDim.x * Cfg::kNumWarps) {
        const long long meta = static_cast<long long>(i) * num_topk;
        if (i >= num_recv) {  // padding of a num_worst_tokens output
            if (lane == 0) recv_src_idx[i] = -1;
            if (lane < num_topk && recv_topk_idx != nullptr) store_index(recv_topk_idx, topk_int64, meta + lane, -1);
            if (lane < num_topk && recv_topk_weights != nullptr) recv_topk_weights[meta + lane] = 0.0f;
            continue;
        }
        const int src = find_segment(begin, R, i);
        const uint8_t* row = peers.local(Reg::row(parity, src, i - begin[src]));
        const auto* src4 = reinterpret_cast<const int4*>(row);
        auto* dst4 = reinterpret_cast<int4*>(static_cast<uint8_t*>(recv_x) + static_cast<long long>(i) * data_bytes);
        const int n = data_bytes / 16;
        for (int base = 0; base < n; base += 32 * 4) {
            int4 chunk[4];
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (base + lane + 32 * u < n) chunk[u] = ld_cg(src4 + base + lane + 32 * u);
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (base + lane + 32 * u < n) dst4[base + lane + 32 * u] = chunk[u];
        }
        if (recv_scales != nullptr)
            for (int g = lane; g < G; g += 32)
                recv_scales[static_cast<long long>(i) * G + g] = ld_cg(reinterpret_cast<const float*>(row + Cfg::kOffRowScales) + g);
        if (lane < num_topk && recv_topk_idx != nullptr) {
            const int expert = ld_cg(reinterpret_cast<const int*>(row + Cfg::kOffRowTopk) + lane);
            const bool mine = expert >= rank * L && expert < (rank + 1) * L;
            store_index(recv_topk_idx, topk_int64, meta + lane, mine ? expert - rank * L : -1);
            if (recv_topk_weights != nullptr)
                recv_topk_weights[meta + lane] = mine ? ld_cg(reinterpret_cast<const float*>(row + Cfg::kOffRowWeights) + lane) : 0.0f;
        }
        if (lane == 0) recv_src_idx[i] = ld_cg(reinterpret_cast<const int*>(row + Cfg::kOffRowSource));
    }

    if (finish_block(blocks_done(state, kCopyDone)) && threadIdx.x == 0) state[kSeq] = seq + 1;
}

}  // namespace lowlat::normal
