// Launchers for mudd_weights (kernels in kernels/mudd_weights.cuh).
//
//   mudd_weights_fwd(x (*tok, d), W1 (d, K), W2 (K, C·l), bias (C·l) or (C, l), n_ways,
//                    eps, approximate) -> {A (*tok, C, l), u (*tok, K), r (*tok)}
//   mudd_weights_bwd(dA, x, W1, W2, bias, u, r, n_ways, eps, approximate, dx_acc)
//                    -> {dx (*tok, d), dW1, dW2b (K + 1, C·l)}: dW2 and dbias stacked
//                    (summed together, by the head kernel or one GEMM; the caller splits
//                    them: two outputs of one buffer would alias, which custom ops may not
//                    return). With dx_acc (x's shape and dtype), dx is added into it in
//                    place (a depth stack's gradient buffer) and dx_acc is returned.
//
// A, u and r are in the accumulator dtype (float64 for float64 x, float32 otherwise);
// u = rms(x)·W1 and r = rsqrt(mean x² + eps) are what the backward needs, so it reads x
// once more (for dx and dW1 together) and never recomputes x·W1.
// Work split:
//   bf16/fp16 x   forward: the W1 packing launch, mudd_weights_fwd_proj_kernel (r, u and A,
//                 x·W1 and the head's GELU(u)·W2 on tensor cores);
//                 backward: the tickets zeroed (one memset), head kernel (g, s, and dW2
//                 and dbias: per-block sums added in block order), mudd_weights_bwd_dx_kernel
//                 (dx and dW1 in one pass over x, token groups added in group order); when
//                 the head's sums do not fit its shared memory, h for one cuBLAS GEMM
//                 [GELU(u), 1]ᵀ·dA.
//   fp32/fp64 x   (correctness dtypes), and 16-bit x with d < 32: x·W1, g·W1ᵀ and xᵀ·g by
//                 at::mm in the accumulator dtype, the head kernels as above.
// Every reduction over tokens is a fixed-order sum (in-kernel, contributors added in
// order through tickets: common/ticket.cuh) or a cuBLAS GEMM: deterministic. Every launch
// runs on the current stream and is followed by a launch check; no host syncs.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"  // CL_BOOL_SWITCH
#include "common/launch.h"
#include "common/layout.h"
#include "common/limits.h"
#include "common/mma_pack.h"
#include "kernels/mudd_weights.cuh"
#include "ops.h"

