// Normal mode, get_dispatch_layout: from top-k expert indices to the counts dispatch needs.
//
//   num_tokens_per_rank   int32 [R]     tokens with at least one expert on rank r
//   num_tokens_per_expert int32 [E]     (token, slot) pairs naming expert e
//   is_token_in_rank      bool  [n, R]  token t goes to rank r
//
// One warp per token (lane k reads slot k).  Each block counts in shared memory and adds its
// counts to the outputs, which the host zeroes first; integer atomics keep the result exact.
// Expert indices outside [-1, E) are reported (kStatusBadExpert) and treated as -1.
#pragma once

#include "normal_common.cuh"

namespace lowlat::normal {

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kNumWarps * 32) normal_dispatch_layout(const void* __restrict__ topk_idx,  // [n, K] int64 or int32
                                                                               bool topk_int64,
                                                                               int num_tokens,
                                                                               int num_topk,
                                                                               int* __restrict__ num_tokens_per_rank,    // [R], zeroed
                                                                               int* __restrict__ num_tokens_per_expert,  // [E], zeroed
                                                                               bool* __restrict__ is_token_in_rank,      // [n, R]
                                                                               const RankArgs args) {
    constexpr int R = Cfg::kNumRanks, E = Cfg::kNumExperts, L = Cfg::kNumLocalExperts;
    const auto [rank, state, status, peers, seq, parity] = this_call(args);  // this kernel only counts: no peers, no staging
    __shared__ int expert_count[E];
    __shared__ int rank_count[R];
    for (int i = threadIdx.x; i < E; i += blockDim.x) expert_count[i] = 0;
    for (int i = threadIdx.x; i < R; i += blockDim.x) rank_count[i] = 0;
    __syncthreads();

    const int lane = lane_id();
    for (int token = blockIdx.x * Cfg::kNumWarps + threadIdx.x / 32; token < num_tokens; token += gridDim.x * Cfg::kNumWarps) {
        unsigned ranks = 0;
        if (lane < num_topk) {
            const long long expert = load_index(topk_idx, topk_int64, static_cast<long long>(token) * num_topk + lane);
            if (expert < -1 || expert >= E) {
                report(state, status, kStatusBadExpert, rank, static_cast<int>(expert));
            } else if (expert >= 0) {
                atomicAdd(expert_count + expert, 1);
                ranks = 1u << (static_cast<int>(expert) / L);
            }
        }
        ranks = __reduce_or_sync(kFullMask, ranks);
        if (lane < R) {
            const bool in_rank = (ranks >> lane) & 1u;
            is_token_in_rank[static_cast<long long>(token) * R + lane] = in_rank;
            if (in_rank) atomicAdd(rank_count + lane, 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < E; i += blockDim.x)
        if (expert_count[i] != 0) atomicAdd(num_tokens_per_expert + i, expert_count[i]);
    for (int i = threadIdx.x; i < R; i += blockDim.x)
        if (rank_count[i] != 0) atomicAdd(num_tokens_per_rank + i, rank_count[i]);
}

}  // namespace lowlat::normal
