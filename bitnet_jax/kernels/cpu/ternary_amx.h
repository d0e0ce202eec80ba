// Packed ternary x int8 GEMM on AMX-INT8 tiles (Sapphire Rapids and later Xeons): the "amx"
// path's kernel for M >= kAmxMinM tokens (fewer take the AVX-512 VNNI kernels of
// ternary_gemm.h, which the amx path otherwise runs as they are).
//
// AMX multiplies tiles held in eight 1 KiB registers: TDPBSUD C += A . B with A [rows <= 16,
// 64] s8, B [16, 64] u8 in "VNNI" order (row kk holds, for each of 16 output columns n, the
// four bytes of contraction indices 4kk..4kk+3) and C [rows, 16] int32: 16 x 16 x 64 multiply-adds
// per instruction (Intel SDM vol. 1 ch. 18; Intel's AMX guide; the tile layouts of oneDNN's
// brgemm and llama.cpp's ggml-cpu/amx/mmq.cpp). Here
//
//   A = x[m0..m0+mb, k..k+63]         straight from x (tile rows are strided loads), mb <= 16
//   B_j = plane j of 16 packed rows p..p+15, columns k..k+63: the 16 rows' 64 bytes are
//         transposed as 16 x 16 dwords (row kk of the result holds dword kk of every row, which
//         is the VNNI order), then masked to plane j (0x03 / 0x0c / 0x30 / 0xc0, so plane j
//         stays scaled by 4^j as in ternary_gemm.h) and stored to an L1 buffer the tile loads
//   C_j[t][n] = out[m0 + t, jR + p + n] (ternary_paths.h's layout: output row p + n + jR is
//         plane j of packed row p + n), then shifted right by 2j and minus sum(x[t]).
//
// So the weights are unpacked to int8 once per call (64 shuffles, 64 ANDs and 64 stores per
// 16 rows x 64 columns, ~110 cycles from L1 on the Xeon this was written on) whatever M is, and
// the multiply-adds are nearly free: prefill reuses one unpacked row panel for all its tokens.
// Exact as ternary_gemm.h (|4^j sum| <= 192 * 128 * I fits int32 for I <= 65536).
//
// Measured (2-core Xeon VM with AMX, one thread, the large shape's q/k/v weight 1536 x 4608,
// in-process medians against ternary_gemm.h's AVX-512 GEMM, benchmarks/README.md): M = 4 / 6 /
// 8 / 16 / 128 0.7-0.8x / 1.1-1.2x / 1.24-1.31x / 1.85-2.15x / 2.3-7.4x. In the engine at
// batch 8 (M = 8, two threads sharing ~20 GB/s of DRAM) it was 0.94x end to end, at batch 16
// 1.03x; prefill (M = 128 per row) 1.25-1.5x. Hence kAmxMinM = 16.
//
// The path exists only where isa.h's AmxUsable() got the tile permission from Linux. Each Run
// call loads its tile configuration and releases the tiles when it returns, so a pool thread
// never carries tile state outside it.

#ifndef BITNET_JAX_KERNELS_CPU_TERNARY_AMX_H_
#define BITNET_JAX_KERNELS_CPU_TERNARY_AMX_H_

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "isa.h"
#include "ternary_gemm.h"
#include "ternary_paths.h"

