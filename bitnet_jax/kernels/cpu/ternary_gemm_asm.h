// The AVX2 GEMM's 4-token block as inline assembly (native builds, BITNET_TERNARY_ASM): one
// packed row for 4 tokens in one asm statement, its int32 sums then reduced with vector hadds
// (a step of isa.h's RunTokens, as the intrinsics' block is), four rows at a time where the
// rows allow (Avx2Gemm4x4Asm, the end of this file). The SIMDe builds of the emulated
// tests keep the intrinsics of Avx2Gemm (ternary_gemm.h), the same arithmetic in another plane
// layout.
//
// Per 16 columns of a packed row (bytes k..k+15, each holding 4 planes = 4 output rows, 2 bits
// each): one broadcast of the 16 bytes to both 128-bit lanes, two vpsrlvd with per-lane counts
// (lanes: 0 / 2 and 4 / 6 bits) and two masks with 0x03 leave planes 0 / 1 in one register and
// 2 / 3 in the other, UNSCALED (codes 0..2); then per token one broadcast of x[t][k..k+15] and
// 2 maddubs + 2 adds into two int16 accumulators (4 tokens: 8 accumulators). The planes shared
// by 4 tokens cost 5 instructions (the intrinsics' plane 1 / 3 masks 0x0c keep the planes x4 at
// 4: a shift and two masks), but unscaled codes let the int16 sums run 64 maddubs (1024
// columns: |sum| <= 64 * 2 * 2 * 128 = 32768, the int16 minimum only when every x is -128)
// before vpmaddwd widens them into the row's int32 sums, against 16 (256 columns) with x4
// planes.
//
// Why asm for the whole row: GCC 12 kept the accumulators of the intrinsics (and of the
// previous asm column loop, which was called per 256 columns of one row) in memory between
// calls, zeroed them with `rep stos` per row, and scheduled the loop ~1.2x slower; per row of
// 1536 columns that was ~30% on top of the bare loop. Measured (Zen 3, AVX2 only, one thread,
// in-process alternation with the previous kernel, 41 rounds, median; benchmarks/README.md):
// weights hot in L1 M = 8 / 128 1.27-1.31x; the large shape's 24 layers from DRAM, M = 8,
// 1.17-1.29x.

#ifndef BITNET_JAX_KERNELS_CPU_TERNARY_GEMM_ASM_H_
#define BITNET_JAX_KERNELS_CPU_TERNARY_GEMM_ASM_H_

#include <cstdint>

#include "isa.h"
#include "ternary_paths.h"

