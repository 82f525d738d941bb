// Host side of kernels/hc_tile.cuh, shared by the launchers of the token-tile kernels
// (hc_post.cu, stream_mix.cu): the streams every such kernel reads, and its launch.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "common/dispatch.h"
#include "common/streams.h"
#include "kernels/hc_tile.cuh"

namespace crosslayer {

// Fills the streams part of a tile kernel's params from H (N > 0, d > 0); returns the
// tensor the kernel reads (H, or its copy when the token dims need one: keep it alive
// until the launch).
inline at::Tensor fill_tile_streams(HcTileParams& p, const StreamsShape& sh, const at::Tensor& H) {
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  at::Tensor h = readable(H, 2, &p.h_tok);
  p.h_stream_stride = stream_stride(h);
  p.h_ptr = h.data_ptr();
  return h;
}

// Launches a token-tile kernel on the current stream, followed by a launch check: the
// block from hc_tile_block (coef_per_row staged coefficients and dots_per_warp partials
// a warp), then launch(kVec, kN, grid, block, smem_bytes, stream) with kVec the 16-byte
// vector width of T when `vectorize`, else 1, and kN from dispatch_streams<0, 2, 4, 8>
// (both as std::integral_constant).
template <typename T, typename Launch>
void launch_hc_tile(const HcTileParams& p, bool vectorize, int coef_per_row, int dots_per_warp, Launch&& launch) {
  const HcTileBlock b = hc_tile_block(p.n_tokens, p.d, vectorize ? kVec16<T> : 1, coef_per_row, dots_per_warp,
                                      sizeof(acc_t<T>));
  const dim3 grid = token_tile_grid(p.n_tokens, b.rows);
  const dim3 block(b.threads_x, b.rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
    dispatch_streams<0, 2, 4, 8>(p.n, [&](auto kn) {
      launch(std::integral_constant<int, kVectorize ? kVec16<T> : 1>{}, kn, grid, block, b.smem_bytes, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace crosslayer
