// cuemu's traffic counter: every global-memory load and store of an emulated kernel,
// as a GPU's memory system would see it. Built as its own module (cuemu_count, without
// instrumentation) that the emulated extensions link against (tools/cuemu/build.py).
//
// How accesses are seen. The emulated sources are compiled with gcc's AddressSanitizer
// instrumentation in call mode (-fsanitize=address, asan-instrumentation-with-call-threshold=0,
// no stack or global redzones): every memory access of a kernel calls __asan_loadN /
// __asan_storeN (N = 1, 2, 4, 8, 16 bytes, or the sized form) with its address. Nothing
// of AddressSanitizer's runtime is linked: the callbacks below are this counter.
//
// What counts as global memory: an address inside a live allocation of torch's CPU
// allocator, which this module wraps at import (c10::SetCPUAllocator) to keep a registry
// of every allocation's range. Fiber stacks (registers and local memory), shared memory,
// the launch's parameter copy and the emulator's own state are other memory and are
// not counted. Tensors allocated before this module was imported are not in the
// registry, so tools/cuemu/count.py imports it before anything is allocated.
//
// Only accesses made while a kernel's thread runs are counted (cuemu.h tells the
// counter which thread of the block runs, and when the scheduler runs instead).
//
// Requests. A GPU issues one request per warp per memory instruction: the sectors
// (32 bytes, aligned) that the warp's active lanes touch together. The emulator runs
// the lanes of a warp one after another, so the counter rebuilds the requests: the k-th
// execution of one memory instruction by each lane of a warp is one request. An
// instruction is its call site (the return address of the callback) and the caller's
// call site (the next frame up, so an out-of-line helper called from two loops is two
// instructions), and whether it loads or stores. For convergent code that is exactly
// what the hardware issues; a lane that skips an execution which later lanes make
// (divergence inside a loop) shifts its later executions into other requests.
//
// Per launch the counter reports, per allocation and for loads and stores apart:
// bytes requested, sectors requested (the L1-to-L2 traffic with no L1 hits: every
// request's sectors), and unique sectors (the HBM traffic when nothing survives in L2
// between launches and everything a launch touches stays in L2 within it: a sector read
// twice is read once, a sector read after the launch stored it is not read); per
// kernel the requests, their sectors (Nsight Compute's sectors/request) and the sectors
// the same distinct bytes would need, packed (coalescing: 1.0 sectors per ideal sector).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <dlfcn.h>
#include <cxxabi.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr int kSectorBits = 5;  // 32-byte sectors

// ------------------------------------------------------------------ allocation registry
struct Range {
  uintptr_t base = 0, end = 0;
  uint64_t id = 0;
};

std::mutex g_registry_mutex;
std::map<uintptr_t, Range> g_registry;  // base -> range
uint64_t g_next_id = 1;

c10::DeleterFnPtr g_inner_deleter = nullptr;

// The registered allocation holding address a, or an empty Range (end 0) when none does.
Range registered_range(uintptr_t a) {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  auto it = g_registry.upper_bound(a);
  if (it == g_registry.begin()) return Range{};
  --it;
  return a < it->second.end ? it->second : Range{};
}

void delete_registered(void* p) {
  if (p != nullptr) {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    g_registry.erase(reinterpret_cast<uintptr_t>(p));
  }
  g_inner_deleter(p);
}

// Wraps torch's CPU allocator: every allocation's range enters the registry. Its data
// pointers stay simple (context = data, one raw deleter), as code that allocates through
// raw_allocate / raw_deallocate (oneDNN's buffers) requires.
struct RegistryAllocator final : c10::Allocator {
  c10::Allocator* inner;
  explicit RegistryAllocator(c10::Allocator* a) : inner(a) {}
  c10::DataPtr allocate(size_t n) override {
    void* p = inner->raw_allocate(n);
    if (p != nullptr && n > 0) {
      const uintptr_t base = reinterpret_cast<uintptr_t>(p);
      std::lock_guard<std::mutex> lock(g_registry_mutex);
      g_registry[base] = Range{base, base + n, g_next_id++};
    }
    return c10::DataPtr(p, p, &delete_registered, c10::Device(c10::DeviceType::CPU));
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_registered; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner->copy_data(dest, src, count);
  }
};

