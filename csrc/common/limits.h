// Shape limits shared by every layer: the kernels' template bounds, the launchers' checks
// and the bindings, which export them as _C.MAX_STREAMS and _C.MAX_SLOTS (tests check
// them against crosslayer.ref's). Torch-free.
#pragma once

namespace crosslayer {

constexpr int kMaxStreams = 16;  // n, the HC streams: 1 <= n <= kMaxStreams
constexpr int kMaxSlots = 128;   // l, the depth slots one aggregation reads: 1 <= l <= kMaxSlots

}  // namespace crosslayer
