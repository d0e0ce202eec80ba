// Decode/prefill attention over the stacked float32 KV cache, read in place (CPU).
//
//   q:      f32 [Bq, T, N, H]         this call's queries, RoPE applied
//   k, v:   [L, B, K, S, H]           the whole cache (model/cache.py layout) in float32, float16
//                                     or bfloat16, or [L, B, K, S, H + 4] int8 rows (codes and
//                                     the row's scale: attention_cache.h), this call's keys and
//                                     values already written; each value is widened to float32
//   rows:   int32 [Bq]                the cache row (slot) of each query row
//   pos:    int32 [Bq]                the position of each query row's first query
//   out:    f32 [Bq, T, N, H]
//
// Query t of row i sits at position pos[i]+t of cache row rows[i] and sees its positions
// 0..pos[i]+t (capped at S-1); query head n uses kv head n / G. out = softmax(q.k / sqrt(H)) . v
// with the softmax in float32, as attention.attend computes it.
//
// Why a kernel: inside lax.scan XLA copies the layer's [B, K, S, H] slice of each cache before
// its dot (3 MB per layer of the large model at S=256, 5 ms of a 20 ms decode step here), and it
// reads all S slots; this reads only the visible ones, in place. Prefill chunks (T > 1) on AVX2
// run the tiled units of attention_prefill.h (NumUnits / RunUnits choose).

#ifndef BITNET_JAX_KERNELS_ATTENTION_CPU_H_
#define BITNET_JAX_KERNELS_ATTENTION_CPU_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_cache.h"  // Problem, the element types, the loads

namespace bitnet_attention {

// q . cache[at : at + h]
template <int C>
inline float DotScalar(const float* a, const void* b, int64_t at, int64_t h) {
  float s = 0.f;
  for (int64_t i = 0; i < h; ++i) s += a[i] * LoadOne<C>(b, at + i);
  return s;
}

// y += p * cache[at : at + h]
template <int C>
inline void AxpyScalar(float p, const void* x, int64_t at, float* y, int64_t h) {
  for (int64_t i = 0; i < h; ++i) y[i] += p * LoadOne<C>(x, at + i);
}

#if BITNET_ATTN_X86
template <int C>
BITNET_ATTN_TARGET inline float DotAvx2(const float* a, const void* b, int64_t at, int64_t h) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= h; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), Load8<C>(b, at + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), Load8<C>(b, at + i + 8), acc1);
  }
  if (i + 8 <= h) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), Load8<C>(b, at + i), acc0);
    i += 8;
  }
  float out = Sum8(_mm256_add_ps(acc0, acc1));
  for (; i < h; ++i) out += a[i] * LoadOne<C>(b, at + i);
  return out;
}

template <int C>
BITNET_ATTN_TARGET inline void AxpyAvx2(float p, const void* x, int64_t at, float* y, int64_t h) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, Load8<C>(x, at + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < h; ++i) y[i] += p * LoadOne<C>(x, at + i);
}
#endif

template <int C>
inline float Dot(bool avx2, const float* a, const void* b, int64_t at, int64_t h) {
#if BITNET_ATTN_X86
  if (avx2) return DotAvx2<C>(a, b, at, h);
#endif
  (void)avx2;
  return DotScalar<C>(a, b, at, h);
}

template <int C>
inline void Axpy(bool avx2, float p, const void* x, int64_t at, float* y, int64_t h) {
#if BITNET_ATTN_X86
  if (avx2) return AxpyAvx2<C>(p, x, at, y, h);
#endif
  (void)avx2;
  AxpyScalar<C>(p, x, at, y, h);
}

