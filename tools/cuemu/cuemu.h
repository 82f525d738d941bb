// cuemu: runs crosslayer's CUDA kernels and launchers on the CPU, for machines without a
// GPU. Not a performance tool and not a replacement for a GPU run: it checks what a
// kernel computes, not how fast, and catches the bugs a first GPU run would otherwise
// spend its time on (wrong index maps, unwritten or overlapping outputs, missing
// barriers, shuffles with exited lanes, launch configurations a GPU refuses).
//
// How: tools/cuemu/build.py copies csrc/ and rewrites the few constructs g++ cannot
// parse (kernel<<<...>>>(args), extern __shared__ arrays, the mma.sync inline asm), then
// compiles everything as C++ with this header force-included and the headers in
// tools/cuemu/include/ standing in for the CUDA and c10/cuda headers. Kernel bodies and
// launchers are compiled unchanged otherwise.
//
// Execution model. A launch runs its blocks one after another. Each CUDA thread of a
// block is a fiber with its own stack (x86-64 only: cuemu_switch below saves the
// callee-saved registers, MXCSR and the x87 control word, ~10 ns a switch); fibers switch only at __syncthreads,
// warp shuffles and mma.sync, so between two synchronisation points a thread runs
// alone. The fibers of a block run in one of two orders (CUEMU_ORDER=forward|reverse,
// default reverse): in reverse order the highest thread runs first, so a thread that
// reads shared memory another thread writes without a barrier in between reads the
// poison instead of the value (dynamic shared memory is filled with 0xff bytes, NaN as
// float, at every block start).
//
// Checked, each failing the launch with a message (C10_CUDA_KERNEL_LAUNCH_CHECK
// throws it): block size (1..1024 threads, and the kernel's __launch_bounds__), grid limits, dynamic shared memory above
// 48 KB without cudaFuncSetAttribute or above the opt-in limit of an H100 (227 KB),
// __syncthreads reached after some threads of the block exited (undefined behaviour
// by the programming guide) or never reached by some (deadlock), a warp shuffle or
// mma.sync whose mask names an exited lane or whose source lane is outside the mask,
// lanes of one warp meeting with different masks, a global-memory access of n bytes not
// n-aligned (a misaligned 16-byte vector load faults on a GPU; the traffic counter sees
// every access), and fiber stack overflow (a guard page: the process dies with SIGSEGV
// rather than corrupting memory silently).
//
// mma.sync.m16n8k16 (bf16/f16 inputs, fp32 accumulators) is computed from the PTX
// ISA fragment layout: lane = 4·group + tig; A (16×16, row): a0 = A[g][2t..2t+1],
// a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; B (16×8, col):
// b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; C/D: c0,c1 = C[g][2t..2t+1],
// c2,c3 = C[g+8][2t..]. The lower 16 bits of a register hold the lower index. Products
// are summed in fp32 (the hardware's internal rounding differs in the last bits).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <math.h>  // erff, expf, tanhf, ... in the global namespace, as in device code
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __maxnreg__(n)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define CUEMU 1
// The emulator's own functions are not instrumented for the traffic counter: none of
// their accesses is a kernel's global-memory access, and the mma gather alone would
// otherwise call the counter tens of thousands of times per instruction.
#define CUEMU_UNCOUNTED __attribute__((no_sanitize_address))
// The 16-bit conversions every emulated load and store of a bf16/fp16 value runs.
#define CUEMU_ALWAYS_INLINE __attribute__((always_inline))

// ------------------------------------------------------------------ vector types
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(16))) double2 { double x, y; };
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

constexpr int warpSize = 32;