namespace bitnet_ternary {

// Fewest tokens that take the AMX GEMM (fewer: the AVX-512 kernels; see the top of the file).
constexpr int64_t kAmxMinM = 16;

#if BITNET_TERNARY_AMX

BITNET_SIMD_WARNINGS_OFF

// One unpacked column block: the four planes' B tiles, kAmxPlaneBytes (16 rows x 64) each.
constexpr int64_t kAmxPlaneBytes = 1024, kAmxBlockBytes = 4 * kAmxPlaneBytes;

// LDTILECFG's 64-byte operand (palette 1): tiles 0-3 C_j and 4, 7 A have `rows` rows, 5-6 B 16.
struct alignas(64) AmxConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Loads the configuration for `rows`-row A and C tiles. GCC 12 does not see the instruction
// read its 64-byte operand and dropped the zeroing of the unused fields (which made LDTILECFG
// fault), hence the memory barrier.
BITNET_AMX inline void ConfigureTiles(int rows) {
  AmxConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = static_cast<uint8_t>(t == 5 || t == 6 ? 16 : rows);
  }
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

// The four B_j (plane j, 16 rows of the VNNI order, 64 bytes each) of packed rows w .. w + nr
// rows (row stride i; rows past nr read as zero) and columns k .. k + 63 (those past i as zero
// codes, which add nothing), into b[4][16][64].
BITNET_AMX inline void UnpackB(const uint8_t* w, int64_t i, int64_t nr, int64_t k,
                               uint8_t* b) {
  const __mmask64 cols = i - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (i - k)) - 1;
  // The next 16 rows are the next 16 i bytes: fetch 1 KiB of them into L2 per 64 columns, so
  // that they have arrived when the kernel gets there (the rows' 16 streams alone defeat the
  // hardware prefetchers).
  const char* next = reinterpret_cast<const char*>(w + 16 * i) + k * 16;
  for (int l = 0; l < 16; ++l) _mm_prefetch(next + 64 * l, _MM_HINT_T1);
  __m512i r[16];
  for (int n = 0; n < 16; ++n) {
    r[n] = n < nr ? _mm512_maskz_loadu_epi8(cols, w + n * i + k) : _mm512_setzero_si512();
  }
  // 4 x 4 dword transposes inside each 128-bit lane: v[g][c] lane L = dword 4L + c of rows
  // 4g..4g+3.
  __m512i v[4][4];
  for (int g = 0; g < 4; ++g) {
    const __m512i t0 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]);
    const __m512i t1 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
    const __m512i t2 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]);
    const __m512i t3 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
    v[g][0] = _mm512_unpacklo_epi64(t0, t2);
    v[g][1] = _mm512_unpackhi_epi64(t0, t2);
    v[g][2] = _mm512_unpacklo_epi64(t1, t3);
    v[g][3] = _mm512_unpackhi_epi64(t1, t3);
  }
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c);
  const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8(static_cast<char>(0xc0));
  for (int c = 0; c < 4; ++c) {
    // then a 4 x 4 transpose of 128-bit lanes: row kk = 4L + c is lane L of every v[g][c].
    const __m512i s0 = _mm512_shuffle_i32x4(v[0][c], v[1][c], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(v[0][c], v[1][c], 0xee);
    const __m512i s2 = _mm512_shuffle_i32x4(v[2][c], v[3][c], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(v[2][c], v[3][c], 0xee);
    const __m512i y[4] = {_mm512_shuffle_i32x4(s0, s2, 0x88), _mm512_shuffle_i32x4(s0, s2, 0xdd),
                          _mm512_shuffle_i32x4(s1, s3, 0x88), _mm512_shuffle_i32x4(s1, s3, 0xdd)};
    for (int l = 0; l < 4; ++l) {
      uint8_t* row = b + (4 * l + c) * 64;
      _mm512_store_si512(row, _mm512_and_si512(y[l], m0));
      _mm512_store_si512(row + kAmxPlaneBytes, _mm512_and_si512(y[l], m1));
      _mm512_store_si512(row + 2 * kAmxPlaneBytes, _mm512_and_si512(y[l], m2));
      _mm512_store_si512(row + 3 * kAmxPlaneBytes, _mm512_and_si512(y[l], m3));
    }
  }
}

// C_j += A . B_j for the four planes, A from `a` (row stride sa) into tile TA, B_j from b[j].
// Tile registers are not renamed: a load waits for the multiplies still reading its register, so
// A alternates between tiles 4 and 7 from one column block to the next (the perf profile of a
// batch-8 decode had a quarter of the kernel's time on the load of A into one tile). A macro:
// GCC's tile intrinsics paste the tile number into their assembly text.
#define BITNET_AMX_MULTIPLY_PLANES(TA, a, sa, b)        \
  do {                                                  \
    _tile_loadd(TA, (a), (sa));                         \
    _tile_loadd(5, (b), 64);                            \
    _tile_dpbsud(0, TA, 5);                             \
    _tile_loadd(6, (b) + kAmxPlaneBytes, 64);           \
    _tile_dpbsud(1, TA, 6);                             \
    _tile_loadd(5, (b) + 2 * kAmxPlaneBytes, 64);       \
    _tile_dpbsud(2, TA, 5);                             \
    _tile_loadd(6, (b) + 3 * kAmxPlaneBytes, 64);       \
    _tile_dpbsud(3, TA, 6);                             \
  } while (0)

// Per-thread scratch: the unpacked B panels and C.
struct AmxScratch {
  std::unique_ptr<uint8_t, decltype(&std::free)> b{nullptr, &std::free};
  int64_t b_bytes = 0;
  alignas(64) int32_t c[4][16][16];
  alignas(64) int8_t xtail[16][64];
  uint8_t* Panel(int64_t bytes) {
    if (bytes > b_bytes) {
      b.reset(static_cast<uint8_t*>(std::aligned_alloc(64, bytes)));
      b_bytes = bytes;
    }
    return b.get();
  }
};

// Tokens m0 .. m0 + mb over packed rows p .. p + nr (nr <= 16), from the unpacked panel
// b[I / 64][4][16][64], or with `unpack` from a ring of 3 blocks that this fills as it goes.
BITNET_AMX inline void AmxBlock(const Problem& p, int64_t m0, int64_t mb, int64_t row,
                                int64_t nr, uint8_t* b, bool unpack, AmxScratch& s) {
  const int64_t i = p.i, kfull = i & ~int64_t{63};
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int8_t* x = p.x + m0 * i;
  const uint8_t* w = p.w + row * i;
  if (unpack) UnpackB(w, i, nr, 0, b);
  for (int64_t k = 0; k < i; k += 64) {
    // With `unpack`, b is a ring of 3 blocks and block k + 64 is unpacked before block k is
    // multiplied, so the tile loads read stores made one block earlier (unpacking k + 128
    // after the multiplies instead measured no faster).
    const uint8_t* bk = b + (unpack ? (k / 64) % 3 : k / 64) * kAmxBlockBytes;
    if (unpack && k + 64 < i) UnpackB(w, i, nr, k + 64, b + (k / 64 + 1) % 3 * kAmxBlockBytes);
    const int8_t* a = x + k;
    int64_t sa = i;
    if (k == kfull) {  // the last i % 64 columns: x from a zero-padded copy (never read past x)
      for (int64_t t = 0; t < mb; ++t) {
        std::fill(s.xtail[t], s.xtail[t] + 64, int8_t{0});
        std::copy(x + t * i + k, x + t * i + i, s.xtail[t]);
      }
      a = &s.xtail[0][0];
      sa = 64;
    }
    if ((k / 64) % 2 == 0) {
      BITNET_AMX_MULTIPLY_PLANES(4, a, sa, bk);
    } else {
      BITNET_AMX_MULTIPLY_PLANES(7, a, sa, bk);
    }
  }
  _tile_stored(0, s.c[0], 64);
  _tile_stored(1, s.c[1], 64);
  _tile_stored(2, s.c[2], 64);
  _tile_stored(3, s.c[3], 64);
  const __mmask16 keep = static_cast<__mmask16>((1u << nr) - 1);
  for (int64_t t = 0; t < mb; ++t) {
    const __m512i xs = _mm512_set1_epi32(p.xsum[m0 + t]);
    int32_t* o = p.out + (m0 + t) * 4 * p.r + row;
    for (int j = 0; j < 4; ++j) {
      const __m512i c = _mm512_load_si512(s.c[j][t]);
      _mm512_mask_storeu_epi32(o + j * p.r, keep,
                               _mm512_sub_epi32(_mm512_srai_epi32(c, 2 * j), xs));
    }
  }
}

// Packed rows [r0, r1) for all tokens: 16 rows at a time; one block of up to 16 tokens unpacks
// each column block as it goes (it stays in L1), more tokens unpack the 16 rows' whole panel
// (I / 64 x 4 KiB, in L2) once and run every token block over it.
BITNET_AMX inline void RunAmxGemm(const Problem& p, int64_t r0, int64_t r1) {
  thread_local AmxScratch scratch;
  const int64_t kb = (p.i + 63) / 64;
  const bool one_block = p.m <= 16;
  uint8_t* b = scratch.Panel((one_block ? 3 : kb) * kAmxBlockBytes);
  int64_t configured = 0;
  for (int64_t row = r0; row < r1; row += 16) {
    const int64_t nr = std::min<int64_t>(16, r1 - row);
    if (!one_block) {
      for (int64_t k = 0; k < p.i; k += 64) {
        UnpackB(p.w + row * p.i, p.i, nr, k, b + k / 64 * kAmxBlockBytes);
      }
    }
    for (int64_t m0 = 0; m0 < p.m; m0 += 16) {
      const int64_t mb = std::min<int64_t>(16, p.m - m0);
      if (mb != configured) {
        ConfigureTiles(static_cast<int>(mb));
        configured = mb;
      }
      AmxBlock(p, m0, mb, row, nr, b, one_block, scratch);
    }
  }
  if (configured) _tile_release();
}

// The amx path's Run* overload for Problem (isa.h RunRows): the AMX GEMM from kAmxMinM tokens,
// the AVX-512 VNNI kernels below that (and for I past the GEMM's exact range).
BITNET_AMX inline void RunAmx(const Problem& p, int64_t r0, int64_t r1) {
  if (p.m >= kAmxMinM && p.i <= kGemmMaxI512) {
    RunAmxGemm(p, r0, r1);
  } else {
    RunAvx512Vnni(p, r0, r1);
  }
}

BITNET_SIMD_WARNINGS_ON

#endif  // BITNET_TERNARY_AMX

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_TERNARY_AMX_H_
