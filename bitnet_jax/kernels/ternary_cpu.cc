// XLA FFI handler for the packed ternary x int8 matmul (kernels in ternary_cpu.h).
//
// Built by setup.py against the FFI headers shipped in jaxlib (jax.ffi.include_dir()) into
// bitnet_jax/kernels/_ternary_cpu*.so, loaded with ctypes and registered as the CPU target
// "bitnet_ternary_matmul" by bitnet_jax/kernels/cpu_ffi.py (jax-notes §2.2).
//
// Threading: the handler takes XLA's intra-op thread pool from the call context, schedules
// workers that pull chunks of packed rows from an atomic counter, runs one worker itself, and
// returns an ffi::Future that a CountDownPromise completes when the last worker finishes.
// Nothing ever waits on another task, so a pool thread is never blocked (the Eigen-pool
// deadlock of jax-notes §2.2 pitfall 2), and no OpenMP competes with XLA for the cores.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "ternary_cpu.h"
#include "xla/ffi/api/ffi.h"

// jaxlib whose FFI headers this was compiled against (set by setup.py). XLA runs handlers
// built with older FFI headers, not newer ones, so cpu_ffi.py refuses a newer build jaxlib.
#ifndef BITNET_JAXLIB_VERSION
#define BITNET_JAXLIB_VERSION "unknown"
#endif

namespace ffi = xla::ffi;
namespace bt = bitnet_ternary;

namespace {

// Path used by every call; chosen once from cpuid (and BITNET_JAX_CPU_ISA), changeable from
// Python for tests and benchmarks through bitnet_ternary_set_isa().
int InitialIsa() {
#if BITNET_TERNARY_X86
  __builtin_cpu_init();
#endif
  int isa = bt::BestIsa();
  if (const char* env = std::getenv("BITNET_JAX_CPU_ISA")) {
    for (int cand = bt::kScalar; cand <= bt::kAvx512Vnni; ++cand) {
      if (std::strcmp(env, bt::IsaName(cand)) == 0 && bt::IsaSupported(cand)) isa = cand;
    }
  }
  return isa;
}

std::atomic<int> g_isa{InitialIsa()};

// Work below this many weight-byte x token products runs on the calling thread alone:
// scheduling costs a few microseconds, more than such a call takes.
constexpr int64_t kMinParallelWork = int64_t{1} << 18;

// Rows per work item: about 16 KiB of packed weights, enough items for load balance.
int64_t ChunkRows(int64_t i, int64_t r) {
  int64_t rows = std::max<int64_t>(4, (int64_t{16} << 10) / std::max<int64_t>(i, 1));
  return std::min(rows, std::max<int64_t>(r, 1));
}

struct Shared {
  bt::Problem problem;
  int isa;
  int64_t chunk_rows;
  int64_t num_chunks;
  std::vector<int32_t> xsum;
  std::atomic<int64_t> next{0};
  ffi::CountDownPromise done;
};

void Worker(const std::shared_ptr<Shared>& s) {
  for (;;) {
    const int64_t c = s->next.fetch_add(1, std::memory_order_relaxed);
    if (c >= s->num_chunks) break;
    const int64_t r0 = c * s->chunk_rows;
    const int64_t r1 = std::min(s->problem.r, r0 + s->chunk_rows);
    bt::RunRows(s->isa, s->problem, r0, r1);
  }
  s->done.CountDown();
}

ffi::Future ReadyFuture(ffi::Error error = ffi::Error::Success()) {
  ffi::Promise promise;
  ffi::Future future(promise);
  if (error.success()) {
    promise.SetAvailable();
  } else {
    promise.SetError(std::move(error));
  }
  return future;
}

ffi::Future TernaryMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                          ffi::Buffer<ffi::U8> packed, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions();
  const auto wd = packed.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_ternary_matmul expects x [M, I], packed [O/4, I] and out [M, O] of rank 2"));
  }
  const int64_t m = xd[0], i = xd[1], r = wd[0];
  if (wd[1] != i || od[0] != m || od[1] != 4 * r) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_ternary_matmul shape mismatch: x [" + std::to_string(m) + ", " +
        std::to_string(i) + "], packed [" + std::to_string(r) + ", " + std::to_string(wd[1]) +
        "], out [" + std::to_string(od[0]) + ", " + std::to_string(od[1]) + "]"));
  }
  if (m == 0 || r == 0) return ReadyFuture();

  auto s = std::make_shared<Shared>();
  s->isa = g_isa.load(std::memory_order_relaxed);
  s->xsum.resize(m);
  bt::RowSums(x.typed_data(), m, i, s->xsum.data());
  s->problem = bt::Problem{x.typed_data(), packed.typed_data(), out->typed_data(),
                           s->xsum.data(), m, i, r};
  s->chunk_rows = ChunkRows(i, r);
  s->num_chunks = (r + s->chunk_rows - 1) / s->chunk_rows;

  int64_t workers = 1;
  if (m * r * i >= kMinParallelWork) {
    workers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), s->num_chunks);
  }
  if (workers <= 1) {
    bt::RunRows(s->isa, s->problem, 0, r);
    return ReadyFuture();
  }

  s->done = ffi::CountDownPromise(workers);
  ffi::Future future(s->done);  // before any worker can complete the promise
  for (int64_t w = 1; w < workers; ++w) {
    pool.Schedule([s] { Worker(s); });
  }
  Worker(s);  // the calling thread works too instead of waiting
  return future;
}

}  // namespace

// Exported although the library is built with -fvisibility=hidden (keeps the many inline FFI
// template symbols private to this object).
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* BitnetTernaryMatmul(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetTernaryMatmul, TernaryMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Plain C entry points for ctypes (cpu_ffi.py): kernel path introspection and selection.
extern "C" {

__attribute__((visibility("default"))) int bitnet_ternary_abi_version() { return 1; }

__attribute__((visibility("default"))) const char* bitnet_ternary_built_jaxlib() {
  return BITNET_JAXLIB_VERSION;
}

__attribute__((visibility("default"))) int bitnet_ternary_get_isa() { return g_isa.load(); }

__attribute__((visibility("default"))) int bitnet_ternary_best_isa() { return bt::BestIsa(); }

__attribute__((visibility("default"))) int bitnet_ternary_isa_supported(int isa) {
  return bt::IsaSupported(isa) ? 1 : 0;
}

__attribute__((visibility("default"))) const char* bitnet_ternary_isa_name(int isa) {
  return bt::IsaName(isa);
}

// Select path `isa`; returns the path now in use (unchanged if `isa` is unsupported here).
__attribute__((visibility("default"))) int bitnet_ternary_set_isa(int isa) {
  if (bt::IsaSupported(isa)) g_isa.store(isa);
  return g_isa.load();
}

}  // extern "C"