bool g_installed = false;

void install_allocator() {
  if (g_installed) return;
  c10::Allocator* inner = c10::GetCPUAllocator();
  g_inner_deleter = inner->raw_deleter();
  TORCH_CHECK(g_inner_deleter != nullptr, "cuemu_count: torch's CPU allocator has no raw deleter; cannot wrap it");
  static RegistryAllocator alloc(inner);
  c10::SetCPUAllocator(&alloc, /*priority=*/200);
  TORCH_CHECK(c10::GetCPUAllocator() == &alloc,
              "cuemu_count: another CPU allocator of higher priority is installed; cannot count");
  g_installed = true;
}

// ------------------------------------------------------------------ per-launch state
struct AllocStats {
  uint64_t id = 0;
  uintptr_t base = 0;
  uint64_t size = 0;
  uint64_t bytes[2] = {0, 0};       // requested; [0] loads, [1] stores
  uint64_t l2_sectors[2] = {0, 0};  // sectors of every request
  uint64_t unique_sectors[2] = {0, 0};
  std::vector<uint64_t> touched[2];  // bitmap of the sectors touched (from the allocation's first sector)
};

struct Group {  // one warp-level request being gathered
  uint64_t bytes = 0;
  int alloc = -1;
  bool store = false;
  std::vector<std::pair<uint64_t, uint32_t>> accesses;  // (address, size) of each lane's access
};

// The requests of one instruction in one warp, by execution number k.
struct InstrGroups {
  uint64_t instr;
  std::vector<Group> by_k;
};

struct Record {
  std::string name;
  int64_t grid[3], block[3], smem;
  std::string args;  // the kernel's argument bytes (its params struct)
  // [0] loads, [1] stores: requests, their sectors, the sectors they would need with
  // the same distinct bytes packed from a sector boundary (ceil(distinct / 32) each), and
  // the bytes requested (lanes reading the same byte count it each time).
  uint64_t requests[2] = {0, 0}, sectors[2] = {0, 0}, ideal_sectors[2] = {0, 0}, bytes[2] = {0, 0};
  std::vector<AllocStats> allocs;
};

bool g_counting = false;
std::vector<Record> g_records;
int g_sm_count = 132;

// The emulated device: an H100 SXM (the yardstick GPU of DESIGN.md); its SM count is
// g_sm_count (132 unless tools/cuemu/count.py scales the device with the tokens).
constexpr int kSmemOptin = 232448;   // 227 KB per block with the opt-in
constexpr int kSmemPerSM = 233472;   // 228 KB
constexpr int kL2Bytes = 52428800;   // 50 MB (not scaled with the SM count)
constexpr int kCapability[2] = {9, 0};

// Blocks per SM from threads and shared memory alone (registers are not modelled: a
// GPU may hold fewer), at most 32; 1 KB of shared memory a block is reserved, as on
// sm 8.0 and 9.0.
int occupancy(int threads, size_t smem) {
  const int by_threads = threads > 0 ? 2048 / threads : 0;
  const int by_smem = static_cast<int>(kSmemPerSM / (smem + 1024));
  return std::max(0, std::min({by_threads, by_smem, 32}));
}

// Pages known to lie wholly inside one allocation of the snapshot (idx >= 0) or wholly
// outside all of them (idx = -1): most accesses are to registers and local memory on
// the fiber stacks, rejected here without a search.
constexpr int kPageBits = 12, kPageCacheSize = 1 << 14;
struct PageEntry {
  uint64_t page = ~0ull;
  int idx = -1;
};

