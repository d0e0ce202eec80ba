// Probe (issue 16, 2026-12-03): ternary x int8 GEMM by table lookup ACROSS TOKENS on AVX2,
// against the shipped Avx2Gemm (kernels/cpu/ternary_gemm.h), exactness and speed, one thread.
// Not part of the package: kept so the measurement in benchmarks/README.md ("Vector-LUT probe")
// can be rerun and the design picked up again.
//
//   g++ -std=c++17 -O3 -I bitnet_jax/kernels/cpu benchmarks/probes/ternary_lut_probe.cc -o /tmp/lp
//   /tmp/lp 8 1536 1152 200     # tokens (8 or 16), I, packed rows R, calls per round
//   /tmp/lp ceiling             # table-lookup adds per ns alone (multiply by the GHz for /cycle)
//
// Design (the "vector LUT" of Vec-LUT / vlut.cpp, github.com/Cipherxzc/vlut.cpp, written for
// this repository's packed layout, ternary_paths.h): for every group of 4 consecutive columns
// and the 81 ternary patterns, a table entry holds sum_c t_c * x[m][k+c] for the N tokens of the
// block as N int16 (one xmm for N = 8, one ymm for N = 16; exact, |entry| <= 4 * 127). A weight
// row then costs ONE vpaddw with a memory operand per group: 4N multiply-adds per instruction,
// against 16 per instruction (maddubs + add) for the multiply kernels. The group's index
// c0 + 3c1 + 9c2 + 27c3 (codes c = t + 1 in bits 2j..2j+1 of four consecutive packed bytes) is
// computed 32 at a time with SIMD (planes by shift and mask, maddubs(codes, (2, 6)),
// madd(., (1, 9)): twice the index, the entry's offset / 8 for an x86 scaled address), packed
// to bytes and taken apart in general registers. Columns go in chunks whose tables fit L1
// (N = 8: 64 columns, 20.7 KB; N = 16: 32 columns); each row's sums per chunk are widened into
// int32 scratch. Tables are built per chunk: 2 x 9 pair sums, then 81 adds and stores per group.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "ternary_amx.h"
#include "ternary_gemm.h"

namespace bitnet_ternary {

#if BITNET_TERNARY_X86
BITNET_SIMD_WARNINGS_OFF

constexpr int64_t kLutTokens = 8;    // tokens per table entry (int16 lanes of an xmm)
constexpr int64_t kLutEntries = 81;  // 3^4 patterns of a group of 4 columns
constexpr int64_t kLutChunk = 64;    // columns per chunk (16 groups)
constexpr int64_t kLutGroups = kLutChunk / 4;
constexpr int64_t kLutTableBytes = kLutEntries * kLutTokens * 2;  // one group's table

// xt[k * stride + t] = x[t][k] as int16 for 8 tokens (rows of x i bytes apart), k < i
// (i % 8 == 0).
BITNET_AVX2 inline void LutTransposeTokens(const int8_t* x, int64_t i, int16_t* xt,
                                           int64_t stride = kLutTokens) {
  for (int64_t k = 0; k < i; k += 8) {
    __m128i v[8];
    for (int t = 0; t < 8; ++t) {
      v[t] = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + t * i + k)));
    }
    // 8 x 8 int16 transpose: pairs, quads, then halves.
    const __m128i a0 = _mm_unpacklo_epi16(v[0], v[1]), a1 = _mm_unpackhi_epi16(v[0], v[1]);
    const __m128i a2 = _mm_unpacklo_epi16(v[2], v[3]), a3 = _mm_unpackhi_epi16(v[2], v[3]);
    const __m128i a4 = _mm_unpacklo_epi16(v[4], v[5]), a5 = _mm_unpackhi_epi16(v[4], v[5]);
    const __m128i a6 = _mm_unpacklo_epi16(v[6], v[7]), a7 = _mm_unpackhi_epi16(v[6], v[7]);
    const __m128i b0 = _mm_unpacklo_epi32(a0, a2), b1 = _mm_unpackhi_epi32(a0, a2);
    const __m128i b2 = _mm_unpacklo_epi32(a1, a3), b3 = _mm_unpackhi_epi32(a1, a3);
    const __m128i b4 = _mm_unpacklo_epi32(a4, a6), b5 = _mm_unpackhi_epi32(a4, a6);
    const __m128i b6 = _mm_unpacklo_epi32(a5, a7), b7 = _mm_unpackhi_epi32(a5, a7);
    int16_t* o = xt + k * stride;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 0 * stride), _mm_unpacklo_epi64(b0, b4));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 1 * stride), _mm_unpackhi_epi64(b0, b4));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * stride), _mm_unpacklo_epi64(b1, b5));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 3 * stride), _mm_unpackhi_epi64(b1, b5));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 4 * stride), _mm_unpacklo_epi64(b2, b6));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 5 * stride), _mm_unpackhi_epi64(b2, b6));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 6 * stride), _mm_unpacklo_epi64(b3, b7));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 7 * stride), _mm_unpackhi_epi64(b3, b7));
  }
}