// One work unit: row bi, kv head ki, query t; all G query heads of that kv head together, so
// each cached key/value row is loaded once for the G heads.
template <int C>
inline void RunUnitT(const Problem& p, int64_t unit, std::vector<float>& scores) {
  const int64_t g = p.n / p.kh;
  const int64_t t = unit % p.t;
  const int64_t ki = (unit / p.t) % p.kh;
  const int64_t bi = unit / (p.t * p.kh);
  // element offset of this (cache row, head); rows[] and pos[] were range-checked by the handler
  const int64_t base = (static_cast<int64_t>(p.rows[bi]) * p.kh + ki) * p.s * p.rs;
  const float scale = 1.0f / std::sqrt(static_cast<float>(p.h));
  int64_t hi = static_cast<int64_t>(p.pos[bi]) + t;  // visible positions [0, hi]
  if (hi > p.s - 1) hi = p.s - 1;
  const int64_t lo = 0, len = hi + 1;
  scores.resize(static_cast<size_t>(g * len));
  for (int64_t gi = 0; gi < g; ++gi) {
    const float* qv = p.q + ((bi * p.t + t) * p.n + ki * g + gi) * p.h;
    float* sc = scores.data() + gi * len;
    float mx = -INFINITY;
    for (int64_t s = 0; s < len; ++s) {
      const int64_t at = base + (lo + s) * p.rs;
      sc[s] = Dot<C>(p.avx2, qv, p.k, at, p.h) * (scale * RowScale<C>(p.k, at, p.h));
      mx = sc[s] > mx ? sc[s] : mx;
    }
    float sum = 0.f;
    for (int64_t s = 0; s < len; ++s) {
      sc[s] = std::exp(sc[s] - mx);
      sum += sc[s];
    }
    const float inv = 1.0f / sum;
    for (int64_t s = 0; s < len; ++s) sc[s] *= inv;
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    float* o = p.out + ((bi * p.t + t) * p.n + ki * g + gi) * p.h;
    for (int64_t i = 0; i < p.h; ++i) o[i] = 0.f;
  }
  for (int64_t s = 0; s < len; ++s) {
    for (int64_t gi = 0; gi < g; ++gi) {
      float* o = p.out + ((bi * p.t + t) * p.n + ki * g + gi) * p.h;
      const int64_t at = base + (lo + s) * p.rs;
      Axpy<C>(p.avx2, scores[gi * len + s] * RowScale<C>(p.v, at, p.h), p.v, at, o, p.h);
    }
  }
}

#if BITNET_ATTN_X86
// GCC 12's AVX-512 headers trip bogus -W(maybe-)uninitialized warnings (_mm512_undefined_*).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// exp(x) for 16 floats (x <= 0 here: scores minus their max): 2^n · p(r) with n = round(x/ln2),
// r = x - n·ln2 in two parts, p the degree-6 Taylor polynomial of e^r on |r| <= ln2/2 (relative
// error < 2e-7, as Cephes' expf); below -87 it flushes to 0 as expf does.
BITNET_ATTN_TARGET512 inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.0f / 720);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 120));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 24));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 6));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// First element and visible length of unit `unit`'s (cache row, kv head) block.
inline void UnitSpan(const Problem& p, int64_t unit, int64_t* base, int64_t* len) {
  const int64_t t = unit % p.t, ki = (unit / p.t) % p.kh, bi = unit / (p.t * p.kh);
  *base = (static_cast<int64_t>(p.rows[bi]) * p.kh + ki) * p.s * p.rs;
  *len = std::min<int64_t>(static_cast<int64_t>(p.pos[bi]) + t, p.s - 1) + 1;
}