PageEntry g_pages[kPageCacheSize];

struct Launch {
  bool active = false;
  Record rec;
  std::vector<Range> snapshot;   // sorted by base
  std::vector<int> alloc_index;  // snapshot index -> rec.allocs index (-1: none yet)
  std::vector<std::vector<std::pair<uint64_t, uint32_t>>> executions;  // per thread: (instr, count)
  std::vector<std::vector<InstrGroups>> groups;                          // per warp
};
Launch g_launch;
// The running kernel thread (linear index in its block), -1 outside kernels. A plain
// global, not thread_local: every callback reads it first, and a thread-local in a
// shared library costs a __tls_get_addr call; kernels run on one host thread at a time
// and no other thread runs instrumented code (the ATen worker threads run torch's own).
int t_thread = -1;
// Whether a kernel's thread runs (counted or not): the alignment check below is always on.
bool t_kernel = false;

// Called with a kernel thread's misaligned global access (a GPU faults on it: every
// access of n bytes must be n-aligned) before the access runs; cuemu.h's handler fails
// the launch and never returns, so the CPU never executes the access (an aligned SSE
// move would crash the process).
using FaultHandler = void (*)(uintptr_t addr, int size, int store);
FaultHandler g_fault_handler = nullptr;

// Index in the snapshot of the allocation holding [a, a + 1), or -1.
int search_range(uintptr_t a) {
  const auto& s = g_launch.snapshot;
  auto it = std::upper_bound(s.begin(), s.end(), a, [](uintptr_t v, const Range& r) { return v < r.base; });
  if (it == s.begin()) return -1;
  --it;
  return a < it->end ? static_cast<int>(it - s.begin()) : -1;
}

int find_range(uintptr_t a) {
  const uint64_t page = a >> kPageBits;
  PageEntry& e = g_pages[page & (kPageCacheSize - 1)];
  if (e.page == page) return e.idx;
  const int idx = search_range(a);
  const uintptr_t lo = page << kPageBits, hi = lo + (uintptr_t(1) << kPageBits);
  bool whole;
  if (idx >= 0) {
    whole = g_launch.snapshot[idx].base <= lo && hi <= g_launch.snapshot[idx].end;
  } else {  // no allocation may start inside the page
    const auto& s = g_launch.snapshot;
    auto it = std::lower_bound(s.begin(), s.end(), lo, [](const Range& r, uintptr_t v) { return r.base < v; });
    whole = (it == s.end() || it->base >= hi) && search_range(lo) < 0;
  }
  if (whole) e = PageEntry{page, idx};
  return idx;
}

// False for an address on a page known to hold no allocation (the callbacks' fast path).
inline bool maybe_global(uintptr_t a) {
  const uint64_t page = a >> kPageBits;
  const PageEntry& e = g_pages[page & (kPageCacheSize - 1)];
  return !(e.page == page && e.idx < 0);
}

Group& group_of(uint64_t instr) {
  auto& counts = g_launch.executions[t_thread];
  uint32_t k = 0;
  auto c = std::find_if(counts.begin(), counts.end(), [&](const auto& x) { return x.first == instr; });
  if (c == counts.end()) {
    counts.emplace_back(instr, 1);
  } else {
    k = c->second++;
  }
  auto& warp = g_launch.groups[t_thread / 32];
  auto g = std::find_if(warp.begin(), warp.end(), [&](const InstrGroups& x) { return x.instr == instr; });
  if (g == warp.end()) {
    warp.push_back(InstrGroups{instr, {}});
    g = warp.end() - 1;
  }
  if (g->by_k.size() <= k) g->by_k.resize(k + 1);
  return g->by_k[k];
}

