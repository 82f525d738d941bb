// token_sums: the gradients of static coefficients, summed over tokens from the
// per-token rows a backward kernel wrote; every such sum of a launcher in one launch
// (host side: token_sums.h).
//
// Math, per segment s (rows_s: (N, cols_s) contiguous, accumulator dtype):
//   out_s[j] = Σ_t Σ_{w < width_s} rows_s[t, col0_s + j / div_s + w]   when j % div_s == 0   (=)
//   out_s[j] = 0                                                       otherwise (a structural zero)
// div = 1, width = 1 sums the columns one for one; div = n+1 writes the (n, n+1)
// gradient of a matrix of which only column 0 was read (SHC's x' = Σ_k A'[k, 0]·H'_k:
// dA' from the (N, n) rows of dw); width > 1 sums a group of columns into one scalar
// (mHC's da_pre = Σ_t Σ_i dh_pre[i]·z_pre[i]).
//
// Thread mapping: one block per output element, the segments' outputs one after
// another (blockIdx.x); thread i sums tokens i, i + blockDim.x, ... in token order,
// then warp_sum and the warps' sums in warp order: the order of every addition is fixed,
// results are bit-identical run to run. Sums run in double (a parameter gradient is a
// sum over every token, with cancellation: fp32 partials lose several ulps where the
// oracle's pairwise sums do not; a few thousand double adds a block cost nothing here)
// and are rounded once.
//
// Assumptions (arranged by the launcher): 1 <= segments <= kTokenSumsMaxSegments; grid
// = the sum of the segments' outputs; blockDim.x = kTokenSumsThreads (a multiple of 32),
// dynamic shared memory one double a warp; rows and outputs contiguous in the
// accumulator dtype.
#pragma once

#include "common/std.cuh"

#include "common/reduce.cuh"

namespace crosslayer {

constexpr int kTokenSumsMaxSegments = 6;  // mhc_boundary_bwd: 4 of connection i+1, 2 of the post
constexpr int kTokenSumsThreads = 256;

struct TokenSumsSegment {
  const void* rows;  // (N, cols)
  int64_t cols;
  void* out;         // (outputs,)
  int64_t outputs;
  int64_t div;
  int64_t col0, width;
};

struct TokenSumsParams {
  int64_t n_tokens;
  int segments;
  TokenSumsSegment seg[kTokenSumsMaxSegments];
};

template <typename acc>
__global__ void __launch_bounds__(kTokenSumsThreads) token_sums_kernel(const TokenSumsParams p) {
  extern __shared__ __align__(16) unsigned char token_sums_smem[];
  double* __restrict__ warp_sums = reinterpret_cast<double*>(token_sums_smem);  // [blockDim.x / 32]
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
  const acc* __restrict__ rows = static_cast<const acc*>(g.rows) + g.col0 + j / g.div;
  double sum = 0.0;
  for (int64_t t = threadIdx.x; t < p.n_tokens; t += blockDim.x) {
    for (int64_t w = 0; w < g.width; ++w) sum += static_cast<double>(rows[t * g.cols + w]);
  }
  sum = warp_sum(sum);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x) / kWarpSize; ++w) total += warp_sums[w];
    out[j] = static_cast<acc>(total);
  }
}

}  // namespace crosslayer
