// Phases of the depth-slot kernels (depth_aggregate, depth_aggregate_qkv_norm): a row of
// threads (whole warps) owns one token t and walks its d features in chunks of kVec
// contiguous elements; for each chunk a thread loops over the l slots S_j. The weights
// of the tile's tokens are staged in shared memory, [row][way][slot], and read as
// warp-uniform broadcasts.
//
// Shifted rows (any d on the 16-byte path). The chunks of token t start at e = −h_t,
// h_t = row_shift(row start): the 16-byte boundaries of memory, not the row start,
// delimit them, so every chunk inside the row is one aligned 16-byte access whatever d
// and the token stride. The row's first chunk (e < 0) and last (e + kVec > d) are cut:
// checked, element by element, zero outside [0, d) (common/vec.cuh). The launcher takes
// this path only when every row of a token, in each tensor the kernel touches, has the
// same shift (slot_rows_path, common/slots.h); with kVec = 1 the shift is 0.
#pragma once

#include "common/std.cuh"

#include "common/limits.h"
#include "common/reduce.cuh"
#include "common/vec.cuh"

namespace crosslayer {

// The l depth slots an op reads, as a table of base pointers: token t of slot j starts
// at ptr[j] + t·token_stride (elements), features at unit stride. The slots need not be
// one tensor: a DepthStack's slots are the blocks' outputs where they lie. The table
// lives in the kernel's params, which the slot kernels take as __grid_constant__, so a
// slot's pointer is one indexed constant-bank load, never a per-thread copy.
struct SlotTable {
  const void* ptr[kMaxSlots];
  int64_t token_stride;
};

// Token t's rows in the slots of a table: at(j) is slot j's row.
template <typename T>
struct TableRows {
  const SlotTable* table;
  int64_t byte_offset;  // t·token_stride·sizeof(T)
  __device__ __forceinline__ const T* at(int j) const {
    return reinterpret_cast<const T*>(static_cast<const char*>(table->ptr[j]) + byte_offset);
  }
};

template <typename T>
__device__ __forceinline__ TableRows<T> table_rows(const SlotTable& table, int64_t t) {
  return TableRows<T>{&table, t * table.token_stride * static_cast<int64_t>(sizeof(T))};
}

// Token t's rows in a strided stack (a slot gradient dS): at(j) = row0 + j·slot_stride.
template <typename T>
struct StridedRows {
  T* row0;
  int64_t slot_stride;
  __device__ __forceinline__ T* at(int j) const { return row0 + j * slot_stride; }
};

// The shift h of a row starting at `row`: elements from the 16-byte boundary below it
// (0 for kVec = 1). The row's chunks start at e = −h.
template <typename T, int kVec>
__device__ __forceinline__ int64_t row_shift(const T* row) {
  if constexpr (kVec == 1) {
    return 0;
  } else {
    return static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) / sizeof(T)) % kVec);
  }
}

// Whether every chunk of the calling thread's warp in the round of chunks starting at e0
// (the row's lanes at e0 + kVec·threadIdx.x) lies inside a row of d: a warp-uniform test,
// so the whole path may reduce across the warp's lanes.
template <int kVec>
__device__ __forceinline__ bool warp_chunks_whole(int64_t e0, int64_t d) {
  constexpr int64_t kWarpSpan = kWarpSize * kVec;  // elements of a warp's chunks
  return whole_chunk(e0 + (threadIdx.x / kWarpSize) * kWarpSpan, kWarpSpan, d);
}

// Copies the (rows × kWays × l) weight tile of tokens t0 + r and ways c0 + c from A
// (strides in elements; token stride 0: static) into a_s; missing tokens or ways
// (c0 + c >= n_ways) read as zero. Strided over the block's threads: call between two
// __syncthreads.
template <int kWays, typename acc>
__device__ __forceinline__ void slot_tile_load_weights(acc* __restrict__ a_s, const acc* __restrict__ A,
                                                       int64_t token_stride, int64_t way_stride,
                                                       int64_t slot_stride, int64_t n_tokens, int n_ways,
                                                       int l, int64_t t0, int c0) {
  const int per_row = kWays * l;
  const int n = blockDim.y * per_row;
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < n; i += blockDim.x * blockDim.y) {
    const int r = i / per_row;
    const int c = (i / l) % kWays;
    const int j = i % l;
    const int64_t t = t0 + r;
    a_s[i] = (t < n_tokens && c0 + c < n_ways) ? A[t * token_stride + (c0 + c) * way_stride + j * slot_stride]
                                                : acc(0);
  }
}