void record_access(uintptr_t addr, uint64_t size, bool store, uintptr_t pc, uintptr_t ctx) {
  const int r = find_range(addr);
  if (r < 0) return;
  Launch& L = g_launch;
  int& ai = L.alloc_index[r];
  if (ai < 0) {
    ai = static_cast<int>(L.rec.allocs.size());
    AllocStats s;
    s.id = L.snapshot[r].id;
    s.base = L.snapshot[r].base;
    s.size = L.snapshot[r].end - L.snapshot[r].base;
    L.rec.allocs.push_back(std::move(s));
  }
  const uint64_t instr = (pc * 0x100000001B3ull) ^ (ctx * 0xC2B2AE3D27D4EB4Full) ^ (store ? 1 : 0);
  Group& g = group_of(instr);
  g.bytes += size;
  g.alloc = ai;
  g.store = store;
  AllocStats& st = L.rec.allocs[ai];
  st.bytes[store] += size;
  std::vector<uint64_t>& bits = st.touched[store];
  const uint64_t base_sector = st.base >> kSectorBits;
  if (bits.empty()) bits.assign((((st.base + st.size - 1) >> kSectorBits) - base_sector) / 64 + 1, 0);
  g.accesses.emplace_back(addr, static_cast<uint32_t>(size));
  // A load of a sector this launch has stored is an L2 hit (L2 is write-back and, in
  // this model, holds everything a launch touches): not an HBM read.
  const std::vector<uint64_t>& stored = st.touched[true];
  const uint64_t first = addr >> kSectorBits, last = (addr + size - 1) >> kSectorBits;
  for (uint64_t s = first; s <= last; ++s) {
    const uint64_t i = s - base_sector;
    if (i / 64 < bits.size() && !(bits[i / 64] >> (i % 64) & 1)) {
      bits[i / 64] |= uint64_t(1) << (i % 64);
      const bool l2_hit = !store && i / 64 < stored.size() && (stored[i / 64] >> (i % 64) & 1);
      if (!l2_hit) ++st.unique_sectors[store];
    }
  }
}

void flush_groups() {
  Launch& L = g_launch;
  for (auto& warp : L.groups) {
    for (auto& instr : warp) {
      for (Group& g : instr.by_k) {
        if (g.alloc < 0) continue;
        // The union of the lanes' byte ranges: its sectors and its size.
        std::sort(g.accesses.begin(), g.accesses.end());
        uint64_t sectors = 0, distinct = 0, covered_to = 0, last_sector = ~0ull;
        for (const auto& [a, n] : g.accesses) {
          const uint64_t from = std::max<uint64_t>(a, covered_to), to = a + n;
          if (to <= from) continue;
          distinct += to - from;
          covered_to = to;
          for (uint64_t s = from >> kSectorBits; s <= (to - 1) >> kSectorBits; ++s) {
            if (s != last_sector) ++sectors;
            last_sector = s;
          }
        }
        L.rec.requests[g.store] += 1;
        L.rec.sectors[g.store] += sectors;
        L.rec.ideal_sectors[g.store] += (distinct + (1u << kSectorBits) - 1) >> kSectorBits;
        L.rec.bytes[g.store] += g.bytes;
        L.rec.allocs[g.alloc].l2_sectors[g.store] += sectors;
      }
    }
    warp.clear();
  }
  for (auto& e : L.executions) e.clear();
}

std::string demangled(const void* fn, const char* fallback) {
  Dl_info info;
  if (fn != nullptr && dladdr(fn, &info) != 0 && info.dli_sname != nullptr) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    if (status == 0 && d != nullptr) {
      std::string s(d);
      std::free(d);
      return s;
    }
  }
  return fallback;
}

// A kernel thread's access of n bytes at a, not n-aligned: a fault when a lies in a
// torch allocation, i.e. in global memory. Other memory is the emulator's (fiber stacks,
// shared memory), where g++'s own vector code may be unaligned.
void misaligned(uintptr_t a, int n, bool store) {
  if (registered_range(a).end != 0 && g_fault_handler != nullptr) g_fault_handler(a, n, store ? 1 : 0);
}

}  // namespace

