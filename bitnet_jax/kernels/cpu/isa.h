// Instruction-set paths of the CPU matmul kernels: detection, selection, the loop skeleton that
// every path runs on, and the dispatcher.
//
// The matmul kernels (ternary_paths.h: packed ternary x int8; int8_cpu.h: int8 x int8 LM head)
// each provide one row function per path and one Run* overload per path for their problem type:
//
//   scalar      portable C++ the compiler auto-vectorises (any CPU)
//   avx2        maddubs, 256-bit
//   avxvnni     vpdpbusd, 256-bit (Alder Lake+, Zen 5)
//   avx512vnni  vpdpbusd, 512-bit (Ice Lake+, Zen 4+)
//   amx         avx512vnni, and AMX-INT8 tiles for the packed GEMM (Sapphire Rapids+)
//
// RunRows() below picks the overload for the path in use. Every SIMD function carries a target
// attribute (BITNET_AVX2 / BITNET_AVXVNNI / BITNET_AVX512): the shared object is built without
// -m flags, runs on any x86-64, and picks a path at run time. The attributes are overridable so
// that tests/test_kernels_emulated.py can build every path with SIMDe's portable intrinsics.
//
// No FFI dependency: the kernels compile on their own (ffi_handlers.cc adds the XLA handlers).

#ifndef BITNET_JAX_KERNELS_CPU_ISA_H_
#define BITNET_JAX_KERNELS_CPU_ISA_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define BITNET_TERNARY_X86 1
#include <immintrin.h>
#else
#define BITNET_TERNARY_X86 0
#endif

// AVX-VNNI intrinsics and cpuid name arrived in GCC 11 and Clang 12; older compilers skip the path.
#if BITNET_TERNARY_X86 && ((defined(__clang__) && __clang_major__ >= 12) || \
                           (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define BITNET_TERNARY_AVXVNNI 1
#else
#define BITNET_TERNARY_AVXVNNI 0
#endif

#if BITNET_TERNARY_X86 && !defined(BITNET_AVX2)
#define BITNET_AVX2 __attribute__((target("avx2")))
#define BITNET_AVXVNNI __attribute__((target("avx2,avxvnni")))
#define BITNET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
// x86 inline assembly where a kernel has one (ternary_gemm_asm.h, int8_asm.h): native builds
// only, not the SIMDe builds of the emulated tests, which exercise the intrinsics instead.
#define BITNET_TERNARY_ASM 1
// AMX-INT8 (ternary_amx.h): native Linux builds with AVX-VNNI's compilers only (not the SIMDe
// builds of the emulated tests, which define the attributes above themselves: SIMDe has no AMX;
// the tile permission is a Linux system call).
#if BITNET_TERNARY_AVXVNNI && defined(__linux__)
#define BITNET_TERNARY_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define BITNET_AMX __attribute__((target("avx512f,avx512bw,avx512vnni,amx-tile,amx-int8")))
#endif
#endif
#ifndef BITNET_TERNARY_AMX
#define BITNET_TERNARY_AMX 0
#endif
#ifndef BITNET_TERNARY_ASM
#define BITNET_TERNARY_ASM 0
#endif

// GCC 12's AVX-512 headers trip bogus -W(maybe-)uninitialized warnings (_mm512_undefined_*):
// the SIMD sections of the kernel headers are wrapped in these.
#if defined(__GNUC__) && !defined(__clang__)
#define BITNET_SIMD_WARNINGS_OFF                                 \
  _Pragma("GCC diagnostic push")                                 \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")         \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define BITNET_SIMD_WARNINGS_ON _Pragma("GCC diagnostic pop")
#else
#define BITNET_SIMD_WARNINGS_OFF
#define BITNET_SIMD_WARNINGS_ON
#endif

namespace bitnet_ternary {

// Kernel paths, best last. The numbers are the ABI of bitnet_ternary_set_isa() (library.py ISAS).
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmx = 4 };

inline const char* IsaName(int isa) {
  switch (isa) {
    case kScalar: return "scalar";
    case kAvx2: return "avx2";
    case kAvxVnni: return "avxvnni";
    case kAvx512Vnni: return "avx512vnni";
    case kAmx: return "amx";
    default: return "unknown";
  }
}

#if BITNET_TERNARY_AMX
// CPUID.(7, 0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), and the kernel's permission: Linux
// leaves a process without the 8 KiB tile state until it asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA, the kernel's Documentation/arch/x86/xstate.rst), once, for all of its threads.
inline bool AmxUsable() {
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) {
      return false;
    }
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}
#endif

// True if this CPU (and OS, which must save the wider registers) can run path `isa`.
inline bool IsaSupported(int isa) {
  switch (isa) {
    case kScalar: return true;
#if BITNET_TERNARY_X86
    case kAvx2: return __builtin_cpu_supports("avx2");
    case kAvxVnni:
#if BITNET_TERNARY_AVXVNNI
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
#else
      return false;
#endif
    case kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
#if BITNET_TERNARY_AMX
    case kAmx: return IsaSupported(kAvx512Vnni) && AmxUsable();
#endif
#endif
    default: return false;
  }
}

inline int BestIsa() {
  for (int isa = kAmx; isa > kScalar; --isa) {
    if (IsaSupported(isa)) return isa;
  }
  return kScalar;
}

