// Test shim (tests/test_kernels_emulated.py): SIMDe's portable implementations under the Intel
// intrinsic names, so the AVX2 / AVX-VNNI / AVX-512 VNNI kernel paths run on any CPU. Fills the
// few intrinsics SIMDe 0.7 lacks with plain loops.
#pragma once
#include <cstdint>
#include <cstring>
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>
#ifndef _mm256_dpbusd_avx_epi32
#define _mm256_dpbusd_avx_epi32(a, b, c) simde_mm256_dpbusd_epi32(a, b, c)
#endif
#ifndef _MM_HINT_T0
#define _MM_HINT_T0 SIMDE_MM_HINT_T0
#endif
#ifndef _MM_HINT_T1
#define _MM_HINT_T1 SIMDE_MM_HINT_T1
#endif
typedef simde__mmask64 __mmask64;
static inline simde__m512i bitnet_shim_maskz_loadu_epi8(simde__mmask64 k, const void* p) {
  int8_t buf[64] = {0};
  for (int j = 0; j < 64; ++j)
    if ((k >> j) & 1) buf[j] = static_cast<const int8_t*>(p)[j];
  simde__m512i out;
  std::memcpy(&out, buf, 64);
  return out;
}
#define _mm512_maskz_loadu_epi8(k, p) bitnet_shim_maskz_loadu_epi8(k, p)
static inline int32_t bitnet_shim_reduce_add_epi32(simde__m512i a) {
  int32_t v[16];
  std::memcpy(v, &a, 64);
  int32_t s = 0;
  for (int j = 0; j < 16; ++j) s += v[j];
  return s;
}
#define _mm512_reduce_add_epi32(a) bitnet_shim_reduce_add_epi32(a)
#ifndef _mm512_shuffle_epi32
typedef int _MM_PERM_ENUM;
static inline simde__m512i bitnet_shim_shuffle_epi32(simde__m512i a, int imm) {
  int32_t v[16], r[16];
  std::memcpy(v, &a, 64);
  for (int j = 0; j < 16; ++j) r[j] = v[(j & ~3) + ((imm >> (2 * (j & 3))) & 3)];
  simde__m512i out;
  std::memcpy(&out, r, 64);
  return out;
}
#define _mm512_shuffle_epi32(a, imm) bitnet_shim_shuffle_epi32(a, static_cast<int>(imm))
#endif
// For quantize_cpu.h (the fused linear's activation quantisation).
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT SIMDE_MM_FROUND_TO_NEAREST_INT
#endif
static inline float bitnet_shim_reduce_max_ps(simde__m512 a) {
  float v[16];
  std::memcpy(v, &a, 64);
  float m = v[0];
  for (int j = 1; j < 16; ++j) m = v[j] > m ? v[j] : m;
  return m;
}
#define _mm512_reduce_max_ps(a) bitnet_shim_reduce_max_ps(a)
static inline simde__m512i bitnet_shim_cvtps_epi32(simde__m512 a) {  // current rounding mode
  float v[16];
  int32_t r[16];
  std::memcpy(v, &a, 64);
  for (int j = 0; j < 16; ++j) r[j] = static_cast<int32_t>(__builtin_nearbyintf(v[j]));
  simde__m512i out;
  std::memcpy(&out, r, 64);
  return out;
}
#define _mm512_cvtps_epi32(a) bitnet_shim_cvtps_epi32(a)
static inline simde__m128i bitnet_shim_cvtepi32_epi8(simde__m512i a) {  // truncating
  int32_t v[16];
  int8_t r[16];
  std::memcpy(v, &a, 64);
  for (int j = 0; j < 16; ++j) r[j] = static_cast<int8_t>(v[j]);
  simde__m128i out;
  std::memcpy(&out, r, 16);
  return out;
}
#define _mm512_cvtepi32_epi8(a) bitnet_shim_cvtepi32_epi8(a)
// For the attention units (attention_cache.h, attention_cpu.h; attention_harness.cc).
#ifndef __mmask16
typedef simde__mmask16 __mmask16;
#endif
static inline simde__m512 bitnet_shim_ps(const float* v) {
  simde__m512 out;
  std::memcpy(&out, v, 64);
  return out;
}
static inline simde__m512i bitnet_shim_epi32(const int32_t* v) {
  simde__m512i out;
  std::memcpy(&out, v, 64);
  return out;
}
// 16 lanes of type T (the low 16 * sizeof(T) bytes of a), each widened to int32.
template <typename T, typename V>
static inline simde__m512i bitnet_shim_widen_epi32(V a) {
  T v[16];
  int32_t r[16];
  std::memcpy(v, &a, sizeof(v));
  for (int j = 0; j < 16; ++j) r[j] = v[j];
  return bitnet_shim_epi32(r);
}
#ifndef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32(a) bitnet_shim_widen_epi32<int8_t>(a)
#endif
#ifndef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32(a) bitnet_shim_widen_epi32<uint16_t>(a)
#endif
#ifndef _mm512_cvtepi32_ps
static inline simde__m512 bitnet_shim_cvtepi32_ps(simde__m512i a) {
  int32_t v[16];
  float r[16];
  std::memcpy(v, &a, 64);
  for (int j = 0; j < 16; ++j) r[j] = static_cast<float>(v[j]);
  return bitnet_shim_ps(r);
}
#define _mm512_cvtepi32_ps(a) bitnet_shim_cvtepi32_ps(a)
#endif
#ifndef _mm512_cvtph_ps
static inline simde__m512 bitnet_shim_cvtph_ps(simde__m256i a) {  // two 8-lane F16C halves
  simde__m256 lo = simde_mm256_cvtph_ps(simde_mm256_castsi256_si128(a));
  simde__m256 hi = simde_mm256_cvtph_ps(simde_mm256_extracti128_si256(a, 1));
  float r[16];
  std::memcpy(r, &lo, 32);
  std::memcpy(r + 8, &hi, 32);
  return bitnet_shim_ps(r);
}
#define _mm512_cvtph_ps(a) bitnet_shim_cvtph_ps(a)
#endif
#ifndef _mm512_reduce_add_ps
static inline float bitnet_shim_reduce_add_ps(simde__m512 a) {
  float v[16], s = 0.0f;
  std::memcpy(v, &a, 64);
  for (int j = 0; j < 16; ++j) s += v[j];
  return s;
}
#define _mm512_reduce_add_ps(a) bitnet_shim_reduce_add_ps(a)
#endif
#ifndef _mm512_maskz_loadu_ps
static inline simde__m512 bitnet_shim_maskz_loadu_ps(__mmask16 k, const float* p) {
  float r[16];
  for (int j = 0; j < 16; ++j) r[j] = (k >> j) & 1 ? p[j] : 0.0f;
  return bitnet_shim_ps(r);
}
#define _mm512_maskz_loadu_ps(k, p) bitnet_shim_maskz_loadu_ps(k, p)
#endif
#ifndef _mm512_mask_storeu_ps
static inline void bitnet_shim_mask_storeu_ps(float* p, __mmask16 k, simde__m512 a) {
  float v[16];
  std::memcpy(v, &a, 64);
  for (int j = 0; j < 16; ++j)
    if ((k >> j) & 1) p[j] = v[j];
}
#define _mm512_mask_storeu_ps(p, k, a) bitnet_shim_mask_storeu_ps(p, k, a)
#endif
#ifndef _mm512_maskz_mov_ps
static inline simde__m512 bitnet_shim_maskz_mov_ps(__mmask16 k, simde__m512 a) {
  float v[16];
  std::memcpy(v, &a, 64);
  for (int j = 0; j < 16; ++j)
    if (!((k >> j) & 1)) v[j] = 0.0f;
  return bitnet_shim_ps(v);
}
#define _mm512_maskz_mov_ps(k, a) bitnet_shim_maskz_mov_ps(k, a)
#endif
