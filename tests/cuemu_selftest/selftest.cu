// Kernels that exercise the emulator's checks (tests/test_cuemu_selftest.py): each
// either computes a known result or breaks one CUDA rule on purpose. Built only by
// tools/cuemu (never by nvcc), as module cuemu_selftest.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>

namespace {

struct Params {
  const float* in;
  float* out;
  int n;
  int mode;
};

// out[t] = Σ_warp in (warp_sum by xor shuffles), then lane 0's sum broadcast by __shfl_sync.
__global__ void warp_sum_kernel(Params p) {
  const int t = threadIdx.x;
  float v = t < p.n ? p.in[t] : 0.f;
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  v = __shfl_sync(0xffffffffu, v, 0);
  if (t < p.n) p.out[t] = v;
}

// Thread 0 writes shared memory, every thread reads it: mode 0 with __syncthreads
// between, mode 1 without (a race: the reverse order reads the poison).
__global__ void broadcast_kernel(Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  if (threadIdx.x == 0) s[0] = p.in[0];
  if (p.mode == 0) __syncthreads();
  p.out[threadIdx.x] = s[0];
}

// Threads >= n return, then the rest meet at __syncthreads (mode 0) or in a full-mask
// shuffle (mode 1): undefined behaviour either way, reported by the emulator.
__global__ void exit_then_sync_kernel(Params p) {
  if (static_cast<int>(threadIdx.x) >= p.n) return;
  if (p.mode == 0) {
    __syncthreads();
  } else {
    p.out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, p.in[threadIdx.x], 1);
    return;
  }
  p.out[threadIdx.x] = 1.f;
}

// Even threads meet at a second barrier the odd ones never reach.
__global__ void deadlock_kernel(Params p) {
  __syncthreads();
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  }
  p.out[threadIdx.x] = 0.f;
}

// Thread 0 spins (__nanosleep) until the flag in global memory reads 1; the block's last
// thread sets it (mode 0) or nobody does (mode 1: every other thread has exited, thread
// 0 spins forever, a deadlock). out[0] = 1 once through.
__global__ void spin_kernel(Params p) {
  int* flag = reinterpret_cast<int*>(p.out + 1);
  if (threadIdx.x == 0) {
    while (*reinterpret_cast<volatile int*>(flag) != 1) __nanosleep(32);
    p.out[0] = 1.f;
  } else if (threadIdx.x == blockDim.x - 1 && p.mode == 0) {
    *reinterpret_cast<volatile int*>(flag) = 1;
  }
}

// At most 64 threads a block.
__global__ void __launch_bounds__(64) bounded_kernel(Params p) { p.out[threadIdx.x] = 2.f; }

// One warp: D = A·B + C with A (16×16), B (16×8) bf16 given as fragments (a: 4 words a
// lane, b: 2 words a lane, c: 4 floats a lane, packed on the host from the PTX layout).
struct MmaParams {
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
  float* d;
};
__global__ void mma_kernel(MmaParams p) {
  const int l = threadIdx.x;
  float c[4] = {p.c[4 * l], p.c[4 * l + 1], p.c[4 * l + 2], p.c[4 * l + 3]};
  const uint32_t a0 = p.a[4 * l], a1 = p.a[4 * l + 1], a2 = p.a[4 * l + 2], a3 = p.a[4 * l + 3];
  const uint32_t b0 = p.b[2 * l], b1 = p.b[2 * l + 1];
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  for (int q = 0; q < 4; ++q) p.d[4 * l + q] = c[q];
}

// Kernels with known global traffic, for the counter's tests (tools/cuemu/count_rt.cpp).
struct TrafficParams {
  const float* in;
  float* out;
  int64_t n;       // elements written
  int64_t stride;  // gather: in's stride in elements
  int mode;        // copy4: 0 = 16-byte accesses, 1 = four 4-byte ones
};

// out[i] = in[i·stride], one element a thread (grid-stride): 4-byte loads and stores.
__global__ void gather_kernel(TrafficParams p) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.n; i += gridDim.x * int64_t(blockDim.x)) {
    p.out[i] = p.in[i * p.stride];
  }
}

// out[4c..4c+3] = in[4c..4c+3] for chunk c = the thread's index (n a multiple of 4): one
// 16-byte load and store (mode 0), or four 4-byte ones, the launchers' scalar path for
// pointers that are not 16-byte aligned (mode 1).
__global__ void copy4_kernel(TrafficParams p) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (4 * c + 4 > p.n) return;
  if (p.mode == 0) {
    *reinterpret_cast<float4*>(p.out + 4 * c) = *reinterpret_cast<const float4*>(p.in + 4 * c);
  } else {
    for (int k = 0; k < 4; ++k) p.out[4 * c + k] = p.in[4 * c + k];
  }
}

