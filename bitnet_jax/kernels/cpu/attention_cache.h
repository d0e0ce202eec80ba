// How the attention kernels (attention_cpu.h, attention_avx2.h, attention_prefill.h) read the
// KV cache: its element types, the Problem they share, and the widening loads.
//
// A cached row (one position of one kv head) is H elements of float32, float16 or bfloat16, or
// in an int8 cache H int8 codes followed by the row's float32 scale as 4 bytes (model/cache.py:
// value = code * scale), i.e. H + 4 elements. Problem::rs is that row stride in elements; the
// kernels address the cache with it and apply RowScale once per row (to a key's dot product and
// to a value's softmax weight), so the widened codes enter the same float32 arithmetic as the
// float caches' values.

#ifndef BITNET_JAX_KERNELS_ATTENTION_CACHE_H_
#define BITNET_JAX_KERNELS_ATTENTION_CACHE_H_

#include <cstdint>
#include <cstring>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BITNET_ATTN_X86 1
#else
#define BITNET_ATTN_X86 0
#endif

namespace bitnet_attention {

// Cache element types: float32, IEEE float16 and bfloat16 (raw 16-bit patterns), int8 rows.
enum CacheType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kI8 = 3 };

// Bytes of one cache element.
constexpr int64_t ElementBytes(int cache) { return cache == kF32 ? 4 : cache == kI8 ? 1 : 2; }

// Bytes of an int8 row's scale, after its h codes.
constexpr int64_t kScaleBytes = 4;

// Elements per cached row of h values: h, or h codes and the scale in an int8 cache.
constexpr int64_t RowStride(int cache, int64_t h) { return cache == kI8 ? h + kScaleBytes : h; }

struct Problem {
  const float* q;       // [Bq, T, N, H]
  const void* k;        // [B, K, S, rs] of the selected layer, element type `cache`
  const void* v;        // [B, K, S, rs]
  const int32_t* rows;  // [Bq] cache row of each query row
  const int32_t* pos;   // [Bq] position of each query row's first query
  float* out;           // [Bq, T, N, H]
  int64_t b, t, n, kh, s, h;  // b = Bq
  int64_t rs;           // elements per cached row: h, or h + 4 for int8 (the row's scale)
  int cache;            // CacheType
  bool avx2;            // use the AVX2+FMA(+F16C) dot / axpy, or unit (attention_avx2.h)
  bool avx512;          // use the AVX-512 unit (RunUnit512) where H is 64, 96 or 128
};

// One cached value as float32.
inline float HalfToFloat(uint16_t h) {  // IEEE binary16, subnormals and inf/nan included
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float Bf16ToFloat(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// An int8 cache holds codes; RowScale turns their sums into values.
template <int C>
inline float LoadOne(const void* base, int64_t at) {
  if constexpr (C == kF32) return static_cast<const float*>(base)[at];
  if constexpr (C == kF16) return HalfToFloat(static_cast<const uint16_t*>(base)[at]);
  if constexpr (C == kI8) return static_cast<float>(static_cast<const int8_t*>(base)[at]);
  return Bf16ToFloat(static_cast<const uint16_t*>(base)[at]);
}

// The scale of the row at element `at` (its h codes, then the float32): 1 for a float cache.
template <int C>
inline float RowScale(const void* base, int64_t at, int64_t h) {
  if constexpr (C != kI8) {
    (void)base, (void)at, (void)h;
    return 1.0f;
  } else {
    float scale;
    std::memcpy(&scale, static_cast<const int8_t*>(base) + at + h, kScaleBytes);
    return scale;
  }
}

#if BITNET_ATTN_X86
// Predefined empty by tests/emulated (SIMDe's portable intrinsics, every path on any CPU).
#ifndef BITNET_ATTN_TARGET
#define BITNET_ATTN_TARGET __attribute__((target("avx2,fma,f16c")))
#endif
#ifndef BITNET_ATTN_TARGET512
#define BITNET_ATTN_TARGET512 __attribute__((target("avx512f,avx512bw,fma,f16c")))
#endif

// The sum of a's 8 floats.
BITNET_ATTN_TARGET inline float Sum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int C>
BITNET_ATTN_TARGET inline __m256 Load8(const void* base, int64_t at) {
  if constexpr (C == kF32) return _mm256_loadu_ps(static_cast<const float*>(base) + at);
  if constexpr (C == kI8) {
    const __m128i raw = _mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + at));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  }
  const __m128i raw =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + at));
  if constexpr (C == kF16) return _mm256_cvtph_ps(raw);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// GCC 12's AVX-512 headers trip bogus -W(maybe-)uninitialized warnings (_mm512_undefined_*).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <int C>
BITNET_ATTN_TARGET512 inline __m512 Load16(const void* base, int64_t at) {
  if constexpr (C == kF32) return _mm512_loadu_ps(static_cast<const float*>(base) + at);
  if constexpr (C == kI8) {
    const __m128i raw =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + at));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  }
  const __m256i raw =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + at));
  if constexpr (C == kF16) return _mm512_cvtph_ps(raw);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// Software prefetch of cached rows [s0, s1) of (element offset) `base`, rs elements each, once
// per line: into L1, or with Far into L2 only. The decode units fetch the keys they read next
// into L1 and the rows of their next pass (the unit's values while its keys are read, the next
// unit's keys while its values are) into L2: a unit's keys and values (2 x 28 KB for 145
// positions of the large shape, f16) do not both fit a 32-48 KB L1, and an L2 prefetch holds no
// L1 fill buffer. On a Xeon (two threads, 24 layers x 8 rows x 16 heads x 145 positions, f16)
// that took decode attention from 7.9-8.4 to 5.3-7.0 ms on AVX-512 and 8.4-8.8 to 7.2-7.4 ms on
// the AVX2 unit, batch-8 decode 1.03-1.07x; int8 rows within noise; not measured on AMD, where
// PREFETCHT1 may act as T0 (benchmarks/README.md).
template <int C, bool Far = false>
inline void PrefetchRows(const void* cache, int64_t base, int64_t s0, int64_t s1, int64_t rs) {
  const char* at = static_cast<const char*>(cache) + (base + s0 * rs) * ElementBytes(C);
  const char* end = static_cast<const char*>(cache) + (base + s1 * rs) * ElementBytes(C);
  for (; at < end; at += 64) _mm_prefetch(at, Far ? _MM_HINT_T1 : _MM_HINT_T0);
}
#endif  // BITNET_ATTN_X86

}  // namespace bitnet_attention

#endif  // BITNET_JAX_KERNELS_ATTENTION_CACHE_H_
