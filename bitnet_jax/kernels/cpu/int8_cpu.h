// int8 x int8 -> int32 matmul for the row-scaled int8 LM head: the row functions (GEMV) of
// every ISA path, on the loop skeleton of isa.h (int8_gemm.h adds the GEMM for M >= 2 and the
// overloads the dispatcher RunRows uses).

#ifndef BITNET_JAX_KERNELS_CPU_INT8_CPU_H_
#define BITNET_JAX_KERNELS_CPU_INT8_CPU_H_

#include <cstdint>

#include "isa.h"

namespace bitnet_ternary {

// int8 x int8 -> int32 matmul for the row-scaled int8 LM head (params.quantize_lm_head):
//
//   out[m, v] = sum_k x[m, k] * w[v, k]       x: int8 [M, I], w: int8 [V, I], out: int32 [M, V]
//
// The SIMD paths multiply |x| (u8, precomputed once per call in xabs) by sign(w, x) (s8), so w
// must not hold -128 (row_int8 quantizes to [-127, 127]); pairs then fit int16 (<= 32512) and
// are widened to int32 at once. XLA:CPU's int8 dot moved the 49 MB head of the large model at
// 6-7 GB/s; this streams it at memory speed.

struct Int8Problem {
  const int8_t* x;       // [M, I]
  const uint8_t* xabs;   // [M, I], |x| (x = -128 gives 128)
  const int8_t* w;       // [R, I]
  int32_t* out;          // [M, R]
  const int32_t* xsum;   // [M], sum_k x[m, k] (the GEMM, int8_gemm.h)
  int64_t m, i, r;
};

inline int32_t Int8DotTail(const int8_t* w, const int8_t* x, int64_t k0, int64_t k1) {
  int32_t s = 0;
  for (int64_t k = k0; k < k1; ++k) s += static_cast<int32_t>(w[k]) * x[k];
  return s;
}

template <int MB>
struct ScalarInt8Row {
  static void Run(const Int8Problem& p, int64_t m0, int64_t row, int64_t /*ahead*/) {
    const int8_t* w = p.w + row * p.i;
    for (int64_t mm = 0; mm < MB; ++mm) {
      p.out[(m0 + mm) * p.r + row] = Int8DotTail(w, p.x + (m0 + mm) * p.i, 0, p.i);
    }
  }
};

#if BITNET_TERNARY_X86

BITNET_SIMD_WARNINGS_OFF

BITNET_AVX2 inline int32_t Sum8(__m256i a) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  const __m128i t = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
}

template <int MB>
struct Avx2Int8Row {
  BITNET_AVX2 static void Run(const Int8Problem& p, int64_t m0, int64_t row, int64_t ahead) {
    const int8_t* w = p.w + row * p.i;
    const int64_t kv = p.i & ~int64_t{31};
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MB];
    for (int mm = 0; mm < MB; ++mm) acc[mm] = _mm256_setzero_si256();
    for (int64_t k = 0; k < kv; k += 32) {
      if ((k & 63) == 0) PrefetchAt(w, k, ahead * p.i);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      for (int mm = 0; mm < MB; ++mm) {
        const int64_t at = (m0 + mm) * p.i + k;
        const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xabs + at));
        const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.x + at));
        const __m256i pairs = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv, xs));
        acc[mm] = _mm256_add_epi32(acc[mm], _mm256_madd_epi16(pairs, ones));
      }
    }
    for (int mm = 0; mm < MB; ++mm) {
      p.out[(m0 + mm) * p.r + row] =
          Sum8(acc[mm]) + Int8DotTail(w, p.x + (m0 + mm) * p.i, kv, p.i);
    }
  }
};