namespace bitnet_ternary {

#if BITNET_TERNARY_X86 && BITNET_TERNARY_ASM

BITNET_SIMD_WARNINGS_OFF

// clang-format off
// Tokens 0..3 (x0..x3) over 16 columns at offset O against planes 0 / 1 in ymm0 and 2 / 3 in
// ymm1; ymm6..13 = tokens 0..3 x planes (0, 1) / (2, 3).
#define BITNET_G4_TOKENS(O)                                               \
  "vbroadcasti128 " O "(%[x0],%[k]), %%ymm4\n"                           \
  "vpmaddubsw %%ymm4, %%ymm0, %%ymm2\n vpaddw %%ymm2, %%ymm6, %%ymm6\n"   \
  "vpmaddubsw %%ymm4, %%ymm1, %%ymm3\n vpaddw %%ymm3, %%ymm7, %%ymm7\n"   \
  "vbroadcasti128 " O "(%[x1],%[k]), %%ymm4\n"                           \
  "vpmaddubsw %%ymm4, %%ymm0, %%ymm2\n vpaddw %%ymm2, %%ymm8, %%ymm8\n"   \
  "vpmaddubsw %%ymm4, %%ymm1, %%ymm3\n vpaddw %%ymm3, %%ymm9, %%ymm9\n"   \
  "vbroadcasti128 " O "(%[x2],%[k]), %%ymm4\n"                           \
  "vpmaddubsw %%ymm4, %%ymm0, %%ymm2\n vpaddw %%ymm2, %%ymm10, %%ymm10\n" \
  "vpmaddubsw %%ymm4, %%ymm1, %%ymm3\n vpaddw %%ymm3, %%ymm11, %%ymm11\n" \
  "vbroadcasti128 " O "(%[x3],%[k]), %%ymm4\n"                           \
  "vpmaddubsw %%ymm4, %%ymm0, %%ymm2\n vpaddw %%ymm2, %%ymm12, %%ymm12\n" \
  "vpmaddubsw %%ymm4, %%ymm1, %%ymm3\n vpaddw %%ymm3, %%ymm13, %%ymm13\n"
// 16 columns at offset O of the packed row w (see the top of the file).
#define BITNET_G4_STEP16(O)                                               \
  "vbroadcasti128 " O "(%[w],%[k]), %%ymm1\n"                            \
  "vpsrlvd %[sh01], %%ymm1, %%ymm0\n"                                    \
  "vpsrlvd %[sh23], %%ymm1, %%ymm1\n"                                    \
  "vpand %[mask], %%ymm0, %%ymm0\n"                                      \
  "vpand %[mask], %%ymm1, %%ymm1\n" BITNET_G4_TOKENS(O)
// 16 columns at offset O of the unpacked row wu (Avx2UnpackTile, below): the planes loaded.
#define BITNET_U4_STEP16(O)                                               \
  "vmovdqu 4*" O "(%[wu],%[k],4), %%ymm0\n"                              \
  "vmovdqu 4*" O "+32(%[wu],%[k],4), %%ymm1\n" BITNET_G4_TOKENS(O)
// Widen int16 accumulator ymmR into the row's int32 sums at byte OFF of acc.
#define BITNET_G4_FLUSH(R, OFF)                                   \
  "vpmaddwd %[ones], %%ymm" R ", %%ymm" R "\n"                   \
  "vpaddd " OFF "(%[acc]), %%ymm" R ", %%ymm" R "\n"             \
  "vmovdqa %%ymm" R ", " OFF "(%[acc])\n"
#define BITNET_G4_ZERO(R) "vpxor %%xmm" R ", %%xmm" R ", %%xmm" R "\n"
// A row: zero its 8 int32 sums; then blocks of up to 1024 columns: zero the int16
// accumulators, 64 columns per iteration (each starting with HEAD: a prefetch, or nothing) in
// STEP16 steps, the block's last k % 64 columns 16 at a time, widen. The operands the steps
// read besides the tokens follow as the macro's last arguments.
#define BITNET_G4_ROW(HEAD, STEP16, ...)                                                       \
  __asm__ volatile(                                                                            \
      "vpxor %%xmm2, %%xmm2, %%xmm2\n"                                                         \
      "vmovdqa %%ymm2, (%[acc])\n vmovdqa %%ymm2, 32(%[acc])\n vmovdqa %%ymm2, 64(%[acc])\n"   \
      "vmovdqa %%ymm2, 96(%[acc])\n vmovdqa %%ymm2, 128(%[acc])\n"                             \
      "vmovdqa %%ymm2, 160(%[acc])\n vmovdqa %%ymm2, 192(%[acc])\n"                            \
      "vmovdqa %%ymm2, 224(%[acc])\n"                                                          \
      "xor %[k], %[k]\n"                                                                       \
      "2:\n lea 1024(%[k]), %[kb]\n cmp %[k16], %[kb]\n cmovg %[k16], %[kb]\n"                 \
      "mov %[kb], %[k64]\n sub %[k], %[k64]\n and $-64, %[k64]\n add %[k], %[k64]\n"           \
      BITNET_G4_ZERO("6") BITNET_G4_ZERO("7") BITNET_G4_ZERO("8") BITNET_G4_ZERO("9")          \
      BITNET_G4_ZERO("10") BITNET_G4_ZERO("11") BITNET_G4_ZERO("12") BITNET_G4_ZERO("13")      \
      "cmp %[k64], %[k]\n jge 4f\n"                                                            \
      "1:\n" HEAD STEP16("0") STEP16("16") STEP16("32") STEP16("48")                           \
      "add $64, %[k]\n cmp %[k64], %[k]\n jl 1b\n"                                             \
      "4:\n cmp %[kb], %[k]\n jge 5f\n"                                                        \
      "3:\n" STEP16("0") "add $16, %[k]\n cmp %[kb], %[k]\n jl 3b\n"                          \
      "5:\n" BITNET_G4_FLUSH("6", "0") BITNET_G4_FLUSH("7", "32") BITNET_G4_FLUSH("8", "64")   \
      BITNET_G4_FLUSH("9", "96") BITNET_G4_FLUSH("10", "128") BITNET_G4_FLUSH("11", "160")     \
      BITNET_G4_FLUSH("12", "192") BITNET_G4_FLUSH("13", "224")                                \
      "cmp %[k16], %[k]\n jl 2b\n"                                                             \
      : [k] "=&r"(k), [kb] "=&r"(kb), [k64] "=&r"(k64)                                         \
      : [x0] "r"(x), [x1] "r"(x + i), [x2] "r"(x + 2 * i), [x3] "r"(x + 3 * i),                \
        [k16] "r"(k16), [acc] "r"(acc), [ones] "m"(ones), __VA_ARGS__                          \
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",       \
        "xmm11", "xmm12", "xmm13", "cc", "memory")
// The packed row's steps, with one prefetch of pf + k per 64 columns (pf = w + pfoff).
#define BITNET_G4_PACKED(PREFETCH)                                                             \
  BITNET_G4_ROW(PREFETCH " (%[pf],%[k])\n", BITNET_G4_STEP16, [w] "r"(w), [pf] "r"(w + pfoff), \
                [mask] "x"(mask), [sh01] "x"(sh01), [sh23] "x"(sh23))
// clang-format on

// Packed row w by the 4 tokens x, x + i, x + 2i, x + 3i over columns [0, k16), k16 >= 0 a
// multiple of 16: its 8 int32 sums to acc (token t: planes (0, 1) at 2t, (2, 3) at 2t + 1; lane
// j of a plane = 4 partial sums). Prefetch per 64 columns: pfoff bytes ahead of the row, to L2
// (l2: the next tile) or L1.
BITNET_AVX2 inline void Avx2Gemm4Row(const uint8_t* w, const int8_t* x, int64_t i, int64_t k16,
                                     int64_t pfoff, bool l2, __m256i acc[8]) {
  const __m256i mask = _mm256_set1_epi8(0x03), ones = _mm256_set1_epi16(1);
  const __m256i sh01 = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  const __m256i sh23 = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);
  int64_t k, kb, k64;
  if (l2) {
    BITNET_G4_PACKED("prefetcht1");
  } else {
    BITNET_G4_PACKED("prefetcht0");
  }
}
#undef BITNET_G4_PACKED
#undef BITNET_G4_STEP16

// Row `row`'s outputs for token m from its sums of planes 0 / 1 (a01) and 2 / 3 (a23), the
// columns past the last 16 added from the codes.
BITNET_AVX2 inline void Avx2FinishTail(const Problem& p, int64_t m, int64_t row, __m256i a01,
                                       __m256i a23) {
  const int64_t i = p.i, k16 = i & ~int64_t{15};
  // h = plane sums (0, 0, 2, 2 | 1, 1, 3, 3), q = (0, 2, 1, 3)
  const __m256i h = _mm256_hadd_epi32(a01, a23);
  const __m128i q = _mm_hadd_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  alignas(16) int32_t s[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(s), _mm_shuffle_epi32(q, 0xd8));
  CodeDotTail(p.w + row * i, p.x + m * i, k16, i, s);
  StoreRow(p, m, row, s);
}

// Row `row`'s outputs for tokens m0..m0+3 from its 8 int32 sums (Avx2Gemm4Row).
BITNET_AVX2 inline void Avx2Gemm4Finish(const Problem& p, int64_t m0, int64_t row,
                                        const __m256i acc[8]) {
  if (p.i % 16 != 0) {
    for (int t = 0; t < 4; ++t) Avx2FinishTail(p, m0 + t, row, acc[2 * t], acc[2 * t + 1]);
    return;
  }
  // Lane 0 of g01: (t0 p0, t0 p2, t1 p0, t1 p2), lane 1: (t0 p1, t0 p3, t1 p1, t1 p3); g23 the
  // same for tokens 2 and 3.
  const __m256i g01 =
      _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
  const __m256i g23 =
      _mm256_hadd_epi32(_mm256_hadd_epi32(acc[4], acc[5]), _mm256_hadd_epi32(acc[6], acc[7]));
  const int32_t* xs = p.xsum + m0;
  alignas(32) int32_t s[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(s),
                     _mm256_sub_epi32(g01, _mm256_setr_epi32(xs[0], xs[0], xs[1], xs[1], xs[0],
                                                             xs[0], xs[1], xs[1])));
  _mm256_store_si256(reinterpret_cast<__m256i*>(s + 8),
                     _mm256_sub_epi32(g23, _mm256_setr_epi32(xs[2], xs[2], xs[3], xs[3], xs[2],
                                                             xs[2], xs[3], xs[3])));
  const int64_t r = p.r;
  for (int h = 0; h < 2; ++h) {  // tokens 2h and 2h + 1
    int32_t* o0 = p.out + (m0 + 2 * h) * 4 * r + row;
    int32_t* o1 = o0 + 4 * r;
    const int32_t* q = s + 8 * h;
    o0[0] = q[0];
    o0[r] = q[4];
    o0[2 * r] = q[1];
    o0[3 * r] = q[5];
    o1[0] = q[2];
    o1[r] = q[6];
    o1[2 * r] = q[3];
    o1[3 * r] = q[7];
  }
}

// Packed row `row` for tokens m0..m0+3, a step of RunTokens (ternary_gemm.h, Avx2GemmBlock):
// with ahead > 0 it also prefetches the row `ahead` further on (the next tile) to L2, else
// within the row to L1, as the intrinsics do (isa.h PrefetchAt).
// Its 8 int32 sums (Avx2Gemm4Row over the whole 16-column part, zeros when there is none).
BITNET_AVX2 inline void Avx2Gemm4Sums(const Problem& p, int64_t m0, int64_t row, int64_t ahead,
                                      __m256i acc[8]) {
  const int64_t i = p.i;
  Avx2Gemm4Row(p.w + row * i, p.x + m0 * i, i, i & ~int64_t{15}, ahead ? ahead * i : kPrefetch,
               ahead != 0, acc);
}
BITNET_AVX2 inline void Avx2Gemm4Asm(const Problem& p, int64_t m0, int64_t row, int64_t ahead) {
  alignas(32) __m256i acc[8];
  Avx2Gemm4Sums(p, m0, row, ahead, acc);
  Avx2Gemm4Finish(p, m0, row, acc);
}

// Packed rows row..row+3 for tokens m0..m0+3, a step of RunTokens with step 4 (RunAvx2Gemm):
// the four rows' sums as in Avx2Gemm4Asm, then one reduction for the 4 rows x 4 tokens: per
// token three hadds leave plane 0 of rows row..row+3 in lane 0 and plane 1 in lane 1 (planes 2 / 3
// from the other accumulator), so each plane's four outputs are one 128-bit store instead of the
// per-row hadds, round trip through memory and 16 scalar stores of Avx2Gemm4Finish (that finish
// was ~10% of the GEMM's samples in a batch-8 profile; benchmarks/README.md).
// Avx2Gemm4x4Store: that reduction and the stores, from the four rows' sums acc[0..3], N2 each:
// two per token, for 4 tokens (6 in the blocks of ternary_avxvnni_asm.h).
template <int N2>
BITNET_AVX2 inline void Avx2Gemm4x4Store(const Problem& p, int64_t m0, int64_t row,
                                         const __m256i (&acc)[4][N2]) {
  constexpr int kTokens = N2 / 2;
  if (p.i % 16 != 0) {  // column tails: the per-row finish adds them from the codes
    for (int d = 0; d < 4; ++d) {
      for (int t = 0; t < kTokens; ++t) {
        Avx2FinishTail(p, m0 + t, row + d, acc[d][2 * t], acc[d][2 * t + 1]);
      }
    }
    return;
  }
  const int64_t r = p.r;
  for (int t = 0; t < kTokens; ++t) {
    const __m256i xs = _mm256_set1_epi32(p.xsum[m0 + t]);
    for (int h = 0; h < 2; ++h) {  // planes (0, 1), then (2, 3)
      const int a = 2 * t + h;
      const __m256i s = _mm256_sub_epi32(_mm256_hadd_epi32(_mm256_hadd_epi32(acc[0][a], acc[1][a]),
                                                           _mm256_hadd_epi32(acc[2][a], acc[3][a])),
                                         xs);
      int32_t* o = p.out + (m0 + t) * 4 * r + 2 * h * r + row;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm256_castsi256_si128(s));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + r), _mm256_extracti128_si256(s, 1));
    }
  }
}
// Avx2Gemm4x4Asm: the four rows' sums by Avx2Gemm4Sums, then Avx2Gemm4x4Store.
BITNET_AVX2 inline void Avx2Gemm4x4Asm(const Problem& p, int64_t m0, int64_t row, int64_t ahead) {
  alignas(32) __m256i acc[4][8];
  for (int d = 0; d < 4; ++d) Avx2Gemm4Sums(p, m0, row + d, ahead, acc[d]);
  Avx2Gemm4x4Store(p, m0, row, acc);
}

