// The rest of a BitLinear's neighbourhood inside the fused linear call (ffi_handlers.cc
// bitnet_ternary_linear with norm / residual / act; issue 16 item 2, the per-layer glue): the
// RMSNorm before the activation quantisation, and after the products either the residual add
// or the gated activation act(gate) * up of the FFN (the residual add lives in quantize_cpu.h
// ScaleRows). Same roles and order of operations as the GPU's fused_bitlinear
// (kernels/gpu/fused.py) and as the XLA composition it replaces (model/layers.py rms_norm and
// activation, transformer.py's residual adds):
//
//   norm:     y = gain * (x * r),  r = 1 / sqrt(sum_k x[k]^2 / I + eps)   (float32)
//   residual: out = residual + y                                            (one float add)
//   act:      out = act(g) * u, act = silu (g / (1 + e^-g)) or relu2 (max(g, 0)^2)
//
// The residual add rounds as XLA's does; the norm's sum of squares and the SiLU's exp round
// differently from XLA's (a different summation order, another exp), a few ulp, so an int8 code
// can move by one where x * 127 / absmax sits on a rounding boundary: the outputs agree with the
// composition to float rounding plus such rare steps (tests/test_fused_layer_cpu.py), as the
// GPU's fused kernels do.

#ifndef BITNET_JAX_KERNELS_CPU_FUSED_CPU_H_
#define BITNET_JAX_KERNELS_CPU_FUSED_CPU_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "attention_cpu.h"  // Exp8 (attention_avx2.h), HasAvx2Fma
#include "isa.h"

namespace bitnet_ternary {

enum Act : int { kActNone = 0, kActSilu = 1, kActRelu2 = 2 };

// y [I] = RMSNorm(x [I]) with gain [I]. 16 float32 partial sums of squares (vectorised by the
// compiler without reassociation), then their sum.
inline void NormRow(const float* x, int64_t i, const float* gain, float eps, float* y) {
  float part[16] = {};
  int64_t k = 0;
  for (; k + 16 <= i; k += 16) {
    for (int l = 0; l < 16; ++l) part[l] += x[k + l] * x[k + l];
  }
  float ss = 0.0f;
  for (int l = 0; l < 16; ++l) ss += part[l];
  for (; k < i; ++k) ss += x[k] * x[k];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(i) + eps);
  for (k = 0; k < i; ++k) y[k] = gain[k] * (x[k] * r);
}

inline float ActOne(int act, float g) {
  if (act == kActRelu2) {
    const float r = g > 0.0f ? g : 0.0f;
    return r * r;
  }
  return g / (1.0f + std::exp(-g));
}

#if BITNET_ATTN_X86
// silu(g) * u for 8 lanes: sigmoid from e = exp(-|g|) <= 1 (no overflow), 1 / (1 + e) for
// g >= 0 and e / (1 + e) below; NaN stays NaN.
BITNET_ATTN_TARGET inline __m256 SiluTimes8(__m256 g, __m256 u) {
  const __m256 e = bitnet_attention::Exp8(_mm256_or_ps(g, _mm256_set1_ps(-0.0f)));  // -|g|
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_mul_ps(_mm256_mul_ps(g, _mm256_div_ps(num, _mm256_add_ps(one, e))), u);
}

// One run of n outputs: out = silu(ga * sg) * (ua * su).
BITNET_ATTN_TARGET inline void SiluRun(const int32_t* ga, const int32_t* ua, float sg, float su,
                                       int64_t n, float* out) {
  const __m256 vg = _mm256_set1_ps(sg), vu = _mm256_set1_ps(su);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 g = _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ga + c))), vg);
    const __m256 u = _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ua + c))), vu);
    _mm256_storeu_ps(out + c, SiluTimes8(g, u));
  }
  for (; c < n; ++c) {
    out[c] = ActOne(kActSilu, static_cast<float>(ga[c]) * sg) * (static_cast<float>(ua[c]) * su);
  }
}
#endif

// The gated FFN output for packed rows [r0, r1) of gate and up (int32 products ga, ua [M, 4R],
// ternary_paths.h layout): out [M, 4R] = act(float(ga) * sg_t) * (float(ua) * su_t), with the
// per-token steps of the fused linear (s = absmax[t] * scale / 127, quantize_cpu.h ScaleRows).
// `vec`: use the AVX2 + FMA SiLU.
inline void ActRows(int act, bool vec, const int32_t* ga, const int32_t* ua, float* out, int64_t m,
                    int64_t r, int64_t r0, int64_t r1, const float* absmax, float scale_g,
                    float scale_u) {
  for (int64_t t = 0; t < m; ++t) {
    const float sg = absmax[t] * (scale_g * (1.0f / 127.0f));
    const float su = absmax[t] * (scale_u * (1.0f / 127.0f));
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t at = t * 4 * r + j * r + r0, n = r1 - r0;
#if BITNET_ATTN_X86
      if (vec && act == kActSilu) {
        SiluRun(ga + at, ua + at, sg, su, n, out + at);
        continue;
      }
#endif
      (void)vec;
      for (int64_t c = 0; c < n; ++c) {
        out[at + c] = ActOne(act, static_cast<float>(ga[at + c]) * sg) *
                      (static_cast<float>(ua[at + c]) * su);
      }
    }
  }
}

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_FUSED_CPU_H_