// Vector helpers so that the table code serves 8 tokens (xmm) and 16 (ymm).
BITNET_AVX2 inline __m128i VAdd(__m128i a, __m128i b) { return _mm_add_epi16(a, b); }
BITNET_AVX2 inline __m256i VAdd(__m256i a, __m256i b) { return _mm256_add_epi16(a, b); }
BITNET_AVX2 inline __m128i VNeg(__m128i a) { return _mm_sub_epi16(_mm_setzero_si128(), a); }
BITNET_AVX2 inline __m256i VNeg(__m256i a) { return _mm256_sub_epi16(_mm256_setzero_si256(), a); }
BITNET_AVX2 inline void VLoad(const int16_t* p, __m128i& v) {
  v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
BITNET_AVX2 inline void VLoad(const int16_t* p, __m256i& v) {
  v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
BITNET_AVX2 inline void VStore(int16_t* p, __m128i v) {
  _mm_store_si128(reinterpret_cast<__m128i*>(p), v);
}
BITNET_AVX2 inline void VStore(int16_t* p, __m256i v) {
  _mm256_store_si256(reinterpret_cast<__m256i*>(p), v);
}

// The 9 sums (a - 1) * u + (b - 1) * v at index a + 3b, a, b in {0, 1, 2}.
template <class V>
BITNET_AVX2 inline void LutPairs(V u, V v, V e[9]) {
  const V nu = VNeg(u), nv = VNeg(v);
  e[0] = VAdd(nu, nv);
  e[1] = nv;
  e[2] = VAdd(u, nv);
  e[3] = nu;
  e[4] = VAdd(nu, u);  // zero, in the vector type V
  e[5] = u;
  e[6] = VAdd(nu, v);
  e[7] = v;
  e[8] = VAdd(u, v);
}

// Tables of `groups` groups from xt (columns as N = sizeof(V) / 2 int16 each): entry p = a + 9b
// of group q is pair sum a of columns 4q, 4q+1 plus pair sum b of columns 4q+2, 4q+3.
template <class V>
BITNET_AVX2 inline void LutBuildTables(const int16_t* xt, int64_t groups, int16_t* tables) {
  constexpr int64_t n = sizeof(V) / 2;
  for (int64_t q = 0; q < groups; ++q) {
    V c[4], lo[9], hi[9];
    for (int j = 0; j < 4; ++j) VLoad(xt + (q * 4 + j) * n, c[j]);
    LutPairs(c[0], c[1], lo);
    LutPairs(c[2], c[3], hi);
    int16_t* t = tables + q * kLutEntries * n;
    for (int b = 0; b < 9; ++b) {
      for (int a = 0; a < 9; ++a) VStore(t + (a + 9 * b) * n, VAdd(lo[a], hi[b]));
    }
  }
}

// Twice the table index of every group of 4 columns of 32 packed bytes, for the 4 planes, as
// bytes in the order of packs/packus: byte p is plane (p & 15) >> 2 of group (p >> 4) * 4 + (p &
// 3).
BITNET_AVX2 inline __m256i LutIndices32(const uint8_t* w) {
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m256i w26 = _mm256_set1_epi16(0x0602);      // bytes 2, 6: 2 c0 + 6 c1
  const __m256i w19 = _mm256_set1_epi32(0x00090001);  // words 1, 9
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  __m256i s[4];
  for (int j = 0; j < 4; ++j) {
    const __m256i codes = _mm256_and_si256(j ? _mm256_srli_epi16(b, 2 * j) : b, m3);
    s[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, w26), w19);
  }
  return _mm256_packus_epi16(_mm256_packs_epi32(s[0], s[1]), _mm256_packs_epi32(s[2], s[3]));
}

// Add the table entries that 32 index bytes select to the 4 plane sums (group offset g0). The
// bytes are read 8 at a time into a general register and taken apart with shifts: extracting
// them from the vector register (vpextrb, what GCC makes of a plain loop) is 2x slower.
#define BITNET_LUT_ADD(P, Q)                                                               \
  acc[((P) & 15) >> 2] = _mm_add_epi16(                                                    \
      acc[((P) & 15) >> 2], _mm_load_si128(reinterpret_cast<const __m128i*>(               \
                                tab + (g0 + ((P) >> 4) * 4 + ((P) & 3)) * kLutTableBytes + \
                                ((Q >> (8 * ((P) & 7))) & 0xff) * 8)));
// Eight lookups of ADD (BITNET_LUT_ADD or L16_ADD) from the index bytes P..P+7.
#define LUT_EIGHT(ADD, P)                                                               \
  {                                                                                     \
    uint64_t q;                                                                         \
    std::memcpy(&q, ix + (P), 8);                                                       \
    __asm__("" : "+r"(q));                                                              \
    ADD(P, q)                                                                           \
    ADD(P + 1, q)                                                                       \
    ADD(P + 2, q) ADD(P + 3, q) ADD(P + 4, q) ADD(P + 5, q) ADD(P + 6, q) ADD(P + 7, q) \
  }

BITNET_AVX2 inline void LutAdd32(const uint8_t* ix, const char* tab, uint64_t g0, __m128i acc[4]) {
  LUT_EIGHT(BITNET_LUT_ADD, 0);
  LUT_EIGHT(BITNET_LUT_ADD, 8);
  LUT_EIGHT(BITNET_LUT_ADD, 16);
  LUT_EIGHT(BITNET_LUT_ADD, 24);
}
#undef BITNET_LUT_ADD

// Tokens m0..m0+7 over packed rows [r0, r1) (p.i % 64 == 0): see the top of the file.
BITNET_AVX2 inline void RunLut8(const Problem& p, int64_t m0, int64_t r0, int64_t r1) {
  thread_local std::vector<int16_t> xt_buf, tab_buf;
  thread_local std::vector<int32_t> acc_buf;
  const int64_t i = p.i, rows = r1 - r0;
  xt_buf.resize(i * kLutTokens);
  tab_buf.resize(kLutGroups * kLutEntries * kLutTokens + 32);
  acc_buf.assign(rows * 4 * kLutTokens, 0);
  int16_t* xt = xt_buf.data();
  // 64-byte aligned tables (aligned xmm loads).
  int16_t* tables = reinterpret_cast<int16_t*>((reinterpret_cast<uintptr_t>(tab_buf.data()) + 63) &
                                               ~uintptr_t{63});
  const char* tab = reinterpret_cast<const char*>(tables);
  int32_t* acc32 = acc_buf.data();
  LutTransposeTokens(p.x + m0 * i, i, xt);
  alignas(32) uint8_t ix[64];
  for (int64_t k = 0; k < i; k += kLutChunk) {
    LutBuildTables<__m128i>(xt + k * kLutTokens, kLutGroups, tables);
    const uint8_t* w = p.w + r0 * i + k;
    for (int64_t row = 0; row < rows; ++row, w += i) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(ix), LutIndices32(w));
      _mm256_store_si256(reinterpret_cast<__m256i*>(ix + 32), LutIndices32(w + 32));
      __m128i acc[4] = {_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128(),
                        _mm_setzero_si128()};
      LutAdd32(ix, tab, 0, acc);
      LutAdd32(ix + 32, tab, 8, acc);
      __m256i* a = reinterpret_cast<__m256i*>(acc32 + row * 4 * kLutTokens);
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_si256(
            a + j, _mm256_add_epi32(_mm256_loadu_si256(a + j), _mm256_cvtepi16_epi32(acc[j])));
      }
    }
  }
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t j = 0; j < 4; ++j) {
      const int32_t* a = acc32 + (row * 4 + j) * kLutTokens;
      int32_t* o = p.out + m0 * 4 * p.r + j * p.r + r0 + row;
      for (int64_t t = 0; t < kLutTokens; ++t) o[t * 4 * p.r] = a[t];
    }
  }
}