namespace crosslayer {
namespace {

struct MuddShape : TokenDims {
  int64_t d, K, Cl, C, l;
};

MuddShape check_mudd_inputs(const at::Tensor& x, const at::Tensor& W1, const at::Tensor& W2,
                            const at::Tensor& bias, int64_t n_ways) {
  CL_CHECK_CUDA(x, "x");
  CL_CHECK_FLOATING(x, "x");
  TORCH_CHECK(x.dim() >= 2, "x must have shape (*tok, d) with at least one token dim, got ", x.sizes());
  check_input(W1, "W1", x, "x");
  check_input(W2, "W2", x, "x");
  check_input(bias, "bias", x, "x");
  TORCH_CHECK(n_ways >= 1, "n_ways must be >= 1, got ", n_ways);
  MuddShape sh;
  sh.d = x.size(-1);
  TORCH_CHECK(sh.d >= 1, "x must have d >= 1 features (its rms is over d), got ", x.sizes());
  static_cast<TokenDims&>(sh) = token_dims(x, 1);
  TORCH_CHECK(W1.dim() == 2 && W1.size(0) == sh.d && W1.size(1) >= 1,
              "W1 must have shape (d, K) with d = x.shape[-1] = ", sh.d, " and K >= 1, got ", W1.sizes());
  sh.K = W1.size(1);
  TORCH_CHECK(W2.dim() == 2 && W2.size(0) == sh.K, "W2 must have shape (K, C*l) with K = W1.shape[1] = ",
              sh.K, ", got ", W2.sizes());
  sh.Cl = W2.size(1);
  sh.C = n_ways;
  TORCH_CHECK(sh.Cl % n_ways == 0 && sh.Cl / n_ways >= 1 && sh.Cl / n_ways <= kMaxSlots,
              "W2 must have shape (K, C*l) with C = n_ways = ", n_ways, " and 1 <= l <= ", kMaxSlots,
              ", got ", W2.sizes());
  sh.l = sh.Cl / n_ways;
  TORCH_CHECK((bias.dim() == 1 && bias.size(0) == sh.Cl) ||
                  (bias.dim() == 2 && bias.size(0) == sh.C && bias.size(1) == sh.l),
              "bias must have shape (C*l,) = (", sh.Cl, ",) or (C, l) = (", sh.C, ", ", sh.l, "), got ",
              bias.sizes());
  return sh;
}

bool tanh_form(const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

// Smallest d on the tensor-core path. Below it the rms-norm Jacobian cancels badly (at
// d = 1, dx is O(eps)) and the hi/lo products' 2^-17 error would show, so tiny widths
// take the fp32 at::mm path (its cost is nothing at such d).
constexpr int64_t kMmaMinD = 32;

// The tensor-core path: 16-bit activations, d >= kMmaMinD, and a device with 16-bit
// mma.sync (sm 8.0+); otherwise the at::mm path computes the same product in fp32.
bool use_mma(const at::Tensor& x, int device) {
  const at::ScalarType t = x.scalar_type();
  return (t == at::kBFloat16 || t == at::kHalf) && x.size(-1) >= kMmaMinD && has_mma_sync_16bit(device);
}

// Refuses a head kernel's `smem` bytes of dynamic shared memory beyond the device's.
void check_head_smem(int64_t smem, const MuddWeightsParams& p, int device, const char* what) {
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  TORCH_CHECK(smem <= optin, what, ": needs ", smem, " bytes of shared memory (K = ", p.K, ", C*l = ",
              p.Cl, "), the device allows ", optin);
}

// Head blocks over N tokens: min(tiles, SMs × blocks_per_sm).
int64_t head_blocks(int64_t n_tokens, int device, int64_t blocks_per_sm) {
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int64_t tiles = (n_tokens + kMuddWeightsHeadTokens - 1) / kMuddWeightsHeadTokens;
  return std::min(tiles, sms * blocks_per_sm);
}

// Launches a head kernel over N tokens with `smem` bytes of dynamic shared memory.
template <typename Kernel>
void launch_head(Kernel kernel, const MuddWeightsParams& p, int64_t smem, int64_t blocks, int device,
                 const char* what) {
  check_head_smem(smem, p, device, what);
  allow_smem(kernel, static_cast<int>(smem));
  launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kMuddWeightsHeadThreads), static_cast<size_t>(smem), p);
}

// The fields both directions set.
MuddWeightsParams mudd_weights_params(const MuddShape& sh, bool tanh_gelu) {
  MuddWeightsParams p{};
  p.n_tokens = sh.N;
  p.d = sh.d;
  p.K = static_cast<int>(sh.K);
  p.Cl = static_cast<int>(sh.Cl);
  p.ldg = static_cast<int>(round_up(sh.K, 16));
  p.k_pad = static_cast<int>(round_up(sh.K, kMuddWeightsProjCols));
  p.tanh_gelu = tanh_gelu;
  return p;
}

// dW1 column passes of the dx kernel (8·kMuddWeightsDw1Tiles columns each).
int64_t mudd_dw1_passes(const MuddShape& sh) {
  return (sh.K + 8 * kMuddWeightsDw1Tiles - 1) / (8 * kMuddWeightsDw1Tiles);
}

// Warps of one token group of the dx kernel: 32-feature chunks × dW1 column passes.
int64_t mudd_dx_units(const MuddShape& sh) { return (sh.d + 31) / 32 * mudd_dw1_passes(sh); }

// dx (= or, with p.accumulate_dx, +=; through writable / copy_back) and dW1 for bf16/fp16 x from the head's g and s
// (p's g_ptr, s_ptr, ldg, and tickets[1 ..], zero): mudd_weights_bwd_dx_kernel over token
// groups of at least K tiles (each group's d·K sums are read and written once more in
// L2 when added into dW1: at most a quarter of its x reads, 8·d·K B against 32·d B a
// tile). Returns dW1 (d, K) fp32.
at::Tensor mudd_weights_dx_pass(MuddWeightsParams& p, const MuddShape& sh, const at::Tensor& x_in,
                                const at::Tensor& W1, at::Tensor& dx) {
  const int device = x_in.device().index();
  const at::Tensor x = readable(x_in, 1, &p.x_tok);
  at::Tensor dx_k = writable(dx, 1, &p.dx_tok, p.accumulate_dx);
  const RowsLd4 w1 = fp32_rows_ld4(W1);  // read as fp32: no packing launch
  p.x_ptr = x.data_ptr();
  p.dx_ptr = dx_k.data_ptr();
  p.w1_ptr = w1.t.data_ptr<float>();
  p.w1_ld = w1.ld;
  p.dw1_passes = static_cast<int>(mudd_dw1_passes(sh));
  const int64_t units = mudd_dx_units(sh);
  const TokenGroups tg = token_groups(sh.N, units, device_attribute(cudaDevAttrMultiProcessorCount, device),
                                      std::max<int64_t>(4, sh.K));
  p.token_groups = tg.groups;
  p.tiles_per_group = tg.tiles_per_group;
  at::Tensor dW1 = at::empty({sh.d, sh.K}, x.options().dtype(at::kFloat));
  p.dw1_ptr = dW1.data_ptr<float>();
  const bool vectorize = vec_ok(p.x_ptr, p.x_tok, 0, 8) && vec_ok(p.dx_ptr, p.dx_tok, 0, 8);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t blocks = (units * tg.groups + kMuddWeightsWarps - 1) / kMuddWeightsWarps;
  const int smem = kMuddWeightsWarps * (bf16 ? kMmaXtStageElems<__nv_bfloat16> : kMmaXtStageElems<__half>) *
                   static_cast<int>(sizeof(__nv_bfloat16));
  CL_BOOL_SWITCH(vectorize, kVec, [&] {
    launch(bf16 ? mudd_weights_bwd_dx_kernel<__nv_bfloat16, kVec> : mudd_weights_bwd_dx_kernel<__half, kVec>,
           dim3(static_cast<unsigned>(blocks)), dim3(kMuddWeightsThreads), smem, p);
  });
  copy_back(dx, dx_k);
  return dW1;
}

}  // namespace

