// Prefill attention (T > 1 queries per cache row) on AVX2 + FMA (+ F16C), tiled, and the
// handler's entry points NumUnits / RunUnits, which choose between it and the per-query units:
// included at the end of attention_cpu.h; same Problem, same result up to the order of the
// float sums.
//
// The per-query units (RunUnit256 / RunUnit512) read, widen and dot every visible key and value
// once per query, each score ending in a horizontal sum. Here a work unit is one (query row, kv
// head, block of queries): ~kTileRows query-head rows (the block's queries times the G query
// heads of the kv head), which share every key and value they read:
//
//   scores: the visible keys 16 at a time, widened and transposed once ([H][16] floats, in L1);
//           then per 4 query-head rows and column c one broadcast of q[c] and two FMAs into 16
//           scores per row (no horizontal sums), times 1/sqrt(H);
//   softmax per row over its own visible positions (the causal mask), zeros past them;
//   values: 32 at a time widened once into L1, then per 4 rows and 16 output columns 8 FMAs
//           per value row, the rows' outputs accumulated across the blocks.
//
// Flash attention's tiling (Dao et al. 2022) without its online softmax: a unit's scores for
// all visible positions fit L2 (32 rows x S floats: 256 KB at S = 2048). Both ways run the same
// 2H/8 FMAs per (query, key); the gain is the widening, loads and horizontal sums shared by a
// unit's rows. Measured on the Zen 3 (AVX2 only, two threads, in-process alternation with the
// per-query units, f16 cache; benchmarks/README.md): the large shape's heads 1.55-1.8x, 2B4T's
// (G = 4, H = 128) 1.35-1.6x. AVX-512 machines take these AVX2 tiles too: on a Xeon with
// AVX-512 (two threads, f16, B = 1, T = 128) they beat RunUnit512 1.3x (large) and 1.35x
// (2B4T), and AVX-512 versions of ScoreRows / ValueRows (16 lanes, 8 FMA chains) gained nothing
// more (11.4 vs 11.3-12.3 ms): the tiles are not FMA-bound.

#ifndef BITNET_JAX_KERNELS_ATTENTION_PREFILL_H_
#define BITNET_JAX_KERNELS_ATTENTION_PREFILL_H_

#if BITNET_ATTN_X86

