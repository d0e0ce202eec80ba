// Packed ternary x int8 GEMM for several tokens (M >= 2), and the choice between it and the
// row kernels of ternary_paths.h (the GEMV) by M, per ISA path: the Run* overloads for Problem
// that RunRows (isa.h) dispatches to.
//
// Why a second kernel: the row kernels reduce each output's 16 (AVX-512) int32 lanes
// horizontally at the end of every row and token, and keep one packed row's four planes for a
// block of tokens. Here a block is FOUR packed rows p..p+3 (16 outputs: rows p+d+jR, d, j in
// 0..3) by up to 4 tokens, and every vpdpbusd serves one packed row and one token:
//
//   W = 16 bytes of packed row d (columns k..k+15) broadcast to the four 128-bit lanes
//   plane mask: lane j keeps bits 2j..2j+1 of every byte (0x03, 0x0c, 0x30, 0xc0), i.e. plane j
//       scaled by 4^j (codes up to 3 * 64 = 192 still fit vpdpbusd's unsigned bytes)
//   X = x[t][k..k+15] broadcast to the four 128-bit lanes (vbroadcasti32x4, a load)
//   acc[d][t] += vpdpbusd(W & mask, X): dword c of lane j sums plane j x x over columns 4c..4c+3
//
// (activations broadcast to the weights' lanes as in oneDNN's VNNI micro-kernels, but 16 bytes
// per 128-bit lane, so that the 4 planes of a packed byte land in 4 lanes), so one AND per
// packed row and 16 columns is shared by the block's tokens and the loop has no shuffle at all:
// 1 + 1/4 vector instructions per vpdpbusd with 4 tokens, where the previous kernel (4 rows
// transposed in registers as in oneDNN's VNNI "4i" layout, x broadcast per lane with vpshufd;
// commit a182219) needed 8 unpacks + 4 shifts/masks per 64 columns plus 4 vpshufd
// per token, ~1.8 per vpdpbusd at 3 tokens. After all columns a 4x4 transpose-add folds the four
// dwords of each lane of the four rows into lane j = outputs p..p+3 of plane j, an arithmetic
// shift by 2j undoes the scale, and one 128-bit store writes 4 outputs. Exactness: |4^j * sum|
// <= 64 * 3 * 128 * I fits int32 for I <= 65536 (larger I takes the row kernel).
//
// Measured on the Zen 5 (one thread, thread CPU time, the large shape's q/k/v, o, gate/up, down,
// best of rounds interleaved with the previous kernel in one process, benchmarks/README.md):
// M = 8 1.14x from L2 (349 -> 399 GMAC/s) and 1.20x cold (24 layers, 319 -> 382 GMAC/s);
// 1.0-1.22x at M = 2..128 (M = 1 keeps the GEMV).

#ifndef BITNET_JAX_KERNELS_CPU_TERNARY_GEMM_H_
#define BITNET_JAX_KERNELS_CPU_TERNARY_GEMM_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "isa.h"
#include "ternary_avxvnni_asm.h"
#include "ternary_gemm_asm.h"
#include "ternary_paths.h"

namespace bitnet_ternary {

// Smallest M that runs the GEMM on the AVX-512 VNNI path (M = 1 keeps the GEMV).
constexpr int64_t kGemmMinM512 = 2;

#if BITNET_TERNARY_X86

BITNET_SIMD_WARNINGS_OFF

// 16 columns of packed rows w, w + i, w + 2i, w + 3i (bytes wk..wk+15) against x[t][xk..xk+15]
// for the MB tokens of the block (rows of x i bytes apart): see the top of the file.
template <int MB>
BITNET_AVX512 inline void Bcast16(const uint8_t* w, const int8_t* x, int64_t i, int64_t k,
                                  const __m512i plane_mask, __m512i acc[4][MB]) {
  __m512i xb[MB];
  for (int t = 0; t < MB; ++t) {
    xb[t] = _mm512_broadcast_i32x4(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + t * i + k)));
  }
  for (int d = 0; d < 4; ++d) {
    const __m512i pl = _mm512_and_si512(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + d * i + k))),
        plane_mask);
    for (int t = 0; t < MB; ++t) acc[d][t] = _mm512_dpbusd_epi32(acc[d][t], pl, xb[t]);
  }
}

