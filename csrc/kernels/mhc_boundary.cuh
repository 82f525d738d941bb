// mhc_boundary: the backward of connection i's post fused with mHC connection i+1's pre
// (the forward is mhc_coeffs_fwd_kernel<..., kPost = true>; launcher mhc_boundary_bwd.cu;
// oracle crosslayer/ref's mhc_boundary_bwd).
//
// Math, per token t. Forward: H'_k = beta_k·y + Σ_j alpha[j, 1+k]·H_j (hc_post, rounded
// to T as the forward stored it), then the mHC pre of H' (kernels/mhc_coeffs.cuh) with
// x' = Σ_k alpha'[k, 0]·H'_k. Backward, from dH_next (H''s gradient from later ops, or
// none), dx' (or none), dalpha', dbeta' (or none):
//   phase 1  dpre_k = <dx', H'_k>
//   phase 2  the coefficients' backward epilogue (mhc_coeffs.cuh: Sinkhorn backward,
//            gates): du (=, global: phase 3 and the dphi pass read it), G = [dh, dh·z]
//            (=, global: the launcher's token sums), s and w_k = alpha'[k, 0] (shared)
//   phase 3  dH'_k = dH_next_k + (du·phiᵀ)_k − s·H'_k + w_k·dx'   (fp32, never stored)
//            dH_j = Σ_k alpha[j, 1+k]·dH'_k,  dy = Σ_k beta_k·dH'_k       (=, T)
//            dalpha[j, 1+k] = <H_j, dH'_k>, dalpha[j, 0] = 0, dbeta_k = <dH'_k, y>
//                                                     (=, one fp32 row a token)
// dphi = Σ_t H'ᵀ·du is not here: a warp's dphi partial must stay put across tokens,
// which a tile kernel cannot give; the launcher runs mhc_coeffs_bwd_dh_kernel's dphi
// pass over the H' the forward wrote.
//
// Thread mapping: a block of kMhcBoundaryBwdThreads on one 16-token tile at a time
// (tiles grid-strided).
//   phases 1 and 3b: thread (tt = tid / 16, sub = tid % 16) owns token t0 + tt and its
//     8-feature groups sub, sub + 16, ... (phase 1: all of d; phase 3b: the round's 16);
//     its dot partials are summed over the token's 16 lanes (a half warp: group_sum<16>)
//     in a fixed order, after the tile's rounds;
//   phase 2: threads < 16·kN (whole warps), kN lanes a token as the epilogue kernels;
//   phase 3a: a round covers kMhcBoundaryBwdChunks chunks of 32 features of every
//     stream; warp w takes the (chunk, stream) pairs w, w + 8, ...: du·phiᵀ on tensor
//     cores (mma_chunk_g_w32, phi read as fp32 from L1/L2), stored to shared memory for
//     phase 3b (fp32).
// Bytes: H, y, dx' read in phase 1 and again in phase 3b (the tile is 16·(n+2)·d·2
// bytes: L2 hits while the tiles in flight fit the L2, which the launcher's grid aims
// for), dH_next read and dH, dy written once: 3n·d + 3d elements a token.
//
// Assumptions (checked or arranged by the launcher): bf16/fp16 activations, d >= 32,
// 1 <= n <= kMhcBoundaryBwdN; with kVec every activation base 16-byte aligned and its
// token and stream strides multiples of 8 elements; alpha', beta', u, r, du, G, the
// post's coefficients and gradient rows fp32 and contiguous (the post's coefficients
// with token stride 0 when static); phi fp32 (n·d, M) contiguous.
#pragma once

#include "kernels/hc_post.cuh"  // hc_post_mix
#include "kernels/mhc_coeffs.cuh"