namespace bitnet_attention {

constexpr int64_t kKeyBlock = 16;    // keys per transposed block
constexpr int64_t kValueBlock = 32;  // values per widened block (>= kKeyBlock: shares its scratch)
constexpr int64_t kTileRows = 32;    // query-head rows per unit (at least G)
constexpr int64_t kMaxGroup = 128;   // the most query heads per kv head the tiled path takes

// Queries per unit: kTileRows query-head rows, G of them per query.
inline int64_t PrefillQueries(const Problem& p) {
  return std::max<int64_t>(1, kTileRows / (p.n / p.kh));
}

// Whether the tiled units run this call: AVX2 (AVX-512 machines included), several queries, H a
// multiple of 16, and at least 4 query-head rows per unit to share each key block.
inline bool PrefillTiled(const Problem& p) {
  return p.avx2 && p.t > 1 && p.h % 16 == 0 && p.n / p.kh <= kMaxGroup &&
         std::min(p.t, PrefillQueries(p)) * (p.n / p.kh) >= 4;
}

// Work units of the tiled path: (row, kv head, block of queries), the query block fastest.
inline int64_t PrefillUnits(const Problem& p) {
  const int64_t qb = PrefillQueries(p);
  return p.b * p.kh * ((p.t + qb - 1) / qb);
}

// 8 x 8 transpose: r[c][k] = old r[k][c].
BITNET_ATTN_TARGET inline void Transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Columns c..c+7 of the cached row at element `at` as values (an int8 row's codes times its
// scale).
template <int C>
BITNET_ATTN_TARGET inline __m256 LoadRow8(const void* cache, int64_t at, int64_t c, int64_t h) {
  if constexpr (C == kI8) {
    return _mm256_mul_ps(Load8<C>(cache, at + c), _mm256_set1_ps(RowScale<C>(cache, at, h)));
  }
  (void)h;
  return Load8<C>(cache, at + c);
}

// Keys s0..s0+nk-1 (nk <= 16) of the block at element `base`, widened: kt[c * 16 + j] = key
// s0 + j, column c; zeros for j >= nk (positions past the last visible one are never read).
template <int C>
BITNET_ATTN_TARGET inline void TransposeKeys(const Problem& p, int64_t base, int64_t s0, int64_t nk,
                                             float* kt) {
  const int64_t h = p.h, rs = p.rs;
  for (int64_t half = 0; half < kKeyBlock; half += 8) {
    for (int64_t c = 0; c < h; c += 8) {
      __m256 r[8];
      for (int64_t j = 0; j < 8; ++j) {
        r[j] = half + j < nk ? LoadRow8<C>(p.k, base + (s0 + half + j) * rs, c, h)
                             : _mm256_setzero_ps();
      }
      Transpose8(r);
      for (int64_t j = 0; j < 8; ++j) _mm256_storeu_ps(kt + (c + j) * kKeyBlock + half, r[j]);
    }
  }
}

// Scores of NR query-head rows q[i] against the 16 keys of kt: out[i][0..16) = q[i].k / sqrt(H).
template <int NR>
BITNET_ATTN_TARGET inline void ScoreRows(const float* const* q, const float* kt, int64_t h,
                                         float scale, float* const* out) {
  __m256 a[NR][2];
  for (int i = 0; i < NR; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < h; ++c) {
    const __m256 k0 = _mm256_loadu_ps(kt + c * kKeyBlock);
    const __m256 k1 = _mm256_loadu_ps(kt + c * kKeyBlock + 8);
    for (int i = 0; i < NR; ++i) {
      const __m256 qc = _mm256_broadcast_ss(q[i] + c);
      a[i][0] = _mm256_fmadd_ps(qc, k0, a[i][0]);
      a[i][1] = _mm256_fmadd_ps(qc, k1, a[i][1]);
    }
  }
  const __m256 sv = _mm256_set1_ps(scale);
  for (int i = 0; i < NR; ++i) {
    _mm256_storeu_ps(out[i], _mm256_mul_ps(a[i][0], sv));
    _mm256_storeu_ps(out[i] + 8, _mm256_mul_ps(a[i][1], sv));
  }
}

// out[i] (+)= sum over s in [s0, s1) of w[i][s] * vt[s - s0] for NR rows (w[i][s] = 0 past row
// i's own visible positions), vt the block's values widened ([s1 - s0][H] floats, in L1), 16
// output columns at a time; out is set by the first block (s0 == 0) and added to by the rest.
template <int NR>
BITNET_ATTN_TARGET inline void ValueRows(const float* vt, int64_t h, int64_t s0, int64_t s1,
                                         const float* const* w, float* const* out) {
  for (int64_t c = 0; c < h; c += 16) {
    __m256 o[NR][2];
    for (int i = 0; i < NR; ++i) {
      o[i][0] = s0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out[i] + c);
      o[i][1] = s0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out[i] + c + 8);
    }
    for (int64_t s = s0; s < s1; ++s) {
      const __m256 v0 = _mm256_loadu_ps(vt + (s - s0) * h + c);
      const __m256 v1 = _mm256_loadu_ps(vt + (s - s0) * h + c + 8);
      for (int i = 0; i < NR; ++i) {
        const __m256 ws = _mm256_broadcast_ss(w[i] + s);
        o[i][0] = _mm256_fmadd_ps(ws, v0, o[i][0]);
        o[i][1] = _mm256_fmadd_ps(ws, v1, o[i][1]);
      }
    }
    for (int i = 0; i < NR; ++i) {
      _mm256_storeu_ps(out[i] + c, o[i][0]);
      _mm256_storeu_ps(out[i] + c + 8, o[i][1]);
    }
  }
}

// Values s0..s1-1 of the block at element `base`, widened to vt ([s1 - s0][H] floats).
template <int C>
BITNET_ATTN_TARGET inline void WidenValues(const Problem& p, int64_t base, int64_t s0, int64_t s1,
                                           float* vt) {
  const int64_t h = p.h, rs = p.rs;
  for (int64_t s = s0; s < s1; ++s) {
    for (int64_t c = 0; c < h; c += 8) {
      _mm256_storeu_ps(vt + (s - s0) * h + c, LoadRow8<C>(p.v, base + s * rs, c, h));
    }
  }
}

// max of sc[0, len), len >= 1.
BITNET_ATTN_TARGET inline float MaxRow(const float* sc, int64_t len) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= len; s += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(sc + s));
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  float mx = _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
  for (; s < len; ++s) mx = sc[s] > mx ? sc[s] : mx;
  return mx;
}

