// The AVX-VNNI GEMM as inline assembly (native builds, BITNET_TERNARY_ASM &&
// BITNET_TERNARY_AVXVNNI): ternary_gemm_asm.h's blocks (Avx2Gemm4Row on packed rows,
// Avx2Gemm4RowU on unpacked tiles) for 6 tokens, with one `{vex} vpdpbusd` per 16 columns, token
// and plane pair in place of their maddubs, add and (per 1024 columns) widening: the planes' u8
// codes times the token's s8 activations, 4 columns summed straight into each int32 lane.
// The sums have Avx2Gemm4RowU's layout (dword c of lane j: plane j over columns 4c..4c+3), so
// Avx2Gemm4x4Store reduces and stores them. Exact: |sum| <= 2 * 128 * I fits int32.
//
// (`{vex}`, written %{vex%} in GCC's asm templates, asks the assembler for the VEX encoding of
// AVX-VNNI: the bare mnemonic assembles to AVX512-VNNI's EVEX form, which CPUs with AVX-VNNI
// only do not run.)

#ifndef BITNET_JAX_KERNELS_CPU_TERNARY_AVXVNNI_ASM_H_
#define BITNET_JAX_KERNELS_CPU_TERNARY_AVXVNNI_ASM_H_

#include <cstdint>

#include "isa.h"
#include "ternary_gemm_asm.h"