// ------------------------------------------------------------------ cuemu.h's calls
extern "C" {

int cuemu_rt_sm_count() { return g_sm_count; }
int cuemu_rt_smem_optin() { return kSmemOptin; }
int cuemu_rt_smem_per_sm() { return kSmemPerSM; }
int cuemu_rt_l2_bytes() { return kL2Bytes; }
int cuemu_rt_capability(int minor) { return kCapability[minor ? 1 : 0]; }
int cuemu_rt_occupancy(int threads, size_t smem) { return occupancy(threads, smem); }

void cuemu_rt_set_thread(int linear) {
  t_thread = g_launch.active ? linear : -1;
  t_kernel = linear >= 0;
}

void cuemu_rt_set_fault_handler(FaultHandler handler) { g_fault_handler = handler; }

void cuemu_rt_launch_begin(const void* kernel, const char* name, const unsigned* grid, const unsigned* block,
                           size_t smem, const void* args, size_t args_bytes) {
  if (!g_counting) return;
  Launch& L = g_launch;
  L.active = true;
  L.rec = Record{};
  L.rec.name = demangled(kernel, name);
  for (int i = 0; i < 3; ++i) {
    L.rec.grid[i] = grid[i];
    L.rec.block[i] = block[i];
  }
  L.rec.smem = static_cast<int64_t>(smem);
  if (args != nullptr) L.rec.args.assign(static_cast<const char*>(args), args_bytes);
  {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    L.snapshot.clear();
    for (const auto& [base, r] : g_registry) L.snapshot.push_back(r);
  }
  L.alloc_index.assign(L.snapshot.size(), -1);
  std::fill(std::begin(g_pages), std::end(g_pages), PageEntry{});
}

void cuemu_rt_block_begin(int nthreads) {
  Launch& L = g_launch;
  if (!L.active) return;
  L.executions.resize(nthreads);
  L.groups.resize((nthreads + 31) / 32);
}

void cuemu_rt_block_end() {
  if (g_launch.active) flush_groups();
}

void cuemu_rt_launch_end() {
  Launch& L = g_launch;
  if (!L.active) return;  // every block's requests were flushed at its end
  L.active = false;
  t_thread = -1;
  g_records.push_back(std::move(L.rec));
}

// ------------------------------------------------------------------ AddressSanitizer callbacks
#define CUEMU_NOINLINE __attribute__((noinline))
#define CUEMU_CALLER() reinterpret_cast<uintptr_t>(__builtin_return_address(0))
#define CUEMU_CONTEXT() reinterpret_cast<uintptr_t>(__builtin_return_address(1))
#define CUEMU_ACCESS(kind, store, n)                                                                  \
  CUEMU_NOINLINE void __asan_##kind##n(uintptr_t a) {                                                 \
    if ((a & (n - 1)) != 0 && t_kernel) misaligned(a, n, store);                                      \
    if (t_thread >= 0 && maybe_global(a)) record_access(a, n, store, CUEMU_CALLER(), CUEMU_CONTEXT()); \
  }
CUEMU_ACCESS(load, false, 1)
CUEMU_ACCESS(load, false, 2)
CUEMU_ACCESS(load, false, 4)
CUEMU_ACCESS(load, false, 8)
CUEMU_ACCESS(load, false, 16)
CUEMU_ACCESS(store, true, 1)
CUEMU_ACCESS(store, true, 2)
CUEMU_ACCESS(store, true, 4)
CUEMU_ACCESS(store, true, 8)
CUEMU_ACCESS(store, true, 16)
CUEMU_NOINLINE void __asan_loadN(uintptr_t a, size_t n) {
  if (t_thread >= 0 && n > 0 && maybe_global(a)) record_access(a, n, false, CUEMU_CALLER(), CUEMU_CONTEXT());
}
CUEMU_NOINLINE void __asan_storeN(uintptr_t a, size_t n) {
  if (t_thread >= 0 && n > 0 && maybe_global(a)) record_access(a, n, true, CUEMU_CALLER(), CUEMU_CONTEXT());
}
// The rest of the instrumentation's interface: nothing to do.
void __asan_init() {}
void __asan_version_mismatch_check_v8() {}
void __asan_handle_no_return() {}
void __asan_before_dynamic_init(const char*) {}
void __asan_after_dynamic_init() {}

}  // extern "C"