// ---- 16 tokens per entry (ymm): 32-column chunks, int16 partials widened every 8 chunks.

constexpr int64_t kL16Chunk = 32, kL16Groups = 8, kL16TableBytes = 81 * 32;
#define L16_ADD(P, Q)                                                                 \
  acc[((P) & 15) >> 2] = _mm256_add_epi16(                                            \
      acc[((P) & 15) >> 2], _mm256_load_si256(reinterpret_cast<const __m256i*>(       \
                                tab + (((P) >> 4) * 4 + ((P) & 3)) * kL16TableBytes + \
                                ((Q >> (8 * ((P) & 7))) & 0xff) * 16)));
BITNET_AVX2 inline void RunLut16(const Problem& p, int64_t m0, int64_t r0, int64_t r1) {
  thread_local std::vector<int16_t> xt_buf, tab_buf, part_buf;
  thread_local std::vector<int32_t> acc_buf;
  const int64_t i = p.i, rows = r1 - r0;
  xt_buf.resize(i * 16);
  tab_buf.resize(kL16Groups * 81 * 16 + 32);
  part_buf.assign(rows * 4 * 16, 0);
  acc_buf.assign(rows * 4 * 16, 0);
  int16_t* xt = xt_buf.data();
  int16_t* tables = reinterpret_cast<int16_t*>((reinterpret_cast<uintptr_t>(tab_buf.data()) + 63) &
                                               ~uintptr_t{63});
  const char* tab = reinterpret_cast<const char*>(tables);
  LutTransposeTokens(p.x + m0 * i, i, xt, 16);
  LutTransposeTokens(p.x + (m0 + 8) * i, i, xt + 8, 16);
  alignas(32) uint8_t ix[32];
  int64_t nchunks = 0;
  for (int64_t k = 0; k < i; k += kL16Chunk) {
    LutBuildTables<__m256i>(xt + k * 16, kL16Groups, tables);
    const uint8_t* w = p.w + r0 * i + k;
    const bool widen = (++nchunks % 8 == 0) || k + kL16Chunk >= i;
    for (int64_t row = 0; row < rows; ++row, w += i) {
      _mm_prefetch(reinterpret_cast<const char*>(w + 4 * i), _MM_HINT_T0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ix), LutIndices32(w));
      __m256i* pp = reinterpret_cast<__m256i*>(part_buf.data() + row * 64);
      __m256i acc[4] = {_mm256_loadu_si256(pp), _mm256_loadu_si256(pp + 1),
                        _mm256_loadu_si256(pp + 2), _mm256_loadu_si256(pp + 3)};
      LUT_EIGHT(L16_ADD, 0);
      LUT_EIGHT(L16_ADD, 8);
      LUT_EIGHT(L16_ADD, 16);
      LUT_EIGHT(L16_ADD, 24);
      if (widen) {
        __m256i* a = reinterpret_cast<__m256i*>(acc_buf.data() + row * 64);
        for (int j = 0; j < 4; ++j) {
          _mm256_storeu_si256(
              a + 2 * j, _mm256_add_epi32(_mm256_loadu_si256(a + 2 * j),
                                          _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[j]))));
          _mm256_storeu_si256(
              a + 2 * j + 1,
              _mm256_add_epi32(_mm256_loadu_si256(a + 2 * j + 1),
                               _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[j], 1))));
          _mm256_storeu_si256(pp + j, _mm256_setzero_si256());
        }
      } else {
        for (int j = 0; j < 4; ++j) _mm256_storeu_si256(pp + j, acc[j]);
      }
    }
  }
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t j = 0; j < 4; ++j) {
      const int32_t* a = acc_buf.data() + (row * 4 + j) * 16;
      int32_t* o = p.out + m0 * 4 * p.r + j * p.r + r0 + row;
      for (int64_t t = 0; t < 16; ++t) o[t * 4 * p.r] = a[t];
    }
}

