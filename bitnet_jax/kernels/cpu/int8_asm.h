// The AVX2 int8 LM head for blocks of 8 tokens as inline assembly (native builds,
// BITNET_TERNARY_ASM; the SIMDe builds of the emulated tests keep Avx2Int8Row of int8_cpu.h).
//
// The same arithmetic as Avx2Int8Row<8> (per 32 columns and token: sign(w, x), maddubs with
// |x|, madd with 1, add to the token's int32 lanes), but the 8 tokens' x and |x| are first
// copied into one interleaved buffer (per 32 columns 512 bytes: x of tokens 0..7, then |x|), so
// that the loop addresses all 16 streams from one pointer with constant offsets. GCC 12's code
// for the intrinsics computed 8 addresses per 32 columns, copied accumulators between registers
// and spilled one to the stack in every iteration.

#ifndef BITNET_JAX_KERNELS_CPU_INT8_ASM_H_
#define BITNET_JAX_KERNELS_CPU_INT8_ASM_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "int8_cpu.h"
#include "isa.h"

namespace bitnet_ternary {

#if BITNET_TERNARY_X86 && BITNET_TERNARY_ASM

BITNET_SIMD_WARNINGS_OFF

// clang-format off
// Token T's step over 32 columns: x at byte XO + 32 T of the buffer, |x| at XO + 256 + 32 T
// (the assembler adds the offsets); temps ymmA, ymmB; accumulator ymmACC.
#define BITNET_I8_TOKEN(XO, T, A, B, ACC)                          \
  "vpsignb " XO "+32*" T "(%[xb]), %%ymm0, %%ymm" A "\n"          \
  "vmovdqu " XO "+256+32*" T "(%[xb]), %%ymm" B "\n"              \
  "vpmaddubsw %%ymm" A ", %%ymm" B ", %%ymm" B "\n"               \
  "vpmaddwd %%ymm1, %%ymm" B ", %%ymm" B "\n"                     \
  "vpaddd %%ymm" B ", %%ymm" ACC ", %%ymm" ACC "\n"
// 32 columns of the row (w + k + WO) against the 8 tokens, from the buffer's bytes XO..XO+511.
#define BITNET_I8_STEP32(WO, XO)                                   \
  "vmovdqu " WO "(%[w],%[k]), %%ymm0\n"                           \
  BITNET_I8_TOKEN(XO, "0", "2", "3", "8")                          \
  BITNET_I8_TOKEN(XO, "1", "4", "5", "9")                          \
  BITNET_I8_TOKEN(XO, "2", "2", "3", "10")                         \
  BITNET_I8_TOKEN(XO, "3", "4", "5", "11")                         \
  BITNET_I8_TOKEN(XO, "4", "2", "3", "12")                         \
  BITNET_I8_TOKEN(XO, "5", "4", "5", "13")                         \
  BITNET_I8_TOKEN(XO, "6", "2", "3", "14")                         \
  BITNET_I8_TOKEN(XO, "7", "4", "5", "15")
// One row over columns [0, kv): 64 columns per iteration with one prefetch of pf + k, then the
// last 32 if any; the 8 int32 accumulators to acc.
#define BITNET_I8_ROW(PREFETCH)                                                                \
  __asm__ volatile(                                                                            \
      "vpxor %%xmm8, %%xmm8, %%xmm8\n vpxor %%xmm9, %%xmm9, %%xmm9\n"                          \
      "vpxor %%xmm10, %%xmm10, %%xmm10\n vpxor %%xmm11, %%xmm11, %%xmm11\n"                    \
      "vpxor %%xmm12, %%xmm12, %%xmm12\n vpxor %%xmm13, %%xmm13, %%xmm13\n"                    \
      "vpxor %%xmm14, %%xmm14, %%xmm14\n vpxor %%xmm15, %%xmm15, %%xmm15\n"                    \
      "vmovdqu %[ones], %%ymm1\n xor %[k], %[k]\n"                                             \
      "cmp %[kv64], %[k]\n jge 2f\n"                                                           \
      "1:\n" PREFETCH " (%[pf],%[k])\n" BITNET_I8_STEP32("0", "0") BITNET_I8_STEP32("32", "512") \
      "add $64, %[k]\n add $1024, %[xb]\n cmp %[kv64], %[k]\n jl 1b\n"                         \
      "2:\n cmp %[kv], %[k]\n jge 3f\n" BITNET_I8_STEP32("0", "0") "3:\n"                      \
      "vmovdqu %%ymm8, (%[acc])\n vmovdqu %%ymm9, 32(%[acc])\n vmovdqu %%ymm10, 64(%[acc])\n"  \
      "vmovdqu %%ymm11, 96(%[acc])\n vmovdqu %%ymm12, 128(%[acc])\n"                           \
      "vmovdqu %%ymm13, 160(%[acc])\n vmovdqu %%ymm14, 192(%[acc])\n"                          \
      "vmovdqu %%ymm15, 224(%[acc])\n"                                                         \
      : [k] "=&r"(k), [xb] "+r"(xb)                                                            \
      : [w] "r"(w), [pf] "r"(pf), [kv64] "r"(kv64), [kv] "r"(kv), [acc] "r"(acc),              \
        [ones] "m"(ones)                                                                       \
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm8", "xmm9", "xmm10", "xmm11",      \
        "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory")
// clang-format on

// Row w (columns [0, kv), kv > 0 a multiple of 32) against the 8 tokens of buffer xb: the 8
// tokens' int32 lanes to acc. Prefetch per 64 columns: pfoff bytes ahead, to L2 (l2) or L1.
BITNET_AVX2 inline void Avx2Int8Row8(const int8_t* w, const int8_t* xb, int64_t kv, int64_t pfoff,
                                     bool l2, __m256i acc[8]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t kv64 = kv & ~int64_t{63};
  const int8_t* pf = w + pfoff;
  int64_t k;
  if (l2) {
    BITNET_I8_ROW("prefetcht1");
  } else {
    BITNET_I8_ROW("prefetcht0");
  }
}
#undef BITNET_I8_ROW
#undef BITNET_I8_STEP32
#undef BITNET_I8_TOKEN

// x and |x| of tokens m0..m0+7 over columns [0, kv) interleaved as Avx2Int8Row8 reads them.
inline void InterleaveInt8(const Int8Problem& p, int64_t m0, int64_t kv, int8_t* out) {
  for (int64_t c = 0; c < kv; c += 32, out += 512) {
    for (int t = 0; t < 8; ++t) {
      std::memcpy(out + 32 * t, p.x + (m0 + t) * p.i + c, 32);
      std::memcpy(out + 256 + 32 * t, p.xabs + (m0 + t) * p.i + c, 32);
    }
  }
}

// The problem with the interleaved buffer of its 8-token blocks (block b at xb + 16 b kv).
struct Int8AsmProblem : Int8Problem {
  const int8_t* xb;
  int64_t kv;  // columns in the buffer: I rounded down to 32
};

// The RowFn of RunTiled: a block of 8 tokens through the asm, fewer (the last M % 8 tokens)
// through Avx2Int8Row.
template <int MB>
struct Avx2Int8AsmRow {
  BITNET_AVX2 static void Run(const Int8AsmProblem& p, int64_t m0, int64_t row, int64_t ahead) {
    if constexpr (MB != 8) {
      Avx2Int8Row<MB>::Run(p, m0, row, ahead);
    } else {
      const int8_t* w = p.w + row * p.i;
      alignas(32) __m256i acc[8];
      if (p.kv > 0) {
        Avx2Int8Row8(w, p.xb + m0 * p.kv * 2, p.kv, ahead ? ahead * p.i : kPrefetch, ahead != 0,
                     acc);
      } else {
        std::fill(acc, acc + 8, _mm256_setzero_si256());
      }
      for (int t = 0; t < 8; ++t) {
        p.out[(m0 + t) * p.r + row] =
            Sum8(acc[t]) + Int8DotTail(w, p.x + (m0 + t) * p.i, p.kv, p.i);
      }
    }
  }
};

// Rows [r0, r1) for every token, M >= 8: the activations interleaved once per call, then the
// loop skeleton of isa.h as RunAvx2Int8Rows runs it (RunTiled<8>).
BITNET_AVX2 inline void RunAvx2Int8Asm(const Int8Problem& p, int64_t r0, int64_t r1) {
  const int64_t kv = p.i & ~int64_t{31}, m8 = p.m & ~int64_t{7};
  std::vector<int8_t> buffer(std::max<int64_t>(m8 * kv * 2, 1));  // freed after the call
  for (int64_t m0 = 0; m0 < m8; m0 += 8) InterleaveInt8(p, m0, kv, buffer.data() + m0 * kv * 2);
  Int8AsmProblem q;
  static_cast<Int8Problem&>(q) = p;
  q.xb = buffer.data();
  q.kv = kv;
  RunTiled<8, Avx2Int8AsmRow>(q, r0, r1);
}

BITNET_SIMD_WARNINGS_ON

#endif  // BITNET_TERNARY_X86 && BITNET_TERNARY_ASM

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_INT8_ASM_H_