#if BITNET_TERNARY_AVXVNNI
// Each vpdpbusd adds into its accumulator, whose latency (5 cycles on the Xeon of 2026-12-04)
// bounds a block with few: U accumulators per token, so that a block keeps at least 4 (4 per
// token at M = 1, 2 at M = 2..3); 32 U columns per step. Against one per token in 2-token
// blocks (bench_bitlinear.py --paths head --isa avxvnni --cold, two threads, alternating
// builds, I = 1536 and 2560): M = 1 the same (the read bandwidth), 3 1.25-1.85x, 4 1.1-1.25x,
// 8 (RunAvxVnniInt8Rows' blocks of 8) 1.2-1.37x, 16 1.2-1.38x; on the large model's head
// (32000 x 1536) at M = 8 87-97 -> 114-118 GMAC/s, as the AVX2 path's assembly (103-124).
template <int MB>
struct AvxVnniInt8Row {
  static constexpr int kU = MB >= 4 ? 1 : (MB == 1 ? 4 : 2);
  // Columns [k, k + 32) into accumulator u of every token (inlined, so acc stays in registers).
  BITNET_AVXVNNI __attribute__((always_inline)) static inline void Step(
      const Int8Problem& p, const int8_t* w, int64_t m0, int64_t k, int u,
      __m256i (&acc)[MB][kU]) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    for (int mm = 0; mm < MB; ++mm) {
      const int64_t at = (m0 + mm) * p.i + k;
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xabs + at));
      const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.x + at));
      acc[mm][u] = _mm256_dpbusd_avx_epi32(acc[mm][u], xa, _mm256_sign_epi8(wv, xs));
    }
  }
  BITNET_AVXVNNI static void Run(const Int8Problem& p, int64_t m0, int64_t row, int64_t ahead) {
    const int8_t* w = p.w + row * p.i;
    const int64_t kv = p.i & ~int64_t{31}, ku = p.i - p.i % (32 * kU);
    __m256i acc[MB][kU];
    for (int mm = 0; mm < MB; ++mm)
      for (int u = 0; u < kU; ++u) acc[mm][u] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k < ku; k += 32 * kU) {
      for (int u = 0; u < kU; ++u) {
        if (((k + 32 * u) & 63) == 0) PrefetchAt(w, k + 32 * u, ahead * p.i);
        Step(p, w, m0, k + 32 * u, u, acc);
      }
    }
    for (; k < kv; k += 32) Step(p, w, m0, k, 0, acc);
    for (int mm = 0; mm < MB; ++mm) {
      for (int u = 1; u < kU; ++u) acc[mm][0] = _mm256_add_epi32(acc[mm][0], acc[mm][u]);
      p.out[(m0 + mm) * p.r + row] =
          Sum8(acc[mm][0]) + Int8DotTail(w, p.x + (m0 + mm) * p.i, kv, p.i);
    }
  }
};
#endif  // BITNET_TERNARY_AVXVNNI

// AVX-512 has no 512-bit sign_epi8: negate w where x < 0 with a masked subtract instead.
template <int MB>
struct Avx512VnniInt8Row {
  // Runs only for M = 1 and the GEMM's last rows (int8_gemm.h): in-row prefetch alone.
  BITNET_AVX512 static void Run(const Int8Problem& p, int64_t m0, int64_t row, int64_t /*ahead*/) {
    const int8_t* w = p.w + row * p.i;
    const __m512i zero = _mm512_setzero_si512();
    __m512i acc[MB];
    for (int mm = 0; mm < MB; ++mm) acc[mm] = zero;
    for (int64_t k = 0; k < p.i; k += 64) {
      const __mmask64 mask = p.i - k >= 64 ? ~uint64_t{0} : (~uint64_t{0}) >> (64 - (p.i - k));
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + k);
      for (int mm = 0; mm < MB; ++mm) {
        const int64_t at = (m0 + mm) * p.i + k;
        const __m512i xa = _mm512_maskz_loadu_epi8(mask, p.xabs + at);
        const __m512i xs = _mm512_maskz_loadu_epi8(mask, p.x + at);
        const __m512i ws = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(xs), zero, wv);
        acc[mm] = _mm512_dpbusd_epi32(acc[mm], xa, ws);
      }
    }
    for (int mm = 0; mm < MB; ++mm) {
      p.out[(m0 + mm) * p.r + row] = _mm512_reduce_add_epi32(acc[mm]);
    }
  }
};

BITNET_SIMD_WARNINGS_ON

// Blocks of up to 8 tokens: each 32-byte weight load then serves 8 sign + maddubs steps.
// Measured on a Zen 3 (one thread, the large shape's head 1536 x 32002 from DRAM, in-process
// alternating with 2-token blocks; benchmarks/README.md): M = 4 / 8 / 16 1.17x, M = 1 / 2
// unchanged (the same code).
BITNET_AVX2 inline void RunAvx2Int8Rows(const Int8Problem& p, int64_t r0, int64_t r1) {
  RunTiled<8, Avx2Int8Row>(p, r0, r1);
}
#if BITNET_TERNARY_AVXVNNI
BITNET_AVXVNNI inline void RunAvxVnniInt8Rows(const Int8Problem& p, int64_t r0, int64_t r1) {
  RunTiled<8, AvxVnniInt8Row>(p, r0, r1);
}
#endif
BITNET_AVX512 inline void RunAvx512VnniInt8Rows(const Int8Problem& p, int64_t r0, int64_t r1) {
  RunTiled<4, Avx512VnniInt8Row>(p, r0, r1);
}

#endif  // BITNET_TERNARY_X86

// The portable path (int8_gemm.h holds the Run* overloads RunRows dispatches to).
inline void RunScalarInt8Rows(const Int8Problem& p, int64_t r0, int64_t r1) {
  RunTiled<1, ScalarInt8Row>(p, r0, r1);
}

// |x| as u8 for the SIMD int8 paths (-128 -> 128).
inline void AbsBytes(const int8_t* x, int64_t n, uint8_t* out) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = static_cast<uint8_t>(x[k] < 0 ? -static_cast<int32_t>(x[k]) : x[k]);
  }
}

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_INT8_CPU_H_
