// Packed 2-bit ternary x int8 matmul: the row functions of every ISA path (isa.h).
//
// out[m, o] = sum_k x[m, k] * t[o, k], exact in int32, where
//   x:      int8  [M, I]      row-major, per-token absmax activations (bitlinear.py)
//   packed: uint8 [R, I]      R = O/4; bits 2j..2j+1 of packed[r, k] hold the code t+1 of
//                             weight row r + j*R at column k (Hugging Face pack_weights layout,
//                             bitnet-spec §1.3). Codes are 0, 1, 2 only: code 3 is invalid
//                             (every loader refuses it), and these kernels read it as t = +2.
//   out:    int32 [M, 4R]
//
// Because the packing runs along the OUTPUT axis, one packed byte gives four output rows at the
// same input column, so every plane j = 0..3 of a 32/64-byte packed chunk multiplies the SAME
// activation bytes. The SIMD paths extract the planes with ONE shift and four masks (planes 1
// and 3 stay in place, i.e. scaled by 4, and are shifted back after the reduction), feed u8
// codes x s8 activations to maddubs (AVX2) or vpdpbusd (VNNI), and subtract sum(x) per token at
// the end (codes are t+1).

#ifndef BITNET_JAX_KERNELS_CPU_TERNARY_PATHS_H_
#define BITNET_JAX_KERNELS_CPU_TERNARY_PATHS_H_

#include <algorithm>
#include <cstdint>

#include "isa.h"

namespace bitnet_ternary {

// One call's operands. Rows [r0, r1) of the packed weight are computed by one Run* call, so
// threads split the work along packed rows (each owns 4 disjoint output columns per row).
struct Problem {
  const int8_t* x;      // [M, I]
  const uint8_t* w;     // [R, I]
  int32_t* out;         // [M, 4R]
  const int32_t* xsum;  // [M], sum_k x[m, k]
  int64_t m, i, r;
};

// Plain dot of packed codes and activations over columns [k0, k1): s[j] += sum code_j * x.
// Used for the portable path and for the column tails of the SIMD paths. Partial sums stay in
// int16 for 64 columns (|sum| <= 64 * 3 * 128 = 24576), which lets compilers auto-vectorise
// with twice the lanes of int32 (3.5x faster than int32 sums on x86-64 baseline SSE2).
inline void CodeDotTail(const uint8_t* w, const int8_t* x, int64_t k0, int64_t k1,
                        int32_t s[4]) {
  constexpr int64_t kBlock = 64;
  for (int64_t kb = k0; kb < k1; kb += kBlock) {
    const int64_t ke = std::min(k1, kb + kBlock);
    int16_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t k = kb; k < ke; ++k) {
      // Kept byte-wide: 32-bit intermediates here halve the vectorised throughput.
      const uint8_t b = w[k];
      const int16_t xv = x[k];
      s0 += static_cast<int16_t>((b & 3) * xv);
      s1 += static_cast<int16_t>(((b >> 2) & 3) * xv);
      s2 += static_cast<int16_t>(((b >> 4) & 3) * xv);
      s3 += static_cast<int16_t>((b >> 6) * xv);
    }
    s[0] += s0;
    s[1] += s1;
    s[2] += s2;
    s[3] += s3;
  }
}

// Write the four outputs of packed row `row` for token `m` from code sums s (codes are t+1).
inline void StoreRow(const Problem& p, int64_t m, int64_t row, const int32_t s[4]) {
  int32_t* o = p.out + m * 4 * p.r + row;
  const int32_t xs = p.xsum[m];
  o[0] = s[0] - xs;
  o[p.r] = s[1] - xs;
  o[2 * p.r] = s[2] - xs;
  o[3 * p.r] = s[3] - xs;
}

// ---------------------------------------------------------------------------------------------
// Portable path: plain C++ the compiler auto-vectorises (ARM NEON, SSE2 baseline, ...).

template <int MB>
struct ScalarRow {
  static void Run(const Problem& p, int64_t m0, int64_t row, int64_t /*ahead*/) {
    const uint8_t* w = p.w + row * p.i;
    for (int64_t mm = 0; mm < MB; ++mm) {
      int32_t s[4] = {0, 0, 0, 0};
      CodeDotTail(w, p.x + (m0 + mm) * p.i, 0, p.i, s);
      StoreRow(p, m0 + mm, row, s);
    }
  }
};

inline void RunScalarRows(const Problem& p, int64_t r0, int64_t r1) {
  RunTiled<1, ScalarRow>(p, r0, r1);
}

#if BITNET_TERNARY_X86

BITNET_SIMD_WARNINGS_OFF