// One unit of the tiled path (see the top of the file); `scratch` is the calling thread's.
template <int C>
BITNET_ATTN_TARGET inline void RunPrefillUnitT(const Problem& p, int64_t unit,
                                               std::vector<float>& scratch) {
  const int64_t g = p.n / p.kh, h = p.h, qb = PrefillQueries(p);
  const int64_t blocks = (p.t + qb - 1) / qb;
  const int64_t t0 = (unit % blocks) * qb, ki = (unit / blocks) % p.kh;
  const int64_t bi = unit / (blocks * p.kh);
  const int64_t nq = std::min(qb, p.t - t0), nr = nq * g;
  const int64_t base = (static_cast<int64_t>(p.rows[bi]) * p.kh + ki) * p.s * p.rs;
  const int64_t pos = p.pos[bi];
  // Row r = query t0 + r / g, head ki * g + r % g; rows in order of their visible length.
  auto visible = [&](int64_t r) { return std::min(pos + t0 + r / g, p.s - 1) + 1; };
  const int64_t len_max = visible(nr - 1);
  const int64_t ls = (len_max + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  scratch.resize(static_cast<size_t>(nr * ls + kValueBlock * h));
  float* kt = scratch.data() + nr * ls;  // the keys' block, then the values'
  float* vt = kt;
  const float* q[kMaxGroup];  // nr <= max(kTileRows, G)
  float* sc[kMaxGroup];
  float* out[kMaxGroup];
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t row = (bi * p.t + t0 + r / g) * p.n + ki * g + r % g;
    q[r] = p.q + row * h;
    out[r] = p.out + row * h;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));
  const int64_t quads = nr & ~int64_t{3};
  for (int64_t s0 = 0; s0 < len_max; s0 += kKeyBlock) {
    TransposeKeys<C>(p, base, s0, std::min(kKeyBlock, len_max - s0), kt);
    for (int64_t r = 0; r < nr; ++r) sc[r] = scratch.data() + r * ls + s0;
    for (int64_t r = 0; r < quads; r += 4) {
      if (s0 < visible(r + 3)) ScoreRows<4>(q + r, kt, h, scale, sc + r);
    }
    for (int64_t r = quads; r < nr; ++r) {
      if (s0 < visible(r)) ScoreRows<1>(q + r, kt, h, scale, sc + r);
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    // Zeros up to the last visible position of the row's group of 4 (the value pass's length).
    const int64_t len = visible(r), group_len = visible(r < quads ? (r | 3) : r);
    float* row = scratch.data() + r * ls;
    sc[r] = row;
    SoftmaxRow(row, len, (group_len + 7) & ~int64_t{7}, MaxRow(row, len));
  }
  for (int64_t s0 = 0; s0 < len_max; s0 += kValueBlock) {
    const int64_t s1 = std::min(s0 + kValueBlock, len_max);
    WidenValues<C>(p, base, s0, s1, vt);
    for (int64_t r = 0; r < quads; r += 4) {  // every row sees s0 = 0: out is set first
      const int64_t end = std::min(s1, visible(r + 3));
      if (s0 < end) ValueRows<4>(vt, h, s0, end, sc + r, out + r);
    }
    for (int64_t r = quads; r < nr; ++r) {
      const int64_t end = std::min(s1, visible(r));
      if (s0 < end) ValueRows<1>(vt, h, s0, end, sc + r, out + r);
    }
  }
}

inline void RunPrefillUnit(const Problem& p, int64_t unit, std::vector<float>& scratch) {
  switch (p.cache) {
    case kF16: return RunPrefillUnitT<kF16>(p, unit, scratch);
    case kBF16: return RunPrefillUnitT<kBF16>(p, unit, scratch);
    case kI8: return RunPrefillUnitT<kI8>(p, unit, scratch);
    default: return RunPrefillUnitT<kF32>(p, unit, scratch);
  }
}

}  // namespace bitnet_attention

#endif  // BITNET_ATTN_X86

namespace bitnet_attention {

// The work units of a call: the tiled prefill units where they apply (attention_prefill.h),
// else one per (row, kv head, query).
inline int64_t NumUnits(const Problem& p) {
#if BITNET_ATTN_X86
  if (PrefillTiled(p)) return PrefillUnits(p);
#endif
  return p.b * p.kh * p.t;
}

// Units [u0, u1) of NumUnits(p); `scratch` is the calling thread's.
inline void RunUnits(const Problem& p, int64_t u0, int64_t u1, std::vector<float>& scratch) {
#if BITNET_ATTN_X86
  if (PrefillTiled(p)) {
    for (int64_t u = u0; u < u1; ++u) RunPrefillUnit(p, u, scratch);
    return;
  }
#endif
  for (int64_t u = u0; u < u1; ++u) RunUnit(p, u, u + 1 < u1 ? u + 1 : -1, scratch);
}

}  // namespace bitnet_attention

#endif  // BITNET_JAX_KERNELS_ATTENTION_PREFILL_H_