BITNET_SIMD_WARNINGS_ON
#endif  // BITNET_TERNARY_X86

}  // namespace bitnet_ternary

namespace bt = bitnet_ternary;

// The ceiling of the 8-token lookup on this CPU, without index computation or table building:
// vpaddw xmm with a memory operand at random entries of a 16-group table (20.7 KB, L1), the
// indices read 8 at a time into a general register and taken apart (movzbl al / ah, shr 16),
// as the kernel does; "fixed" adds the same entries at index 0 (no scalar work).
#define PROBE_ADD(REG, G, ACC) "vpaddw " #G "*1296(%1,%%" REG ",8), %%xmm" ACC ", %%xmm" ACC "\n"
#define PROBE_TWO(G, A, B)                                                            \
  "movzbl %%al, %%ecx\n movzbl %%ah, %%edx\n shr $16, %%rax\n" PROBE_ADD("rcx", G, A) \
      PROBE_ADD("rdx", G + 1, B)
#define PROBE_EIGHT(G)                                                     \
  "mov (%2,%0), %%rax\n" PROBE_TWO(G, "0", "1") PROBE_TWO(G + 2, "2", "3") \
      PROBE_TWO(G + 4, "0", "1") PROBE_TWO(G + 6, "2", "3") "add $8, %0\n"
#define PROBE_FIXED(G)                                                                   \
  PROBE_ADD("rcx", G, "0")                                                               \
  PROBE_ADD("rdx", G + 1, "1")                                                           \
  PROBE_ADD("rcx", G + 2, "2")                                                           \
  PROBE_ADD("rdx", G + 3, "3")                                                           \
  PROBE_ADD("rcx", G + 4, "0") PROBE_ADD("rdx", G + 5, "1") PROBE_ADD("rcx", G + 6, "2") \
      PROBE_ADD("rdx", G + 7, "3") "add $8, %0\n"

