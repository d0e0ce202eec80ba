// The packed-matmul handlers' operands (ffi_handlers.cc bitnet_ternary_matmul / _linear): the
// weights and outputs of one call checked into ternary_paths.h Problems, the rows of a call run
// problem by problem, and the fused linear's activation prologue (RMSNorm, int8 codes).

#ifndef BITNET_JAX_KERNELS_CPU_FFI_PROBLEMS_H_
#define BITNET_JAX_KERNELS_CPU_FFI_PROBLEMS_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ffi_runtime.h"
#include "fused_cpu.h"
#include "isa.h"
#include "quantize_cpu.h"
#include "ternary_gemm.h"
#include "xla/ffi/api/ffi.h"

namespace bitnet_ffi {

namespace bt = bitnet_ternary;

// Whether path `isa` runs the float kernels' AVX2 + FMA (+ F16C) code (fused_cpu.h, the
// attention units, greedy_cpu.h): any SIMD path on a CPU that has them.
inline bool FloatSimd(int isa) { return isa != bt::kScalar && bitnet_attention::HasAvx2Fma(); }

// Weight j of a call, dimensions wd, with output dimensions od: checks that it is packed
// [O/4, I] or stacked [L, O/4, I] with matrix `at` in it, and its output [M, 4R]; R to *r.
inline ffi::Error CheckWeight(const std::string& who, size_t j, ffi::Span<const int64_t> wd,
                              ffi::Span<const int64_t> od, int64_t m, int64_t i, int64_t at,
                              int64_t* r) {
  const bool stacked = wd.size() == 3;
  if ((wd.size() != 2 && !stacked) || od.size() != 2) {
    return ffi::Error::InvalidArgument(who + " weight " + std::to_string(j) +
                                       " must be [O/4, I] or [L, O/4, I], its output [M, O]");
  }
  const int64_t l = stacked ? wd[0] : 1;
  *r = wd[wd.size() - 2];
  if (wd[wd.size() - 1] != i || od[0] != m || od[1] != 4 * *r) {
    return ffi::Error::InvalidArgument(who + " shape mismatch: packed " + Dims(wd) + ", out " +
                                       Dims(od) + " for x [" + std::to_string(m) + ", " +
                                       std::to_string(i) + "]");
  }
  if (at < 0 || at >= l) {
    return ffi::Error::InvalidArgument(who + " layer " + std::to_string(at) + " is outside [0, " +
                                       std::to_string(l) + ")");
  }
  return ffi::Error::Success();
}

// The problems of one call of the packed matmuls: n >= 1 weights, each packed [O_j/4, I] or
// stacked [L, O_j/4, I] (matrix `at` is used; at must be 0 for 2-D weights), against x [M, I]
// int8 (x_q, built by the caller) with outputs [M, O_j] of element type Out (int32, or float32
// whose buffer first receives the int32 products, TernaryLinear). Problem j owns rows
// [first_row[j], first_row[j + 1]) of the call's work.
template <ffi::DataType Out>
inline ffi::Error Collect(const char* name, int64_t m, int64_t i, int64_t at, const int8_t* x_q,
                          const int32_t* xsum, ffi::RemainingArgs weights, size_t first_weight,
                          ffi::RemainingRets outs, std::vector<bt::Problem>& problems,
                          std::vector<int64_t>& first_row) {
  const std::string who = name;
  if (weights.size() <= first_weight || weights.size() - first_weight != outs.size()) {
    return ffi::Error::InvalidArgument(who +
                                       " expects as many packed weights [(L,) O/4, I] as "
                                       "outputs [M, O]");
  }
  first_row = {0};
  for (size_t j = 0; j < outs.size(); ++j) {
    auto w = weights.get<ffi::Buffer<ffi::U8>>(first_weight + j);
    auto o = outs.get<ffi::Buffer<Out>>(j);
    if (!w.has_value() || !o.has_value()) {
      return ffi::Error::InvalidArgument(who + " weight/output " + std::to_string(j) +
                                         " has the wrong element type");
    }
    int64_t r;
    ffi::Error error = CheckWeight(who, j, w->dimensions(), (*o)->dimensions(), m, i, at, &r);
    if (!error.success()) return error;
    int32_t* out = reinterpret_cast<int32_t*>((*o)->typed_data());
    problems.push_back(bt::Problem{x_q, w->typed_data() + at * r * i, out, xsum, m, i, r});
    first_row.push_back(first_row.back() + r);
  }
  return ffi::Error::Success();
}

// Rows [r0, r1) of the call's work: each problem's share of them, then `after(j, lo, hi)` on
// the rows [lo, hi) of problem j just computed (while they are in cache).
template <class After>
inline void RunProblems(int isa, const std::vector<bt::Problem>& problems,
                        const std::vector<int64_t>& first_row, int64_t r0, int64_t r1,
                        After after) {
  for (size_t j = 0; j < problems.size(); ++j) {
    const int64_t lo = std::max(r0, first_row[j]), hi = std::min(r1, first_row[j + 1]);
    if (lo >= hi) continue;
    bt::RunRows(isa, problems[j], lo - first_row[j], hi - first_row[j]);
    after(j, lo - first_row[j], hi - first_row[j]);
  }
}

// n int32 for a gated linear's gate and up products, written before they are read: the calling
// thread's buffer, kept between calls up to kKeep elements (a decode step's FFN calls; a fresh
// allocation of that size is an mmap, page faults and an munmap per call, ~5% of a batch-8
// step here), or above that one owned by the job (prefill: large calls, rare).
inline int32_t* GatedScratch(Job* job, size_t n) {
  constexpr size_t kKeep = size_t{1} << 20;  // 4 MB
  if (n > kKeep) {
    job->gated.reset(new int32_t[n]);
    return job->gated.get();
  }
  thread_local std::unique_ptr<int32_t[]> kept;
  thread_local size_t size = 0;
  if (size < n) {
    kept.reset(new int32_t[n]);
    size = n;
  }
  return kept.get();
}

// The gate and up weights of a gated linear (args first_weight, first_weight + 1; one shape
// [(L,) R, I]) as problems 0 and 1, their int32 products in GatedScratch, and the float32 output
// [M, 4R] (act(gate) · up, fused_cpu.h ActRows) to *out.
inline ffi::Error CollectGated(int64_t m, int64_t i, int64_t at, Job* job, ffi::RemainingArgs args,
                               size_t first_weight, ffi::RemainingRets outs,
                               std::vector<bt::Problem>& problems, float** out) {
  auto g = args.get<ffi::Buffer<ffi::U8>>(first_weight);
  auto u = args.get<ffi::Buffer<ffi::U8>>(first_weight + 1);
  auto o = outs.get<ffi::Buffer<ffi::F32>>(0);
  if (!g.has_value() || !u.has_value() || !o.has_value() ||
      !Same(g->dimensions(), u->dimensions())) {
    return ffi::Error::InvalidArgument(
        "bitnet_ternary_linear with act needs gate and up uint8 weights of one shape and a "
        "float32 output");
  }
  int64_t r;
  ffi::Error error =
      CheckWeight("bitnet_ternary_linear", 0, g->dimensions(), (*o)->dimensions(), m, i, at, &r);
  if (!error.success()) return error;
  int32_t* scratch = GatedScratch(job, 2 * m * 4 * r);
  for (int k = 0; k < 2; ++k) {
    const uint8_t* w = (k == 0 ? g : u)->typed_data() + at * r * i;
    problems.push_back(
        bt::Problem{job->xq.data(), w, scratch + k * m * 4 * r, job->xsum.data(), m, i, r});
  }
  *out = (*o)->typed_data();
  return ffi::Error::Success();
}

// The fused linear's activations: per token, RMSNorm (with a gain) then the int8 codes, their
// absmax and sum, into job->xq / absmax / xsum; tokens split over the threads when the call is
// big enough (a prefill chunk: ~0.1-0.15 ms of one thread for [128, 1536-4096]).
inline void Prologue(ffi::ThreadPool& pool, int isa, const float* x, int64_t m, int64_t i,
                     const float* gain, float eps, Job* job) {
  auto pre = std::make_shared<Job>();
  pre->rows = [=](int64_t t0, int64_t t1) {
    thread_local std::vector<float> normed;
    if (gain != nullptr) normed.resize(i);
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = x + t * i;
      if (gain != nullptr) {
        bt::NormRow(row, i, gain, eps, normed.data());
        row = normed.data();
      }
      bt::QuantizeRows(isa, row, 1, i, job->xq.data() + t * i, job->absmax.data() + t);
      bt::RowSums(job->xq.data() + t * i, 1, i, job->xsum.data() + t);
    }
  };
  Run(pool, pre, m, 1, m * i * 16);
}

}  // namespace bitnet_ffi

#endif  // BITNET_JAX_KERNELS_CPU_FFI_PROBLEMS_H_