// Slots whose loads a thread issues before it uses any, for whole chunks: the slot
// loops below read the chunk of kSlotBatch slots into registers first (four independent
// 16-byte loads in flight per thread and stream), then work on them. A cut chunk (the
// row's first on a shifted row, its last when d cuts it) goes one slot at a time
// (slot_batch<false>): its checked loads (one 16-byte load, or element by element in
// the lane the row's bounds cut) would otherwise take kSlotBatch times the registers of
// both paths.
constexpr int kSlotBatch = 4;

template <bool kWhole>
constexpr int slot_batch() {
  return kWhole ? kSlotBatch : 1;
}

// The chunk [e, e + kVec) of slots j0 .. j0 + kBatch of one token's rows (TableRows or
// StridedRows), loaded before any is used; kWhole as in load_chunk_as. Slots past the
// last (j >= l) load slot l − 1 again: the caller gives them zero weight and stores
// nothing for them. (Selecting zeros instead makes ptxas unpack every loaded vector at
// once, which serialises the batch's loads; the repeated slot's sectors are L1 hits of
// the same request stream, no extra HBM bytes.)
template <typename T, int kVec, bool kWhole, int kBatch, typename Rows>
__device__ __forceinline__ void slot_batch_load(const Rows& rows, int j0, int l, int64_t e, int64_t d,
                                                Vec<T, kVec> (&s)[kBatch]) {
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    const int j = j0 + b < l ? j0 + b : l - 1;
    s[b] = load_chunk_as<T, kVec, kWhole>(rows.at(j), e, d);
  }
}

// y[c] += Σ_j a_row[c·l + j]·S_j[e, e + kVec) for c < kWays, over the l slots of one
// token (s_rows: its rows in the slots), slot_batch<kWhole>() slots' loads at a time;
// kWhole as in load_chunk_as. With a stage, slot j's chunk (as loaded: zero outside the
// row) is also written to stage[j·stage_stride]. Per thread, no shuffles.
template <typename T, int kVec, int kWays, bool kWhole>
__device__ __forceinline__ void slot_aggregate_as(const TableRows<T>& s_rows, const acc_t<T>* __restrict__ a_row, int l, int64_t e, int64_t d,
                                                  acc_t<T> (&y)[kWays][kVec],
                                                  Vec<T, kVec>* __restrict__ stage = nullptr,
                                                  int64_t stage_stride = 0) {
  using acc = acc_t<T>;
  constexpr int kBatch = slot_batch<kWhole>();
  for (int j0 = 0; j0 < l; j0 += kBatch) {
    Vec<T, kVec> s[kBatch];
    slot_batch_load<T, kVec, kWhole>(s_rows, j0, l, e, d, s);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (j0 + b < l) {
        if (stage != nullptr) stage[(j0 + b) * stage_stride] = s[b];
#pragma unroll
        for (int c = 0; c < kWays; ++c) {
          const acc w = a_row[c * l + j0 + b];
#pragma unroll
          for (int k = 0; k < kVec; ++k) y[c][k] += w * to_acc(s[b].v[k]);
        }
      }
    }
  }
}

// slot_aggregate_as with the whole-chunk test made once per chunk (reads cut to [0, d),
// zero outside).
template <typename T, int kVec, int kWays>
__device__ __forceinline__ void slot_aggregate(const TableRows<T>& s_rows, const acc_t<T>* __restrict__ a_row,
                                               int l, int64_t e, int64_t d, acc_t<T> (&y)[kWays][kVec]) {
  if (whole_chunk(e, kVec, d)) {
    slot_aggregate_as<T, kVec, kWays, true>(s_rows, a_row, l, e, d, y);
  } else {
    slot_aggregate_as<T, kVec, kWays, false>(s_rows, a_row, l, e, d, y);
  }
}

}  // namespace crosslayer
