// The AVX2 attention unit: RunUnit512 (attention_cpu.h) on 256-bit AVX2 + FMA (+ F16C) for
// H = 64, 96 and 128, for CPUs without AVX-512 (Zen 2/3, Intel before Ice Lake) and the
// BITNET_JAX_CPU_ISA=avx2 / avxvnni paths. Included by attention_cpu.h after RunUnit512.
//
// As there: each query head's output row stays in registers across all visible positions (the
// generic RunUnitT loads and stores it per position through AxpyAvx2), the exp is vectorised,
// and in decode (T = 1) the value row s and the key row s + 8 are prefetched while key row s is
// read, and the next unit's keys while the values are read. Differences forced by 16 ymm
// registers: q is reloaded from L1 per key row (no room for 12-16 q registers next to the
// accumulators), and for H = 128 the value pass runs over two halves of the row (16 output
// registers would spill), the second half re-reading the values from L1/L2. Keys go 4 at a
// time (KeyDots4: one hadd tree for 4 dot products, one 4-score store and a vector max); on
// the Zen 3 (2026-12-04, the large shape's decode, 24 layers x 8 rows x 16 heads x 145
// positions, one thread, alternating builds) int8 rows 7.4-10.5 -> 6.6-8.2 ms, float16
// 10.0-13.1 -> 10.3-11.9; with two threads float16 stays at the read bandwidth (~27 GB/s).
//
// Measured on the Zen 5 (2026-12-02; a throwaway harness calling RunUnitT with its AVX2
// dot/axpy and this unit alternately in one process, best of 7, wall time, load 0.5-2): decode,
// 24 layers x 8 rows x 16 heads x 145 positions, f16 cache (85 MB read per step): H = 96 one
// thread 14.6-18.2 -> 6.3-7.2 ms (2.3-2.5x, about the AVX-512 unit's 7.2 ms), two threads 10.8-
// 20.9 -> 7.0-11.7 ms (1.5-1.8x); H = 64 2.7-2.9x, H = 128 1.8-2.0x; prefill (B = 1, T = 128,
// no prefetch) 51.7-54.4 -> 27.8-28.1 ms (1.9x). Largest |difference| 6e-7 (1.4e-6 prefill).

#ifndef BITNET_JAX_KERNELS_ATTENTION_AVX2_H_
#define BITNET_JAX_KERNELS_ATTENTION_AVX2_H_

#if BITNET_ATTN_X86

namespace bitnet_attention {

// exp(x) for 8 floats, x <= 0: Exp16's polynomial (attention_cpu.h), with 2^n built in the
// exponent field (n >= -126 after the clamp at -87, so 2^n is a normal float).
BITNET_ATTN_TARGET inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.0f / 720);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 120));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 24));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 6));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Scores sc[0, len) (max mx) -> their softmax in place, and sc[len, end) -> 0 (end >= len a
// multiple of 8; the lanes past len are masked, whatever they held).
BITNET_ATTN_TARGET inline void SoftmaxRow(float* sc, int64_t len, int64_t end, float mx) {
  __m256 total = _mm256_setzero_ps();
  const __m256 mxv = _mm256_set1_ps(mx);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t s = 0; s < end; s += 8) {
    const __m256i left = _mm256_set1_epi32(static_cast<int>(std::max<int64_t>(len - s, 0)));
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, iota));
    const __m256 e = _mm256_and_ps(Exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + s), mxv)), live);
    _mm256_storeu_ps(sc + s, e);
    total = _mm256_add_ps(total, e);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / Sum8(total));
  for (int64_t s = 0; s < end; s += 8) {
    _mm256_storeu_ps(sc + s, _mm256_mul_ps(_mm256_loadu_ps(sc + s), inv));
  }
}

// Output columns [8 * J0, 8 * (J0 + NJ)) of one query head: o = sum_s w[s] * v[s], then stored.
template <int C, int J0, int NJ>
BITNET_ATTN_TARGET inline void ValuePass(const Problem& p, int64_t base, int64_t len,
                                         const float* w, float* out, bool pf, int64_t next_base,
                                         int64_t next_len) {
  const int64_t h = p.h, rs = p.rs;
  __m256 o[NJ];
  for (int j = 0; j < NJ; ++j) o[j] = _mm256_setzero_ps();
  for (int64_t s = 0; s < len; ++s) {
    if (pf && s < next_len) PrefetchRows<C, true>(p.k, next_base, s, s + 1, rs);
    const int64_t at = base + s * rs;
    __m256 ws = _mm256_broadcast_ss(w + s);
    if constexpr (C == kI8) ws = _mm256_mul_ps(ws, _mm256_set1_ps(RowScale<C>(p.v, at, h)));
    for (int j = 0; j < NJ; ++j) o[j] = _mm256_fmadd_ps(ws, Load8<C>(p.v, at + 8 * (J0 + j)), o[j]);
  }
  for (int j = 0; j < NJ; ++j) _mm256_storeu_ps(out + 8 * (J0 + j), o[j]);
}