// Packed rows row..row+3 for tokens m0..m0+MB-1 (the RowFn of RunTokens with step 4).
template <int MB>
struct Avx512Gemm4 {
  BITNET_AVX512 static void Run(const Problem& p, int64_t m0, int64_t row, int64_t ahead) {
    const int64_t i = p.i;
    const uint8_t* w = p.w + row * i;
    const int8_t* x = p.x + m0 * i;
    const int64_t k64 = i & ~int64_t{63}, k16 = i & ~int64_t{15}, ahead_bytes = ahead * i;
    const int32_t m0c = 0x03030303, m30 = 0x30303030, mc0 = static_cast<int32_t>(0xc0c0c0c0u);
    const __m512i plane_mask = _mm512_set_epi32(mc0, mc0, mc0, mc0, m30, m30, m30, m30,
                                                m0c << 2, m0c << 2, m0c << 2, m0c << 2,
                                                m0c, m0c, m0c, m0c);
    __m512i acc[4][MB];
    for (int d = 0; d < 4; ++d)
      for (int t = 0; t < MB; ++t) acc[d][t] = _mm512_setzero_si512();
    for (int64_t k = 0; k < k64; k += 64) {
      if (ahead_bytes) {  // the next tile's same four rows, to L2 (isa.h RunTokens)
        const char* f = reinterpret_cast<const char*>(w + k) + ahead_bytes;
        _mm_prefetch(f, _MM_HINT_T1);
        _mm_prefetch(f + i, _MM_HINT_T1);
        _mm_prefetch(f + 2 * i, _MM_HINT_T1);
        _mm_prefetch(f + 3 * i, _MM_HINT_T1);
      }
      // Written out: as a loop GCC 12 keeps acc[][] in memory (0.85x).
      Bcast16<MB>(w, x, i, k, plane_mask, acc);
      Bcast16<MB>(w, x, i, k + 16, plane_mask, acc);
      Bcast16<MB>(w, x, i, k + 32, plane_mask, acc);
      Bcast16<MB>(w, x, i, k + 48, plane_mask, acc);
    }
    for (int64_t k = k64; k < k16; k += 16) Bcast16<MB>(w, x, i, k, plane_mask, acc);
    if (k16 < i) {  // the last i % 16 columns from zero-padded copies (zero codes add nothing)
      alignas(16) uint8_t wt[4][16] = {};
      alignas(16) int8_t xt[MB][16] = {};
      for (int64_t c = k16; c < i; ++c) {
        for (int d = 0; d < 4; ++d) wt[d][c - k16] = w[d * i + c];
        for (int t = 0; t < MB; ++t) xt[t][c - k16] = x[t * i + c];
      }
      Bcast16<MB>(&wt[0][0], &xt[0][0], 16, 0, plane_mask, acc);
    }
    for (int t = 0; t < MB; ++t) {
      // Sum the four dwords of every lane of rows 0..3: lane j of s = (S0j, S1j, S2j, S3j).
      const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[0][t], acc[1][t]),
                                           _mm512_unpackhi_epi32(acc[0][t], acc[1][t]));
      const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[2][t], acc[3][t]),
                                           _mm512_unpackhi_epi32(acc[2][t], acc[3][t]));
      const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23),
                                         _mm512_unpackhi_epi64(s01, s23));
      const __m128i xs = _mm_set1_epi32(p.xsum[m0 + t]);
      const __m128i lane[4] = {_mm512_castsi512_si128(s), _mm512_extracti32x4_epi32(s, 1),
                               _mm512_extracti32x4_epi32(s, 2), _mm512_extracti32x4_epi32(s, 3)};
      int32_t* o = p.out + (m0 + t) * 4 * p.r + row;
      for (int j = 0; j < 4; ++j) {  // undo the 4^j scale of plane j
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j * p.r),
                         _mm_sub_epi32(_mm_srai_epi32(lane[j], 2 * j), xs));
      }
    }
  }
};