namespace crosslayer {

constexpr int kMhcBoundaryBwdWarps = 8;
constexpr int kMhcBoundaryBwdThreads = kMhcBoundaryBwdWarps * kWarpSize;
constexpr int kMhcBoundaryBwdN = 4;       // streams the kernel holds: n <= 4
constexpr int kMhcBoundaryBwdChunks = 4;  // 32-feature chunks a phase-3 round: 16 lanes × 8
// Row (token) stride of a round's du·phiᵀ in shared memory, floats: kN streams × 128
// features + 4 (rows 4 banks apart: a half warp's mma stores hit a bank at most twice).
constexpr int kMhcBoundaryBwdRow = kMhcBoundaryBwdN * 32 * kMhcBoundaryBwdChunks + 4;

// Shared memory of mhc_boundary_bwd_kernel, in floats: du·phiᵀ [16][row], the post's
// alpha [16][kN(kN+1)] and beta [16][kN], dpre [16][kN], w [16][kN], s [16], and the
// Sinkhorn scales [2·iters − 1][16·kN].
__host__ __device__ constexpr int64_t mhc_boundary_bwd_smem_floats(int64_t iters) {
  constexpr int kN = kMhcBoundaryBwdN;
  return 16 * kMhcBoundaryBwdRow + 16 * kN * (kN + 1) + 3 * 16 * kN + 16 + (2 * iters - 1) * 16 * kN;
}

// 8 elements [e, e + 8) of a 16-bit row (zeros past d) as Vec<T, 8>.
template <typename T, bool kVec>
__device__ __forceinline__ Vec<T, 8> load_vec8(const T* __restrict__ row, int64_t e, int64_t d) {
  const uint4 w = load8<T, kVec>(row, e, d);
  return *reinterpret_cast<const Vec<T, 8>*>(&w);
}

template <typename T>
__device__ __forceinline__ Vec<T, 8> zero_vec8() {
  Vec<T, 8> z;
#pragma unroll
  for (int k = 0; k < 8; ++k) z.v[k] = T(0.0f);
  return z;
}

// fp32 values rounded to T and stored to row[e, e + 8) (those past d skipped).
template <typename T, bool kVec>
__device__ __forceinline__ void store_vec8(T* row, int64_t e, int64_t d, const float (&v)[8]) {
  Vec<T, 8> out;
#pragma unroll
  for (int k = 0; k < 8; ++k) out.v[k] = from_acc<T>(v[k]);
  store8<T, kVec>(row, e, d, *reinterpret_cast<const uint4*>(&out));
}

// The streams of connection i's post at token t's features [e, e + 8): H_j (j < n;
// zeros beyond) and y.
template <typename T, bool kVec, int kN>
__device__ __forceinline__ void mhc_boundary_load_post(const MhcCoeffsParams& p, const T* __restrict__ h_t,
                                                       const T* __restrict__ y_t, int64_t e, Vec<T, 8> (&hv)[kN],
                                                       Vec<T, 8>& yv) {
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    hv[j] = j < p.n ? load_vec8<T, kVec>(h_t + j * p.post_h_stream_stride, e, p.d) : zero_vec8<T>();
  }
  yv = load_vec8<T, kVec>(y_t, e, p.d);
}