// RunUnitT for H = 16·NV on AVX-512: each query head's q and output stay in NV registers
// across all visible positions (the AVX2 path loads and stores the output row per position).
// Same arithmetic as RunUnitT up to the order of the float sums.
//
// The unit reads its keys, then its values, each a contiguous run (~28 KB for 145 positions of
// the large shape), from DRAM at batch 8. With software prefetches of the value row s (and the
// key row s + 8) while the key row s is read, and of unit `next`'s keys while the values are
// read (the values and next keys into L2: PrefetchRows), so that two streams are in flight,
// 24 layers x 8 rows x 16 heads x 145 positions (f16, Zen 5, interleaved with the old unit in
// one process, benchmarks/README.md) went from 14.4 to 23.7 GB/s on one thread (11.9 -> 7.2
// ms) and 21.1 to 28.1 GB/s on two (8.1 -> 6.1, load 0.8).
// Decode only (T = 1): with T > 1 consecutive units share their keys and values, which are
// then in cache, and the prefetches made prefill's attention 0.90x (B = 1, T = 128).
template <int C, int NV>
BITNET_ATTN_TARGET512 inline void RunUnit512(const Problem& p, int64_t unit, int64_t next,
                                             std::vector<float>& scores) {
  const int64_t g = p.n / p.kh, h = p.h, rs = p.rs;
  const int64_t t = unit % p.t;
  const int64_t ki = (unit / p.t) % p.kh;
  const int64_t bi = unit / (p.t * p.kh);
  int64_t base, len, next_base = 0, next_len = 0;
  UnitSpan(p, unit, &base, &len);
  const bool stream = p.t == 1;
  if (stream && next >= 0) UnitSpan(p, next, &next_base, &next_len);
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));
  scores.resize(static_cast<size_t>(len));
  for (int64_t gi = 0; gi < g; ++gi) {
    const int64_t row = (bi * p.t + t) * p.n + ki * g + gi;
    __m512 q[NV], o[NV];
    for (int j = 0; j < NV; ++j) q[j] = _mm512_loadu_ps(p.q + row * h + 16 * j);
    float mx = -INFINITY;
    for (int64_t s = 0; s < len; ++s) {
      if (stream && gi == 0) {  // later query heads of the kv head find both in cache
        PrefetchRows<C, true>(p.v, base, s, s + 1, rs);
        if (s + 8 < len) PrefetchRows<C>(p.k, base, s + 8, s + 9, rs);
      }
      const int64_t at = base + s * rs;
      __m512 acc = _mm512_mul_ps(q[0], Load16<C>(p.k, at));
      for (int j = 1; j < NV; ++j) acc = _mm512_fmadd_ps(q[j], Load16<C>(p.k, at + 16 * j), acc);
      const float sc = _mm512_reduce_add_ps(acc) * (scale * RowScale<C>(p.k, at, h));
      scores[s] = sc;
      mx = sc > mx ? sc : mx;
    }
    __m512 total = _mm512_setzero_ps();
    const __m512 mxv = _mm512_set1_ps(mx);
    for (int64_t s = 0; s < len; s += 16) {
      const __mmask16 live = len - s >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - s)) - 1);
      const __m512 e = Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores.data() + s), mxv));
      _mm512_mask_storeu_ps(scores.data() + s, live, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(live, e));
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(total);
    for (int j = 0; j < NV; ++j) o[j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < len; ++s) {
      if (gi == g - 1 && s < next_len) PrefetchRows<C, true>(p.k, next_base, s, s + 1, rs);
      const int64_t at = base + s * rs;
      const __m512 w = _mm512_set1_ps(scores[s] * inv * RowScale<C>(p.v, at, h));
      for (int j = 0; j < NV; ++j) o[j] = _mm512_fmadd_ps(w, Load16<C>(p.v, at + 16 * j), o[j]);
    }
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(p.out + row * h + 16 * j, o[j]);
  }
}

template <int C>
inline bool RunUnitAvx512(const Problem& p, int64_t unit, int64_t next,
                          std::vector<float>& scores) {
  switch (p.h) {
    case 64: RunUnit512<C, 4>(p, unit, next, scores); return true;
    case 96: RunUnit512<C, 6>(p, unit, next, scores); return true;
    case 128: RunUnit512<C, 8>(p, unit, next, scores); return true;
    default: return false;
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif
}  // namespace bitnet_attention

#include "attention_avx2.h"  // RunUnitAvx2: the same unit on AVX2

namespace bitnet_attention {

// Unit `unit`; `next` is the unit this thread runs after it (-1: none), whose keys the AVX-512
// and AVX2 units prefetch.
inline void RunUnit(const Problem& p, int64_t unit, int64_t next, std::vector<float>& scores) {
#if BITNET_ATTN_X86
  if (p.avx512) {
    const bool done = p.cache == kF16    ? RunUnitAvx512<kF16>(p, unit, next, scores)
                      : p.cache == kBF16 ? RunUnitAvx512<kBF16>(p, unit, next, scores)
                      : p.cache == kI8   ? RunUnitAvx512<kI8>(p, unit, next, scores)
                                         : RunUnitAvx512<kF32>(p, unit, next, scores);
    if (done) return;
  } else if (p.avx2) {
    const bool done = p.cache == kF16    ? RunUnitAvx2<kF16>(p, unit, next, scores)
                      : p.cache == kBF16 ? RunUnitAvx2<kBF16>(p, unit, next, scores)
                      : p.cache == kI8   ? RunUnitAvx2<kI8>(p, unit, next, scores)
                                         : RunUnitAvx2<kF32>(p, unit, next, scores);
    if (done) return;
  }
#else
  (void)next;
#endif
  switch (p.cache) {
    case kF16: return RunUnitT<kF16>(p, unit, scores);
    case kBF16: return RunUnitT<kBF16>(p, unit, scores);
    case kI8: return RunUnitT<kI8>(p, unit, scores);
    default: return RunUnitT<kF32>(p, unit, scores);
  }
}

inline bool HasAvx2Fma() {
#if BITNET_ATTN_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

inline bool HasAvx512() {
#if BITNET_ATTN_X86
  return HasAvx2Fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

}  // namespace bitnet_attention

#include "attention_prefill.h"  // T > 1 tiled; NumUnits / RunUnits, the handler's entry points

#endif  // BITNET_JAX_KERNELS_ATTENTION_CPU_H_