namespace bitnet_ternary {

#if BITNET_TERNARY_X86 && BITNET_TERNARY_ASM && BITNET_TERNARY_AVXVNNI

BITNET_SIMD_WARNINGS_OFF

// clang-format off
// The token whose activations operand X points to: one broadcast of its 16 columns at offset
// O, one vpdpbusd per plane pair into accumulators ymmA (planes 0 / 1) and ymmB (2 / 3).
#define BITNET_V6_TOKEN(O, X, A, B)                                      \
  "vbroadcasti128 " O "(" X ",%[k]), %%ymm4\n"                          \
  "%{vex%} vpdpbusd %%ymm4, %%ymm0, %%ymm" A "\n"                       \
  "%{vex%} vpdpbusd %%ymm4, %%ymm1, %%ymm" B "\n"
// The 6 tokens (at x0..x5) against planes 0 / 1 in ymm0 and 2 / 3 in ymm1.
#define BITNET_V6_TOKENS(O)                                                                  \
  BITNET_V6_TOKEN(O, "%[x0]", "2", "3") BITNET_V6_TOKEN(O, "%[x1]", "5", "6")                \
  BITNET_V6_TOKEN(O, "%[x2]", "7", "8") BITNET_V6_TOKEN(O, "%[x3]", "9", "10")               \
  BITNET_V6_TOKEN(O, "%[x4]", "11", "12") BITNET_V6_TOKEN(O, "%[x5]", "13", "14")
// 16 columns at offset O: the planes loaded from the unpacked row wu.
#define BITNET_V6_STEP16(O)                                                                  \
  "vmovdqu 4*" O "(%[wu],%[k],4), %%ymm0\n"                                                 \
  "vmovdqu 4*" O "+32(%[wu],%[k],4), %%ymm1\n" BITNET_V6_TOKENS(O)
// 16 columns at offset O: the planes unpacked from the packed row w as Avx2Gemm4Row does.
#define BITNET_V6P_STEP16(O)                                                                 \
  "vbroadcasti128 " O "(%[w],%[k]), %%ymm1\n"                                              \
  "vpsrlvd %[sh01], %%ymm1, %%ymm0\n vpsrlvd %[sh23], %%ymm1, %%ymm1\n"                     \
  "vpand %[mask], %%ymm0, %%ymm0\n vpand %[mask], %%ymm1, %%ymm1\n" BITNET_V6_TOKENS(O)
#define BITNET_V6_ZERO(R) "vpxor %%xmm" R ", %%xmm" R ", %%xmm" R "\n"
#define BITNET_V6_STORE(R, OFF) "vmovdqa %%ymm" R ", " OFF "(%[acc])\n"
// A row: zero the 12 accumulators, 64 columns per iteration (each starting with HEAD: a
// prefetch, or nothing) in STEP16 steps, the last k16 % 64 columns 16 at a time, store. The
// operands the steps read besides the tokens follow as the macro's last arguments.
#define BITNET_V6_ROW(HEAD, STEP16, ...)                                                       \
  __asm__ volatile(                                                                            \
      BITNET_V6_ZERO("2") BITNET_V6_ZERO("3") BITNET_V6_ZERO("5") BITNET_V6_ZERO("6")          \
      BITNET_V6_ZERO("7") BITNET_V6_ZERO("8") BITNET_V6_ZERO("9") BITNET_V6_ZERO("10")         \
      BITNET_V6_ZERO("11") BITNET_V6_ZERO("12") BITNET_V6_ZERO("13") BITNET_V6_ZERO("14")      \
      "xor %[k], %[k]\n cmp %[k64], %[k]\n jge 4f\n"                                           \
      "1:\n" HEAD STEP16("0") STEP16("16") STEP16("32") STEP16("48")                           \
      "add $64, %[k]\n cmp %[k64], %[k]\n jl 1b\n"                                             \
      "4:\n cmp %[k16], %[k]\n jge 5f\n"                                                       \
      "3:\n" STEP16("0") "add $16, %[k]\n cmp %[k16], %[k]\n jl 3b\n"                         \
      "5:\n"                                                                                   \
      BITNET_V6_STORE("2", "0") BITNET_V6_STORE("3", "32") BITNET_V6_STORE("5", "64")          \
      BITNET_V6_STORE("6", "96") BITNET_V6_STORE("7", "128") BITNET_V6_STORE("8", "160")       \
      BITNET_V6_STORE("9", "192") BITNET_V6_STORE("10", "224") BITNET_V6_STORE("11", "256")    \
      BITNET_V6_STORE("12", "288") BITNET_V6_STORE("13", "320") BITNET_V6_STORE("14", "352")   \
      : [k] "=&r"(k)                                                                           \
      : [x0] "r"(x), [x1] "r"(x + i), [x2] "r"(x + 2 * i), [x3] "r"(x + 3 * i),                \
        [x4] "r"(x + 4 * i), [x5] "r"(x + 5 * i), [k16] "r"(k16), [k64] "r"(k64),               \
        [acc] "r"(acc), __VA_ARGS__                                                            \
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",         \
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "cc", "memory")
// The packed row's steps, with one prefetch of pf + k per 64 columns (pf = w + pfoff).
#define BITNET_V6_PACKED(PREFETCH)                                                             \
  BITNET_V6_ROW(PREFETCH " (%[pf],%[k])\n", BITNET_V6P_STEP16, [w] "r"(w), [pf] "r"(w + pfoff), \
                [sh01] "m"(sh01), [sh23] "m"(sh23), [mask] "m"(mask))
// clang-format on

// Unpacked row wu (Avx2UnpackTile) by the 6 tokens x, x + i, ..., x + 5i over columns [0, k16),
// k16 >= 0 a multiple of 16: token t's sums of planes 0 / 1 to acc[2t], of 2 / 3 to acc[2t + 1]
// (Avx2Gemm4RowU's layout). Six tokens, not four: each vpdpbusd adds to its accumulator, whose
// latency (5 cycles here) with 8 accumulators held a bare loop to 186 GMAC/s on one core of
// the Xeon (2026-12-04, 3.9 GHz); 12 accumulators reach the 2 vpdpbusd per cycle, 245.
BITNET_AVXVNNI inline void AvxVnniGemm6RowU(const uint8_t* wu, const int8_t* x, int64_t i,
                                            int64_t k16, __m256i acc[12]) {
  const int64_t k64 = k16 & ~int64_t{63};
  int64_t k;
  BITNET_V6_ROW("", BITNET_V6_STEP16, [wu] "r"(wu));
}


// AvxVnniGemm6RowU on the packed row w, its planes unpacked per 16 columns (for fewer tokens
// than pay for an unpacked tile). Prefetch per 64 columns: pfoff bytes ahead of the row, to L2
// (l2: the next tile) or L1.
BITNET_AVXVNNI inline void AvxVnniGemm6Row(const uint8_t* w, const int8_t* x, int64_t i,
                                           int64_t k16, int64_t pfoff, bool l2, __m256i acc[12]) {
  const __m256i mask = _mm256_set1_epi8(0x03);
  const __m256i sh01 = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  const __m256i sh23 = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);
  const int64_t k64 = k16 & ~int64_t{63};
  int64_t k;
  if (l2) {
    BITNET_V6_PACKED("prefetcht1");
  } else {
    BITNET_V6_PACKED("prefetcht0");
  }
}
#undef BITNET_V6_PACKED
#undef BITNET_V6_ROW
#undef BITNET_V6_STORE
#undef BITNET_V6_ZERO
#undef BITNET_V6P_STEP16
#undef BITNET_V6_STEP16
#undef BITNET_V6_TOKENS
#undef BITNET_V6_TOKEN

// Packed rows row..row+3 for tokens m0..m0+5 (RunTokens step 4): AvxVnniGemm6Row per row, with
// the next tile's prefetch when ahead > 0, then Avx2Gemm4x4Store.
BITNET_AVXVNNI inline void AvxVnniGemm6x4Asm(const Problem& p, int64_t m0, int64_t row,
                                             int64_t ahead) {
  const int64_t i = p.i, k16 = i & ~int64_t{15};
  alignas(32) __m256i acc[4][12];
  for (int d = 0; d < 4; ++d) {
    AvxVnniGemm6Row(p.w + (row + d) * i, p.x + m0 * i, i, k16, ahead ? ahead * i : kPrefetch,
                    ahead != 0, acc[d]);
  }
  Avx2Gemm4x4Store(p, m0, row, acc);
}

BITNET_SIMD_WARNINGS_ON

#endif  // BITNET_TERNARY_X86 && BITNET_TERNARY_ASM && BITNET_TERNARY_AVXVNNI

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_TERNARY_AVXVNNI_ASM_H_
