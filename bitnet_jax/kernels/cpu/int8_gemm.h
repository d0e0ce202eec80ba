// int8 x int8 GEMM of the LM head for several tokens (M >= 2), and the choice between it and
// the row kernels of int8_cpu.h (the GEMV) by M: the Run* overloads for Int8Problem that
// RunRows (isa.h) dispatches to.
//
// The row kernels make vpdpbusd's unsigned operand |x| and move x's sign onto the weights, two
// extra instructions per token and weight vector. Here the weights become the unsigned operand
// instead: w + 128 = w XOR 0x80 (w is in [-127, 127], so 1..255), one instruction per weight
// vector for all the tokens of a block, and
//
//   sum_k (w + 128) x = sum_k w x + 128 sum_k x,   so   out = acc - 128 * xsum[m].
//
// acc itself may leave int32 (|acc| <= 255 * 128 * I, past I = 65792), but vpdpbusd and the
// adds wrap modulo 2^32, so out is exact whenever the true sum fits int32, as for the row
// kernels (tests/test_kernels_cpu.py checks I = 70000). The layout is oneDNN's VNNI "4i" one
// (ternary_gemm.h's before its 128-bit broadcast kernel): four rows transposed inside 128-bit
// lanes (lane dword d = row d), x broadcast per 128-bit lane with vpshufd; a block is 8 rows
// (two transposed groups) by up to 6 tokens (GCC 12 emits 2.4 instructions per vpdpbusd for
// 6-token blocks, 3.1 for 4-token ones).

#ifndef BITNET_JAX_KERNELS_CPU_INT8_GEMM_H_
#define BITNET_JAX_KERNELS_CPU_INT8_GEMM_H_

#include <algorithm>
#include <cstdint>

#include "int8_asm.h"
#include "int8_cpu.h"
#include "isa.h"

namespace bitnet_ternary {

constexpr int64_t kInt8GemmMinM512 = 2;

#if BITNET_TERNARY_X86

BITNET_SIMD_WARNINGS_OFF

// Rows w..w+3 (row stride i), columns k..k+63 under `mask`: four 128-bit-lane transposes
// (lane c, dword d of z[q] = row d, columns 16c+4q..+3), plus 128.
BITNET_AVX512 inline void Int8Transpose4(const int8_t* w, int64_t i, int64_t k, __mmask64 mask,
                                         int64_t ahead_bytes, __m512i z[4]) {
  const __m512i a0 = _mm512_maskz_loadu_epi8(mask, w + k);
  const __m512i a1 = _mm512_maskz_loadu_epi8(mask, w + i + k);
  const __m512i a2 = _mm512_maskz_loadu_epi8(mask, w + 2 * i + k);
  const __m512i a3 = _mm512_maskz_loadu_epi8(mask, w + 3 * i + k);
  if (ahead_bytes) {
    const char* f = reinterpret_cast<const char*>(w + k) + ahead_bytes;
    _mm_prefetch(f, _MM_HINT_T1);
    _mm_prefetch(f + i, _MM_HINT_T1);
    _mm_prefetch(f + 2 * i, _MM_HINT_T1);
    _mm_prefetch(f + 3 * i, _MM_HINT_T1);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(a0, a1), t1 = _mm512_unpackhi_epi32(a0, a1);
  const __m512i t2 = _mm512_unpacklo_epi32(a2, a3), t3 = _mm512_unpackhi_epi32(a2, a3);
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  z[0] = _mm512_xor_si512(_mm512_unpacklo_epi64(t0, t2), bias);
  z[1] = _mm512_xor_si512(_mm512_unpackhi_epi64(t0, t2), bias);
  z[2] = _mm512_xor_si512(_mm512_unpacklo_epi64(t1, t3), bias);
  z[3] = _mm512_xor_si512(_mm512_unpackhi_epi64(t1, t3), bias);
}

template <int MB>
BITNET_AVX512 inline void Int8Gemm8Step(const Int8Problem& p, const int8_t* w, const int8_t* x,
                                        int64_t k, __mmask64 mask, int64_t ahead_bytes,
                                        __m512i acc[MB][2]) {
  __m512i z0[4], z1[4];
  Int8Transpose4(w, p.i, k, mask, ahead_bytes, z0);
  Int8Transpose4(w + 4 * p.i, p.i, k, mask, ahead_bytes, z1);
  __m512i xv[MB];
  for (int t = 0; t < MB; ++t) xv[t] = _mm512_maskz_loadu_epi8(mask, x + t * p.i + k);
  for (int q = 0; q < 4; ++q) {
    for (int t = 0; t < MB; ++t) {
      const __m512i xq = _mm512_shuffle_epi32(xv[t], static_cast<_MM_PERM_ENUM>(q * 0x55));
      acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], z0[q], xq);
      acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], z1[q], xq);
    }
  }
}

