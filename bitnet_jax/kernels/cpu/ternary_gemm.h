// Packed ternary x int8 GEMM for several tokens (M >= 2), and the choice between it and the
// row kernels of ternary_paths.h (the GEMV) by M, per ISA path: the Run* overloads for Problem
// that RunRows (isa.h) dispatches to.
//
// Why a second kernel: the row kernels reduce each output's 16 (AVX-512) int32 lanes
// horizontally at the end of every row and token, and keep one packed row's four planes for a
// block of tokens. Here one block is FOUR packed rows p..p+3 (16 outputs: rows p+d+jR, d, j in
// 0..3) transposed in registers so that every 32-bit lane belongs to one output row, the layout
// of int8 GEMM micro-kernels (oneDNN's VNNI "4i" weight layout, llama.cpp's repacked q4_0x8):
//
//   packed rows p..p+3, columns k..k+63 (4 zmm loads; dword c*4+q of row d = columns 16c+4q..+3)
//   4x4 dword transpose inside each 128-bit lane (8 unpacks) -> Z_q, q = 0..3:
//       lane c, dword d of Z_q = row p+d, columns 16c+4q..16c+4q+3
//   planes of Z_q (one shift, four masks; planes 1 and 3 stay x4 as in ternary_paths.h)
//   x: vpshufd broadcasts dword q of each 128-bit lane of x[k..k+63] -> X_q
//   acc[t][j] += vpdpbusd(plane_j(Z_q), X_q)      t: token of the block, j: plane
//
// so after all columns, lane (c, d) of acc[t][j] holds the sum over the columns 16c..16c+15 of
// each 64 of output row p+d+jR for token t: three adds fold the four 128-bit lanes into the
// four outputs, stored as one 128-bit vector (no horizontal sums, no scalar stores). A block of
// 3 tokens (12 accumulators, 4 planes, 3 x, 4 Z in zmm registers) shares each transpose and
// plane extraction. Measured on Zen 5 (benchmarks/README.md, CPU GEMM): 1.1-1.3x the row
// kernel from L2, and 1.5-2.5x from DRAM together with the next-tile prefetch of isa.h.

#ifndef BITNET_JAX_KERNELS_CPU_TERNARY_GEMM_H_
#define BITNET_JAX_KERNELS_CPU_TERNARY_GEMM_H_

#include <algorithm>
#include <cstdint>

#include "isa.h"
#include "ternary_paths.h"

namespace bitnet_ternary {

// Smallest M that runs the GEMM on the AVX-512 VNNI path (M = 1 keeps the GEMV).
constexpr int64_t kGemmMinM512 = 2;

#if BITNET_TERNARY_X86

BITNET_SIMD_WARNINGS_OFF

// One 64-column step of a 4-row block for MB tokens: `mask` selects the valid columns of the
// last step (zero bytes are code 0 against x = 0, so they add nothing).
template <int MB>
BITNET_AVX512 inline void Gemm4Step(const Problem& p, const uint8_t* w, const int8_t* x,
                                    int64_t k, __mmask64 mask, int64_t ahead_bytes,
                                    __m512i acc[MB][4]) {
  const int64_t i = p.i;
  const __m512i a0 = _mm512_maskz_loadu_epi8(mask, w + k);
  const __m512i a1 = _mm512_maskz_loadu_epi8(mask, w + i + k);
  const __m512i a2 = _mm512_maskz_loadu_epi8(mask, w + 2 * i + k);
  const __m512i a3 = _mm512_maskz_loadu_epi8(mask, w + 3 * i + k);
  if (ahead_bytes) {  // the next tile's same four rows, to L2 (isa.h RunTokens)
    const char* f = reinterpret_cast<const char*>(w + k) + ahead_bytes;
    _mm_prefetch(f, _MM_HINT_T1);
    _mm_prefetch(f + i, _MM_HINT_T1);
    _mm_prefetch(f + 2 * i, _MM_HINT_T1);
    _mm_prefetch(f + 3 * i, _MM_HINT_T1);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(a0, a1), t1 = _mm512_unpackhi_epi32(a0, a1);
  const __m512i t2 = _mm512_unpacklo_epi32(a2, a3), t3 = _mm512_unpackhi_epi32(a2, a3);
  const __m512i z[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                        _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
  __m512i xv[MB];
  for (int t = 0; t < MB; ++t) xv[t] = _mm512_maskz_loadu_epi8(mask, x + t * i + k);
  const __m512i m03 = _mm512_set1_epi8(0x03), m0c = _mm512_set1_epi8(0x0c);
  for (int q = 0; q < 4; ++q) {
    const __m512i h = _mm512_srli_epi16(z[q], 4);
    const __m512i pl0 = _mm512_and_si512(z[q], m03), pl1 = _mm512_and_si512(z[q], m0c);
    const __m512i pl2 = _mm512_and_si512(h, m03), pl3 = _mm512_and_si512(h, m0c);
    for (int t = 0; t < MB; ++t) {
      // _MM_PERM_ENUM q*0x55 = (q, q, q, q): dword q of every 128-bit lane.
      const __m512i xq = _mm512_shuffle_epi32(xv[t], static_cast<_MM_PERM_ENUM>(q * 0x55));
      acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], pl0, xq);
      acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], pl1, xq);
      acc[t][2] = _mm512_dpbusd_epi32(acc[t][2], pl2, xq);
      acc[t][3] = _mm512_dpbusd_epi32(acc[t][3], pl3, xq);
    }
  }
}

