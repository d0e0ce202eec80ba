// BitLinear's activation quantisation and output scaling inside the kernel call, for the fused
// linear (ffi_handlers.cc bitnet_ternary_linear): float32 x [M, I] in, float32 y [M, O] out, so
// that the XLA ops around the int32 matmul (abs, max, divide, round, clip, convert; convert and
// two multiplies per output) are not separate fusions, each a pass over memory and a hand-off
// between XLA's threads (issue 16 item 2: the per-layer glue).
//
// The float32 operations are those XLA runs for quant.py and bitlinear_many's scaling:
//   absmax = max(max_k |x[m, k]|, kActEps)
//   x_q    = clip(round_half_even(x * (127 / absmax)), -128, 127)    (quantize_activations)
//   y      = float(acc) * (absmax * (scale * (1 / 127)))
// The last line is y = acc * (step * scale), step = absmax / 127, as XLA's algebraic simplifier
// rewrites it (division by a constant -> multiplication by its reciprocal, constants gathered;
// seen in the optimized HLO of jax 0.10). So the int8 codes, and thus the int32 products, are
// the XLA path's exactly; the float32 outputs equal it where XLA keeps that form and are within
// a few ulp otherwise (tests/test_fused_linear_cpu.py). Rounding uses the current mode (round to
// nearest even, as jnp.round) in every path.

#ifndef BITNET_JAX_KERNELS_CPU_QUANTIZE_CPU_H_
#define BITNET_JAX_KERNELS_CPU_QUANTIZE_CPU_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa.h"

namespace bitnet_ternary {

constexpr float kActEps = 1e-5f;  // quant.py ACT_EPS

// max(a, b) that is NaN if either is, as XLA's max (std::max(a, NaN) is a, and SIMD max
// returns its second operand when either is NaN): a NaN activation must give a NaN absmax, so
// that the outputs are NaN as on the XLA path and the engine sees non-finite logits (with
// std::max a NaN row quantised against absmax = kActEps into finite garbage).
inline float MaxNan(float a, float b) { return (a != a || a > b) ? a : b; }

// Columns [k0, i) of a row, one at a time (the portable path, and the vector paths' tails):
// max |x| folded into amax, and the codes for the multiplier inv = 127 / absmax.
inline float AbsMaxTail(const float* x, int64_t k0, int64_t i, float amax) {
  for (int64_t k = k0; k < i; ++k) amax = MaxNan(amax, std::fabs(x[k]));
  return amax;
}
inline void CodesTail(const float* x, int64_t k0, int64_t i, float inv, int8_t* q) {
  for (int64_t k = k0; k < i; ++k) {
    q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, std::nearbyint(x[k] * inv))));
  }
}

// Portable row: returns absmax.
inline float QuantizeRowScalar(const float* x, int64_t i, int8_t* q) {
  const float amax = MaxNan(AbsMaxTail(x, 0, i, 0.0f), kActEps);
  CodesTail(x, 0, i, 127.0f / amax, q);
  return amax;
}

#if BITNET_TERNARY_X86
BITNET_SIMD_WARNINGS_OFF

BITNET_AVX2 inline float QuantizeRowAvx2(const float* x, int64_t i, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();  // vnan: lanes that saw NaN
  const int64_t i8 = i & ~int64_t{7};
  for (int64_t k = 0; k < i8; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = MaxNan(AbsMaxTail(x, i8, i, AbsMaxTail(lanes, 0, 8, 0.0f)), kActEps);
  if (_mm256_movemask_ps(vnan)) amax = std::nanf("");
  const float inv = 127.0f / amax;
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-128.0f),
               hi = _mm256_set1_ps(127.0f);
  for (int64_t k = 0; k < i8; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i d = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w, w));
  }
  CodesTail(x, i8, i, inv, q);
  return amax;
}

BITNET_AVX512 inline float QuantizeRowAvx512(const float* x, int64_t i, int8_t* q) {
  __m512 vmax = _mm512_setzero_ps();
  uint32_t nan = 0;  // lanes that saw NaN (as in the AVX2 row)
  const int64_t i16 = i & ~int64_t{15};
  for (int64_t k = 0; k < i16; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  float amax = MaxNan(AbsMaxTail(x, i16, i, _mm512_reduce_max_ps(vmax)), kActEps);
  if (nan) amax = std::nanf("");
  const float inv = 127.0f / amax;
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-128.0f),
               hi = _mm512_set1_ps(127.0f);
  for (int64_t k = 0; k < i16; k += 16) {
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i d = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, r)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(d));
  }
  CodesTail(x, i16, i, inv, q);
  return amax;
}

BITNET_SIMD_WARNINGS_ON
#endif  // BITNET_TERNARY_X86

// Rows of x [M, I] -> q [M, I] int8 and absmax [M], with path `isa`'s vectors.
inline void QuantizeRows(int isa, const float* x, int64_t m, int64_t i, int8_t* q,
                         float* absmax) {
  for (int64_t r = 0; r < m; ++r) {
    float amax;
#if BITNET_TERNARY_X86
    if (isa >= kAvx512Vnni) {
      amax = QuantizeRowAvx512(x + r * i, i, q + r * i);
    } else if (isa != kScalar) {
      amax = QuantizeRowAvx2(x + r * i, i, q + r * i);
    } else {
      amax = QuantizeRowScalar(x + r * i, i, q + r * i);
    }
#else
    (void)isa;
    amax = QuantizeRowScalar(x + r * i, i, q + r * i);
#endif
    absmax[r] = amax;
  }
}

// The outputs of packed rows [r0, r1) of an [M, 4R] int32 product in y (written there by the
// matmul: packed row r holds output columns r, R + r, 2R + r, 3R + r, ternary_paths.h) turned,
// in place, into float32 y = float(acc) * (absmax[m] * (scale * (1 / 127))), plus residual
// [M, 4R] when given (the residual stream's add of the o and down projections, rounded as XLA
// adds them: fused_cpu.h). memcpy keeps the reinterpretation of the buffer well defined;
// compilers turn it into plain vector code.
inline void ScaleRows(float* y, int64_t m, int64_t r, int64_t r0, int64_t r1,
                      const float* absmax, float scale, const float* residual = nullptr) {
  const float per_step = scale * (1.0f / 127.0f);
  for (int64_t t = 0; t < m; ++t) {
    const float s = absmax[t] * per_step;
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t at = t * 4 * r + j * r;
      float* out = y + at;
      for (int64_t c = r0; c < r1; ++c) {
        int32_t a;
        std::memcpy(&a, out + c, sizeof a);
        out[c] = static_cast<float>(a) * s;
      }
      if (residual != nullptr) {
        for (int64_t c = r0; c < r1; ++c) out[c] = residual[at + c] + out[c];
      }
    }
  }
}

// The int8 LM head's vocabulary rows [r0, r1) of an [M, V] int32 product in y turned, in place,
// into float32 logits y = float(acc) * (absmax[m] * (1 / 127)) * scale[v]: transformer.unembed's
// dequantisation rounded as XLA's fusion of it computes it (the step's division by 127 folded
// into a product, then two products).
inline void ScaleHeadRows(float* y, int64_t m, int64_t v, int64_t r0, int64_t r1,
                          const float* absmax, const float* scale) {
  for (int64_t t = 0; t < m; ++t) {
    const float s = absmax[t] * (1.0f / 127.0f);
    float* out = y + t * v;
    for (int64_t c = r0; c < r1; ++c) {
      int32_t a;
      std::memcpy(&a, out + c, sizeof a);
      out[c] = (static_cast<float>(a) * s) * scale[c];
    }
  }
}

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_QUANTIZE_CPU_H_
