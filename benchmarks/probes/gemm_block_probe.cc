// Probe (issue 16, 2026-12-04): the multiply-accumulate blocks of the AVX2 and AVX-VNNI
// GEMMs as bare asm loops over L1-hot bytes, one thread, to tell a core's limit from a
// kernel's overheads. Timing only (the operands are constant and the sums are not checked).
// Not part of the package: kept so the fifteenth session's numbers in benchmarks/README.md can
// be rerun on another CPU (an AVX2-only Zen 3 first) before a kernel is chosen for it.
//
//   g++ -std=c++17 -O2 benchmarks/probes/gemm_block_probe.cc -o /tmp/gp && /tmp/gp
//
// One line per loop, GMAC/s (best of 5 rounds of 200000 calls over 1024 columns):
//   c4  the shipped AVX2 block (ternary_gemm_asm.h Avx2Gemm4Row): 4 tokens, the planes
//       unpacked per 16 columns (broadcast, 2 vpsrlvd, 2 vpand), 8 maddubs + 8 adds: 20 vector
//       instructions per 256 multiply-adds
//   a8  8 tokens sharing one unpacking, one plane pair per pass (the two-pass block tried and
//       dropped): 18 per 256
//   g6  6 tokens on packed rows, 12 int16 accumulators (tried in the GEMM and dropped): 28
//       per 384, i.e. 18.7 per 256
//   u4  the shipped unpacked-tile block (Avx2Gemm4RowU): planes loaded ready-made, 16 per 256
//   v4  AVX-VNNI, 4 tokens on unpacked planes: 8 vpdpbusd per 256 (8 accumulators)
//   v6  AVX-VNNI, 6 tokens (ternary_avxvnni_asm.h): 12 vpdpbusd per 384 (12 accumulators)
// (The packed loops take their shift counts and mask from memory here, the kernels from
// registers.) Measured on the 2-core Xeon VM (3.9 GHz), three runs: c4 126-132, a8 129-136,
// u4 159-163, v4 175-187, v6 228-239; g6 (two runs) 137-150 against c4's 120-133 in the same
// runs, which in the GEMM (6 + 2 tokens at M = 8) came to 0.95-1.05x.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr int64_t kCols = 1024;  // columns per call; tokens' activation rows 4096 bytes apart

// clang-format off
#define BX(OFF, R) "vbroadcasti128 " OFF "(%[x],%[k]), %%ymm" R "\n"
#define MAC(P, A) "vpmaddubsw %%ymm4, %%ymm" P ", %%ymm2\n vpaddw %%ymm2, %%ymm" A ", %%ymm" A "\n"
#define DP(P, A) "%{vex%} vpdpbusd %%ymm4, %%ymm" P ", %%ymm" A "\n"
#define LOOP(BODY) "1:\n" BODY "add $16, %[k]\n cmp %[n], %[k]\n jl 1b\n"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
                "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory"
#define C4_BODY                                                                                \
  "vbroadcasti128 (%[w],%[k]), %%ymm1\n vpsrlvd %[s0], %%ymm1, %%ymm0\n"                      \
  "vpsrlvd %[s1], %%ymm1, %%ymm1\n vpand %[m], %%ymm0, %%ymm0\n vpand %[m], %%ymm1, %%ymm1\n" \
  BX("0", "4") MAC("0", "6") MAC("1", "7") BX("4096", "4") MAC("0", "8") MAC("1", "9")         \
  BX("8192", "4") MAC("0", "10") MAC("1", "11") BX("12288", "4") MAC("0", "12") MAC("1", "13")
#define A8_BODY                                                                                \
  "vbroadcasti128 (%[w],%[k]), %%ymm0\n vpsrlvd %[s0], %%ymm0, %%ymm0\n"                      \
  "vpand %[m], %%ymm0, %%ymm0\n"                                                               \
  BX("0", "4") MAC("0", "6") BX("4096", "4") MAC("0", "7") BX("8192", "4") MAC("0", "8")       \
  BX("12288", "4") MAC("0", "9") BX("16384", "4") MAC("0", "10") BX("20480", "4")              \
  MAC("0", "11") BX("24576", "4") MAC("0", "12") BX("28672", "4") MAC("0", "13")
#define MAC15(P, A) \
  "vpmaddubsw %%ymm4, %%ymm" P ", %%ymm15\n vpaddw %%ymm15, %%ymm" A ", %%ymm" A "\n"
