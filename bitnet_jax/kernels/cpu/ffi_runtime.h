// How the XLA FFI handlers (ffi_handlers.cc) run a kernel on several threads.
//
// Each handler describes its work as rows [0, r) and a function that computes rows [r0, r1), and
// calls Run(): the chunks of rows are dealt out as one contiguous run per worker, each worker
// takes its own chunks in order from an atomic cursor and then helps the others from theirs. The
// calling thread (XLA's) runs worker 0 and this file's helper threads (Helpers) the others, as
// many as XLA's intra-op pool has threads (the cores the process may use); once every chunk is
// taken the caller waits only for chunks still running on a helper and returns a ready future.
// Nothing waits for a thread to start (a helper that starts late finds no chunks left), and
// helpers never need XLA's pool, so no pool thread can block on another task (the Eigen-pool
// deadlock of jax-notes §2.2 pitfall 2); no OpenMP competes with XLA for the cores.

#ifndef BITNET_JAX_KERNELS_CPU_FFI_RUNTIME_H_
#define BITNET_JAX_KERNELS_CPU_FFI_RUNTIME_H_

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
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
  std::unique_ptr<int32_t[]> gated;  // a large gated linear's gate and up int32 products
  int64_t r = 0, chunk_rows = 1, num_chunks = 0, workers = 1;
  // Worker w owns chunks [FirstChunk(w), FirstChunk(w + 1)); cursor[w] is the next of them.
  std::unique_ptr<std::atomic<int64_t>[]> cursor;
  std::atomic<int64_t> finished{0};  // chunks done
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
      job->finished.fetch_add(1, std::memory_order_release);
    }
  }
}

// Helper threads that wait for work by spinning, as llama.cpp's CPU threadpool does (ggml-cpu.c,
// PR #8672: polling by default "to match OpenMP behavior"): helper w - 1 runs Worker(job, w) for
// w >= 1 of every parallel call. Handing worker 1 to XLA's Eigen pool instead (pool.Schedule)
// started it late: on the Zen 3 VM of benchmarks/README.md (M = 8 gate/up product, 2 threads,
// rdtsc per call) a median 37 us after the call began and in 14% of calls never (the pool thread
// woke after the caller had done every chunk), so calls ran at 84% of two independent threads;
// with helpers worker 1 starts after ~2 us, and bitnet-jax bench's batch-8 decode went from
// 121 / 113 / 129 to 151 / 160 / 144 tok/s (alternating builds; 1.12-1.25x over three such
// series, batch 1 and prefill even within the noise). A helper spins (with a yield every 64 pauses,
// so that a runnable XLA thread on its core goes first) for kSpin after its last job, then sleeps
// until the next.
class Helpers {
 public:
  // The helpers of this process: a fork's child, which has none of the parent's threads, starts
  // its own (a pthread_atfork handler forgets the parent's; no getpid system call per call).
  static Helpers& Get() {
    static std::mutex mu;
    Helpers* h = Current().load(std::memory_order_acquire);
    if (h != nullptr) return *h;
    std::lock_guard<std::mutex> lock(mu);
    h = Current().load(std::memory_order_relaxed);
    if (h == nullptr) {
      static bool forgets_on_fork = false;  // the handler is inherited by children
      if (!forgets_on_fork) forgets_on_fork = !pthread_atfork(nullptr, nullptr, [] { Forget(); });
      h = new Helpers();  // never freed: detached threads use it until the process exits
      Current().store(h, std::memory_order_release);
    }
    return *h;
  }

  // Worker(job, w) on helper w - 1 for w in [1, job->workers). Without helpers (a thread could
  // not be started) the caller does every chunk.
  void Post(const std::shared_ptr<Job>& job) {
    for (int64_t w = 1; w < job->workers; ++w) {
      Slot* found = SlotFor(w - 1);
      if (found == nullptr) return;
      Slot& slot = *found;
      std::lock_guard<std::mutex> lock(slot.mu);
      slot.jobs.push_back(job);
      slot.pending.fetch_add(1, std::memory_order_release);
      if (slot.sleeping) slot.cv.notify_one();
    }
  }

  // Step `spins` (from 1) of a spin-wait: a pause, and every 64th a yield, so that a thread
  // waiting for this core (with fewer cores than threads) runs.
  static void Relax(int64_t spins) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if (spins % 64 == 0) sched_yield();
  }

 private:
  static constexpr auto kSpin = std::chrono::milliseconds(2);

  struct Slot {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::shared_ptr<Job>> jobs;
    std::atomic<int64_t> pending{0};
    bool sleeping = false;
  };

  Helpers() = default;

  static std::atomic<Helpers*>& Current() {
    static std::atomic<Helpers*> current{nullptr};
    return current;
  }
  static void Forget() { Current().store(nullptr, std::memory_order_relaxed); }

  Slot* SlotFor(int64_t k) {
    std::lock_guard<std::mutex> lock(mu_);
    while (static_cast<int64_t>(slots_.size()) <= k) {
      auto slot = std::make_unique<Slot>();
      try {
        std::thread(Loop, slot.get(), static_cast<int64_t>(slots_.size()) + 1).detach();
      } catch (const std::system_error&) {
        return nullptr;
      }
      slots_.push_back(std::move(slot));
    }
    return slots_[k].get();
  }

  // Helper for worker index w: spin for a job, sleep after kSpin without one, run it.
  static void Loop(Slot* slot, int64_t w) {
    for (;;) {
      auto since = std::chrono::steady_clock::now();
      for (int64_t spins = 1; slot->pending.load(std::memory_order_acquire) == 0; ++spins) {
        Relax(spins);
        if (spins % 64 != 0 || std::chrono::steady_clock::now() - since < kSpin) continue;
        std::unique_lock<std::mutex> lock(slot->mu);
        slot->sleeping = true;
        slot->cv.wait(lock, [slot] { return !slot->jobs.empty(); });
        slot->sleeping = false;
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(slot->mu);
        job = std::move(slot->jobs.front());
        slot->jobs.pop_front();
        slot->pending.fetch_sub(1, std::memory_order_relaxed);
      }
      Worker(job, w);
    }
  }

  std::mutex mu_;
  std::vector<std::unique_ptr<Slot>> slots_;
};

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
// the bytes touched) is big enough, on the helpers too (Worker above), one worker per thread of
// XLA's pool. Chunks grown for the pool stay a multiple of `align` rows (chunk_rows must be
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
  Helpers::Get().Post(job);
  Worker(job, 0);
  // Every chunk is taken now; wait for those still running on helpers (at most one each).
  for (int64_t spins = 1; job->finished.load(std::memory_order_acquire) < job->num_chunks;) {
    Helpers::Relax(spins++);
  }
  return ReadyFuture();
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
