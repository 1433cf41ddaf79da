// Normal mode combine: each received row goes back to its source, which sums its copies.
//
// normal_combine_send  (never waits)  one warp per received row i < num_recv (source s = the
//                      segment of i in the rank prefix matrix, position i - begin[s]): the bf16 row
//                      and its top-k weights go to staging [this rank][position] of rank s; the last
//                      block releases every rank's flag (also ranks that get nothing).
// normal_combine_recv  (waits)  every block waits for every source, then one warp per token:
//                      out[t] = bf16(((0 + bias_0[t]) + bias_1[t]) + sum over ranks r ascending with
//                      send_pos[t, r] >= 0 of row(r, send_pos[t, r])), each add rounded in fp32; the
//                      weights likewise (no bias).  Its last block advances the call counter.
#pragma once

#include "normal_common.cuh"

namespace lowlat::normal {

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) normal_combine_send(const __nv_bfloat16* __restrict__ x,  // [num_rows, H]
                                                                            const float* __restrict__ topk_weights,  // [num_rows, K] or null
                                                                            int num_topk,
                                                                            const int* __restrict__ rank_prefix_matrix,  // [R, R]
                                                                            int num_rows,
                                                                            const RankArgs args) {
    using Reg = NormalRegion<Cfg>;
    constexpr int R = Cfg::kNumRanks, H = Cfg::kHidden;
    const auto [rank, state, status, peers, seq, parity] = this_call(args);
    const int lane = lane_id();
    __shared__ int begin[R + 1];
    load_source_begins<R>(rank_prefix_matrix, rank, begin);
    const int num_recv = min(begin[R], num_rows);

    for (int i = blockIdx.x * Cfg::kNumWarps + threadIdx.x / 32; i < num_recv; i += gridDim.x * Cfg::kNumWarps) {
        const int src = find_segment(begin, R, i);
        uint8_t* row = peers.remote(src, Reg::row(parity, rank, i - begin[src]));
        copy_to_each(x + static_cast<long long>(i) * H, row, 1u << src, 2 * H);
        if (lane < num_topk)
            reinterpret_cast<float*>(row + Cfg::kOffRowWeights)[lane] =
                topk_weights != nullptr ? __ldg(topk_weights + static_cast<long long>(i) * num_topk + lane) : 0.0f;
    }

    if (finish_block(blocks_done(state, kCombineSendDone)))
        for (int dst = threadIdx.x; dst < R; dst += blockDim.x) signal(peers, dst, Reg::flag(parity, rank), seq + 1);
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) normal_combine_recv(__nv_bfloat16* __restrict__ out,  // [n, H]
                                                                            float* __restrict__ out_weights,  // [n, K] or null
                                                                            const __nv_bfloat16* __restrict__ bias_0,  // [n, H] or null
                                                                            const __nv_bfloat16* __restrict__ bias_1,  // [n, H] or null
                                                                            const int* __restrict__ send_pos,  // [n, R] from the dispatch
                                                                            int num_tokens,
                                                                            int num_topk,
                                                                            const RankArgs args) {
    using Reg = NormalRegion<Cfg>;
    constexpr int R = Cfg::kNumRanks, H = Cfg::kHidden;
    const auto [rank, state, status, peers, seq, parity] = this_call(args);
    const int lane = lane_id();
    __shared__ int ok[R];
    wait_sources<Cfg>(peers, parity, seq + 1, ok, args.timeout_ns, state, status);

    for (int token = blockIdx.x * Cfg::kNumWarps + threadIdx.x / 32; token < num_tokens; token += gridDim.x * Cfg::kNumWarps) {
        const int position = lane < R ? __ldg(send_pos + static_cast<long long>(token) * R + lane) : -1;
        const bool present = position >= 0 && ok[lane];
        const unsigned ranks = __ballot_sync(kFullMask, present);
        const uint8_t* row = present ? peers.local(Reg::row(parity, lane, position)) : nullptr;
        const long long first = static_cast<long long>(token) * H;
        for (int base = 0; base < H; base += 256) {  // warp-uniform: the shuffles below need every lane
            const int c = base + lane * 8;
            const bool active = c < H;  // the upper half-warp idles on a trailing 128-channel group
            float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            if (active && bias_0 != nullptr) add_bf16x8(acc, __ldg(reinterpret_cast<const int4*>(bias_0 + first + c)));
            if (active && bias_1 != nullptr) add_bf16x8(acc, __ldg(reinterpret_cast<const int4*>(bias_1 + first + c)));
            for (unsigned mask = ranks; mask != 0; mask &= mask - 1) {
                const auto* src = reinterpret_cast<const uint8_t*>(__shfl_sync(kFullMask, reinterpret_cast<uint64_t>(row), __ffs(mask) - 1));
                if (active) add_bf16x8(acc, ld_cg(reinterpret_cast<const int4*>(src + 2 * c)));
            }
            if (active) *reinterpret_cast<int4*>(out + first + c) = pack_bf16x8(acc);
        }
        // Weights: lane k sums slot k over the same ranks in the same order.
        float weight = 0.0f;
        for (unsigned mask = ranks; mask != 0; mask &= mask - 1) {
            const auto* src = reinterpret_cast<const uint8_t*>(__shfl_sync(kFullMask, reinterpret_cast<uint64_t>(row), __ffs(mask) - 1));
            if (lane < num_topk) weight = __fadd_rn(weight, ld_cg(reinterpret_cast<const float*>(src + Cfg::kOffRowWeights) + lane));
        }
        if (out_weights != nullptr && lane < num_topk) out_weights[static_cast<long long>(token) * num_topk + lane] = weight;
    }

    if (finish_block(blocks_done(state, kCombineRecvDone)) && threadIdx.x == 0) state[kSeq] = seq + 1;
}

}  // namespace lowlat::normal
