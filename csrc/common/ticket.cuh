// Ordered accumulation within one launch: the contributors 0, 1, ..., n − 1 of one
// result (blocks, or warps) add into it in that order, contributor i after contributor
// i − 1 has released the result's ticket (a global int, zero before the launch). The
// sum is the same run to run (one order, no atomics on the data), and there is neither
// a partial buffer per contributor nor a second launch to add them up: the result stays
// in L2 between its contributors.
//
// Forward progress: contributor i waits only on contributors of lower linear block
// index, or on earlier warps of its own block, which the GPU has dispatched before it
// (the assumption of CUB's decoupled look-back): the waits cannot deadlock.
//
// Use (per result; `turn` = the contributor's index):
//   one thread: ticket_wait(ticket, turn); then barrier (block or warp);
//   every thread: result (=, turn 0 | +=, reading it with __ldcg) its part; __threadfence();
//   barrier; one thread: ticket_release(ticket, turn + 1).
#pragma once

namespace crosslayer {

// Waits until the ticket reads `turn`, then orders the caller's later loads after the
// releasing contributor's stores.
__device__ __forceinline__ void ticket_wait(const int* ticket, int turn) {
  while (*reinterpret_cast<const volatile int*>(ticket) != turn) __nanosleep(32);
  __threadfence();
}

// Hands the result to contributor `next` (after the caller's barrier: every thread's
// stores are fenced before).
__device__ __forceinline__ void ticket_release(int* ticket, int next) {
  __threadfence();
  *reinterpret_cast<volatile int*>(ticket) = next;
}

}  // namespace crosslayer