// ------------------------------------------------------------------ 16-bit floats
namespace cuemu {
CUEMU_ALWAYS_INLINE inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
CUEMU_ALWAYS_INLINE inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
CUEMU_ALWAYS_INLINE inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u = f2u(f);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
CUEMU_ALWAYS_INLINE inline float bf16_bits_to_float(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
CUEMU_ALWAYS_INLINE inline uint16_t float_to_half_bits(float f) {
  _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  uint16_t b; std::memcpy(&b, &h, 2); return b;
}
CUEMU_ALWAYS_INLINE inline float half_bits_to_float(uint16_t b) {
  _Float16 h; std::memcpy(&h, &b, 2); return static_cast<float>(h);
}
}  // namespace cuemu

struct __attribute__((aligned(2))) __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(cuemu::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double f) : __x(cuemu::float_to_bf16_bits(static_cast<float>(f))) {}
  __nv_bfloat16(int i) : __x(cuemu::float_to_bf16_bits(static_cast<float>(i))) {}
  operator float() const { return cuemu::bf16_bits_to_float(__x); }
};
struct __attribute__((aligned(2))) __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(cuemu::float_to_half_bits(f)) {}
  __half(double f) : __x(cuemu::float_to_half_bits(static_cast<float>(f))) {}
  __half(int i) : __x(cuemu::float_to_half_bits(static_cast<float>(i))) {}
  operator float() const { return cuemu::half_bits_to_float(__x); }
};
struct __attribute__((aligned(4))) __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __attribute__((aligned(4))) __half2 { __half x, y; };

inline float __bfloat162float(__nv_bfloat16 b) { return cuemu::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __half2float(__half h) { return cuemu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {float(v.x), float(v.y)}; }
inline float2 __half22float2(__half2 v) { return {float(v.x), float(v.y)}; }

// ------------------------------------------------------------------ math
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }  // the L1 bypass: one memory, nothing to bypass
inline void __threadfence() {}  // a block's threads run one at a time: stores are visible at once

// ------------------------------------------------------------------ runtime API
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
  cudaErrorInvalidConfiguration = 9,
};
typedef cudaError_t cudaError;
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrL2CacheSize = 38,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
#ifndef CUDART_VERSION
#define CUDART_VERSION 13000
#endif

// The traffic counter (tools/cuemu/count_rt.cpp, module cuemu_count), which every
// emulated module links against: it sees each global load and store through the
// AddressSanitizer callbacks the sources are instrumented with, and these calls tell it
// which launch, block and thread runs.
extern "C" {
int cuemu_rt_sm_count();
// The rest of the emulated device's attributes and its occupancy rule (count_rt.cpp:
// one definition, which the JIT path's plan tests use as their device model too).
int cuemu_rt_smem_optin();
int cuemu_rt_smem_per_sm();
int cuemu_rt_l2_bytes();
int cuemu_rt_capability(int minor);
int cuemu_rt_occupancy(int threads, size_t smem);
void cuemu_rt_set_thread(int linear);
void cuemu_rt_launch_begin(const void* kernel, const char* name, const unsigned* grid,
                           const unsigned* block, size_t smem, const void* args, size_t args_bytes);
void cuemu_rt_block_begin(int nthreads);
void cuemu_rt_block_end();
void cuemu_rt_launch_end();
void cuemu_rt_set_fault_handler(void (*handler)(uintptr_t addr, int size, int store));
}