// Sum each of four int32x8 vectors: returns [sum a0, sum a1, sum a2, sum a3].
BITNET_AVX2 inline __m128i Sum4x8(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i h01 = _mm256_hadd_epi32(a0, a1);   // a0 a0 a1 a1 | a0 a0 a1 a1
  const __m256i h23 = _mm256_hadd_epi32(a2, a3);
  const __m256i h = _mm256_hadd_epi32(h01, h23);   // a0 a1 a2 a3 | a0 a1 a2 a3
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// The four 2-bit planes of 32 packed bytes as u8 codes: planes 0 and 2 in {0, 1, 2}, planes 1
// and 3 left in bits 2-3, i.e. in {0, 4, 8} (one shift instead of three; undone by FixScaled).
BITNET_AVX2 inline void Planes32(const uint8_t* w, __m256i pl[4]) {
  const __m256i m03 = _mm256_set1_epi8(0x03);
  const __m256i m0c = _mm256_set1_epi8(0x0c);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  // A 16-bit shift is fine: the masks drop the bits that cross byte boundaries.
  const __m256i h = _mm256_srli_epi16(b, 4);
  pl[0] = _mm256_and_si256(b, m03);
  pl[1] = _mm256_and_si256(b, m0c);
  pl[2] = _mm256_and_si256(h, m03);
  pl[3] = _mm256_and_si256(h, m0c);
}

// Planes 1 and 3 were summed at 4x their value; every term is a multiple of 4, so the
// arithmetic shift is an exact division.
inline void FixScaled(int32_t s[4]) {
  s[1] >>= 2;
  s[3] >>= 2;
}

// The end of one packed row for one token on the 256-bit paths: reduce the four plane
// accumulators, undo the x4 planes, add the columns [kv, I) past the last full vector and store.
BITNET_AVX2 inline void FinishRow(const Problem& p, int64_t m, int64_t row, const uint8_t* w,
                                  const int8_t* x, int64_t kv, const __m256i acc[4]) {
  alignas(16) int32_t s[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(s), Sum4x8(acc[0], acc[1], acc[2], acc[3]));
  FixScaled(s);
  CodeDotTail(w, x, kv, p.i, s);
  StoreRow(p, m, row, s);
}

// AVX2: maddubs(u8 code, s8 x) gives pairs in [-2048, 2032] for the x4 planes, so int16 lanes
// can add 16 of them without overflowing; we add 16 (512 columns), then widen with madd(., 1).
template <int MB>
struct Avx2Row {
  BITNET_AVX2 static void Run(const Problem& p, int64_t m0, int64_t row, int64_t ahead) {
    constexpr int64_t kBlock = 16 * 32;
    const uint8_t* w = p.w + row * p.i;
    const int8_t* x = p.x + m0 * p.i;
    const int64_t kv = p.i & ~int64_t{31};
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MB][4];
    for (int mm = 0; mm < MB; ++mm)
      for (int j = 0; j < 4; ++j) acc[mm][j] = _mm256_setzero_si256();
    for (int64_t kb = 0; kb < kv; kb += kBlock) {
      const int64_t ke = std::min(kv, kb + kBlock);
      __m256i a16[MB][4];
      for (int mm = 0; mm < MB; ++mm)
        for (int j = 0; j < 4; ++j) a16[mm][j] = _mm256_setzero_si256();
      for (int64_t k = kb; k < ke; k += 32) {
        if ((k & 63) == 0) PrefetchAt(w, k, ahead * p.i);
        __m256i pl[4];
        Planes32(w + k, pl);
        for (int mm = 0; mm < MB; ++mm) {
          const __m256i xv =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + mm * p.i + k));
          for (int j = 0; j < 4; ++j)
            a16[mm][j] = _mm256_add_epi16(a16[mm][j], _mm256_maddubs_epi16(pl[j], xv));
        }
      }
      for (int mm = 0; mm < MB; ++mm)
        for (int j = 0; j < 4; ++j)
          acc[mm][j] = _mm256_add_epi32(acc[mm][j], _mm256_madd_epi16(a16[mm][j], ones));
    }
    for (int mm = 0; mm < MB; ++mm) FinishRow(p, m0 + mm, row, w, x + mm * p.i, kv, acc[mm]);
  }
};

BITNET_AVX2 inline void RunAvx2Rows(const Problem& p, int64_t r0, int64_t r1) {
  RunTiled<2, Avx2Row>(p, r0, r1);
}