#if BITNET_TERNARY_X86
// Software prefetch distance in bytes of weights. Rows are contiguous, so this runs into the next
// row; it helped decode from DRAM by ~10-15% on Zen 3 (best of noisy runs), and prefetching past
// the end of the buffer is harmless (prefetches never fault).
constexpr int64_t kPrefetch = 2048;
#endif

// ---------------------------------------------------------------------------------------------
// Loop skeleton. A problem P has m tokens, i columns and r weight rows; one Run* call computes
// weight rows [r0, r1) for every token, so threads split the work along weight rows.
//
// Rows are cut into tiles of about kTileBytes of weights; every block of MB tokens streams over
// a tile while it sits in L1/L2, so the weights come from memory once per call whatever M is.
// The first block of tokens over a tile also prefetches the NEXT tile into L2 (`ahead` below):
// a kernel that does more than a few multiply-adds per weight byte otherwise streams from DRAM
// far below the bandwidth (here 4-token blocks read 9 GB/s of 40; with the prefetch, 2-8 token
// blocks run at the speed they reach from L2; benchmarks/README.md, CPU GEMM).

constexpr int64_t kTileBytes = int64_t{16} << 10;

// Rows per tile, a multiple of `step` (the rows one RowFn call computes).
inline int64_t TileRows(int64_t i, int64_t step) {
  const int64_t rows = kTileBytes / std::max<int64_t>(i, 1);
  return std::max<int64_t>(step, rows - rows % step);
}

// Tokens [m0, m1) over rows [t0, t1) (step `step`) in blocks of MB tokens; the remainder
// recurses to MB-1. RowFn<B>::Run(p, m0, row, ahead) computes `step` weight rows from `row` for
// the B consecutive tokens m0..m0+B-1; with ahead > 0 it also prefetches the same columns of
// rows row + ahead.. into L2 (only the first block of tokens does, and never past `lim`).
template <int MB, template <int> class RowFn, class P>
inline void RunTokens(const P& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1, int64_t step,
                      int64_t ahead, int64_t lim) {
  for (; m0 + MB <= m1; m0 += MB) {
    for (int64_t row = t0; row < t1; row += step) {
      RowFn<MB>::Run(p, m0, row, row + ahead + step <= lim ? ahead : 0);
    }
    ahead = 0;
  }
  if constexpr (MB > 1) {
    if (m0 < m1) RunTokens<MB - 1, RowFn>(p, m0, m1, t0, t1, step, ahead, lim);
  }
}

// Rows [r0, r1) (a multiple of kStep of them) tile by tile, tokens in blocks of MB. When one
// block of a row kernel (kStep 1) holds all the tokens, as in the GEMV, the rows run in one
// pass that prefetches within rows instead: the next-tile prefetch made M = 1 ~20% slower on
// AVX-512 (and the 1-2 token AVX2 rows no faster), measured interleaved (benchmarks/README.md).
template <int MB, template <int> class RowFn, int kStep = 1, class P>
inline void RunTiled(const P& p, int64_t r0, int64_t r1) {
  const bool one_pass = kStep == 1 && p.m <= MB;
  const int64_t tile = one_pass ? std::max<int64_t>(r1 - r0, 1) : TileRows(p.i, kStep);
  for (int64_t t0 = r0; t0 < r1; t0 += tile) {
    RunTokens<MB, RowFn>(p, 0, p.m, t0, std::min(r1, t0 + tile), kStep, tile, r1);
  }
}

// One token (the GEMV): every row in order, prefetching within rows (RowFn<1>).
template <template <int> class RowFn, class P>
inline void RunGemv(const P& p, int64_t r0, int64_t r1) {
  for (int64_t row = r0; row < r1; ++row) RowFn<1>::Run(p, 0, row, 0);
}

// Software prefetch of the weights a row kernel reads at byte k of its row w (once per 64
// bytes): with ahead > 0 the same column of the row `ahead_bytes` further on (next tile) to L2,
// else the bytes kPrefetch further on in this row to L1.
#if BITNET_TERNARY_X86
inline void PrefetchAt(const void* w, int64_t k, int64_t ahead_bytes) {
  const char* at = static_cast<const char*>(w) + k;
  if (ahead_bytes) {
    _mm_prefetch(at + ahead_bytes, _MM_HINT_T1);
  } else {
    _mm_prefetch(at + kPrefetch, _MM_HINT_T0);
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Dispatcher: weight rows [r0, r1) of problem p for every token with path `isa` (which must be
// supported). The Run* overloads of each problem type (Problem in ternary_paths.h, Int8Problem in
// int8_cpu.h) live in this namespace and are found by argument-dependent lookup when this is
// instantiated, so a kernel only has to define them.
template <class P>
inline void RunRows(int isa, const P& p, int64_t r0, int64_t r1) {
#if BITNET_TERNARY_X86
  switch (isa) {
#if BITNET_TERNARY_AMX
    case kAmx: RunAmx(p, r0, r1); return;
#endif
    case kAvx512Vnni: RunAvx512Vnni(p, r0, r1); return;
#if BITNET_TERNARY_AVXVNNI
    case kAvxVnni: RunAvxVnni(p, r0, r1); return;
#endif
    case kAvx2: RunAvx2(p, r0, r1); return;
    default: break;
  }
#else
  (void)isa;
#endif
  RunScalar(p, r0, r1);
}

}  // namespace bitnet_ternary

#endif  // BITNET_JAX_KERNELS_CPU_ISA_H_
