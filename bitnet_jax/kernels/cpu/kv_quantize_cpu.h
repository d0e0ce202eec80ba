// The int8 KV cache's row quantisation (model/cache.py quantize_rows) on the CPU, and the
// bitnet_quantize_kv FFI handler's body (ffi_handlers.cc binds it).
//
// A row x of H floats becomes H codes clip(round_half_even(x * (127 / amax)), -127, 127), amax =
// max |x|, then amax * (1 / 127) as 4 bytes; amax = 0 gives zero codes, a NaN or inf in the row
// (amax NaN or inf, so 127 / amax is 0 or NaN) zero codes and a NaN / inf scale, as XLA
// converts NaN to 0. The same float32 operations as the XLA expression, so the codes and
// scales are bit-identical (tests/test_attention.py). Why a kernel: XLA:CPU ran the reduce, the
// rounding and the concatenation with the scale's bytes as ~6 small fusions per layer (~1.5-1.9
// ms of a batch-8 decode step of the large shape, benchmarks/README.md); this is one call.

#ifndef BITNET_JAX_KERNELS_CPU_KV_QUANTIZE_CPU_H_
#define BITNET_JAX_KERNELS_CPU_KV_QUANTIZE_CPU_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "attention_cache.h"  // BITNET_ATTN_X86, BITNET_ATTN_TARGET
#include "ffi_problems.h"
#include "ffi_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace bitnet_kv {

// max |x[0, h)|, NaN if any element is NaN (as XLA's reduce-max).
inline float AbsMaxScalar(const float* x, int64_t h) {
  float m = 0.0f;
  for (int64_t i = 0; i < h; ++i) {
    const float a = std::fabs(x[i]);
    if (std::isnan(a)) return a;
    m = a > m ? a : m;
  }
  return m;
}

// NaN (0 x inf when a tiny amax makes inv inf) -> 0 as XLA converts it; inf clipped to 127.
inline int8_t CodeScalar(float x, float inv) {
  const float r = std::nearbyint(x * inv);  // round half to even (the default rounding mode)
  if (std::isnan(r)) return 0;
  return static_cast<int8_t>(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
}

#if BITNET_ATTN_X86
BITNET_ATTN_TARGET inline float AbsMaxAvx2(const float* x, int64_t h) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) return NAN;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float out = AbsMaxScalar(lanes, 8);
  const float tail = AbsMaxScalar(x + i, h - i);
  return std::isnan(tail) || tail > out ? tail : out;
}

// Codes of x[0, h) (CodeScalar's, 8 at a time).
BITNET_ATTN_TARGET inline void CodesAvx2(const float* x, int64_t h, float inv, int8_t* out) {
  const __m256 iv = _mm256_set1_ps(inv);
  const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_andnot_ps(_mm256_cmp_ps(r, r, _CMP_UNORD_Q), r);  // NaN -> 0
    const __m256i c = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packs_epi16(w, w));
  }
  for (; i < h; ++i) out[i] = CodeScalar(x[i], inv);
}
#endif

// Row x[0, h) -> out[0, h + 4): codes, then the float32 scale's bytes.
inline void QuantizeRow(bool avx2, const float* x, int64_t h, int8_t* out) {
#if BITNET_ATTN_X86
  const float amax = avx2 ? AbsMaxAvx2(x, h) : AbsMaxScalar(x, h);
#else
  (void)avx2;
  const float amax = AbsMaxScalar(x, h);
#endif
  const float scale = amax * (1.0f / 127.0f);  // as model/cache.py (XLA's form of amax / 127)
  std::memcpy(out + h, &scale, bitnet_attention::kScaleBytes);
  if (!(amax > 0.0f) || !std::isfinite(amax)) {  // inv 0 (or NaN): every code rounds to 0
    std::memset(out, 0, static_cast<size_t>(h));
    return;
  }
  const float inv = 127.0f / amax;
#if BITNET_ATTN_X86
  if (avx2) return CodesAvx2(x, h, inv, out);
#endif
  for (int64_t i = 0; i < h; ++i) out[i] = CodeScalar(x[i], inv);
}

}  // namespace bitnet_kv

namespace bitnet_ffi {

namespace ba = bitnet_attention;

// k, v [..., H] float32 -> k8, v8 [..., H + 4] int8 rows (top of the file).
inline ffi::Future QuantizeKv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> k,
                              ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::S8> k8,
                              ffi::ResultBuffer<ffi::S8> v8, bool avx2) {
  const auto d = k.dimensions();
  const auto o = k8->dimensions();
  bool ok = d.size() >= 1 && Same(v.dimensions(), d) && Same(v8->dimensions(), o) &&
            o.size() == d.size() && d[d.size() - 1] > 0;
  for (size_t i = 0; ok && i + 1 < d.size(); ++i) ok = o[i] == d[i];
  ok = ok && o[d.size() - 1] == ba::RowStride(ba::kI8, d[d.size() - 1]);
  if (!ok) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_quantize_kv expects k, v [..., H] and int8 results [..., H + 4]; got k " + Dims(d) +
        ", k8 " + Dims(o)));
  }
  const int64_t h = d[d.size() - 1], rows = static_cast<int64_t>(k.element_count()) / h;
  const int64_t rs = ba::RowStride(ba::kI8, h);
  const float* kx = k.typed_data();
  const float* vx = v.typed_data();
  int8_t* ko = k8->typed_data();
  int8_t* vo = v8->typed_data();
  auto job = std::make_shared<Job>();
  job->rows = [=](int64_t r0, int64_t r1) {  // rows of k, then rows of v
    for (int64_t r = r0; r < r1; ++r) {
      const bool is_k = r < rows;
      const int64_t at = is_k ? r : r - rows;
      bitnet_kv::QuantizeRow(avx2, (is_k ? kx : vx) + at * h, h, (is_k ? ko : vo) + at * rs);
    }
  };
  return Run(pool, job, 2 * rows, 1, 2 * rows * h * 4);
}

}  // namespace bitnet_ffi

#endif  // BITNET_JAX_KERNELS_CPU_KV_QUANTIZE_CPU_H_
