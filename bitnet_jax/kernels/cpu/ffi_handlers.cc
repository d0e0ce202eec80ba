// XLA FFI handlers for bitnet_jax's CPU kernels, and the C entry points library.py calls:
//
//   bitnet_ternary_matmul  packed ternary x int8 matmul, one or several weights (ternary_paths.h
//                          GEMV for M = 1, ternary_gemm.h GEMM for M >= 2)
//   bitnet_int8_matmul     int8 x int8 LM head (int8_cpu.h GEMV, int8_gemm.h GEMM)
//   bitnet_attention       attention over one layer of the stacked KV cache (attention_cpu.h)
//
// Built by setup.py against the FFI headers shipped in jaxlib (jax.ffi.include_dir()) into
// bitnet_jax/kernels/cpu/_ternary_cpu*.so, loaded with ctypes and registered as CPU targets by
// bitnet_jax/kernels/cpu/library.py (jax-notes §2.2). The handlers check shapes and run the
// kernels on XLA's thread pool (ffi_runtime.h); the ISA path (isa.h) is one process-wide choice.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "attention_cpu.h"
#include "ffi_runtime.h"
#include "int8_gemm.h"
#include "isa.h"
#include "ternary_gemm.h"
#include "xla/ffi/api/ffi.h"

// jaxlib whose FFI headers this was compiled against (set by setup.py). XLA runs handlers
// built with older FFI headers, not newer ones, so library.py refuses a newer build jaxlib.
#ifndef BITNET_JAXLIB_VERSION
#define BITNET_JAXLIB_VERSION "unknown"
#endif

namespace ffi = xla::ffi;
namespace bt = bitnet_ternary;
namespace ba = bitnet_attention;
using bitnet_ffi::ChunkRows;
using bitnet_ffi::Dims;
using bitnet_ffi::Job;
using bitnet_ffi::ReadyFuture;
using bitnet_ffi::Run;
using bitnet_ffi::Same;

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

// x [M, I] int8 and a layer index (int32 scalar), then n >= 1 weights, each packed [O_j/4, I]
// or stacked [L, O_j/4, I] (matrix `layer` is used; layer must be 0 for 2-D weights) -> n
// outputs out_j [M, O_j] int32. Reading stacked weights in place spares the per-layer slice copy
// XLA makes for a custom call inside lax.scan; taking several weights that share x (q/k/v,
// gate/up) in one call halves the thread hand-offs of a decode step.
ffi::Future TernaryMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                          ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs weights,
                          ffi::RemainingRets outs) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || layer.element_count() != 1 || weights.size() == 0 ||
      weights.size() != outs.size()) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_ternary_matmul expects x [M, I], a scalar layer, and as many packed weights "
        "[(L,) O/4, I] as outputs [M, O]"));
  }
  const int64_t m = xd[0], i = xd[1];
  const int64_t at = layer.typed_data()[0];
  std::vector<bt::Problem> problems;
  std::vector<int64_t> first_row = {0};  // problem j owns rows [first_row[j], first_row[j+1])
  auto job = std::make_shared<Job>();
  job->xsum.resize(m);
  for (size_t j = 0; j < weights.size(); ++j) {
    auto w = weights.get<ffi::Buffer<ffi::U8>>(j);
    auto o = outs.get<ffi::Buffer<ffi::S32>>(j);
    if (!w.has_value() || !o.has_value()) {
      return ReadyFuture(ffi::Error::InvalidArgument(
          "bitnet_ternary_matmul weight/output " + std::to_string(j) + " is not uint8/int32"));
    }
    const auto wd = w->dimensions();
    const auto od = (*o)->dimensions();
    const bool stacked = wd.size() == 3;
    if ((wd.size() != 2 && !stacked) || od.size() != 2) {
      return ReadyFuture(ffi::Error::InvalidArgument(
          "bitnet_ternary_matmul weight " + std::to_string(j) + " must be [O/4, I] or "
          "[L, O/4, I], its output [M, O]"));
    }
    const int64_t l = stacked ? wd[0] : 1, r = wd[wd.size() - 2];
    if (wd[wd.size() - 1] != i || od[0] != m || od[1] != 4 * r) {
      return ReadyFuture(ffi::Error::InvalidArgument(
          "bitnet_ternary_matmul shape mismatch: x " + Dims(xd) + ", packed " + Dims(wd) +
          ", out " + Dims(od)));
    }
    if (at < 0 || at >= l) {
      return ReadyFuture(ffi::Error::InvalidArgument(
          "bitnet_ternary_matmul layer " + std::to_string(at) + " is outside [0, " +
          std::to_string(l) + ")"));
    }
    problems.push_back(bt::Problem{x.typed_data(), w->typed_data() + at * r * i,
                                   (*o)->typed_data(), job->xsum.data(), m, i, r});
    first_row.push_back(first_row.back() + r);
  }
  const int64_t rows = first_row.back();
  if (m == 0 || rows == 0) return ReadyFuture();
  bt::RowSums(x.typed_data(), m, i, job->xsum.data());
  const int isa = g_isa.load(std::memory_order_relaxed);
  job->rows = [problems, first_row, isa](int64_t r0, int64_t r1) {
    for (size_t j = 0; j < problems.size(); ++j) {
      const int64_t lo = std::max(r0, first_row[j]), hi = std::min(r1, first_row[j + 1]);
      if (lo < hi) bt::RunRows(isa, problems[j], lo - first_row[j], hi - first_row[j]);
    }
  };
  return Run(pool, job, rows, ChunkRows(i, rows), m * rows * i, bitnet_ffi::kRowAlign);
}