// Rows row..row+7 for tokens m0..m0+MB-1 (the RowFn of RunTiled with kStep = 8).
template <int MB>
struct Avx512Int8Gemm8 {
  BITNET_AVX512 static void Run(const Int8Problem& p, int64_t m0, int64_t row, int64_t ahead) {
    const int8_t* w = p.w + row * p.i;
    const int8_t* x = p.x + m0 * p.i;
    const int64_t kv = p.i & ~int64_t{63}, ahead_bytes = ahead * p.i;
    __m512i acc[MB][2];
    for (int t = 0; t < MB; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
    for (int64_t k = 0; k < kv; k += 64) {
      Int8Gemm8Step<MB>(p, w, x, k, ~__mmask64{0}, ahead_bytes, acc);
    }
    if (kv < p.i) {
      Int8Gemm8Step<MB>(p, w, x, kv, (~uint64_t{0}) >> (64 - (p.i - kv)), ahead_bytes, acc);
    }
    for (int t = 0; t < MB; ++t) {
      // 128 * xsum modulo 2^32 (unsigned: no signed overflow for huge I).
      const __m128i bias = _mm_set1_epi32(
          static_cast<int32_t>(static_cast<uint32_t>(p.xsum[m0 + t]) * 128u));
      for (int g = 0; g < 2; ++g) {
        const __m256i f = _mm256_add_epi32(_mm512_castsi512_si256(acc[t][g]),
                                           _mm512_extracti64x4_epi64(acc[t][g], 1));
        const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(f), _mm256_extracti128_si256(f, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p.out + (m0 + t) * p.r + row + 4 * g),
                         _mm_sub_epi32(s, bias));
      }
    }
  }
};

BITNET_SIMD_WARNINGS_ON

// Rows [r0, r1): whole 8-row blocks through the GEMM, the last r % 8 through the row kernel.
BITNET_AVX512 inline void RunAvx512VnniInt8Gemm(const Int8Problem& p, int64_t r0, int64_t r1) {
  const int64_t r8 = r0 + ((r1 - r0) & ~int64_t{7});
  RunTiled<6, Avx512Int8Gemm8, 8>(p, r0, r8);
  if (r8 < r1) RunAvx512VnniInt8Rows(p, r8, r1);
}

#endif  // BITNET_TERNARY_X86

// ---------------------------------------------------------------------------------------------
// The Run* overloads RunRows dispatches to for Int8Problem: GEMV or GEMM by M, per path.

inline void RunScalar(const Int8Problem& p, int64_t r0, int64_t r1) {
  RunScalarInt8Rows(p, r0, r1);
}

#if BITNET_TERNARY_X86
BITNET_AVX2 inline void RunAvx2(const Int8Problem& p, int64_t r0, int64_t r1) {
#if BITNET_TERNARY_ASM
  if (p.m >= 8) return RunAvx2Int8Asm(p, r0, r1);  // int8_asm.h: 8-token blocks as asm
#endif
  RunAvx2Int8Rows(p, r0, r1);
}
#if BITNET_TERNARY_AVXVNNI
BITNET_AVXVNNI inline void RunAvxVnni(const Int8Problem& p, int64_t r0, int64_t r1) {
  RunAvxVnniInt8Rows(p, r0, r1);
}
#endif
BITNET_AVX512 inline void RunAvx512Vnni(const Int8Problem& p, int64_t r0, int64_t r1) {
  if (p.m >= kInt8GemmMinM512 && p.xsum != nullptr) {
    RunAvx512VnniInt8Gemm(p, r0, r1);
  } else if (p.m == 1) {
    RunGemv<Avx512VnniInt8Row>(p, r0, r1);
  } else {
    RunAvx512VnniInt8Rows(p, r0, r1);
  }
}
#if BITNET_TERNARY_AMX
// The amx path runs the LM head on the AVX-512 VNNI kernels (AMX is the packed GEMM's,
// ternary_amx.h).
BITNET_AVX512 inline void RunAmx(const Int8Problem& p, int64_t r0, int64_t r1) {
  RunAvx512Vnni(p, r0, r1);
}
#endif
#endif  // BITNET_TERNARY_X86

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_INT8_GEMM_H_