#if BITNET_TERNARY_AVXVNNI
// AVX-VNNI (Alder Lake+, Zen 5): vpdpbusd adds u8 x s8 quads straight into int32 lanes.
template <int MB>
struct AvxVnniRow {
  BITNET_AVXVNNI static void Run(const Problem& p, int64_t m0, int64_t row, int64_t ahead) {
    const uint8_t* w = p.w + row * p.i;
    const int8_t* x = p.x + m0 * p.i;
    const int64_t kv = p.i & ~int64_t{31};
    __m256i acc[MB][4];
    for (int mm = 0; mm < MB; ++mm)
      for (int j = 0; j < 4; ++j) acc[mm][j] = _mm256_setzero_si256();
    for (int64_t k = 0; k < kv; k += 32) {
      if ((k & 63) == 0) PrefetchAt(w, k, ahead * p.i);
      __m256i pl[4];
      Planes32(w + k, pl);
      for (int mm = 0; mm < MB; ++mm) {
        const __m256i xv =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + mm * p.i + k));
        for (int j = 0; j < 4; ++j) acc[mm][j] = _mm256_dpbusd_avx_epi32(acc[mm][j], pl[j], xv);
      }
    }
    for (int mm = 0; mm < MB; ++mm) FinishRow(p, m0 + mm, row, w, x + mm * p.i, kv, acc[mm]);
  }
};

BITNET_AVXVNNI inline void RunAvxVnniRows(const Problem& p, int64_t r0, int64_t r1) {
  RunTiled<2, AvxVnniRow>(p, r0, r1);
}
#endif  // BITNET_TERNARY_AVXVNNI

// AVX-512 VNNI (Ice Lake+, Zen 4+): 64-byte chunks; the column tail uses masked loads, whose
// zero bytes are code 0 (weights) and 0 (activations), so no scalar tail is needed.
BITNET_AVX512 inline void Planes64(__m512i b, __m512i pl[4]) {  // as Planes32
  const __m512i m03 = _mm512_set1_epi8(0x03);
  const __m512i m0c = _mm512_set1_epi8(0x0c);
  const __m512i h = _mm512_srli_epi16(b, 4);
  pl[0] = _mm512_and_si512(b, m03);
  pl[1] = _mm512_and_si512(b, m0c);
  pl[2] = _mm512_and_si512(h, m03);
  pl[3] = _mm512_and_si512(h, m0c);
}

BITNET_AVX512 inline __m256i Fold512(__m512i a) {
  return _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
}

template <int MB>
// (The AVX-512 path runs this row kernel only for M = 1 and the GEMM's last r % 4 rows, so it
// keeps the in-row prefetch alone: the next-tile variant made its loop ~2% slower at M = 1.)
struct Avx512VnniRow {
  BITNET_AVX512 static void Run(const Problem& p, int64_t m0, int64_t row, int64_t /*ahead*/) {
    const uint8_t* w = p.w + row * p.i;
    const int8_t* x = p.x + m0 * p.i;
    const int64_t kv = p.i & ~int64_t{63};
    __m512i acc[MB][4];
    for (int mm = 0; mm < MB; ++mm)
      for (int j = 0; j < 4; ++j) acc[mm][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < kv; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);
      __m512i pl[4];
      Planes64(_mm512_loadu_si512(w + k), pl);
      for (int mm = 0; mm < MB; ++mm) {
        const __m512i xv = _mm512_loadu_si512(x + mm * p.i + k);
        for (int j = 0; j < 4; ++j) acc[mm][j] = _mm512_dpbusd_epi32(acc[mm][j], pl[j], xv);
      }
    }
    if (kv < p.i) {
      const __mmask64 mask = (~uint64_t{0}) >> (64 - (p.i - kv));
      __m512i pl[4];
      Planes64(_mm512_maskz_loadu_epi8(mask, w + kv), pl);
      for (int mm = 0; mm < MB; ++mm) {
        const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + mm * p.i + kv);
        for (int j = 0; j < 4; ++j) acc[mm][j] = _mm512_dpbusd_epi32(acc[mm][j], pl[j], xv);
      }
    }
    for (int mm = 0; mm < MB; ++mm) {
      const __m256i a0 = Fold512(acc[mm][0]), a1 = Fold512(acc[mm][1]);
      const __m256i a2 = Fold512(acc[mm][2]), a3 = Fold512(acc[mm][3]);
      const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
      alignas(16) int32_t s[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(s),
                      _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
      FixScaled(s);
      StoreRow(p, m0 + mm, row, s);
    }
  }
};

BITNET_AVX512 inline void RunAvx512VnniRows(const Problem& p, int64_t r0, int64_t r1) {
  RunTiled<4, Avx512VnniRow>(p, r0, r1);
}

BITNET_SIMD_WARNINGS_ON

#endif  // BITNET_TERNARY_X86

// Per-token activation sums, subtracted at the end because the codes are t+1.
inline void RowSums(const int8_t* x, int64_t m, int64_t i, int32_t* xsum) {
  for (int64_t mm = 0; mm < m; ++mm) {
    int32_t s = 0;
    const int8_t* xr = x + mm * i;
    for (int64_t k = 0; k < i; ++k) s += xr[k];
    xsum[mm] = s;
  }
}

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_TERNARY_PATHS_H_