// ---------------------------------------------------------------------------------------------
// Many tokens (prefill): the planes unpacked once per tile. Avx2Gemm4Row extracts the planes of
// every 16 columns anew for every block of 4 tokens (4 of its 20 vector instructions per 256
// multiply-adds); with M tokens over a tile, Avx2UnpackTile writes each packed row's planes
// once as Avx2Gemm4Row computes them (per 16 columns 64 bytes: planes 0 / 1, then 2 / 3) and
// Avx2Gemm4RowU loads them instead: 16 vector instructions per 256 multiply-adds, the maddubs
// and adds alone. In a bare loop over L1-hot bytes (one thread, the Xeon of 2026-12-04 at
// 3.9 GHz) that is 148-157 against 132-142 GMAC/s, where the unpacked tile's stores and loads
// leave 1.04-1.18x from M = 64 tokens on (ternary_gemm.h kGemmUnpackMinMAvx2). (An 8-token
// block that shares each 16 columns' shift and mask between 8 tokens, planes 0 / 1 and 2 / 3
// in two passes, 18 instructions: no faster than this file's 4-token block, 0.94x in the
// GEMM; so on this core the adds, not the count of instructions, set the pace.)

// Packed rows [0, rows) of w (i bytes apart) over columns [0, k16) unpacked to out (4 k16
// bytes per row), prefetching the bytes pf_ahead further on (the next tile) to L2.
BITNET_AVX2 inline void Avx2UnpackTile(const uint8_t* w, int64_t i, int64_t rows, int64_t k16,
                                       int64_t pf_ahead, uint8_t* out) {
  const __m256i mask = _mm256_set1_epi8(0x03);
  const __m256i sh01 = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  const __m256i sh23 = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);
  for (int64_t row = 0; row < rows; ++row, out += 4 * k16) {
    const uint8_t* wr = w + row * i;
    for (int64_t k = 0; k < k16; k += 16) {
      if (pf_ahead && (k & 63) == 0) _mm_prefetch(wr + k + pf_ahead, _MM_HINT_T1);
      const __m256i b =
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k)));
      __m256i* o = reinterpret_cast<__m256i*>(out + 4 * k);
      _mm256_storeu_si256(o, _mm256_and_si256(_mm256_srlv_epi32(b, sh01), mask));
      _mm256_storeu_si256(o + 1, _mm256_and_si256(_mm256_srlv_epi32(b, sh23), mask));
    }
  }
}