namespace cuemu {

// The emulated device (count_rt.cpp's cuemu_rt_* attributes: an H100 SXM) without
// the opt-in to more dynamic shared memory.
constexpr int kSmemDefault = 49152;
constexpr size_t kStackBytes = 128 * 1024;

// cuemu_switch(&from_sp, to_sp): saves the callee-saved state on the current stack,
// stores its stack pointer in from_sp and resumes the fiber whose stack pointer is to_sp.
#if !defined(__x86_64__)
#error "cuemu's fiber switch is written for x86-64"
#endif
extern "C" void cuemu_switch(void** from_sp, void* to_sp);
asm(R"(
  .text
  .weak cuemu_switch
  .type cuemu_switch, @function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch, .-cuemu_switch
)");

struct Fiber {
  void* sp = nullptr;
  uint3 tid;
  int linear = 0;
  bool done = false;
  bool started = false;
  const char* waiting = nullptr;  // where it waits, for the deadlock message
  int internal = 0;               // depth of emulator internals it runs (not counted)
};

struct WarpState {
  unsigned alive = 0;          // lanes not exited
  int arrived = 0;
  unsigned mask = 0;           // mask of the meeting being gathered
  uint64_t gen = 0;
  alignas(16) unsigned char xchg[32][64];  // per-lane payload (shuffles: one value; mma: registers)
  uint64_t mma_gen = ~0ull;    // the meeting whose mma results mma_out holds
  float mma_out[32][4];        // D fragments of every lane, computed once per mma
};

struct Emu {
  // launch state
  std::vector<Fiber> fibers;
  std::vector<void*> stacks;
  void* sched_sp = nullptr;
  int current = -1;
  int live = 0;
  uint64_t progress = 0;
  // block barrier
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  int exited = 0;
  std::vector<WarpState> warps;
  std::vector<unsigned char> smem;
  std::function<void()> body;
  std::string error;  // first error of the running launch
  // sticky error of the last launch, read by cudaGetLastError
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  std::map<const void*, int> smem_limit;  // cudaFuncSetAttribute per kernel
  uint64_t launches = 0;
  bool reverse = true;
};

// Thread-local state in the initial-exec TLS model: a plain %fs-relative access, where
// the default model in a shared library calls __tls_get_addr on every threadIdx read
// (the emulated module is dlopen'ed; these few bytes fit glibc's static TLS surplus).
#define CUEMU_TLS __attribute__((tls_model("initial-exec")))

inline Emu& emu() {
  static thread_local Emu* e CUEMU_TLS = nullptr;
  if (e == nullptr) e = new Emu();  // one per host thread, for the process's lifetime
  return *e;
}

// While it lives, the running fiber executes the emulator's own code (a barrier, a
// shuffle, an mma): the traffic counter ignores its accesses (none is a kernel's
// global-memory access). Per fiber, because fibers switch inside these functions.
struct Internal {
  CUEMU_UNCOUNTED Internal() {
    Emu& e = emu();
    if (e.current >= 0 && e.fibers[e.current].internal++ == 0) cuemu_rt_set_thread(-1);
  }
  CUEMU_UNCOUNTED ~Internal() {
    Emu& e = emu();
    if (e.current >= 0 && --e.fibers[e.current].internal == 0) cuemu_rt_set_thread(e.current);
  }
};

}  // namespace cuemu

inline thread_local uint3 threadIdx CUEMU_TLS;
inline thread_local uint3 blockIdx CUEMU_TLS;
inline thread_local dim3 blockDim CUEMU_TLS;
inline thread_local dim3 gridDim CUEMU_TLS;

