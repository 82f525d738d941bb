// Host side of kernels/hc_tile.cuh, shared by the launchers of the token-tile kernels
// (hc_post.cu, stream_mix.cu): the streams every such kernel reads, and its launch.
#pragma once

#include <type_traits>

#include "common/dispatch.h"
#include "common/launch.h"
#include "common/layout.h"
#include "kernels/hc_tile.cuh"

namespace crosslayer {

// Fills the streams part of a tile kernel's params from H (N > 0, d > 0); returns the
// tensor the kernel reads (H, or its copy when the token dims need one: keep it alive
// until the launch).
inline at::Tensor fill_tile_streams(HcTileParams& p, const StreamShape& sh, const at::Tensor& H) {
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.n = static_cast<int>(sh.n);
  at::Tensor h = readable(H, 2, &p.h_tok);
  p.h_stream_stride = stream_stride(h);
  p.h_ptr = h.data_ptr();
  return h;
}

// Launches a token-tile kernel through common/launch.h (current stream, launch check):
// the block from token_tile_block (coef_per_row staged coefficients and dots_per_warp
// partials a warp), one block per tile of rows, and the kernel kernel_for(kvec, kn)
// with kvec the 16-byte vector width of T when `vectorize`, else 1, and kn from
// dispatch_streams<0, 2, 4, 8> (both std::integral_constant).
template <typename T, typename Params, typename KernelFor>
void launch_hc_tile(const Params& p, bool vectorize, int coef_per_row, int dots_per_warp, KernelFor&& kernel_for) {
  constexpr int kAccBytes = sizeof(acc_t<T>);
  const TokenTileBlock b = token_tile_block(p.n_tokens, p.d, vectorize ? kVec16<T> : 1, kAccBytes * coef_per_row,
                                            kAccBytes * dots_per_warp);
  CL_BOOL_SWITCH(vectorize, kVectorize, [&] {
    dispatch_streams<0, 2, 4, 8>(p.n, [&](auto kn) {
      launch(kernel_for(std::integral_constant<int, kVectorize ? kVec16<T> : 1>{}, kn),
             cover_grid(p.n_tokens, b.rows), dim3(b.threads_x, b.rows), b.smem_bytes, p);
    });
  });
}

}  // namespace crosslayer
