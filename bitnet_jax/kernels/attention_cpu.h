// Decode/prefill attention over the stacked float32 KV cache, read in place (CPU).
//
//   q:      f32 [B, T, N, H]          this call's queries, RoPE applied
//   k, v:   f32 [L, B, K, S, H]       the whole cache (attention.py layout), this call's keys and
//                                     values already written at slots index..index+T-1
//   out:    f32 [B, T, N, H]
//
// Query t of row b sits in slot index+t and sees the slots starts[b] <= s <= index+t (left
// padding, attention.py); query head n uses kv head n / G. out = softmax(q.k / sqrt(H)) . v with
// the softmax in float32, as attention.attend computes it. A query with no visible slot (a pad
// position) gets what the XLA path gives it: every score masked to the same value, i.e. the mean
// of v over all S slots.
//
// Why a kernel: inside lax.scan XLA copies the layer's [B, K, S, H] slice of each cache before
// its dot (3 MB per layer of the large model at S=256, 5 ms of a 20 ms decode step here), and it
// reads all S slots; this reads only the visible ones, in place.

#ifndef BITNET_JAX_KERNELS_ATTENTION_CPU_H_
#define BITNET_JAX_KERNELS_ATTENTION_CPU_H_

#include <cmath>
#include <cstdint>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BITNET_ATTN_X86 1
#else
#define BITNET_ATTN_X86 0
#endif

namespace bitnet_attention {

struct Problem {
  const float* q;       // [B, T, N, H]
  const float* k;       // [B, K, S, H] of the selected layer
  const float* v;       // [B, K, S, H]
  const int32_t* starts;  // [B]
  float* out;           // [B, T, N, H]
  int64_t b, t, n, kh, s, h;
  int64_t index;
  bool avx2;            // use the AVX2+FMA dot / axpy
};

inline float DotScalar(const float* a, const float* b, int64_t h) {
  float s = 0.f;
  for (int64_t i = 0; i < h; ++i) s += a[i] * b[i];
  return s;
}

inline void AxpyScalar(float p, const float* x, float* y, int64_t h) {
  for (int64_t i = 0; i < h; ++i) y[i] += p * x[i];
}

#if BITNET_ATTN_X86
__attribute__((target("avx2,fma"))) inline float DotAvx2(const float* a, const float* b,
                                                         int64_t h) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= h; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  if (i + 8 <= h) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    i += 8;
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float out = _mm_cvtss_f32(s);
  for (; i < h; ++i) out += a[i] * b[i];
  return out;
}

__attribute__((target("avx2,fma"))) inline void AxpyAvx2(float p, const float* x, float* y,
                                                         int64_t h) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < h; ++i) y[i] += p * x[i];
}
#endif

inline float Dot(bool avx2, const float* a, const float* b, int64_t h) {
#if BITNET_ATTN_X86
  if (avx2) return DotAvx2(a, b, h);
#endif
  (void)avx2;
  return DotScalar(a, b, h);
}

inline void Axpy(bool avx2, float p, const float* x, float* y, int64_t h) {
#if BITNET_ATTN_X86
  if (avx2) return AxpyAvx2(p, x, y, h);
#endif
  (void)avx2;
  AxpyScalar(p, x, y, h);
}

// One work unit: row bi, kv head ki, query t; all G query heads of that kv head together, so
// each cached key/value row is loaded once for the G heads.
inline void RunUnit(const Problem& p, int64_t unit, std::vector<float>& scores) {
  const int64_t g = p.n / p.kh;
  const int64_t t = unit % p.t;
  const int64_t ki = (unit / p.t) % p.kh;
  const int64_t bi = unit / (p.t * p.kh);
  const float* kc = p.k + (bi * p.kh + ki) * p.s * p.h;
  const float* vc = p.v + (bi * p.kh + ki) * p.s * p.h;
  const float scale = 1.0f / std::sqrt(static_cast<float>(p.h));
  int64_t lo = p.starts[bi], hi = p.index + t;  // visible slots [lo, hi]
  if (lo < 0) lo = 0;
  if (hi > p.s - 1) hi = p.s - 1;
  const bool none = lo > hi;
  if (none) {  // all scores masked alike: uniform weights over all S slots
    lo = 0;
    hi = p.s - 1;
  }
  const int64_t len = hi - lo + 1;
  scores.resize(static_cast<size_t>(g * len));
  for (int64_t gi = 0; gi < g; ++gi) {
    const float* qv = p.q + ((bi * p.t + t) * p.n + ki * g + gi) * p.h;
    float* sc = scores.data() + gi * len;
    float mx = -INFINITY;
    for (int64_t s = 0; s < len; ++s) {
      sc[s] = none ? 0.f : Dot(p.avx2, qv, kc + (lo + s) * p.h, p.h) * scale;
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
    const float* vr = vc + (lo + s) * p.h;
    for (int64_t gi = 0; gi < g; ++gi) {
      float* o = p.out + ((bi * p.t + t) * p.n + ki * g + gi) * p.h;
      Axpy(p.avx2, scores[gi * len + s], vr, o, p.h);
    }
  }
}

inline bool HasAvx2Fma() {
#if BITNET_ATTN_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace bitnet_attention

#endif  // BITNET_JAX_KERNELS_ATTENTION_CPU_H_