// ------------------------------------------------------------------ Python interface
namespace {

// d["ld_<key>"] = v[0] (loads), d["st_<key>"] = v[1] (stores).
void put_io(py::dict& d, const std::string& key, const uint64_t (&v)[2]) {
  d[py::str("ld_" + key)] = v[0];
  d[py::str("st_" + key)] = v[1];
}

py::list drain() {
  py::list out;
  for (const Record& r : g_records) {
    py::dict d;
    d["kind"] = "kernel";
    d["name"] = r.name;
    d["grid"] = py::make_tuple(r.grid[0], r.grid[1], r.grid[2]);
    d["block"] = py::make_tuple(r.block[0], r.block[1], r.block[2]);
    d["smem"] = r.smem;
    d["args"] = py::bytes(r.args);
    put_io(d, "requests", r.requests);
    put_io(d, "sectors", r.sectors);
    put_io(d, "ideal_sectors", r.ideal_sectors);
    put_io(d, "bytes", r.bytes);
    py::list allocs;
    for (const AllocStats& a : r.allocs) {
      py::dict x;
      x["id"] = a.id;
      x["base"] = a.base;
      x["size"] = a.size;
      put_io(x, "bytes", a.bytes);
      put_io(x, "l2_sectors", a.l2_sectors);
      put_io(x, "unique_sectors", a.unique_sectors);
      allocs.append(x);
    }
    d["allocs"] = allocs;
    out.append(d);
  }
  g_records.clear();
  return out;
}

void begin() {
  TORCH_CHECK(g_installed, "cuemu_count: the registry allocator is not installed");
  g_counting = true;
}

void end() { g_counting = false; }

void set_sm_count(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= 1024, "cuemu_count: SM count must be in [1, 1024], got ", n);
  g_sm_count = static_cast<int>(n);
}

py::tuple allocation_of(uintptr_t ptr) {
  const Range r = registered_range(ptr);
  if (r.end == 0) return py::make_tuple();
  return py::make_tuple(r.id, r.base, r.end - r.base);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  install_allocator();
  m.doc() = "cuemu's traffic counter (see tools/cuemu/count_rt.cpp)";
  m.def("begin", &begin, "start (or resume) counting");
  m.def("end", &end, "stop (or pause) counting");
  m.def("counting", [] { return g_counting; });
  m.def("drain", &drain, "the records since the last drain, in launch order");
  m.def("set_sm_count", &set_sm_count, "SMs the emulated device reports (default 132, an H100 SXM)");
  m.def("sm_count", [] { return g_sm_count; });
  m.def(
      "device",
      [] {
        py::dict d;
        d["sms"] = g_sm_count;
        d["smem_optin"] = kSmemOptin;
        d["smem_per_sm"] = kSmemPerSM;
        d["l2_bytes"] = kL2Bytes;
        d["capability"] = py::make_tuple(kCapability[0], kCapability[1]);
        return d;
      },
      "the emulated device's attributes (what cudaDeviceGetAttribute reports)");
  m.def("occupancy", &occupancy, "blocks per SM of a kernel with `threads` threads and `smem` bytes of dynamic "
        "shared memory (cudaOccupancyMaxActiveBlocksPerMultiprocessor's stand-in)", py::arg("threads"),
        py::arg("smem"));
  m.def("allocation_of", &allocation_of, "(id, base, size) of the registered allocation holding ptr, or ()");
}