// Avx2Gemm4Row on an unpacked row wu (Avx2UnpackTile): the same blocks, sums and layout.
BITNET_AVX2 inline void Avx2Gemm4RowU(const uint8_t* wu, const int8_t* x, int64_t i, int64_t k16,
                                      __m256i acc[8]) {
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t k, kb, k64;
  BITNET_G4_ROW("", BITNET_U4_STEP16, [wu] "r"(wu));
}
#undef BITNET_G4_ROW
#undef BITNET_G4_TOKENS
#undef BITNET_U4_STEP16
#undef BITNET_G4_ZERO
#undef BITNET_G4_FLUSH

// The problem with one tile's unpacked rows: rows [row0, row0 + tile) at wu (4 k16 bytes each).
struct UnpackedProblem : Problem {
  const uint8_t* wu;
  int64_t row0;
};

// An unpacked row's block: the row's planes wu by the block's tokens from x (i bytes apart)
// over k16 columns, its N2 int32 sums to acc.
using RowUFn = void (*)(const uint8_t* wu, const int8_t* x, int64_t i, int64_t k16,
                        __m256i* acc);

// Packed rows row..row+3 of the unpacked tile for the tokens from m0 (the step of RunTokens that
// Avx2Gemm4x4U / AvxVnniGemm6x4U of ternary_gemm.h run): RowU's N2 sums per row (Avx2Gemm4RowU:
// 4 tokens, 8; AvxVnniGemm6RowU of ternary_avxvnni_asm.h: 6 tokens, 12), then
// Avx2Gemm4x4Store. Always inlined, so it is compiled with its caller's ISA.
template <int N2, RowUFn RowU>
__attribute__((always_inline)) inline void Gemm4x4UAsm(const UnpackedProblem& p, int64_t m0,
                                                       int64_t row) {
  const int64_t k16 = p.i & ~int64_t{15};
  alignas(32) __m256i acc[4][N2];
  for (int d = 0; d < 4; ++d) {
    RowU(p.wu + (row + d - p.row0) * 4 * k16, p.x + m0 * p.i, p.i, k16, acc[d]);
  }
  Avx2Gemm4x4Store(p, m0, row, acc);
}

BITNET_SIMD_WARNINGS_ON

#endif  // BITNET_TERNARY_X86 && BITNET_TERNARY_ASM

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_TERNARY_GEMM_ASM_H_
