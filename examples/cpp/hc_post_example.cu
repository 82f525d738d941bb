// crosslayer's kernels from C++ without torch: hc_post (H'_k = beta_k·y + Σ_i alpha[i][1+k]·H_i,
// DESIGN.md's HC post) forward and backward on raw device pointers, checked against a
// double-precision loop on the host. Exit 0: correct; 1: wrong or a CUDA error; 77: no
// GPU (ctest reads it as skipped).
//
// The launch is what crosslayer's launcher does for contiguous fp32 tensors (csrc/hc_tile.h):
// token_tile_block sizes the block for `n(n+2)` staged coefficients a token (and, in the
// backward, n(n+1) dot partials a warp), one block per tile of rows, 16-byte vectors.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "kernels/hc_post.cuh"

namespace cl = crosslayer;

#define CHECK(call)                                                                        \
  do {                                                                                     \
    cudaError_t err_ = (call);                                                             \
    if (err_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      return 1;                                                                            \
    }                                                                                      \
  } while (0)

constexpr int kN = 4;        // streams
constexpr int kD = 256;      // features
constexpr int kTokens = 37;  // an odd count: the last tile is partial
constexpr int kVec = 4;      // 16-byte vectors of float

// Contiguous (tokens, rows, d) layout: token t starts at t·rows·d.
cl::TokenLayout contiguous(int64_t token_stride) {
  cl::TokenLayout t;
  t.inner = 1;
  t.outer_stride = token_stride;
  return t;
}

float* device_copy(const std::vector<float>& host) {
  float* p = nullptr;
  if (cudaMalloc(&p, host.size() * sizeof(float)) != cudaSuccess) return nullptr;
  cudaMemcpy(p, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice);
  return p;
}

double max_rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0, scale = 1e-30;
  for (size_t i = 0; i < got.size(); ++i) {
    err = std::fmax(err, std::fabs(got[i] - want[i]));
    scale = std::fmax(scale, std::fabs(want[i]));
  }
  return err / scale;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("hc_post_example: no CUDA device, skipped\n");
    return 77;
  }
  const int n = kN, d = kD, N = kTokens;
  std::vector<float> H(size_t(N) * n * d), y(size_t(N) * d), alpha(size_t(N) * n * (n + 1)), beta(size_t(N) * n),
      g(size_t(N) * n * d);
  unsigned s = 1;
  auto rnd = [&s] { s = s * 1664525u + 1013904223u; return float(s >> 8) / float(1 << 24) - 0.5f; };
  for (auto* v : {&H, &y, &alpha, &beta, &g})
    for (float& x : *v) x = rnd();

  float *dH_in = device_copy(H), *dy_in = device_copy(y), *da_in = device_copy(alpha), *db_in = device_copy(beta),
        *dg = device_copy(g);
  float *out, *dH, *dy, *dalpha, *dbeta;
  CHECK(cudaMalloc(&out, H.size() * sizeof(float)));
  CHECK(cudaMalloc(&dH, H.size() * sizeof(float)));
  CHECK(cudaMalloc(&dy, y.size() * sizeof(float)));
  CHECK(cudaMalloc(&dalpha, alpha.size() * sizeof(float)));
  CHECK(cudaMalloc(&dbeta, beta.size() * sizeof(float)));

  cl::HcPostParams p{};
  p.n_tokens = N;
  p.d = d;
  p.n = n;
  p.h_tok = contiguous(int64_t(n) * d);
  p.h_stream_stride = d;
  p.h_ptr = dH_in;
  p.y_tok = contiguous(d);
  p.y_ptr = dy_in;
  p.a_ptr = da_in;
  p.b_ptr = db_in;
  p.a_token_stride = n * (n + 1);  // per-token coefficients (0: static)
  p.b_token_stride = n;
  p.out_tok = contiguous(int64_t(n) * d);
  p.out_stream_stride = d;
  p.out_ptr = out;
  p.g_tok = p.out_tok;
  p.g_stream_stride = d;
  p.g_ptr = dg;
  p.dh_tok = p.h_tok;
  p.dh_stream_stride = d;
  p.dh_ptr = dH;
  p.dy_tok = p.y_tok;
  p.dy_ptr = dy;
  p.da_ptr = dalpha;
  p.db_ptr = dbeta;

  const int acc_bytes = sizeof(float);
  const cl::TokenTileBlock fb = cl::token_tile_block(N, d, kVec, acc_bytes * n * (n + 2), 0);
  cl::hc_post_fwd_kernel<float, kVec, kN><<<(N + fb.rows - 1) / fb.rows, dim3(fb.threads_x, fb.rows), fb.smem_bytes>>>(p);
  CHECK(cudaGetLastError());
  const cl::TokenTileBlock bb = cl::token_tile_block(N, d, kVec, acc_bytes * n * (n + 2), acc_bytes * n * (n + 1));
  cl::hc_post_bwd_kernel<float, kVec, kN><<<(N + bb.rows - 1) / bb.rows, dim3(bb.threads_x, bb.rows), bb.smem_bytes>>>(p);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());

  std::vector<float> got_out(H.size()), got_dH(H.size()), got_dy(y.size()), got_da(alpha.size()), got_db(beta.size());
  CHECK(cudaMemcpy(got_out.data(), out, H.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(got_dH.data(), dH, H.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(got_dy.data(), dy, y.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(got_da.data(), dalpha, alpha.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(got_db.data(), dbeta, beta.size() * sizeof(float), cudaMemcpyDeviceToHost));

  // The host reference in double: forward, then the backward of <g, H'>.
  std::vector<double> want_out(H.size()), want_dH(H.size(), 0.0), want_dy(y.size(), 0.0),
      want_da(alpha.size(), 0.0), want_db(beta.size(), 0.0);
  for (int t = 0; t < N; ++t) {
    const float* a = &alpha[size_t(t) * n * (n + 1)];
    const float* b = &beta[size_t(t) * n];
    for (int k = 0; k < n; ++k)
      for (int e = 0; e < d; ++e) {
        const size_t o = (size_t(t) * n + k) * d + e;
        double v = double(b[k]) * y[size_t(t) * d + e];
        for (int i = 0; i < n; ++i) v += double(a[i * (n + 1) + 1 + k]) * H[(size_t(t) * n + i) * d + e];
        want_out[o] = v;
        const double gk = g[o];
        want_dy[size_t(t) * d + e] += double(b[k]) * gk;
        want_db[size_t(t) * n + k] += gk * y[size_t(t) * d + e];
        for (int i = 0; i < n; ++i) {
          want_dH[(size_t(t) * n + i) * d + e] += double(a[i * (n + 1) + 1 + k]) * gk;
          want_da[size_t(t) * n * (n + 1) + i * (n + 1) + 1 + k] += gk * H[(size_t(t) * n + i) * d + e];
        }
      }
  }
  const double errs[] = {max_rel_err(got_out, want_out), max_rel_err(got_dH, want_dH), max_rel_err(got_dy, want_dy),
                         max_rel_err(got_da, want_da), max_rel_err(got_db, want_db)};
  const char* names[] = {"H'", "dH", "dy", "dalpha", "dbeta"};
  bool ok = true;
  for (int i = 0; i < 5; ++i) {
    std::printf("hc_post_example: %-6s max |err| / max |ref| = %.2e\n", names[i], errs[i]);
    ok = ok && errs[i] < 1e-5;
  }
  for (float* ptr : {dH_in, dy_in, da_in, db_in, dg, out, dH, dy, dalpha, dbeta}) cudaFree(ptr);
  std::printf("hc_post_example: %s\n", ok ? "OK" : "WRONG");
  return ok ? 0 : 1;
}