// q . key of the cached key at element `at`, still in 8 lanes (two FMA chains, added).
template <int C, int NV>
BITNET_ATTN_TARGET inline __m256 KeyDot8(const Problem& p, const float* q, int64_t at) {
  __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(q), Load8<C>(p.k, at));
  __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(q + 8), Load8<C>(p.k, at + 8));
  for (int j = 2; j < NV; j += 2) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * j), Load8<C>(p.k, at + 8 * j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * j + 8), Load8<C>(p.k, at + 8 * j + 8), a1);
  }
  return _mm256_add_ps(a0, a1);
}

// q . key for the 4 cached keys at elements at, at + rs, at + 2 rs, at + 3 rs, times `scale`
// (and an int8 row's scale): one hadd tree for the four instead of a horizontal sum per key
// (whose latency chain, with the score's store and the running max, was ~1/3 of an int8 unit's
// samples).
template <int C, int NV>
BITNET_ATTN_TARGET inline __m128 KeyDots4(const Problem& p, const float* q, int64_t at,
                                          float scale) {
  const int64_t rs = p.rs;
  __m256 a[4];
  for (int u = 0; u < 4; ++u) a[u] = KeyDot8<C, NV>(p, q, at + u * rs);
  // lanes 0..3: sums of a[u]'s lanes 0-3, lanes 4..7: of its lanes 4-7
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m128 d = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  if constexpr (C == kI8) {
    return _mm_mul_ps(d, _mm_mul_ps(_mm_set1_ps(scale),
                                    _mm_setr_ps(RowScale<C>(p.k, at, p.h),
                                                RowScale<C>(p.k, at + rs, p.h),
                                                RowScale<C>(p.k, at + 2 * rs, p.h),
                                                RowScale<C>(p.k, at + 3 * rs, p.h))));
  }
  return _mm_mul_ps(d, _mm_set1_ps(scale));
}

// RunUnit512 for H = 8 * NV on AVX2 (see the top of the file).
template <int C, int NV>
BITNET_ATTN_TARGET inline void RunUnit256(const Problem& p, int64_t unit, int64_t next,
                                          std::vector<float>& scores) {
  const int64_t g = p.n / p.kh, h = p.h, rs = p.rs;
  const int64_t t = unit % p.t, ki = (unit / p.t) % p.kh, bi = unit / (p.t * p.kh);
  int64_t base, len, next_base = 0, next_len = 0;
  UnitSpan(p, unit, &base, &len);
  const bool stream = p.t == 1;
  if (stream && next >= 0) UnitSpan(p, next, &next_base, &next_len);
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));
  scores.resize(static_cast<size_t>((len + 7) & ~int64_t{7}));
  float* sc = scores.data();
  for (int64_t gi = 0; gi < g; ++gi) {
    const int64_t row = (bi * p.t + t) * p.n + ki * g + gi;
    const float* q = p.q + row * h;
    float mx = -INFINITY;
    int64_t s = 0;
    if (len >= 4) {  // 4 keys at a time, their 4 dot products reduced together (KeyDots4)
      __m128 mx4 = _mm_set1_ps(-INFINITY);
      for (; s + 4 <= len; s += 4) {
        if (stream && gi == 0) {  // later query heads of the kv head find both in cache
          PrefetchRows<C, true>(p.v, base, s, s + 4, rs);
          PrefetchRows<C>(p.k, base, std::min(s + 8, len), std::min(s + 12, len), rs);
        }
        const __m128 d = KeyDots4<C, NV>(p, q, base + s * rs, scale);
        _mm_storeu_ps(sc + s, d);
        mx4 = _mm_max_ps(d, mx4);
      }
      mx4 = _mm_max_ps(mx4, _mm_movehl_ps(mx4, mx4));
      mx = _mm_cvtss_f32(_mm_max_ss(mx4, _mm_movehdup_ps(mx4)));
    }
    for (; s < len; ++s) {
      if (stream && gi == 0) PrefetchRows<C, true>(p.v, base, s, s + 1, rs);
      const int64_t at = base + s * rs;
      const float v = Sum8(KeyDot8<C, NV>(p, q, at)) * (scale * RowScale<C>(p.k, at, h));
      sc[s] = v;
      mx = v > mx ? v : mx;
    }
    SoftmaxRow(sc, len, (len + 7) & ~int64_t{7}, mx);
    const bool pf = gi == g - 1;
    float* out = p.out + row * h;
    if constexpr (NV <= 12) {
      ValuePass<C, 0, NV>(p, base, len, sc, out, pf, next_base, next_len);
    } else {
      ValuePass<C, 0, NV / 2>(p, base, len, sc, out, pf, next_base, next_len);
      ValuePass<C, NV / 2, NV - NV / 2>(p, base, len, sc, out, false, 0, 0);
    }
  }
}

template <int C>
inline bool RunUnitAvx2(const Problem& p, int64_t unit, int64_t next, std::vector<float>& scores) {
  switch (p.h) {
    case 64: RunUnit256<C, 8>(p, unit, next, scores); return true;
    case 96: RunUnit256<C, 12>(p, unit, next, scores); return true;
    case 128: RunUnit256<C, 16>(p, unit, next, scores); return true;
    default: return false;
  }
}

}  // namespace bitnet_attention

#endif  // BITNET_ATTN_X86

#endif  // BITNET_JAX_KERNELS_ATTENTION_AVX2_H_