// Dynamic shared memory: mhc_boundary_bwd_smem_floats(iters) floats.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kMhcBoundaryBwdThreads) mhc_boundary_bwd_kernel(const MhcCoeffsParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int kN = kMhcBoundaryBwdN;
  constexpr int kA = kN * (kN + 1);
  constexpr int kRow = kMhcBoundaryBwdRow;
  constexpr int kChunks = kMhcBoundaryBwdChunks;
  extern __shared__ __align__(16) unsigned char mhc_bb_smem[];
  float* __restrict__ g_s = reinterpret_cast<float*>(mhc_bb_smem);  // [16][kRow] du·phiᵀ of a round
  float* __restrict__ a_s = g_s + 16 * kRow;                         // [16][kA] alpha[j][c] at j(n+1)+c
  float* __restrict__ b_s = a_s + 16 * kA;                           // [16][kN]
  float* __restrict__ dpre_s = b_s + 16 * kN;                        // [16][kN]
  float* __restrict__ w_s = dpre_s + 16 * kN;                        // [16][kN]
  float* __restrict__ s_s = w_s + 16 * kN;                           // [16]
  float* __restrict__ cbuf_s = s_s + 16;                             // [steps][16·kN]
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int grp = lane / 4, tig = lane % 4;
  const int tt = threadIdx.x / 16, sub = threadIdx.x % 16;
  const int n = p.n;
  const int64_t N = p.n_tokens, d = p.d;
  const int64_t tiles = (N + 15) / 16;
  const int64_t rounds = (p.cps + kChunks - 1) / kChunks;
  const float* __restrict__ A = static_cast<const float*>(p.post_a_ptr);
  const float* __restrict__ B = static_cast<const float*>(p.post_b_ptr);
  const T* __restrict__ DX = static_cast<const T*>(p.gx_ptr);
  const T* __restrict__ DHN = static_cast<const T*>(p.dh_prior_ptr);
  // du is written by phase 2 and read by phase 3a of the same tile: plain loads.
  const float* DU = static_cast<const float*>(p.du_ptr);

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t t0 = tile * 16;
    __syncthreads();  // the previous tile's readers of shared memory are done
    for (int idx = threadIdx.x; idx < 16 * (kA + kN); idx += kMhcBoundaryBwdThreads) {
      const int r = idx / (kA + kN), j = idx % (kA + kN);
      const int64_t t = t0 + r;
      float v = 0.f;
      if (t < N && j < n * (n + 1)) v = A[t * p.post_a_token_stride + j];
      if (t < N && j >= kA && j - kA < n) v = B[t * p.post_b_token_stride + j - kA];
      if (j < kA) {
        a_s[r * kA + j] = v;
      } else {
        b_s[r * kN + j - kA] = v;
      }
    }
    __syncthreads();

    const int64_t t = t0 + tt;
    const bool tv = t < N;
    const float* a_row = a_s + tt * kA;
    const float* b_row = b_s + tt * kN;
    const T* __restrict__ h_t = static_cast<const T*>(p.post_h_ptr) + (tv ? p.post_h_tok.offset(t) : 0);
    const T* __restrict__ y_t = static_cast<const T*>(p.post_y_ptr) + (tv ? p.post_y_tok.offset(t) : 0);
    const T* __restrict__ dx_t = DX != nullptr ? DX + (tv ? p.gx_tok.offset(t) : 0) : nullptr;

    // Phase 1: dpre_k = <dx', H'_k>, H' mixed again from H and y (the forward's bits).
    {
      float dot[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) dot[k] = 0.f;
      if (tv && dx_t != nullptr) {
        for (int64_t e = 8 * sub; e < d; e += 8 * 16) {
          Vec<T, 8> hv[kN], yv;
          mhc_boundary_load_post<T, kVec, kN>(p, h_t, y_t, e, hv, yv);
          const Vec<T, 8> xv = load_vec8<T, kVec>(dx_t, e, d);
#pragma unroll
          for (int k = 0; k < kN; ++k) {
            if (k < n) {
              float o[8];
              hc_post_mix<T, 8, kN>(hv, yv, a_row, b_row[k], n, k, o);
#pragma unroll
              for (int v = 0; v < 8; ++v) dot[k] += to_acc(from_acc<T>(o[v])) * to_acc(xv.v[v]);
            }
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        dot[k] = group_sum<16>(dot[k]);
        if (sub == 0) dpre_s[tt * kN + k] = dot[k];
      }
    }
    __syncthreads();

    // Phase 2: the coefficients' backward of the tile (2 warps: kN lanes a token).
    if (threadIdx.x < 16 * kN) {
      const MhcCoeffsLane l = mhc_coeffs_lane_at<kN>(t0 * kN + threadIdx.x, N, n);  // token t0 + tid / kN
      const MhcRow<float, kN> u =
          mhc_load_row<float, kN>(static_cast<const float*>(p.u_ptr) + l.tc * p.M, n, l.row, l.active);
      const float r = static_cast<const float*>(p.r_ptr)[l.tc];
      float zres[kN], L[kN], S[kN], P[kN];
      mhc_coeffs_res_logits<float, kN>(p, l, u, r, zres, L);
      float* cbuf = cbuf_s + threadIdx.x;
      mhc_sinkhorn_fwd<float, kN>(L, n, l.row, l.active, p.iters, static_cast<float>(p.sinkhorn_eps), S, P, cbuf,
                                  16 * kN);
      const float* __restrict__ dalpha = static_cast<const float*>(p.dalpha_ptr);
      const float* __restrict__ da_row = dalpha != nullptr ? dalpha + (l.tc * n + l.rr) * (n + 1) : nullptr;
      float g[kN], dh_res[kN];
#pragma unroll
      for (int j = 0; j < kN; ++j) g[j] = (l.active && j < n && da_row != nullptr) ? da_row[1 + j] : 0.f;
      mhc_sinkhorn_bwd<float, kN>(g, P, S, n, l.active, p.iters, cbuf, 16 * kN, dh_res);
      const float dpre = l.active ? (da_row != nullptr ? da_row[0] : 0.f) + dpre_s[threadIdx.x] : 0.f;
      float z_pre, z_post, dh_pre, dh_post, w;
      mhc_coeffs_gates_bwd<float, kN>(p, l, u, r, dpre, z_pre, z_post, dh_pre, dh_post, w);
      const float dr = mhc_coeffs_dr<float, kN>(mhc_scales<float>(p), u, dh_pre, dh_post, dh_res);
      w_s[threadIdx.x] = w;
      if (l.row == 0) s_s[threadIdx.x / kN] = l.valid ? mhc_rms_grad_scale(dr, r, n, d) : 0.f;
      if (l.active) mhc_coeffs_write_bwd<float, kN>(p, l, r, dh_pre, dh_post, z_pre, z_post, dh_res, zres);
    }
    __syncthreads();

    // Phase 3, rounds of kChunks·32 features.
    const int64_t ta = t0 + grp, tb = ta + 8;
    const bool va = ta < N, vb = tb < N;
    const float s_t = s_s[tt];
    float da[kN][kN], db[kN];  // <H_j, dH'_k>, <dH'_k, y>: this thread's partials
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      db[k] = 0.f;
#pragma unroll
      for (int j = 0; j < kN; ++j) da[j][k] = 0.f;
    }
    for (int64_t rd = 0; rd < rounds; ++rd) {
      // 3a: du·phiᵀ of the round's (chunk, stream) pairs to shared memory.
      for (int q = warp; q < kChunks * n; q += kMhcBoundaryBwdWarps) {
        const int fl = q / n, k = q % n;
        const int64_t f = rd * kChunks + fl;  // chunk of stream k
        if (f >= p.cps) continue;             // warp-uniform
        float acc[4][4];
        mma_chunk_g_w32<4>(acc, DU + (va ? ta : 0) * p.ldu, DU + (vb ? tb : 0) * p.ldu, va, vb, p.phi_ptr,
                           p.phi_ld, k * d + f * 32, f * 32, d, p.ldu / 16, grp, tig);
        float* ga = g_s + grp * kRow + k * (32 * kChunks) + fl * 32 + 8 * tig;
        float* gb = ga + 8 * kRow;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          *reinterpret_cast<float2*>(ga + 2 * j) = make_float2(acc[j][0], acc[j][1]);
          *reinterpret_cast<float2*>(gb + 2 * j) = make_float2(acc[j][2], acc[j][3]);
        }
      }
      __syncthreads();
      // 3b: dH' of this thread's 8 features, folded into hc_post's backward.
      const int64_t e = rd * (32 * kChunks) + 8 * sub;
      if (tv && e < d) {
        Vec<T, 8> hv[kN], yv;
        mhc_boundary_load_post<T, kVec, kN>(p, h_t, y_t, e, hv, yv);
        const Vec<T, 8> xv = dx_t != nullptr ? load_vec8<T, kVec>(dx_t, e, d) : zero_vec8<T>();
        const T* __restrict__ dhn_t = DHN != nullptr ? DHN + p.prior_tok.offset(t) : nullptr;
        float dh[kN][8], dy[8];
#pragma unroll
        for (int v = 0; v < 8; ++v) {
          dy[v] = 0.f;
#pragma unroll
          for (int j = 0; j < kN; ++j) dh[j][v] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          if (k < n) {
            float o[8];
            hc_post_mix<T, 8, kN>(hv, yv, a_row, b_row[k], n, k, o);
            const float* gk = g_s + tt * kRow + k * (32 * kChunks) + 8 * sub;
            const float4 g0 = *reinterpret_cast<const float4*>(gk);
            const float4 g1 = *reinterpret_cast<const float4*>(gk + 4);
            const float gv[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
            const Vec<T, 8> nv = dhn_t != nullptr ? load_vec8<T, kVec>(dhn_t + k * p.prior_stream_stride, e, d)
                                                  : zero_vec8<T>();
            const float bk = b_row[k], wk = w_s[tt * kN + k];
#pragma unroll
            for (int v = 0; v < 8; ++v) {
              const float gd = gv[v] - s_t * to_acc(from_acc<T>(o[v])) + wk * to_acc(xv.v[v]) + to_acc(nv.v[v]);
              dy[v] += bk * gd;
              db[k] += gd * to_acc(yv.v[v]);
#pragma unroll
              for (int j = 0; j < kN; ++j) {
                if (j < n) {
                  dh[j][v] += a_row[j * (n + 1) + 1 + k] * gd;
                  da[j][k] += gd * to_acc(hv[j].v[v]);
                }
              }
            }
          }
        }
        T* dh_t = static_cast<T*>(p.dh_ptr) + p.dh_tok.offset(t);
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          if (j < n) store_vec8<T, kVec>(dh_t + j * p.dh_stream_stride, e, d, dh[j]);
        }
        store_vec8<T, kVec>(static_cast<T*>(p.dy_ptr) + p.dy_tok.offset(t), e, d, dy);
      }
      __syncthreads();  // the next round overwrites g_s
    }

    // The post's coefficient gradient rows of the tile (=).
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      db[k] = group_sum<16>(db[k]);
#pragma unroll
      for (int j = 0; j < kN; ++j) da[j][k] = group_sum<16>(da[j][k]);
    }
    if (tv && sub == 0) {
      float* __restrict__ da_t = static_cast<float*>(p.post_da_ptr) + t * n * (n + 1);
      float* __restrict__ db_t = static_cast<float*>(p.post_db_ptr) + t * n;
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        if (j < n) {
          da_t[j * (n + 1)] = 0.f;
          db_t[j] = db[j];
#pragma unroll
          for (int k = 0; k < kN; ++k) {
            if (k < n) da_t[j * (n + 1) + 1 + k] = da[j][k];
          }
        }
      }
    }
  }
#endif
}

}  // namespace crosslayer
