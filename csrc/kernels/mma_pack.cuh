// mma_pack: fp32 weights packed into the 16-bit mma.sync m16n8k16 B fragments of
// common/mma.cuh in one launch (host side: common/mma_pack.h's pack_fragments; the
// fragment consumer: mma_proj_chunk, the projections' X·W).
//
// Source: W (streams·d, cols) fp32, row stride ld, whose rows are `streams` blocks of d;
// the packed rows are those blocks each zero-padded to d_pad (a multiple of 32), the
// packed columns zero-padded from cols to col_pad, so reduction chunk c of 32 rows lies
// in block c / (d_pad / 32). With `scale` (fp16: the device scalar 2^k of
// fp16_split_scale) every element is multiplied by it first.
//
// Parts of an element v (T = bf16 or fp16, all sums in fp32):
//   hi = T(v), lo = T(v − hi), rest = T(v − hi − lo), rest_lo = T((v − hi − lo) − rest)
//   (rest_lo: the second part of the rest's own split, as packing v − hi − lo gives it;
//   the kernels never read it).
//
// Orders (element index, outermost first; row = packed row, col = packed column):
//   [chunk][s 2][n-tile col_pad/8][grp 8][tig 4][part P][half 2][j 2]
//   row = 32·chunk + 8·tig + 4·s + 2·half + j, col = 8·n-tile + grp;
//   P = 2 (hi, lo) or 4 (hi, lo, rest, rest_lo)
//
// Thread mapping: one output element a thread, grid-stride over `total` (coalesced
// 2-byte stores; the fp32 reads are gathers from a weight that L2 holds).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/std.cuh"

#include "common/vec.cuh"

namespace crosslayer {

constexpr int kMmaPackThreads = 256;

struct MmaPackParams {
  const float* __restrict__ w;      // (streams·d, cols), row stride ld
  const float* __restrict__ scale;  // 0-dim, or null
  void* __restrict__ out;           // `total` elements of T
  int64_t ld, d, d_pad, cols, col_pad, total;
  int streams, parts;
};

// Part `part` of v (see the header).
template <typename T>
__device__ __forceinline__ T mma_pack_part(float v, int part) {
  const float hi = to_acc(from_acc<T>(v));
  const float r1 = v - hi;
  if (part == 0) return from_acc<T>(v);
  if (part == 1) return from_acc<T>(r1);
  const float lo = to_acc(from_acc<T>(r1));
  const float r2 = r1 - lo;
  if (part == 2) return from_acc<T>(r2);
  return from_acc<T>(r2 - to_acc(from_acc<T>(r2)));
}

template <typename T>
__global__ void __launch_bounds__(kMmaPackThreads) mma_pack_kernel(const MmaPackParams p) {
  T* __restrict__ out = static_cast<T*>(p.out);
  const float scale = p.scale != nullptr ? *p.scale : 1.f;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < p.total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t q = idx;
    const int j = q % 2, half = (q / 2) % 2;
    q /= 4;
    const int part = static_cast<int>(q % p.parts);
    q /= p.parts;
    const int tig = q % 4, grp = (q / 4) % 8;
    q /= 32;
    const int64_t ntile = q % (p.col_pad / 8);
    q /= p.col_pad / 8;
    const int s = q % 2;
    const int64_t chunk = q / 2;
    const int64_t row = 32 * chunk + 8 * tig + 4 * s + 2 * half + j;
    const int64_t col = 8 * ntile + grp;
    const int64_t block = row / p.d_pad, e = row % p.d_pad;
    float v = 0.f;
    if (block < p.streams && e < p.d && col < p.cols) v = p.w[(block * p.d + e) * p.ld + col] * scale;
    out[idx] = mma_pack_part<T>(v, part);
  }
}

}  // namespace crosslayer
