// The float LM head from a 16-bit table, and the bitnet_half_linear FFI handler's body
// (ffi_handlers.cc binds it): x [M, D] float32 by w [V, D] float16 or bfloat16 -> logits
// [M, V] float32 (transformer.unembed under a float32 policy).
//
// Every weight is widened to float32 exactly (F16C / a 16-bit shift, attention_cache.h's loads)
// and the products are summed in float32 with FMA, the arithmetic of XLA's float32 dot of the
// widened table but in another order (equal to float32 rounding, not bit for bit). Why: the
// loaders keep a table the file stores in 16 bits as it is (model/params.py table_dtype), since
// a float32 copy of BitNet-2B4T's tied 128256 x 2560 embedding is 1.3 GB held and read once per
// decode step, and XLA would widen the whole table again in every call.
//
// Blocks of 2-4 rows x up to 6 tokens: each widened 8 weights feed one FMA per token, with
// 8-12 independent accumulators; the table streams from memory once per call (each block
// fetching its rows 1 KiB ahead), in tiles that stay in L2 while each block of tokens runs
// over them (HeadRowsAvx2). 2B4T's table on the 2-core Xeon, 2 threads, best of 7: M = 1 / 2 /
// 4 / 8 / 16 24.1 / 25.3 / 30 / 49-52 / 82-83 ms (25.6 / 28.6 / 36.6 / 59.8 / 97 without the
// prefetch; blocks of 4 tokens: M = 5 / 12 / 16 41 / 69-72 / 89 ms, 6 tokens 35 / 65 / 82;
// XLA's dot of a float32 table M = 1 / 8 49.5 / 98 ms). Tried: the columns in L1-sized
// chunks per token block (partial sums added to out): 1.2-1.45x slower at M = 4-16.

#ifndef BITNET_JAX_KERNELS_CPU_HALF_HEAD_CPU_H_
#define BITNET_JAX_KERNELS_CPU_HALF_HEAD_CPU_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "attention_cache.h"  // the 16-bit element types, their widening loads, Sum8
#include "ffi_problems.h"
#include "ffi_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace bitnet_half {

namespace ba = bitnet_attention;

// Rows [r0, r1) of out [M, V]: out[t, r] = sum_k x[t, k] * w[r, k] (C = ba::kF16 or ba::kBF16).
template <int C>
inline void HeadRowsScalar(const float* x, const uint16_t* w, float* out, int64_t m, int64_t d,
                           int64_t v, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < m; ++t) {
      float s = 0.f;
      for (int64_t k = 0; k < d; ++k) s += x[t * d + k] * ba::LoadOne<C>(w, r * d + k);
      out[t * v + r] = s;
    }
  }
}

#if BITNET_ATTN_X86
// Bytes ahead of each row that a block fetches into L1 (the table streams from memory).
constexpr int64_t kAhead = 1024;

// Columns k..k+7 of NR rows from r by NT tokens from t0 into acc.
template <int C, int NR, int NT>
BITNET_ATTN_TARGET __attribute__((always_inline)) inline void HeadStep(
    const float* x, const uint16_t* w, int64_t d, int64_t r, int64_t t0, int64_t k,
    __m256 (&acc)[NR][NT]) {
  __m256 wv[NR];
  for (int j = 0; j < NR; ++j) wv[j] = ba::Load8<C>(w, (r + j) * d + k);
  for (int t = 0; t < NT; ++t) {
    const __m256 xv = _mm256_loadu_ps(x + (t0 + t) * d + k);
    for (int j = 0; j < NR; ++j) acc[j][t] = _mm256_fmadd_ps(xv, wv[j], acc[j][t]);
  }
}

// NR rows from r by NT tokens from t0 (see the top of the file).
template <int C, int NR, int NT>
BITNET_ATTN_TARGET inline void HeadBlock(const float* x, const uint16_t* w, float* out,
                                         int64_t d, int64_t v, int64_t r, int64_t t0) {
  __m256 acc[NR][NT];
  for (int j = 0; j < NR; ++j)
    for (int t = 0; t < NT; ++t) acc[j][t] = _mm256_setzero_ps();
  const int64_t d8 = d & ~int64_t{7}, d32 = d & ~int64_t{31};
  int64_t k = 0;
  for (; k < d32; k += 32) {  // a line of each row per 32 columns, fetched kAhead bytes ahead
    for (int j = 0; j < NR; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + j) * d + k) + kAhead, _MM_HINT_T0);
    }
    HeadStep<C, NR, NT>(x, w, d, r, t0, k, acc);
    HeadStep<C, NR, NT>(x, w, d, r, t0, k + 8, acc);
    HeadStep<C, NR, NT>(x, w, d, r, t0, k + 16, acc);
    HeadStep<C, NR, NT>(x, w, d, r, t0, k + 24, acc);
  }
  for (; k < d8; k += 8) HeadStep<C, NR, NT>(x, w, d, r, t0, k, acc);
  for (int j = 0; j < NR; ++j) {
    for (int t = 0; t < NT; ++t) {
      const float* xt = x + (t0 + t) * d;
      float s = ba::Sum8(acc[j][t]);
      for (int64_t c = d8; c < d; ++c) s += xt[c] * ba::LoadOne<C>(w, (r + j) * d + c);
      out[(t0 + t) * v + r + j] = s;
    }
  }
}

