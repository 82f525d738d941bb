// token_sums: the gradients of static coefficients, summed over tokens from the
// per-token rows a backward kernel wrote; every such sum of a launcher in one launch
// (host side: token_sums.h).
//
// Math, per segment s (rows_s: (N, cols_s) contiguous, accumulator dtype):
//   out_s[j] = Σ_t rows_s[t, j / div_s]   when j % div_s == 0          (=)
//   out_s[j] = 0                           otherwise (a structural zero)
// div = 1 sums the columns one for one; div = n+1 writes the (n, n+1) gradient of a
// matrix of which only column 0 was read (SHC's x' = Σ_k A'[k, 0]·H'_k: dA' from the
// (N, n) rows of dw).
//
// Thread mapping: one block per output element, the segments' outputs one after
// another (blockIdx.x); thread i sums tokens i, i + blockDim.x, ... in token order,
// then warp_sum and the warps' sums in warp order: the order of every addition is fixed,
// results are bit-identical run to run.
//
// Assumptions (arranged by the launcher): 1 <= segments <= kTokenSumsMaxSegments; grid
// = the sum of the segments' outputs; blockDim.x = kTokenSumsThreads (a multiple of 32),
// dynamic shared memory one accumulator a warp; rows and outputs contiguous in the
// accumulator dtype.
#pragma once

#include <cstdint>

#include "common/reduce.cuh"

namespace crosslayer {

constexpr int kTokenSumsMaxSegments = 3;
constexpr int kTokenSumsThreads = 256;

struct TokenSumsSegment {
  const void* rows;  // (N, cols)
  int64_t cols;
  void* out;         // (outputs,)
  int64_t outputs;
  int64_t div;
};

struct TokenSumsParams {
  int64_t n_tokens;
  int segments;
  TokenSumsSegment seg[kTokenSumsMaxSegments];
};

template <typename acc>
__global__ void __launch_bounds__(kTokenSumsThreads) token_sums_kernel(const TokenSumsParams p) {
  extern __shared__ __align__(16) unsigned char token_sums_smem[];
  acc* __restrict__ warp_sums = reinterpret_cast<acc*>(token_sums_smem);  // [blockDim.x / 32]
  int64_t j = blockIdx.x;
  int s = 0;
  while (s + 1 < p.segments && j >= p.seg[s].outputs) {
    j -= p.seg[s].outputs;
    ++s;
  }
  const TokenSumsSegment g = p.seg[s];
  acc* __restrict__ out = static_cast<acc*>(g.out);
  if (j % g.div != 0) {  // block-uniform
    if (threadIdx.x == 0) out[j] = acc(0);
    return;
  }
  const acc* __restrict__ rows = static_cast<const acc*>(g.rows) + j / g.div;
  acc sum = acc(0);
  for (int64_t t = threadIdx.x; t < p.n_tokens; t += blockDim.x) sum += rows[t * g.cols];
  sum = warp_sum(sum);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc total = acc(0);
    for (int w = 0; w < static_cast<int>(blockDim.x) / kWarpSize; ++w) total += warp_sums[w];
    out[j] = total;
  }
}

}  // namespace crosslayer