std::vector<at::Tensor> mudd_weights_fwd(const at::Tensor& x_in, const at::Tensor& W1, const at::Tensor& W2,
                                         const at::Tensor& bias, int64_t n_ways, double eps,
                                         const std::string& approximate) {
  const MuddShape sh = check_mudd_inputs(x_in, W1, W2, bias, n_ways);
  const bool tanh_gelu = tanh_form(approximate);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType acc_type = acc_dtype(x_in.scalar_type());
  const auto acc_opts = x_in.options().dtype(acc_type);
  at::Tensor A = at::empty(with_tail(sh.lead, {sh.C, sh.l}), acc_opts);
  at::Tensor u = at::empty(with_tail(sh.lead, {sh.K}), acc_opts);
  at::Tensor r = at::empty(sh.lead, acc_opts);
  if (sh.N == 0) return {A, u, r};

  MuddWeightsParams p = mudd_weights_params(sh, tanh_gelu);
  p.eps = eps;
  const at::Tensor W2_ = W2.to(acc_type).contiguous();
  const at::Tensor b_ = bias.to(acc_type).reshape({sh.Cl}).contiguous();
  p.w2_ptr = W2_.data_ptr();
  p.bias_ptr = b_.data_ptr();
  p.u_ptr = u.data_ptr();
  p.r_ptr = r.data_ptr();
  p.a_ptr = A.data_ptr();
  const int device = x_in.device().index();

  if (use_mma(x_in, device)) {
    const at::Tensor x = readable(x_in, 1, &p.x_tok);
    // W1 in hi + lo parts of x's dtype; fp16 scaled by 2^k first (max|W1|·2^k in
    // [2^14, 2^15), on the device: no sync), the kernel scaling u back by 2^-k.
    Pow2Scale sc;
    if (x.scalar_type() == at::kHalf) {
      sc = fp16_split_scale(W1);
      p.w1f_unscale_ptr = sc.unscale.data_ptr<float>();
    }
    const at::Tensor w1f = pack_fragments(W1, 1, round_up(sh.d, 32), p.k_pad, 2, x.scalar_type(),
                                          sc.scale);
    p.x_ptr = x.data_ptr();
    p.w1f_ptr = w1f.data_ptr();
    const bool vectorize = vec_ok(p.x_ptr, p.x_tok, 0, 8);
    CL_BOOL_SWITCH(vectorize, kVec, [&] {
      launch(x.scalar_type() == at::kBFloat16 ? mudd_weights_fwd_proj_kernel<__nv_bfloat16, kVec>
                                              : mudd_weights_fwd_proj_kernel<__half, kVec>,
             cover_grid(sh.N, 16 * kMuddWeightsProjWarps), dim3(kMuddWeightsProjThreads), 0, p);
    });
    return {A, u, r};
  }
  // The oracle's own sequence of operations: r = rsqrt(mean x² + eps), u = (x·r)·W1.
  const at::Tensor x2 = x_in.reshape({sh.N, sh.d}).to(acc_type);
  const at::Tensor r2 = at::rsqrt(x2.square().mean({1}, true) + eps);
  u.view({sh.N, sh.K}).copy_(at::mm(x2 * r2, W1.to(acc_type)));
  r.view({sh.N}).copy_(r2.view({sh.N}));
  const int64_t smem = static_cast<int64_t>(kMuddWeightsHeadTokens) * sh.K * at::elementSize(acc_type);
  launch_head(acc_type == at::kDouble ? mudd_weights_fwd_head_kernel<double> : mudd_weights_fwd_head_kernel<float>,
              p, smem, head_blocks(sh.N, device, 8), device, "mudd_weights_fwd");
  return {A, u, r};
}