static void LookupCeiling() {
  alignas(64) static uint8_t table[16 * 1296 + 64];
  alignas(64) static uint8_t index[4096];
  std::mt19937 g(2);
  for (auto& b : index) b = static_cast<uint8_t>(2 * (g() % 81));
  for (int fixed = 0; fixed < 2; ++fixed) {
    const long reps = 200000;
    const auto t0 = std::chrono::steady_clock::now();
    for (long rep = 0; rep < reps; ++rep) {
      long k = 0;
      if (fixed) {
        __asm__ volatile("xor %%ecx, %%ecx\n xor %%edx, %%edx\n 1:\n" PROBE_FIXED(0)
                             PROBE_FIXED(8) "cmp $4096, %0\n jl 1b\n"
                         : "+r"(k)
                         : "r"(table), "r"(index)
                         : "xmm0", "xmm1", "xmm2", "xmm3", "rcx", "rdx", "cc", "memory");
      } else {
        __asm__ volatile("1:\n" PROBE_EIGHT(0) PROBE_EIGHT(8) "cmp $4096, %0\n jl 1b\n"
                         : "+r"(k)
                         : "r"(table), "r"(index)
                         : "xmm0", "xmm1", "xmm2", "xmm3", "rax", "rcx", "rdx", "cc", "memory");
      }
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("{\"lookup_adds_per_ns\": %.3f, \"indices\": \"%s\"}\n", 4096.0 * reps / s / 1e9,
                fixed ? "fixed" : "extracted");
  }
}

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "ceiling") == 0) {
    LookupCeiling();
    return 0;
  }
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s N(8|16) I R CALLS [COPIES] | %s ceiling\n", argv[0], argv[0]);
    return 2;
  }
  const int n = std::atoi(argv[1]);
  const int64_t i = std::atoll(argv[2]), r = std::atoll(argv[3]);
  const long calls = std::atol(argv[4]);
  const int copies = argc > 5 ? std::atoi(argv[5]) : 1;
  if ((n != 8 && n != 16) || i % 64 != 0 || !bt::IsaSupported(bt::kAvx2)) {
    std::fprintf(stderr, "needs N 8 or 16, I a multiple of 64, an AVX2 CPU\n");
    return 2;
  }
  std::mt19937 g(1);
  std::vector<std::vector<uint8_t>> w(copies, std::vector<uint8_t>(r * i));
  for (auto& c : w) {
    for (auto& b : c)
      b = static_cast<uint8_t>(g() % 3 | g() % 3 << 2 | g() % 3 << 4 | g() % 3 << 6);
  }
  std::vector<int8_t> x(n * i);
  for (auto& v : x) v = static_cast<int8_t>(static_cast<int>(g() % 255) - 127);
  std::vector<int32_t> xsum(n, 0), ref(n * 4 * r), out(n * 4 * r);
  for (int m = 0; m < n; ++m) {
    for (int64_t k = 0; k < i; ++k) xsum[m] += x[m * i + k];
  }
  bt::Problem p{x.data(), w[0].data(), ref.data(), xsum.data(), n, i, r};
  auto lut = [&](const bt::Problem& q) {
    if (n == 8) {
      bt::RunLut8(q, 0, 0, r);
    } else {
      bt::RunLut16(q, 0, 0, r);
    }
  };
  bt::RunRows(bt::kAvx2, p, 0, r);
  p.out = out.data();
  lut(p);
  const bool exact = std::memcmp(out.data(), ref.data(), out.size() * 4) == 0;
  for (int round = 0; round < 5; ++round) {
    double s[2];
    for (int v = 0; v < 2; ++v) {
      const auto t0 = std::chrono::steady_clock::now();
      for (long c = 0; c < calls; ++c) {
        p.w = w[c % copies].data();
        if (v) {
          lut(p);
        } else {
          bt::RunRows(bt::kAvx2, p, 0, r);
        }
      }
      s[v] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    const double macs = double(n) * i * 4 * r * calls;
    std::printf(
        "{\"tokens\": %d, \"i\": %lld, \"r\": %lld, \"exact\": %s, \"avx2gemm_gmacs\": %.1f, "
        "\"lut_gmacs\": %.1f, \"lut_over_avx2gemm\": %.2f}\n",
        n, static_cast<long long>(i), static_cast<long long>(r), exact ? "true" : "false",
        macs / s[0] / 1e9, macs / s[1] / 1e9, s[0] / s[1]);
  }
  return exact ? 0 : 1;
}