// The kernels' Vec pattern (depth_aggregate_bwd's dY): two ways of 8 bf16 a thread, each
// loaded whole (16 bytes) through a condition into an array, then read by element:
// out[i] = Σ_w Σ_k in_bf16[w·n + 8i + k], the n floats of `in` seen as 2n bf16 (way w
// is the w-th half), for i < n/8. g++'s scalar replacement of aggregates turns
// each 16-byte load into eight 2-byte ones unless it is off (tools/cuemu/build.py).
struct alignas(16) Bf16x8 {
  __nv_bfloat16 v[8];
};

// Elements [e, e + 8) of row as one 16-byte load, or element by element past d (vec.cuh's
// load_chunk_raw).
__device__ Bf16x8 load_bf16x8(const __nv_bfloat16* __restrict__ row, int64_t e, int64_t d) {
  if (e + 8 <= d) return *reinterpret_cast<const Bf16x8*>(row + e);
  Bf16x8 x;
  for (int k = 0; k < 8; ++k) x.v[k] = e + k < d ? row[e + k] : __nv_bfloat16(0.f);
  return x;
}

__global__ void vec_ways_kernel(TrafficParams p) {
  const __nv_bfloat16* in = reinterpret_cast<const __nv_bfloat16*>(p.in);
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= p.n / 8) return;
  Bf16x8 g[2];
  for (int w = 0; w < 2; ++w) g[w] = w < p.mode ? load_bf16x8(in + w * p.n, 8 * i, p.n) : Bf16x8{};
  float sum = 0.f;
  for (int w = 0; w < 2; ++w) {
    for (int k = 0; k < 8; ++k) sum += static_cast<float>(g[w].v[k]);
  }
  p.out[i] = sum;
}

// out[i] = in[0] through shared memory: thread 0 of each block loads in[0] into shared
// memory, every thread then reads it there (shared memory is not global traffic).
__global__ void broadcast_read_kernel(TrafficParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* s = reinterpret_cast<float*>(smem);
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (threadIdx.x == 0) s[0] = p.in[0];
  __syncthreads();
  const float every_thread = p.in[blockIdx.x % 2];
  if (i < p.n) p.out[i] = s[0] + 0.f * every_thread;
}

at::Tensor traffic(const std::string& which, const at::Tensor& in, int64_t n, int64_t stride, int64_t mode,
                   int64_t threads, int64_t blocks) {
  at::Tensor out = at::empty({n}, in.options());
  const TrafficParams p{in.data_ptr<float>(), out.data_ptr<float>(), n, stride, static_cast<int>(mode)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(threads));
  if (which == "gather") {
    gather_kernel<<<grid, block, 0, stream>>>(p);
  } else if (which == "copy4") {
    copy4_kernel<<<grid, block, 0, stream>>>(p);
  } else if (which == "vec_ways") {
    vec_ways_kernel<<<grid, block, 0, stream>>>(p);
  } else if (which == "broadcast_read") {
    broadcast_read_kernel<<<grid, block, 16, stream>>>(p);
  } else {
    TORCH_CHECK(false, "no kernel ", which);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Params params(const at::Tensor& in, const at::Tensor& out, int n, int mode) {
  return Params{in.data_ptr<float>(), out.data_ptr<float>(), n, mode};
}

at::Tensor run(const std::string& which, const at::Tensor& in, int64_t threads, int64_t smem,
               int64_t mode, bool opt_in) {
  at::Tensor out = at::full({threads}, -1.0f, in.options());
  const Params p = params(in, out, static_cast<int>(in.numel()), static_cast<int>(mode));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(static_cast<unsigned>(threads));
  if (which == "warp_sum") {
    warp_sum_kernel<<<1, block, 0, stream>>>(p);
  } else if (which == "broadcast") {
    if (opt_in) C10_CUDA_CHECK(cudaFuncSetAttribute(broadcast_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    broadcast_kernel<<<1, block, smem, stream>>>(p);
  } else if (which == "exit_then_sync") {
    exit_then_sync_kernel<<<1, block, 0, stream>>>(p);
  } else if (which == "bounded") {
    bounded_kernel<<<1, block, 0, stream>>>(p);
  } else if (which == "spin") {
    out.narrow(0, 1, 1).zero_();  // the flag: int 0 (the bits of 0.f)
    spin_kernel<<<1, block, 0, stream>>>(p);
  } else if (which == "deadlock") {
    deadlock_kernel<<<1, block, 0, stream>>>(p);
  } else {
    TORCH_CHECK(false, "no kernel ", which);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  at::Tensor d = at::empty_like(c);
  const MmaParams p{reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>()),
                    reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>()), c.data_ptr<float>(),
                    d.data_ptr<float>()};
  mma_kernel<<<1, 32, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run);
  m.def("mma", &mma);
  m.def("traffic", &traffic);
}