// AVX2 GEMM block: one packed row by MB tokens. 16 bytes of the row are broadcast to both
// 128-bit lanes (as in the AVX-512 block above), lane 0 masked to plane 0 (0x03) and lane 1 to
// plane 1 (0x0c, x4), and the same after one shift by 4 for planes 2 and 3; x[t][k..k+15] is
// broadcast too. So a token needs TWO int16 accumulators for the four outputs of the row (the
// row kernel needs four), and 4 tokens fit in registers: 8 int16 accumulators + 2 planes + x +
// mask. Per 16 columns and token: 2 maddubs + 2 adds, as the row kernel, but the shift and
// masks (3 ops per 16 columns) are shared by 4 tokens instead of 2. Same int16 bounds as
// Avx2Row (planes 1 and 3 x4, 16 maddubs per int16 lane, then widened with madd(., 1)).
// Measured (Zen 5 via set_isa, one thread, thread CPU time, the large shape's linears, best of
// 15 rounds interleaved with RunAvx2Rows in one process, 2026-12-02, load 0.8): 24 layers cold
// M = 4 / 5 / 8 / 16 1.02 / 1.04 / 1.05 / 1.05x, 4 layers M = 64 / 128 1.04 / 1.03x, one layer
// 1.03 / 1.05 / 1.04 / 1.03x (M = 1..3, the same code: 0.99-1.04, the noise floor). Both kernels
// run at ~150 GMAC/s even from L1, i.e. core-bound; per 32 MACs they issue 2.63 (Avx2Row<2>)
// and 2.38 (this, 4 tokens) vector ops against a floor of 2 (maddubs + its add), so no token
// blocking can give more than ~1.2x. As a loop over a Step16 helper GCC 12 kept a16[][] in
// memory (0.80-0.87x), hence written inline. Native builds run the 4-token block as the asm of
// ternary_gemm_asm.h instead (Avx2GemmBlock below: unscaled planes; 1.2-1.3x on Zen 3); the
// SIMDe builds of the emulated tests run this.
template <int MB>
struct Avx2Gemm {
  BITNET_AVX2 static void Run(const Problem& p, int64_t m0, int64_t row, int64_t ahead) {
    const int64_t i = p.i, k16 = i & ~int64_t{15};
    const uint8_t* w = p.w + row * i;
    const int8_t* x = p.x + m0 * i;
    const __m256i mask = _mm256_setr_m128i(_mm_set1_epi8(0x03), _mm_set1_epi8(0x0c));
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MB][2];
    for (int t = 0; t < MB; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
    for (int64_t kb = 0; kb < k16; kb += 16 * 16) {
      const int64_t ke = std::min(k16, kb + 16 * 16);
      __m256i a16[MB][2];
      for (int t = 0; t < MB; ++t) a16[t][0] = a16[t][1] = _mm256_setzero_si256();
      for (int64_t k = kb; k < ke; k += 16) {
        if ((k & 63) == 0) PrefetchAt(w, k, ahead * i);
        const __m256i b = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
        const __m256i p01 = _mm256_and_si256(b, mask);
        const __m256i p23 = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
        for (int t = 0; t < MB; ++t) {
          const __m256i xv = _mm256_broadcastsi128_si256(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + t * i + k)));
          a16[t][0] = _mm256_add_epi16(a16[t][0], _mm256_maddubs_epi16(p01, xv));
          a16[t][1] = _mm256_add_epi16(a16[t][1], _mm256_maddubs_epi16(p23, xv));
        }
      }
      for (int t = 0; t < MB; ++t) {
        acc[t][0] = _mm256_add_epi32(acc[t][0], _mm256_madd_epi16(a16[t][0], ones));
        acc[t][1] = _mm256_add_epi32(acc[t][1], _mm256_madd_epi16(a16[t][1], ones));
      }
    }
    for (int t = 0; t < MB; ++t) {
      // lane 0 of h: (S0, S2, S0, S2), lane 1: (S1, S3, S1, S3)
      const __m256i h01 = _mm256_hadd_epi32(acc[t][0], acc[t][1]);
      alignas(32) int32_t h[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(h), _mm256_hadd_epi32(h01, h01));
      int32_t s[4] = {h[0], h[4], h[1], h[5]};
      FixScaled(s);
      CodeDotTail(w, x + t * i, k16, i, s);
      StoreRow(p, m0 + t, row, s);
    }
  }
};

