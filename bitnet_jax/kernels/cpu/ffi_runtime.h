// How the XLA FFI handlers (ffi_handlers.cc) run a kernel on XLA's intra-op thread pool.
//
// Each handler takes the pool from the call context, describes its work as rows [0, r) and a
// function that computes rows [r0, r1), and calls Run(): the chunks of rows are dealt out as one
// contiguous run per worker, each worker takes its own chunks in order from an atomic cursor and
// then helps the others from theirs, the calling thread runs one worker itself, and the returned
// ffi::Future is completed by a CountDownPromise when the last worker finishes. Nothing ever waits
// on another task, so a pool thread is never blocked (the Eigen-pool deadlock of jax-notes §2.2
// pitfall 2), and no OpenMP competes with XLA for the cores.

#ifndef BITNET_JAX_KERNELS_CPU_FFI_RUNTIME_H_
#define BITNET_JAX_KERNELS_CPU_FFI_RUNTIME_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace bitnet_ffi {

namespace ffi = xla::ffi;

// Work below this many weight-byte x token products runs on the calling thread alone:
// scheduling costs a few microseconds, more than such a call takes.
constexpr int64_t kMinParallelWork = int64_t{1} << 18;
// A parallel call cuts its rows into at least kSplit contiguous chunks per worker: long runs of
// consecutive rows stream better than 16 KiB pieces (the LM head: ~20 -> ~27 GB/s with 2
// threads here), and 8 per worker still balances the load when one thread starts late.
constexpr int64_t kSplit = 8;

// The matmuls' work items are whole multiples of this many rows (unless they end the work),
// so that the GEMM kernels' 4-row (ternary_gemm.h) and 8-row (int8_gemm.h) blocks are not cut.
constexpr int64_t kRowAlign = 8;

inline int64_t RoundUp(int64_t n, int64_t align) { return (n + align - 1) / align * align; }

// Rows per work item at least: about 16 KiB of weights (Run may make items larger).
inline int64_t ChunkRows(int64_t i, int64_t r) {
  const int64_t rows =
      RoundUp(std::max<int64_t>(1, (int64_t{16} << 10) / std::max<int64_t>(i, 1)), kRowAlign);
  return std::min(rows, std::max<int64_t>(r, 1));
}

// One call's work split into chunks of rows; `rows(r0, r1)` computes rows [r0, r1). Owns
// whatever the rows read besides the XLA buffers (activation sums, |x|).
struct Job {
  std::function<void(int64_t, int64_t)> rows;
  std::vector<int32_t> xsum;
  std::vector<uint8_t> xabs;
  std::vector<int8_t> xq;     // quantised activations (bitnet_ternary_linear)
  std::vector<float> absmax;  // their per-token max |x| (the step is absmax / 127)
  int64_t r = 0, chunk_rows = 1, num_chunks = 0, workers = 1;
  // Worker w owns chunks [FirstChunk(w), FirstChunk(w + 1)); cursor[w] is the next of them.
  std::unique_ptr<std::atomic<int64_t>[]> cursor;
  ffi::CountDownPromise done;
};

inline int64_t FirstChunk(const Job& job, int64_t w) { return w * job.num_chunks / job.workers; }

// Worker `self` runs its own chunks in order, then takes what is left of the others'. Owning a
// contiguous run keeps a worker's rows consecutive in memory, so a kernel's next-tile prefetch
// at the end of one chunk fetches the start of the next chunk it runs (ternary_gemm.h); pulling
// chunks from one shared counter instead interleaved the workers' chunks, and every chunk
// started on cold weights (M = 8 decode from DRAM, both threads: 1.06x, benchmarks/README.md).
inline void Worker(const std::shared_ptr<Job>& job, int64_t self) {
  for (int64_t k = 0; k < job->workers; ++k) {
    const int64_t w = (self + k) % job->workers, end = FirstChunk(*job, w + 1);
    for (int64_t c; (c = job->cursor[w].fetch_add(1, std::memory_order_relaxed)) < end;) {
      const int64_t r0 = c * job->chunk_rows;
      job->rows(r0, std::min(job->r, r0 + job->chunk_rows));
    }
  }
  job->done.CountDown();
}

inline ffi::Future ReadyFuture(ffi::Error error = ffi::Error::Success()) {
  ffi::Promise promise;
  ffi::Future future(promise);
  if (error.success()) {
    promise.SetAvailable();
  } else {
    promise.SetError(std::move(error));
  }
  return future;
}

// Run job->rows over [0, r) in chunks of chunk_rows on the calling thread and, when `work` (about
// the bytes touched) is big enough, on XLA's pool (Worker above); the calling thread works too
// instead of waiting. Chunks grown for the pool stay a multiple of `align` rows (chunk_rows must be
// one already, or cover all r).
inline ffi::Future Run(ffi::ThreadPool& pool, std::shared_ptr<Job> job, int64_t r,
                       int64_t chunk_rows, int64_t work, int64_t align = 1) {
  job->r = r;
  job->chunk_rows = chunk_rows;
  job->num_chunks = (r + job->chunk_rows - 1) / job->chunk_rows;
  int64_t workers = 1;
  if (work >= kMinParallelWork) {
    workers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), job->num_chunks);
    const int64_t split = RoundUp((r + workers * kSplit - 1) / (workers * kSplit), align);
    if (split > job->chunk_rows) {
      job->chunk_rows = split;
      job->num_chunks = (r + split - 1) / split;
    }
  }
  if (workers <= 1) {
    job->rows(0, r);
    return ReadyFuture();
  }
  job->workers = workers;
  job->cursor.reset(new std::atomic<int64_t>[workers]);
  for (int64_t w = 0; w < workers; ++w) job->cursor[w].store(FirstChunk(*job, w));
  job->done = ffi::CountDownPromise(workers);
  ffi::Future future(job->done);  // before any worker can complete the promise
  for (int64_t w = 1; w < workers; ++w) {
    pool.Schedule([job, w] { Worker(job, w); });
  }
  Worker(job, 0);
  return future;
}

// "[2, 3]" for error messages.
inline std::string Dims(ffi::Span<const int64_t> d) {
  std::string out = "[";
  for (size_t k = 0; k < d.size(); ++k) out += (k ? ", " : "") + std::to_string(d[k]);
  return out + "]";
}

inline bool Same(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

}  // namespace bitnet_ffi

#endif  // BITNET_JAX_KERNELS_CPU_FFI_RUNTIME_H_