// Rows [r0, r1) for the NT tokens from t0: 4 rows per block for 1-2 tokens (8 accumulators:
// enough independent FMAs to stream the table at one token), 2 for 3-6 (up to 12
// accumulators, 2 widened rows and a token's 8 activations: 15 of the 16 ymm registers).
template <int C, int NT>
BITNET_ATTN_TARGET inline void HeadRowsNT(const float* x, const uint16_t* w, float* out,
                                          int64_t d, int64_t v, int64_t r0, int64_t r1,
                                          int64_t t0) {
  constexpr int NR = NT <= 2 ? 4 : 2;
  int64_t r = r0;
  for (; r + NR <= r1; r += NR) HeadBlock<C, NR, NT>(x, w, out, d, v, r, t0);
  for (; r < r1; ++r) HeadBlock<C, 1, NT>(x, w, out, d, v, r, t0);
}

// Rows [r0, r1) for all m tokens: tiles of ~256 KiB of the table, each run for one block of
// up to 6 tokens after another, so that a block's activations stay in L1 and the tile in L2
// (token blocks inside the row loop re-read every token's activations per row: 0.45x XLA at
// M = 64).
template <int C>
BITNET_ATTN_TARGET inline void HeadRowsAvx2(const float* x, const uint16_t* w, float* out,
                                            int64_t m, int64_t d, int64_t v, int64_t r0,
                                            int64_t r1) {
  const int64_t tile = std::max<int64_t>(4, (int64_t{256} << 10) / (2 * d) & ~int64_t{3});
  for (int64_t rt = r0; rt < r1; rt += tile) {
    const int64_t re = std::min(r1, rt + tile);
    for (int64_t t0 = 0; t0 < m; t0 += 6) {
      switch (std::min<int64_t>(6, m - t0)) {
        case 6: HeadRowsNT<C, 6>(x, w, out, d, v, rt, re, t0); break;
        case 5: HeadRowsNT<C, 5>(x, w, out, d, v, rt, re, t0); break;
        case 4: HeadRowsNT<C, 4>(x, w, out, d, v, rt, re, t0); break;
        case 3: HeadRowsNT<C, 3>(x, w, out, d, v, rt, re, t0); break;
        case 2: HeadRowsNT<C, 2>(x, w, out, d, v, rt, re, t0); break;
        default: HeadRowsNT<C, 1>(x, w, out, d, v, rt, re, t0); break;
      }
    }
  }
}
#endif  // BITNET_ATTN_X86

template <int C>
inline void HeadRows(bool avx2, const float* x, const uint16_t* w, float* out, int64_t m,
                     int64_t d, int64_t v, int64_t r0, int64_t r1) {
#if BITNET_ATTN_X86
  if (avx2) return HeadRowsAvx2<C>(x, w, out, m, d, v, r0, r1);
#endif
  (void)avx2;
  HeadRowsScalar<C>(x, w, out, m, d, v, r0, r1);
}

}  // namespace bitnet_half

namespace bitnet_ffi {

// x [M, D] float32, w [V, D] float16 or bfloat16 -> out [M, V] float32 (top of the file).
inline ffi::Future HalfLinear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                              ffi::ResultBuffer<ffi::F32> out, int isa) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || wd[1] != xd[1] ||
      od[0] != xd[0] || od[1] != wd[0]) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_half_linear expects x [M, D], w [V, D] and out [M, V]; got x " + Dims(xd) +
        ", w " + Dims(wd) + ", out " + Dims(od)));
  }
  const ffi::DataType type = w.element_type();
  if (type != ffi::DataType::F16 && type != ffi::DataType::BF16) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_half_linear takes a float16 or bfloat16 table; cast other tables to float32"));
  }
  const int64_t m = xd[0], d = xd[1], v = wd[0];
  if (m == 0 || v == 0) return ReadyFuture();
  const float* xp = x.typed_data();
  const uint16_t* wp = static_cast<const uint16_t*>(w.untyped_data());
  float* op = out->typed_data();
  const bool avx2 = FloatSimd(isa), f16 = type == ffi::DataType::F16;
  auto job = std::make_shared<Job>();
  job->rows = [=](int64_t r0, int64_t r1) {
    if (f16) {
      bitnet_half::HeadRows<bitnet_attention::kF16>(avx2, xp, wp, op, m, d, v, r0, r1);
    } else {
      bitnet_half::HeadRows<bitnet_attention::kBF16>(avx2, xp, wp, op, m, d, v, r0, r1);
    }
  };
  // Work ~ the table's bytes times the tokens; chunks of ~16 KiB of rows (ffi_runtime.h).
  return Run(pool, job, v, ChunkRows(2 * d, v), m * v * d * 2, 2);
}

}  // namespace bitnet_ffi

#endif  // BITNET_JAX_KERNELS_CPU_HALF_HEAD_CPU_H_