#define G6_BODY                                                                                \
  "vbroadcasti128 (%[w],%[k]), %%ymm1\n vpsrlvd %[s0], %%ymm1, %%ymm0\n"                      \
  "vpsrlvd %[s1], %%ymm1, %%ymm1\n vpand %[m], %%ymm0, %%ymm0\n vpand %[m], %%ymm1, %%ymm1\n" \
  BX("0", "4") MAC15("0", "2") MAC15("1", "3") BX("4096", "4") MAC15("0", "5")                 \
  MAC15("1", "6") BX("8192", "4") MAC15("0", "7") MAC15("1", "8") BX("12288", "4")             \
  MAC15("0", "9") MAC15("1", "10") BX("16384", "4") MAC15("0", "11") MAC15("1", "12")          \
  BX("20480", "4") MAC15("0", "13") MAC15("1", "14")
#define U4_BODY                                                                                \
  "vmovdqu (%[w],%[k],4), %%ymm0\n vmovdqu 32(%[w],%[k],4), %%ymm1\n"                         \
  BX("0", "4") MAC("0", "6") MAC("1", "7") BX("4096", "4") MAC("0", "8") MAC("1", "9")         \
  BX("8192", "4") MAC("0", "10") MAC("1", "11") BX("12288", "4") MAC("0", "12") MAC("1", "13")
#define V4_BODY                                                                                \
  "vmovdqu (%[w],%[k],4), %%ymm0\n vmovdqu 32(%[w],%[k],4), %%ymm1\n"                         \
  BX("0", "4") DP("0", "6") DP("1", "7") BX("4096", "4") DP("0", "8") DP("1", "9")             \
  BX("8192", "4") DP("0", "10") DP("1", "11") BX("12288", "4") DP("0", "12") DP("1", "13")
#define V6_BODY                                                                                \
  V4_BODY BX("16384", "4") DP("0", "14") DP("1", "15") BX("20480", "4") DP("0", "2")           \
  DP("1", "3")
// clang-format on

struct Operands {
  const uint8_t* w;  // 4 * kCols bytes (unpacked planes; the packed loops read the first kCols)
  const int8_t* x;   // 6 rows of 4096 bytes
  alignas(32) int32_t s0[8] = {0, 0, 0, 0, 2, 2, 2, 2};  // vpsrlvd counts: planes 0 / 1
  alignas(32) int32_t s1[8] = {4, 4, 4, 4, 6, 6, 6, 6};  // planes 2 / 3
  alignas(32) uint8_t m[32] = {3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
                               3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3};  // a plane's bits
};

// One function per loop, each given every operand (a loop reads the ones its body names).
#define RUNNER(NAME, TARGET, BODY)                                                           \
  __attribute__((target(TARGET))) void NAME(const Operands& o) {                             \
    int64_t k = 0;                                                                           \
    asm volatile(LOOP(BODY)                                                                  \
                 : [k] "+r"(k)                                                               \
                 : [w] "r"(o.w), [x] "r"(o.x), [n] "r"(kCols), [s0] "m"(o.s0), [s1] "m"(o.s1), \
                   [m] "m"(o.m)                                                              \
                 : CLOBBER);                                                                 \
  }
RUNNER(RunC4, "avx2", C4_BODY)
RUNNER(RunA8, "avx2", A8_BODY)
RUNNER(RunG6, "avx2", G6_BODY)
RUNNER(RunU4, "avx2", U4_BODY)
RUNNER(RunV4, "avx2,avxvnni", V4_BODY)
RUNNER(RunV6, "avx2,avxvnni", V6_BODY)
#undef RUNNER

// Best GMAC/s of 5 rounds of `calls` calls of fn, each `macs` multiply-adds.
double Best(void (*fn)(const Operands&), const Operands& o, double macs, int calls) {
  double best = 0;
  for (int round = 0; round < 5; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int c = 0; c < calls; ++c) fn(o);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, macs * calls / s / 1e9);
  }
  return best;
}

}  // namespace

int main() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2")) {
    std::printf("this CPU has no AVX2\n");
    return 1;
  }
  std::vector<uint8_t> w(4 * kCols + 64, 0x55);
  std::vector<int8_t> x(6 * 4096 + 64, 3);
  const Operands o{w.data(), x.data()};
  constexpr int kCalls = 200000;
  const double per16 = kCols / 16.0;
  std::printf("c4 %.1f GMAC/s\n", Best(RunC4, o, 256 * per16, kCalls));
  std::printf("a8 %.1f GMAC/s\n", Best(RunA8, o, 256 * per16, kCalls));
  std::printf("g6 %.1f GMAC/s\n", Best(RunG6, o, 384 * per16, kCalls));
  std::printf("u4 %.1f GMAC/s\n", Best(RunU4, o, 256 * per16, kCalls));
  if (__builtin_cpu_supports("avxvnni")) {
    std::printf("v4 %.1f GMAC/s\n", Best(RunV4, o, 256 * per16, kCalls));
    std::printf("v6 %.1f GMAC/s\n", Best(RunV6, o, 384 * per16, kCalls));
  } else {
    std::printf("v4, v6: this CPU has no AVX-VNNI\n");
  }
  return 0;
}
