// Greedy next-token choice of one row of logits, for bitnet_greedy (ffi_handlers.cc): the
// argmax of the repetition-penalised logits and whether every logit is finite, which
// runtime/sampling.py otherwise computes with XLA reductions over [B, V] (an argmax over a
// select, an is-finite and an all: ~0.9 ms of a batch-8 decode step of the large shape on the
// Zen 3 of benchmarks/README.md, XLA:CPU's variadic argmax reduce is not vectorised).
//
// The same values as sampling.apply_repetition_penalty + jnp.argmax: a seen token's logit x
// becomes x / p if x > 0 else x * p (IEEE division and product); the index is the first
// maximum, or the first NaN if any (jnp.argmax counts NaN as the maximum).

#ifndef BITNET_JAX_KERNELS_CPU_GREEDY_CPU_H_
#define BITNET_JAX_KERNELS_CPU_GREEDY_CPU_H_

#include <cmath>
#include <cstdint>

#include "attention_cpu.h"  // BITNET_ATTN_X86, BITNET_ATTN_TARGET

namespace bitnet_greedy {

struct Row {
  int32_t token;
  bool finite;
};

inline float Penalised(float x, bool seen, float p) { return seen ? (x > 0 ? x / p : x * p) : x; }

// x [V], seen [V] (0 / 1), penalty p: the scalar path (and the reference of the vector one).
inline Row GreedyScalar(const float* x, const uint8_t* seen, float p, int64_t v) {
  int64_t best = 0;
  float top = -INFINITY;
  bool finite = true, found = false;
  for (int64_t i = 0; i < v; ++i) {
    const float y = Penalised(x[i], seen[i] != 0, p);
    finite = finite && std::isfinite(x[i]);
    if (std::isnan(y)) {
      if (!found) best = i;
      found = true;  // the first NaN wins; keep scanning for the finite flag
    } else if (!found && y > top) {
      top = y;
      best = i;
    }
  }
  return {static_cast<int32_t>(best), finite};
}

#if BITNET_ATTN_X86
// Logits i..i+7 penalised (p != 1) or as they are.
BITNET_ATTN_TARGET inline __m256 Penalised8(const float* x, const uint8_t* seen, float p,
                                            int64_t i) {
  const __m256 xv = _mm256_loadu_ps(x + i);
  if (p == 1.0f) return xv;
  const __m256 pv = _mm256_set1_ps(p);
  const __m128i s8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(seen + i));
  const __m256 s =
      _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(s8), _mm256_setzero_si256()));
  const __m256 pen = _mm256_blendv_ps(_mm256_mul_ps(xv, pv), _mm256_div_ps(xv, pv),
                                      _mm256_cmp_ps(xv, _mm256_setzero_ps(), _CMP_GT_OQ));
  return _mm256_blendv_ps(xv, pen, s);
}

// Two passes of 8 lanes: the maximum (NaN and non-finite lanes noted), then the first index
// holding it (or the first NaN).
BITNET_ATTN_TARGET inline Row GreedyAvx2(const float* x, const uint8_t* seen, float p, int64_t v) {
  const int64_t v8 = v & ~int64_t{7};
  const __m256 zero = _mm256_setzero_ps(), inf = _mm256_set1_ps(INFINITY);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 top = _mm256_set1_ps(-INFINITY), bad = zero, nan = zero;
  for (int64_t i = 0; i < v8; i += 8) {
    const __m256 y = Penalised8(x, seen, p, i);
    top = _mm256_max_ps(y, top);  // a NaN y leaves top as it was
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
    // |x| < inf is false for inf and NaN
    bad = _mm256_or_ps(
        bad, _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), inf, _CMP_NLT_UQ));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  float m = -INFINITY;
  for (float f : lanes) m = f > m ? f : m;
  bool finite = _mm256_movemask_ps(bad) == 0, any_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t i = v8; i < v; ++i) {
    const float y = Penalised(x[i], seen[i] != 0, p);
    finite = finite && std::isfinite(x[i]);
    any_nan = any_nan || std::isnan(y);
    m = y > m ? y : m;
  }
  const __m256 mv = _mm256_set1_ps(m);
  for (int64_t i = 0; i < v8; i += 8) {
    const __m256 y = Penalised8(x, seen, p, i);
    const __m256 hit =
        any_nan ? _mm256_cmp_ps(y, y, _CMP_UNORD_Q) : _mm256_cmp_ps(y, mv, _CMP_EQ_OQ);
    const int mask = _mm256_movemask_ps(hit);
    if (mask != 0) return {static_cast<int32_t>(i + __builtin_ctz(mask)), finite};
  }
  for (int64_t i = v8; i < v; ++i) {
    const float y = Penalised(x[i], seen[i] != 0, p);
    if (any_nan ? std::isnan(y) : y == m) return {static_cast<int32_t>(i), finite};
  }
  return {0, finite};  // every logit -inf (and so equal to m): index 0, as jnp.argmax
}
#endif

inline Row Greedy(bool avx2, const float* x, const uint8_t* seen, float p, int64_t v) {
#if BITNET_ATTN_X86
  if (avx2) return GreedyAvx2(x, seen, p, v);
#endif
  (void)avx2;
  return GreedyScalar(x, seen, p, v);
}

}  // namespace bitnet_greedy

#endif  // BITNET_JAX_KERNELS_CPU_GREEDY_CPU_H_