// x [M, I] int8, w [V, I] int8 (no -128) -> out [M, V] int32: the int8 LM head.
ffi::Future Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                       ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || wd[1] != xd[1] ||
      od[0] != xd[0] || od[1] != wd[0]) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_int8_matmul expects x [M, I], w [V, I] and out [M, V]; got x " + Dims(xd) +
        ", w " + Dims(wd) + ", out " + Dims(od)));
  }
  const int64_t m = xd[0], i = xd[1], v = wd[0];
  if (m == 0 || v == 0) return ReadyFuture();
  auto job = std::make_shared<Job>();
  job->xabs.resize(m * i);
  bt::AbsBytes(x.typed_data(), m * i, job->xabs.data());
  job->xsum.resize(m);
  bt::RowSums(x.typed_data(), m, i, job->xsum.data());
  const bt::Int8Problem problem{x.typed_data(), job->xabs.data(), w.typed_data(),
                                out->typed_data(), job->xsum.data(), m, i, v};
  const int isa = g_isa.load(std::memory_order_relaxed);
  job->rows = [problem, isa](int64_t r0, int64_t r1) { bt::RunRows(isa, problem, r0, r1); };
  return Run(pool, job, v, ChunkRows(i, v), m * v * i, bitnet_ffi::kRowAlign);
}

// q [Bq, T, N, H] float32, k/v caches [L, B, K, S, H] (float32, float16 or bfloat16), layer
// int32 scalar, rows [Bq] and pos [Bq] int32 -> out [Bq, T, N, H]: query t of row i attends
// over positions 0..pos[i]+t of cache row rows[i] in layer `layer` (attention_cpu.h). One work
// unit per (row, kv head, query).
ffi::Future Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                      ffi::AnyBuffer v, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                      ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || !Same(v.dimensions(), kd) ||
      !Same(out->dimensions(), qd) || layer.element_count() != 1 ||
      static_cast<int64_t>(rows.element_count()) != qd[0] ||
      static_cast<int64_t>(pos.element_count()) != qd[0] || kd[4] != qd[3] || kd[2] == 0 ||
      qd[2] % kd[2] != 0) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_attention expects q [Bq, T, N, H], caches [L, B, K, S, H] with N % K == 0, a "
        "scalar layer, rows [Bq] and pos [Bq]; got q " + Dims(qd) + ", k " + Dims(kd)));
  }
  int cache;
  switch (k.element_type()) {
    case ffi::DataType::F32: cache = ba::kF32; break;
    case ffi::DataType::F16: cache = ba::kF16; break;
    case ffi::DataType::BF16: cache = ba::kBF16; break;
    default:
      return ReadyFuture(ffi::Error::InvalidArgument(
          "bitnet_attention caches must be float32, float16 or bfloat16"));
  }
  if (v.element_type() != k.element_type()) {
    return ReadyFuture(ffi::Error::InvalidArgument("bitnet_attention k and v dtypes differ"));
  }
  const int64_t l = kd[0], bc = kd[1], b = qd[0], t = qd[1], n = qd[2], kh = kd[2], s = kd[3],
                h = qd[3];
  const int64_t at = layer.typed_data()[0];
  if (at < 0 || at >= l) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_attention layer " + std::to_string(at) + " outside the cache " + Dims(kd)));
  }
  int64_t visible = 0;  // positions read per kv head, summed over rows (the work estimate)
  for (int64_t i = 0; i < b; ++i) {
    const int64_t row = rows.typed_data()[i], p0 = pos.typed_data()[i];
    if (row < 0 || row >= bc || p0 < 0) {
      return ReadyFuture(ffi::Error::InvalidArgument(
          "bitnet_attention row " + std::to_string(row) + " / position " + std::to_string(p0) +
          " outside the cache " + Dims(kd)));
    }
    visible += std::min(p0 + t, s);
  }
  if (b == 0 || t == 0 || n == 0 || h == 0) return ReadyFuture();
  const int64_t per_layer = bc * kh * s * h * (cache == ba::kF32 ? 4 : 2);  // bytes
  const ba::Problem problem{q.typed_data(),
                            static_cast<const char*>(k.untyped_data()) + at * per_layer,
                            static_cast<const char*>(v.untyped_data()) + at * per_layer,
                            rows.typed_data(), pos.typed_data(), out->typed_data(), b, t, n, kh,
                            s, h, cache,
                            g_isa.load(std::memory_order_relaxed) != bt::kScalar &&
                                ba::HasAvx2Fma(),
                            g_isa.load(std::memory_order_relaxed) == bt::kAvx512Vnni &&
                                ba::HasAvx512()};
  auto job = std::make_shared<Job>();
  job->rows = [problem](int64_t u0, int64_t u1) {
    thread_local std::vector<float> scores;
    for (int64_t u = u0; u < u1; ++u) ba::RunUnit(problem, u, u + 1 < u1 ? u + 1 : -1, scores);
  };
  const int64_t units = b * kh * t;
  // Work ~ bytes of cache read: the visible positions of k and v per unit.
  return Run(pool, job, units, 1, visible * kh * t * h * (cache == ba::kF32 ? 8 : 4));
}

}  // namespace

// Exported although the library is built with -fvisibility=hidden (keeps the many inline FFI
// template symbols private to this object).
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* BitnetTernaryMatmul(
    XLA_FFI_CallFrame* call_frame);
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* BitnetInt8Matmul(
    XLA_FFI_CallFrame* call_frame);
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* BitnetAttention(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetTernaryMatmul, TernaryMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Plain C entry points for ctypes (library.py): kernel path introspection and selection.
extern "C" {

__attribute__((visibility("default"))) int bitnet_ternary_abi_version() { return 2; }

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