// The AVX2 GEMM's token block: native builds run 4 tokens as the asm of ternary_gemm_asm.h,
// the SIMDe builds (and any other block size) the intrinsics above.
template <int MB>
struct Avx2GemmBlock {
  BITNET_AVX2 static void Run(const Problem& p, int64_t m0, int64_t row, int64_t ahead) {
#if BITNET_TERNARY_ASM
    if constexpr (MB == 4) return Avx2Gemm4Asm(p, m0, row, ahead);
#endif
    Avx2Gemm<MB>::Run(p, m0, row, ahead);
  }
};

#if BITNET_TERNARY_ASM
// Four packed rows by MB tokens (RunTokens step 4): the asm block for 4 tokens, else per row
// (RunAvx2Gemm only hands it whole blocks of 4 tokens).
template <int MB>
struct Avx2Gemm4x4 {
  BITNET_AVX2 static void Run(const Problem& p, int64_t m0, int64_t row, int64_t ahead) {
    if constexpr (MB == 4) {
      Avx2Gemm4x4Asm(p, m0, row, ahead);
    } else {
      for (int64_t d = 0; d < 4; ++d) Avx2Gemm<MB>::Run(p, m0, row + d, ahead);
    }
  }
};
// Four rows of an unpacked tile by 4 tokens (RunGemmUnpacked hands it only whole blocks of
// 4; other block sizes run Avx2Gemm4x4 on the packed rows).
template <int MB>
struct Avx2Gemm4x4U {
  BITNET_AVX2 static void Run(const UnpackedProblem& p, int64_t m0, int64_t row, int64_t) {
    if constexpr (MB == 4) {
      Gemm4x4UAsm<8, Avx2Gemm4RowU>(p, m0, row);
    } else {
      Avx2Gemm4x4<MB>::Run(p, m0, row, 0);
    }
  }
};
#if BITNET_TERNARY_AVXVNNI
// The same on the avxvnni path, 6 tokens (ternary_avxvnni_asm.h); other block sizes per row.
template <int MB>
struct AvxVnniGemm6x4U {
  BITNET_AVXVNNI static void Run(const UnpackedProblem& p, int64_t m0, int64_t row, int64_t) {
    if constexpr (MB == 6) {
      Gemm4x4UAsm<12, AvxVnniGemm6RowU>(p, m0, row);
    } else {
      for (int64_t d = 0; d < 4; ++d) AvxVnniRow<MB>::Run(p, m0, row + d, 0);
    }
  }
};
// Four packed rows by 6 tokens on the avxvnni path; other block sizes per row (never handed
// here: RunAvxVnniGemm gives it whole blocks of 6).
template <int MB>
struct AvxVnniGemm6x4 {
  BITNET_AVXVNNI static void Run(const Problem& p, int64_t m0, int64_t row, int64_t ahead) {
    if constexpr (MB == 6) {
      AvxVnniGemm6x4Asm(p, m0, row, ahead);
    } else {
      for (int64_t d = 0; d < 4; ++d) AvxVnniRow<MB>::Run(p, m0, row + d, 0);
    }
  }
};
#endif
#endif

BITNET_SIMD_WARNINGS_ON

// Columns up to which the plane-scaled sums stay exact (see the top of the file).
constexpr int64_t kGemmMaxI512 = 65536;

