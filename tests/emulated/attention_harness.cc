// The attention units' x86 paths (attention_avx2.h's decode unit and attention_prefill.h's tiles
// on AVX2, RunUnit512 and the same tiles on AVX-512) against the portable units, for float32,
// float16, bfloat16 and int8-row caches (attention_cache.h), built with SIMDe
// (tests/emulated/immintrin.h) by tests/test_kernels_emulated.py. The sums run in another order,
// so the check is a tolerance, not bit equality; a path that drops an int8 row's scale or
// misreads a row is off by O(1).
#include "attention_cpu.h"
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
namespace ba = bitnet_attention;

// The cached value of element x in type `cache` (rounded as the cache stores it), written at e.
static void Put(int cache, float x, void* base, int64_t e) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (cache == ba::kF32) {
    static_cast<float*>(base)[e] = x;
  } else if (cache == ba::kBF16) {
    static_cast<uint16_t*>(base)[e] = static_cast<uint16_t>(bits >> 16);
  } else {  // float16 of a value in [-4, 4]: normal, truncated mantissa
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const int exp = static_cast<int>((bits >> 23) & 0xff) - 127 + 15;
    const uint32_t man = (bits >> 13) & 0x3ffu;
    const uint32_t h = exp <= 0 ? sign : sign | (static_cast<uint32_t>(exp) << 10) | man;
    static_cast<uint16_t*>(base)[e] = static_cast<uint16_t>(h);
  }
}

int main() {
  std::mt19937 g(7);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  int bad = 0, cases = 0;
  // (N, K, H, T, positions of the 2 query rows)
  const int shapes[][6] = {{4, 4, 64, 1, 0, 13},  {8, 4, 96, 1, 30, 6},  {4, 2, 128, 1, 21, 2},
                           {16, 4, 64, 5, 9, 0},  {8, 2, 96, 20, 3, 11}, {4, 4, 128, 3, 33, 1}};
  for (auto& sh : shapes) {
    for (int cache : {ba::kF32, ba::kF16, ba::kBF16, ba::kI8}) {
      const int64_t n = sh[0], kh = sh[1], h = sh[2], t = sh[3], b = 2, s = 40;
      const int64_t rs = ba::RowStride(cache, h), bytes = ba::ElementBytes(cache);
      const int64_t count = 3 * kh * s * rs;  // 3 cache rows (slots)
      std::vector<char> k(count * bytes), v(count * bytes);
      for (auto* c : {&k, &v}) {
        for (int64_t r = 0; r < count / rs; ++r) {
          if (cache == ba::kI8) {  // codes, then the row's scale
            auto* row = reinterpret_cast<int8_t*>(c->data()) + r * rs;
            for (int64_t i = 0; i < h; ++i) row[i] = static_cast<int8_t>(g() % 255 - 127);
            const float scale = 0.002f + 0.0005f * static_cast<float>(r % 11);
            std::memcpy(row + h, &scale, ba::kScaleBytes);
          } else {
            for (int64_t i = 0; i < h; ++i) Put(cache, u(g), c->data(), r * rs + i);
          }
        }
      }
      std::vector<float> q(b * t * n * h);
      for (auto& x : q) x = u(g);
      std::vector<int32_t> rows = {2, 0}, pos = {sh[4], sh[5]};
      std::vector<float> want(q.size());
      ba::Problem p{q.data(), k.data(), v.data(), rows.data(), pos.data(), want.data(),
                    b, t, n, kh, s, h, rs, cache, false, false};
      std::vector<float> scratch;
      ba::RunUnits(p, 0, ba::NumUnits(p), scratch);
      // AVX2 units / tiles, then the AVX-512 path (RunUnit512, or the same tiles where a
      // prefill call tiles: attention_prefill.h PrefillTiled).
      for (int path = 0; path < 2; ++path) {
        std::vector<float> got(q.size());
        ba::Problem x = p;
        x.out = got.data();
        x.avx2 = true;
        x.avx512 = path == 1;
        ba::RunUnits(x, 0, ba::NumUnits(x), scratch);
        float worst = 0.0f;
        for (size_t i = 0; i < got.size(); ++i) {
          worst = std::fmax(worst, std::fabs(got[i] - want[i]) / (1.0f + std::fabs(want[i])));
        }
        ++cases;
        if (!(worst <= 1e-5f)) {
          ++bad;
          std::printf("MISMATCH N=%d K=%d H=%d T=%d cache=%d path=%d: %g\n", sh[0], sh[1], sh[2],
                      sh[3], cache, path, worst);
        }
      }
    }
  }
  std::printf("%d/%d emulated attention cases agree\n", cases - bad, cases);
  return bad == 0 ? 0 : 1;
}
