// The bitnet_attention FFI handler's body (ffi_handlers.cc binds it with the process-wide ISA
// path): operand checks, the cache type, and the work split of attention_cpu.h's units.

#ifndef BITNET_JAX_KERNELS_CPU_FFI_ATTENTION_H_
#define BITNET_JAX_KERNELS_CPU_FFI_ATTENTION_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attention_cpu.h"
#include "ffi_problems.h"
#include "ffi_runtime.h"
#include "isa.h"
#include "xla/ffi/api/ffi.h"

namespace bitnet_ffi {

namespace ba = bitnet_attention;

// q [Bq, T, N, H] float32, k/v caches [L, B, K, S, H] (float32, float16 or bfloat16) or
// [L, B, K, S, H + 4] int8 rows (attention_cache.h), layer int32 scalar, rows [Bq] and pos [Bq]
// int32 -> out [Bq, T, N, H]: query t of row i attends over positions 0..pos[i]+t of cache row
// rows[i] in layer `layer` (attention_cpu.h). One work unit per (row, kv head, query), or per
// block of queries in prefill (attention_prefill.h).
inline ffi::Future Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                             ffi::AnyBuffer v, ffi::Buffer<ffi::S32> layer,
                             ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> pos,
                             ffi::ResultBuffer<ffi::F32> out, int isa) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || !Same(v.dimensions(), kd) ||
      !Same(out->dimensions(), qd) || layer.element_count() != 1 ||
      static_cast<int64_t>(rows.element_count()) != qd[0] ||
      static_cast<int64_t>(pos.element_count()) != qd[0] || kd[2] == 0 || qd[2] % kd[2] != 0) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_attention expects q [Bq, T, N, H], caches [L, B, K, S, H] with N % K == 0, a "
        "scalar layer, rows [Bq] and pos [Bq]; got q " + Dims(qd) + ", k " + Dims(kd)));
  }
  int cache;
  switch (k.element_type()) {
    case ffi::DataType::F32: cache = ba::kF32; break;
    case ffi::DataType::F16: cache = ba::kF16; break;
    case ffi::DataType::BF16: cache = ba::kBF16; break;
    case ffi::DataType::S8: cache = ba::kI8; break;
    default:
      return ReadyFuture(ffi::Error::InvalidArgument(
          "bitnet_attention caches must be float32, float16, bfloat16 or int8 rows"));
  }
  const int64_t rs = ba::RowStride(cache, qd[3]);  // elements per cached row
  if (kd[4] != rs) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_attention cache rows must hold H = " + std::to_string(qd[3]) +
        (cache == ba::kI8 ? " int8 codes and a float32 scale" : " values") + "; got k " +
        Dims(kd)));
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
  const int64_t bytes = ba::ElementBytes(cache);
  const int64_t per_layer = bc * kh * s * rs * bytes;
  const ba::Problem problem{q.typed_data(),
                            static_cast<const char*>(k.untyped_data()) + at * per_layer,
                            static_cast<const char*>(v.untyped_data()) + at * per_layer,
                            rows.typed_data(), pos.typed_data(), out->typed_data(), b, t, n, kh,
                            s, h, rs, cache, FloatSimd(isa),
                            isa >= bitnet_ternary::kAvx512Vnni && ba::HasAvx512()};
  auto job = std::make_shared<Job>();
  job->rows = [problem](int64_t u0, int64_t u1) {
    thread_local std::vector<float> scratch;
    ba::RunUnits(problem, u0, u1, scratch);
  };
  // Work ~ bytes of cache read: the visible positions of k and v per query.
  return Run(pool, job, ba::NumUnits(problem), 1, visible * kh * t * rs * 2 * bytes);
}

}  // namespace bitnet_ffi

#endif  // BITNET_JAX_KERNELS_CPU_FFI_ATTENTION_H_