// Rows [r0, r1): whole 4-row blocks tile by tile through the GEMM (isa.h RunTokens, with the
// next-tile prefetch, which runs on past r1 up to the problem's last whole block: a worker's next
// chunk usually starts there, ffi_runtime.h), the last r % 4 rows through the row kernel. Tokens go
// in blocks of 4, except that a lone last token joins the block before it (5: 20 accumulators; a
// 1-token block does 2 vector instructions per vpdpbusd). Measured against the previous
// kernel's 3 + 3 + 2: 4-token blocks 1.04-1.24x at every M from 2 to 64; all-5 blocks 0.95x /
// 0.91x of all-4 at M = 8 / 16, but 1.08x at M = 5.
BITNET_AVX512 inline void RunAvx512VnniGemm(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t r4 = r0 + ((r1 - r0) & ~int64_t{3});
  const int64_t tile = TileRows(p.i, 4);
  const int64_t m4 = p.m % 4 == 1 && p.m > 1 ? p.m - 5 : p.m;  // tokens [m4, m) as one 5-block
  const int64_t lim = p.r & ~int64_t{3};
  for (int64_t t0 = r0; t0 < r4; t0 += tile) {
    const int64_t t1 = std::min(r4, t0 + tile);
    RunTokens<4, Avx512Gemm4>(p, 0, m4, t0, t1, 4, tile, lim);
    if (m4 < p.m) RunTokens<5, Avx512Gemm4>(p, m4, p.m, t0, t1, 4, m4 == 0 ? tile : 0, lim);
  }
  if (r4 < r1) RunAvx512VnniRows(p, r4, r1);
}

#endif  // BITNET_TERNARY_X86

// ---------------------------------------------------------------------------------------------
// The Run* overloads RunRows dispatches to for Problem: GEMV or GEMM by M, per path.

inline void RunScalar(const Problem& p, int64_t r0, int64_t r1) { RunScalarRows(p, r0, r1); }

#if BITNET_TERNARY_X86
// M >= kGemmMinMAvx2 on AVX2: 4-token blocks of Avx2GemmBlock, tile by tile with the next-tile
// prefetch (isa.h; past r1 as on AVX-512), the last m % 4 tokens through Avx2Row (2 + 1:
// Avx2Gemm<1..3> measured 0.6-0.96x of them).
constexpr int64_t kGemmMinMAvx2 = 4;
// Rows [r0, r1) (a multiple of kStep of them) tile by tile: MB-token blocks of Block (kStep
// rows per call), the last m % MB tokens through the row kernel Rest (AVX2 and AVX-VNNI paths).
template <int MB, template <int> class Block, int64_t kStep, template <int> class Rest>
BITNET_AVX2 inline void RunGemmTiles(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t mb = p.m - p.m % MB, tile = TileRows(p.i, kStep);
  for (int64_t t0 = r0; t0 < r1; t0 += tile) {
    const int64_t t1 = std::min(r1, t0 + tile);
    RunTokens<MB, Block>(p, 0, mb, t0, t1, kStep, tile, p.r - p.r % kStep);
    if (mb < p.m) RunTokens<2, Rest>(p, mb, p.m, t0, t1, 1, mb == 0 ? tile : 0, p.r);
  }
}
#if BITNET_TERNARY_ASM
// Smallest M whose 4-row blocks run on tiles unpacked once (ternary_gemm_asm.h). Measured on the
// Xeon's AVX2 path (bench_bitlinear.py --isa avx2 --cold, two threads, alternating builds,
// 2026-12-04): M = 16 0.85-0.95x, 32 0.9-1.05x, 64 1.0-1.13x, 128 1.04-1.18x, 512 1.03-1.16x
// (the large and 2B4T shapes); tiles of 4 or 8 KB of packed bytes (unpacked within L1) instead
// of isa.h's 16 KB were no better.
constexpr int64_t kGemmUnpackMinMAvx2 = 64;
// The avxvnni path's 6-token blocks (ternary_avxvnni_asm.h), same kind of runs: on packed rows
// from 6 tokens, against the 2-token row kernel (AvxVnniRow): M = 6 1.25x, 8 1.2x, 12 1.25x,
// 16 1.15-1.2x; on unpacked tiles from 48, against the packed blocks: M = 24-32 0.9-0.95x, 48
// 1.0x, 64 1.0-1.05x, 128 1.05-1.1x (and 1.15-1.35x over the row kernel).
constexpr int64_t kGemmMinMAvxVnni = 6;
constexpr int64_t kGemmUnpackMinMAvxVnni = 48;
// Rows [r0, r1) (a multiple of 4 of them) tile by tile: the tile's planes unpacked once (with
// the next tile's bytes prefetched to L2 meanwhile), then MB-token blocks of Block over them,
// the last m % MB tokens through the row kernel Rest.
template <int MB, template <int> class Block, template <int> class Rest>
inline void RunGemmUnpacked(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t k16 = p.i & ~int64_t{15}, mb = p.m - p.m % MB, lim = p.r & ~int64_t{3};
  const int64_t tile = TileRows(p.i, 4);
  std::vector<uint8_t> unpacked(std::max<int64_t>(tile * 4 * k16, 1));  // freed on return
  UnpackedProblem q;
  static_cast<Problem&>(q) = p;
  q.wu = unpacked.data();
  for (int64_t t0 = r0; t0 < r1; t0 += tile) {
    const int64_t t1 = std::min(r1, t0 + tile);
    Avx2UnpackTile(p.w + t0 * p.i, p.i, t1 - t0, k16, t1 < lim ? tile * p.i : 0, unpacked.data());
    q.row0 = t0;
    RunTokens<MB, Block>(q, 0, mb, t0, t1, 4, 0, lim);
    if (mb < p.m) RunTokens<2, Rest>(p, mb, p.m, t0, t1, 1, 0, p.r);
  }
}
// The whole 4-row blocks of rows [r0, r1) by MB-token blocks: on tiles unpacked once from
// unpack_min tokens (BlockU), else on packed rows tile by tile (Block); returns where they end.
template <int MB, template <int> class BlockU, template <int> class Block,
          template <int> class Rest>
