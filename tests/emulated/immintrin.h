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