namespace cuemu {

inline void fail(const std::string& msg);

CUEMU_UNCOUNTED inline void yield_to_scheduler() {
  Emu& e = emu();
  Fiber& f = e.fibers[e.current];
  cuemu_switch(&f.sp, e.sched_sp);
}

CUEMU_UNCOUNTED inline std::string thread_name(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," +
         std::to_string(f.tid.z) + ") of block (" + std::to_string(blockIdx.x) + "," +
         std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}

// Records the first error of the launch and parks the calling fiber for good (its stack
// is abandoned; the scheduler ends the launch).
CUEMU_UNCOUNTED inline void fail(const std::string& msg) {
  Emu& e = emu();
  if (e.error.empty()) e.error = msg;
  Fiber& f = e.fibers[e.current];
  f.waiting = "failed";
  for (;;) yield_to_scheduler();
}

// The traffic counter's call on a kernel thread's misaligned global access, made before
// the access runs (count_rt.cpp): fails the launch, so the access never executes.
CUEMU_UNCOUNTED inline void misaligned_access(uintptr_t addr, int size, int store) {
  Emu& e = emu();
  std::ostringstream msg;
  msg << thread_name(e.fibers[e.current]) << ": misaligned " << size << "-byte "
      << (store ? "store to" : "load from") << " global address 0x" << std::hex << addr << std::dec << " ("
      << addr % size << " bytes past a " << size << "-byte boundary)";
  fail(msg.str());
}

CUEMU_UNCOUNTED inline void syncthreads(const char* site) {
  const Internal internal;
  Emu& e = emu();
  Fiber& f = e.fibers[e.current];
  if (e.exited > 0) {
    fail(thread_name(f) + " reached __syncthreads after " + std::to_string(e.exited) +
         " threads of its block exited (undefined behaviour: every thread of the block must reach "
         "it); at " + site);
  }
  const uint64_t gen = e.bar_gen;
  const int n = static_cast<int>(e.fibers.size());
  if (++e.bar_arrived == n) {
    e.bar_arrived = 0;
    ++e.bar_gen;
    ++e.progress;
    return;
  }
  f.waiting = site;
  while (e.bar_gen == gen) yield_to_scheduler();
  f.waiting = nullptr;
}

// __nanosleep: the calling thread gives the others of its block a turn, so a spin-wait
// on another thread's store (a ticket) progresses. It makes no progress of its own:
// threads that all spin forever are reported as a deadlock. (Blocks run one after
// another: a wait on an earlier block finds its store already made.)
CUEMU_UNCOUNTED inline void nanosleep_yield(const char* site) {
  const Internal internal;
  Emu& e = emu();
  Fiber& f = e.fibers[e.current];
  f.waiting = site;
  yield_to_scheduler();
  f.waiting = nullptr;
}

CUEMU_UNCOUNTED inline int lane_of(const Fiber& f) { return f.linear % 32; }

// All lanes in `mask` meet here (the caller's lane must be in it); returns when all did.
CUEMU_UNCOUNTED inline void warp_meet(unsigned mask, const char* what) {
  const Internal internal;
  Emu& e = emu();
  Fiber& f = e.fibers[e.current];
  const int lane = lane_of(f);
  WarpState& w = e.warps[f.linear / 32];
  if (!(mask >> lane & 1u)) {
    fail(thread_name(f) + ": " + what + " with mask 0x" + [&] {
      char b[16]; std::snprintf(b, sizeof b, "%08x", mask); return std::string(b); }() +
         " that does not contain the calling lane " + std::to_string(lane));
  }
  if ((mask & w.alive) != mask) {
    char b[96];
    std::snprintf(b, sizeof b, " with mask 0x%08x but lanes 0x%08x of the warp exited", mask,
                  mask & ~w.alive);
    fail(thread_name(f) + ": " + what + b);
  }
  if (w.arrived == 0) {
    w.mask = mask;
  } else if (w.mask != mask) {
    char b[96];
    std::snprintf(b, sizeof b, " with mask 0x%08x while other lanes meet with 0x%08x", mask, w.mask);
    fail(thread_name(f) + ": " + what + b);
  }
  const uint64_t gen = w.gen;
  if (++w.arrived == __builtin_popcount(mask)) {
    w.arrived = 0;
    ++w.gen;
    ++e.progress;
    return;
  }
  f.waiting = what;
  while (w.gen == gen) yield_to_scheduler();
  f.waiting = nullptr;
}

template <typename T>
CUEMU_UNCOUNTED inline T shfl(unsigned mask, T v, int src_lane, int width, const char* what) {
  static_assert(sizeof(T) <= 64, "shuffle payload");
  const Internal internal;
  Emu& e = emu();
  Fiber& f = e.fibers[e.current];
  const int lane = lane_of(f);
  WarpState& w = e.warps[f.linear / 32];
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail(thread_name(f) + ": " + what + " with width " + std::to_string(width));
  }
  std::memcpy(w.xchg[lane], &v, sizeof(T));
  warp_meet(mask, what);
  const int base = lane & ~(width - 1);
  int src = src_lane;
  if (src < base || src >= base + width) src = lane;  // outside the lane's segment: own value
  if (!(mask >> src & 1u)) {
    fail(thread_name(f) + ": " + what + " reads lane " + std::to_string(src) +
         ", which is not in the mask");
  }
  T r;
  std::memcpy(&r, w.xchg[src], sizeof(T));
  warp_meet(mask, what);  // nobody overwrites xchg before every lane has read
  return r;
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32
struct MmaRegs {
  float c[4];
  uint32_t a[4];
  uint32_t b[2];
};

CUEMU_UNCOUNTED inline float half16_to_float(uint16_t bits, bool bf16) {
  return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

// D = A·B + C of one warp from the fragments in w.xchg (MmaRegs per lane) into w.mma_out.
CUEMU_UNCOUNTED inline uint16_t half_of(uint32_t reg, int h) {
  return static_cast<uint16_t>(h ? reg >> 16 : reg & 0xffff);
}
CUEMU_UNCOUNTED inline void mma_compute(WarpState& w, bool bf16) {
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    MmaRegs r;
    std::memcpy(&r, w.xchg[l], sizeof r);
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = half16_to_float(half_of(r.a[0], h), bf16);
      A[g + 8][2 * t + h] = half16_to_float(half_of(r.a[1], h), bf16);
      A[g][2 * t + 8 + h] = half16_to_float(half_of(r.a[2], h), bf16);
      A[g + 8][2 * t + 8 + h] = half16_to_float(half_of(r.a[3], h), bf16);
      B[2 * t + h][g] = half16_to_float(half_of(r.b[0], h), bf16);
      B[2 * t + 8 + h][g] = half16_to_float(half_of(r.b[1], h), bf16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    MmaRegs r;
    std::memcpy(&r, w.xchg[l], sizeof r);
    const int g = l / 4, t = l % 4;
    const int rows[4] = {g, g, g + 8, g + 8};
    const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int q = 0; q < 4; ++q) {
      float acc = r.c[q];
      for (int k = 0; k < 16; ++k) acc += A[rows[q]][k] * B[k][cols[q]];
      w.mma_out[l][q] = acc;
    }
  }
}

CUEMU_UNCOUNTED inline void mma_sync(const char* instr, float& d0, float& d1, float& d2, float& d3, uint32_t a0,
                     uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const Internal internal;
  Emu& e = emu();
  Fiber& f = e.fibers[e.current];
  const std::string s(instr);
  bool bf16;
  if (s.find("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") != std::string::npos) {
    bf16 = true;
  } else if (s.find("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") != std::string::npos) {
    bf16 = false;
  } else {
    fail(thread_name(f) + ": cuemu does not emulate the instruction: " + s);
    return;
  }
  const int lane = lane_of(f);
  WarpState& w = e.warps[f.linear / 32];
  MmaRegs mine{{d0, d1, d2, d3}, {a0, a1, a2, a3}, {b0, b1}};
  static_assert(sizeof(MmaRegs) <= sizeof(w.xchg[0]), "mma payload");
  std::memcpy(w.xchg[lane], &mine, sizeof mine);
  warp_meet(0xffffffffu, "mma.sync");  // .aligned: the whole warp executes it
  if (w.mma_gen != w.gen) {  // the first lane to resume computes D for the whole warp
    mma_compute(w, bf16);
    w.mma_gen = w.gen;
  }
  float res[4];
  std::memcpy(res, w.mma_out[lane], sizeof res);
  warp_meet(0xffffffffu, "mma.sync");  // every lane has read before xchg is reused
  float* out[4] = {&d0, &d1, &d2, &d3};
  for (int q = 0; q < 4; ++q) *out[q] = res[q];
}

// __launch_bounds__(max_threads[, min_blocks]) of the running kernel: a block larger
// than max_threads does not launch on a GPU ("too many resources requested").
CUEMU_UNCOUNTED inline void check_launch_bounds(long max_threads, long min_blocks = 0) {
  (void)min_blocks;
  const long threads = long(blockDim.x) * blockDim.y * blockDim.z;
  if (threads > max_threads) {
    fail("block of " + std::to_string(threads) + " threads above the kernel's __launch_bounds__(" +
         std::to_string(max_threads) + "): the launch fails on a GPU");
  }
}

CUEMU_UNCOUNTED inline void fiber_entry() {
  Emu& e = emu();
  e.body();
  Fiber& f = e.fibers[e.current];
  f.done = true;
  --e.live;
  ++e.exited;
  ++e.progress;
  e.warps[f.linear / 32].alive &= ~(1u << lane_of(f));
  for (;;) yield_to_scheduler();  // never resumed: the scheduler skips finished fibers
}

// A fresh fiber's stack: the frame cuemu_switch pops (MXCSR and x87 control word at
// their defaults, six zero registers), then fiber_entry as the return address, then a
// null slot so fiber_entry starts with the stack alignment of a called function.
CUEMU_UNCOUNTED inline void* fresh_stack(void* stack_base) {
  uint64_t* top = reinterpret_cast<uint64_t*>(static_cast<char*>(stack_base) + kStackBytes);
  *--top = 0;
  *--top = reinterpret_cast<uint64_t>(&fiber_entry);
  for (int r = 0; r < 6; ++r) *--top = 0;
  *--top = 0x1f80ull | (0x037full << 32);
  return top;
}

CUEMU_UNCOUNTED inline void* stack_for(size_t i) {
  Emu& e = emu();
  while (e.stacks.size() <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuemu: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);  // guard page below the stack
    e.stacks.push_back(static_cast<char*>(p) + page);
  }
  return e.stacks[i];
}