std::vector<at::Tensor> mudd_weights_bwd(const at::Tensor& dA_in, const at::Tensor& x_in, const at::Tensor& W1,
                                         const at::Tensor& W2, const at::Tensor& bias, const at::Tensor& u_in,
                                         const at::Tensor& r_in, int64_t n_ways, double eps,
                                         const std::string& approximate, const std::optional<at::Tensor>& dx_acc) {
  const MuddShape sh = check_mudd_inputs(x_in, W1, W2, bias, n_ways);
  const bool tanh_gelu = tanh_form(approximate);
  (void)eps;  // r carries it
  check_per_token(dA_in, "dA", "(*tok, C, l)", with_tail(sh.lead, {sh.C, sh.l}), x_in, "x");
  check_per_token(u_in, "u", "(*tok, K)", with_tail(sh.lead, {sh.K}), x_in, "x");
  check_per_token(r_in, "r", "(*tok,)", sh.lead, x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType acc_type = acc_dtype(x_in.scalar_type());
  const auto acc_opts = x_in.options().dtype(acc_type);
  if (dx_acc.has_value()) check_activation(*dx_acc, "dx", x_in, "(*tok, d) like x", x_in.sizes(), "x");
  at::Tensor dx = dx_acc.has_value() ? *dx_acc : at::empty(with_tail(sh.lead, {sh.d}), x_in.options());
  if (sh.N == 0) return {dx, at::zeros(W1.sizes(), W1.options()), at::zeros({sh.K + 1, sh.Cl}, acc_opts)};
  const int64_t ldg = round_up(sh.K, 16);
  const at::Tensor dA = dA_in.to(acc_type).reshape({sh.N, sh.Cl}).contiguous();
  const at::Tensor u = u_in.to(acc_type).reshape({sh.N, sh.K}).contiguous();
  const at::Tensor r = r_in.to(acc_type).reshape({sh.N}).contiguous();
  const at::Tensor W2_ = W2.to(acc_type).contiguous();
  at::Tensor g = at::empty({sh.N, ldg}, acc_opts);
  at::Tensor s = at::empty({sh.N}, acc_opts);

  MuddWeightsParams p = mudd_weights_params(sh, tanh_gelu);
  p.accumulate_dx = dx_acc.has_value();
  p.w2_ptr = W2_.data_ptr();
  p.u_ptr = const_cast<void*>(u.data_ptr());
  p.r_ptr = const_cast<void*>(r.data_ptr());
  p.da_ptr = dA.data_ptr();
  p.g_ptr = g.data_ptr();
  p.s_ptr = s.data_ptr();
  const int device = x_in.device().index();

  // [dW2; dbias] in the head kernel (per-block sums in shared memory, one block an SM,
  // added into dW2b in block order: h is never written and dA read once) when its sums
  // fit next to the tile buffers; else h = [GELU(u), 1] for one GEMM.
  const int64_t es = at::elementSize(acc_type);
  const int64_t smem = kMuddWeightsHeadTokens * (sh.Cl + sh.K) * es;
  const int64_t smem_dw2 = smem + (kMuddWeightsHeadTokens * sh.K + (sh.K + 1) * sh.Cl) * es;
  check_head_smem(smem, p, device, "mudd_weights_bwd");
  const bool dw2_in_head = smem_dw2 <= device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const bool mma = use_mma(x_in, device);
  const int64_t blocks = head_blocks(sh.N, device, dw2_in_head ? 1 : 8);
  // The turns of the ordered sums (common/ticket.cuh): [0] the head blocks', [1 + u] the
  // dx kernel's unit u; one memset.
  at::Tensor tickets;
  if (dw2_in_head || mma) {
    tickets = at::zeros({1 + (mma ? mudd_dx_units(sh) : 0)}, x_in.options().dtype(at::kInt));
    p.tickets = tickets.data_ptr<int>();
  }
  at::Tensor h, dW2b;
  if (dw2_in_head) {
    dW2b = at::empty({sh.K + 1, sh.Cl}, acc_opts);
    p.dw2_ptr = dW2b.data_ptr();
  } else {
    h = at::empty({sh.N, sh.K + 1}, acc_opts);  // [GELU(u), 1]
    p.h_ptr = h.data_ptr();
  }
  launch_head(acc_type == at::kDouble ? mudd_weights_bwd_head_kernel<double> : mudd_weights_bwd_head_kernel<float>,
              p, dw2_in_head ? smem_dw2 : smem, blocks, device, "mudd_weights_bwd");

  const at::Tensor gK = g.narrow(1, 0, sh.K);
  at::Tensor dW1;
  if (mma) {
    dW1 = mudd_weights_dx_pass(p, sh, x_in, W1, dx);
  } else {
    // dx in the oracle's form r·(dxn − xn·mean(dxn·xn)), not g·W1ᵀ − s·x: at d = 1 the
    // two terms cancel to O(eps), and only the oracle's form keeps their rounding
    // errors correlated (so its error stays at the oracle's).
    const at::Tensor x2 = x_in.reshape({sh.N, sh.d}).to(acc_type);
    const at::Tensor r2 = r.unsqueeze(1);
    const at::Tensor xn = x2 * r2;
    const at::Tensor dxn = at::mm(gK / r2, W1.to(acc_type).t());
    dW1 = at::mm(x2.t(), gK);
    const at::Tensor dx_new = (r2 * (dxn - xn * (dxn * xn).mean({1}, true))).view(dx.sizes());
    p.accumulate_dx ? dx.add_(dx_new) : dx.copy_(dx_new);
  }
  // [dW2; dbias] without the head: hᵀ·dA in one GEMM (h's last column is ones).
  if (!dw2_in_head) dW2b = at::mm(h.t(), dA);
  return {dx, dW1.to(W1.scalar_type()).contiguous(), dW2b};
}

}  // namespace crosslayer