BITNET_AVX2 inline int64_t RunGemm4Rows(const Problem& p, int64_t r0, int64_t r1,
                                         int64_t unpack_min) {
  const int64_t r4 = r0 + ((r1 - r0) & ~int64_t{3});
  if (p.m >= unpack_min) {
    RunGemmUnpacked<MB, BlockU, Rest>(p, r0, r4);
  } else {
    RunGemmTiles<MB, Block, 4, Rest>(p, r0, r4);
  }
  return r4;
}
#endif
BITNET_AVX2 inline void RunAvx2Gemm(const Problem& p, int64_t r0, int64_t r1) {
#if BITNET_TERNARY_ASM
  // Native builds: whole 4-row blocks (Avx2Gemm4x4: one reduction per 4 rows), as on AVX-512,
  // on unpacked tiles from kGemmUnpackMinMAvx2 tokens; the last (r1 - r0) % 4 rows one at a
  // time.
  r0 = RunGemm4Rows<4, Avx2Gemm4x4U, Avx2Gemm4x4, Avx2Row>(p, r0, r1, kGemmUnpackMinMAvx2);
#endif
  RunGemmTiles<4, Avx2GemmBlock, 1, Avx2Row>(p, r0, r1);
}
BITNET_AVX2 inline void RunAvx2(const Problem& p, int64_t r0, int64_t r1) {
  if (p.m >= kGemmMinMAvx2) {
    RunAvx2Gemm(p, r0, r1);
  } else {
    RunAvx2Rows(p, r0, r1);
  }
}
#if BITNET_TERNARY_AVXVNNI
// Native builds: whole 4-row blocks of 6-token blocks from kGemmMinMAvxVnni tokens, on
// unpacked tiles from kGemmUnpackMinMAvxVnni, tile by tile with the next-tile prefetch; the
// rest (fewer tokens, the last m % 6 tokens and (r1 - r0) % 4 rows) through the row kernel.
BITNET_AVXVNNI inline void RunAvxVnni(const Problem& p, int64_t r0, int64_t r1) {
#if BITNET_TERNARY_ASM
  if (p.m >= kGemmMinMAvxVnni) {
    r0 = RunGemm4Rows<6, AvxVnniGemm6x4U, AvxVnniGemm6x4, AvxVnniRow>(p, r0, r1,
                                                                     kGemmUnpackMinMAvxVnni);
  }
#endif
  RunAvxVnniRows(p, r0, r1);
}
#endif
BITNET_AVX512 inline void RunAvx512Vnni(const Problem& p, int64_t r0, int64_t r1) {
  if (p.m >= kGemmMinM512 && p.i <= kGemmMaxI512) {
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