// Packed rows row..row+3 for tokens m0..m0+MB-1 (the RowFn of RunTiled with kStep = 4).
template <int MB>
struct Avx512Gemm4 {
  BITNET_AVX512 static void Run(const Problem& p, int64_t m0, int64_t row, int64_t ahead) {
    const uint8_t* w = p.w + row * p.i;
    const int8_t* x = p.x + m0 * p.i;
    const int64_t kv = p.i & ~int64_t{63}, ahead_bytes = ahead * p.i;
    __m512i acc[MB][4];
    for (int t = 0; t < MB; ++t)
      for (int j = 0; j < 4; ++j) acc[t][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < kv; k += 64) {
      Gemm4Step<MB>(p, w, x, k, ~__mmask64{0}, ahead_bytes, acc);
    }
    if (kv < p.i) {
      Gemm4Step<MB>(p, w, x, kv, (~uint64_t{0}) >> (64 - (p.i - kv)), ahead_bytes, acc);
    }
    for (int t = 0; t < MB; ++t) {
      const __m128i xs = _mm_set1_epi32(p.xsum[m0 + t]);
      int32_t* o = p.out + (m0 + t) * 4 * p.r + row;
      for (int j = 0; j < 4; ++j) {
        const __m256i f = _mm256_add_epi32(_mm512_castsi512_si256(acc[t][j]),
                                           _mm512_extracti64x4_epi64(acc[t][j], 1));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(f), _mm256_extracti128_si256(f, 1));
        if (j & 1) s = _mm_srai_epi32(s, 2);  // planes 1 and 3 were x4 (exact: see FixScaled)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j * p.r), _mm_sub_epi32(s, xs));
      }
    }
  }
};

BITNET_SIMD_WARNINGS_ON

// Tokens of one tile in blocks of 3 (12 accumulators: GCC 12 keeps 4-token blocks' 16 in
// registers only with spills and copies, ~10% slower per token), except that a last lone token
// joins the block before it (4) and 2 left over make a 2-block: 3-, 4- and 2-token blocks ran at
// about 410, 370 and 265 GMAC/s per Zen 5 core from L2, 1-token blocks at half that.
BITNET_AVX512 inline void Gemm4Tile(const Problem& p, int64_t t0, int64_t t1, int64_t ahead,
                                    int64_t lim) {
  int64_t m0 = 0;
  for (; p.m - m0 >= 3; m0 += 3) {
    if (p.m - m0 == 4) break;
    RunTokens<3, Avx512Gemm4>(p, m0, m0 + 3, t0, t1, 4, ahead, lim);
    ahead = 0;
  }
  if (p.m - m0 == 4) RunTokens<4, Avx512Gemm4>(p, m0, p.m, t0, t1, 4, ahead, lim);
  if (p.m - m0 < 3) RunTokens<2, Avx512Gemm4>(p, m0, p.m, t0, t1, 4, ahead, lim);
}

// Rows [r0, r1): whole 4-row blocks tile by tile through the GEMM (isa.h RunTiled, with the
// next-tile prefetch), the last r % 4 rows through the row kernel.
BITNET_AVX512 inline void RunAvx512VnniGemm(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t r4 = r0 + ((r1 - r0) & ~int64_t{3});
  const int64_t tile = TileRows(p.i, 4);
  for (int64_t t0 = r0; t0 < r4; t0 += tile) Gemm4Tile(p, t0, std::min(r4, t0 + tile), tile, r4);
  if (r4 < r1) RunAvx512VnniRows(p, r4, r1);
}

#endif  // BITNET_TERNARY_X86

// ---------------------------------------------------------------------------------------------
// The Run* overloads RunRows dispatches to for Problem: GEMV or GEMM by M, per path.

inline void RunScalar(const Problem& p, int64_t r0, int64_t r1) { RunScalarRows(p, r0, r1); }

#if BITNET_TERNARY_X86
BITNET_AVX2 inline void RunAvx2(const Problem& p, int64_t r0, int64_t r1) {
  RunAvx2Rows(p, r0, r1);
}
#if BITNET_TERNARY_AVXVNNI
BITNET_AVXVNNI inline void RunAvxVnni(const Problem& p, int64_t r0, int64_t r1) {
  RunAvxVnniRows(p, r0, r1);
}
#endif
BITNET_AVX512 inline void RunAvx512Vnni(const Problem& p, int64_t r0, int64_t r1) {
  if (p.m >= kGemmMinM512) {
    RunAvx512VnniGemm(p, r0, r1);
  } else if (p.m == 1) {
    RunGemv<Avx512VnniRow>(p, r0, r1);
  } else {
    RunAvx512VnniRows(p, r0, r1);
  }
}
#endif  // BITNET_TERNARY_X86

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_TERNARY_GEMM_H_