CUEMU_UNCOUNTED inline std::string deadlock_message() {
  Emu& e = emu();
  std::string msg = "deadlock in block (" + std::to_string(blockIdx.x) + "," +
                    std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + "): ";
  int shown = 0;
  for (const Fiber& f : e.fibers) {
    if (f.done || shown >= 6) continue;
    msg += "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," +
           std::to_string(f.tid.z) + ") waits at " + (f.waiting ? f.waiting : "?") + "; ";
    ++shown;
  }
  msg += std::to_string(e.exited) + " of " + std::to_string(e.fibers.size()) + " threads exited";
  return msg;
}

// Runs one block: every thread a fiber, round-robin between synchronisation points.
CUEMU_UNCOUNTED inline void run_block(size_t smem_bytes) {
  Emu& e = emu();
  const int n = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  e.fibers.assign(n, Fiber{});
  e.warps.assign((n + 31) / 32, WarpState{});
  for (int w = 0; w < (n + 31) / 32; ++w) {
    const int lanes = std::min(32, n - 32 * w);
    e.warps[w].alive = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
  e.smem.assign(smem_bytes + 16, 0xff);
  e.live = n;
  e.exited = 0;
  e.bar_arrived = 0;
  for (int i = 0; i < n; ++i) {
    Fiber& f = e.fibers[i];
    f.linear = i;
    f.tid = {static_cast<unsigned>(i % blockDim.x), static_cast<unsigned>((i / blockDim.x) % blockDim.y),
             static_cast<unsigned>(i / (blockDim.x * blockDim.y))};
    f.sp = fresh_stack(stack_for(i));
  }
  cuemu_rt_block_begin(n);
  while (e.live > 0 && e.error.empty()) {
    const uint64_t before = e.progress;
    for (int k = 0; k < n && e.error.empty(); ++k) {
      const int i = e.reverse ? n - 1 - k : k;
      Fiber& f = e.fibers[i];
      if (f.done) continue;
      e.current = i;
      threadIdx = f.tid;
      cuemu_rt_set_thread(f.internal ? -1 : i);
      cuemu_switch(&e.sched_sp, f.sp);
      cuemu_rt_set_thread(-1);
    }
    if (e.live > 0 && e.progress == before && e.error.empty()) e.error = deadlock_message();
  }
  cuemu_rt_block_end();
  e.current = -1;
}

CUEMU_UNCOUNTED inline unsigned char* dynamic_smem() {
  Emu& e = emu();
  return e.smem.data();
}

CUEMU_UNCOUNTED inline void set_error(cudaError_t code, const std::string& msg) {
  Emu& e = emu();
  if (e.last_error == cudaSuccess) {
    e.last_error = code;
    e.last_message = msg;
  }
}

struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}

  // `name`: the kernel expression as written at the launch (the counter prefers the
  // instantiation's symbol when the dynamic loader knows it).
  template <typename... P, typename... A>
  CUEMU_UNCOUNTED void run(const char* name, void (*kernel)(P...), A&&... args) const {
    Emu& e = emu();
    ++e.launches;
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64) {
      set_error(cudaErrorInvalidConfiguration,
                "invalid block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                    std::to_string(block.z) + ")");
      return;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
        grid.z > 65535) {
      set_error(cudaErrorInvalidConfiguration,
                "invalid grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                    std::to_string(grid.z) + ")");
      return;
    }
    const auto it = e.smem_limit.find(reinterpret_cast<const void*>(kernel));
    const size_t limit = it == e.smem_limit.end() ? kSmemDefault : it->second;
    if (smem > limit) {
      set_error(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(smem) +
                                           " B above the kernel's limit " + std::to_string(limit) + " B");
      return;
    }
    const std::tuple<P...> params(std::forward<A>(args)...);  // by value, as a launch copies them
    e.body = [&] { std::apply(kernel, params); };
    e.error.clear();
    const char* order = std::getenv("CUEMU_ORDER");
    e.reverse = !(order && std::string(order) == "forward");
    gridDim = grid;
    blockDim = block;
    const unsigned g3[3] = {grid.x, grid.y, grid.z}, b3[3] = {block.x, block.y, block.z};
    cuemu_rt_set_fault_handler(&misaligned_access);  // this module's: its emu() runs the launch
    // The argument bytes as a launch passes them: crosslayer's kernels take one params
    // struct (the JIT path's plans are compared with these; tests/test_jit_plan.py).
    const void* arg_bytes = nullptr;
    size_t arg_size = 0;
    if constexpr (sizeof...(P) == 1) {
      arg_bytes = &std::get<0>(params);
      arg_size = sizeof(std::get<0>(params));
    }
    cuemu_rt_launch_begin(reinterpret_cast<const void*>(kernel), name, g3, b3, smem, arg_bytes, arg_size);
    for (unsigned z = 0; z < grid.z && e.error.empty(); ++z)
      for (unsigned y = 0; y < grid.y && e.error.empty(); ++y)
        for (unsigned x = 0; x < grid.x && e.error.empty(); ++x) {
          blockIdx = {x, y, z};
          run_block(smem);
        }
    cuemu_rt_launch_end();
    e.body = nullptr;
    if (!e.error.empty()) set_error(cudaErrorLaunchFailure, e.error);
  }
};

}  // namespace cuemu

// ------------------------------------------------------------------ device builtins
#define CUEMU_STR2(x) #x
#define CUEMU_STR(x) CUEMU_STR2(x)
#define __syncthreads() ::cuemu::syncthreads("__syncthreads at " __FILE__ ":" CUEMU_STR(__LINE__))
#define __nanosleep(ns) ::cuemu::nanosleep_yield("__nanosleep at " __FILE__ ":" CUEMU_STR(__LINE__))
#define __syncwarp(...) ::cuemu::warp_meet(__VA_OPT__(__VA_ARGS__) __VA_OPT__(+0*)0xffffffffu, \
                                           "__syncwarp at " __FILE__ ":" CUEMU_STR(__LINE__))

template <typename T>
CUEMU_UNCOUNTED inline T cuemu_shfl_xor(unsigned mask, T v, int lane_mask, int width, const char* site) {
  const int lane = ::cuemu::lane_of(::cuemu::emu().fibers[::cuemu::emu().current]);
  return ::cuemu::shfl(mask, v, lane ^ lane_mask, width, site);
}
template <typename T>
CUEMU_UNCOUNTED inline T cuemu_shfl_idx(unsigned mask, T v, int src, int width, const char* site) {
  const int lane = ::cuemu::lane_of(::cuemu::emu().fibers[::cuemu::emu().current]);
  return ::cuemu::shfl(mask, v, (lane & ~(width - 1)) + (src % width), width, site);
}
#define CUEMU_SHFL_SITE(name) name " at " __FILE__ ":" CUEMU_STR(__LINE__)
#define __shfl_xor_sync(mask, v, lm, ...) \
  cuemu_shfl_xor(mask, v, lm, __VA_OPT__(__VA_ARGS__ +0*) 32, CUEMU_SHFL_SITE("__shfl_xor_sync"))
#define __shfl_sync(mask, v, src, ...) \
  cuemu_shfl_idx(mask, v, src, __VA_OPT__(__VA_ARGS__ +0*) 32, CUEMU_SHFL_SITE("__shfl_sync"))

inline cudaError_t cudaGetLastError() {
  cuemu::Emu& e = cuemu::emu();
  const cudaError_t r = e.last_error;
  e.last_error = cudaSuccess;
  return r;
}
inline cudaError_t cudaPeekAtLastError() { return cuemu::emu().last_error; }
inline const char* cudaGetErrorString(cudaError_t) { return cuemu::emu().last_message.c_str(); }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = cuemu_rt_smem_optin(); break;
    case cudaDevAttrMultiProcessorCount: *v = cuemu_rt_sm_count(); break;
    case cudaDevAttrComputeCapabilityMajor: *v = cuemu_rt_capability(0); break;
    case cudaDevAttrComputeCapabilityMinor: *v = cuemu_rt_capability(1); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = cuemu_rt_smem_per_sm(); break;
    case cudaDevAttrL2CacheSize: *v = cuemu_rt_l2_bytes(); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > cuemu_rt_smem_optin()) {
    cuemu::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: dynamic shared memory " +
                                                std::to_string(value) + " B above the opt-in limit");
    return cudaErrorInvalidValue;
  }
  cuemu::emu().smem_limit[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
// Blocks per SM: cuemu_rt_occupancy (threads and shared memory alone).
template <typename... P>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*)(P...), int threads,
                                                                 size_t smem) {
  *n = cuemu_rt_occupancy(threads, smem);
  return cudaSuccess;
}
