// Every x86 kernel path of ternary_paths.h / ternary_gemm.h / int8_cpu.h / int8_gemm.h (and the
// activation quantisation of quantize_cpu.h) against
// the portable one, bit for bit, through the dispatcher of isa.h, built with SIMDe
// (tests/emulated/immintrin.h) by tests/test_kernels_emulated.py. Each case also runs its rows
// as two calls split at an odd row, as threads split them (ffi_runtime.h), so the GEMMs' row
// blocks and their row-kernel remainders both meet every M bucket, column tail and row count.
#include "ternary_gemm.h"
#include "int8_gemm.h"
#include "quantize_cpu.h"
#include <cstdio>
#include <random>
#include <vector>
namespace bt = bitnet_ternary;
int main() {
  std::mt19937 g(1);
  int bad = 0, cases = 0;
  const int shapes[][3] = {{1, 32, 4},   {1, 100, 48}, {3, 320, 12},  {2, 1000, 1024},
                           {5, 64, 8},   {8, 77, 12},  {4, 4100, 8},  {2, 64, 20},
                           {4, 200, 36}, {9, 130, 68}, {16, 96, 40},  {17, 1000, 36}};
  for (auto& sh : shapes) {
    const int64_t m = sh[0], i = sh[1], o = sh[2], r = o / 4;
    std::vector<int8_t> x(m * i);
    for (auto& v : x) v = static_cast<int8_t>(static_cast<int>(g() % 256) - 128);
    x[0] = -128;  // the extremes the accumulators must hold
    x[x.size() - 1] = 127;
    std::vector<uint8_t> w(r * i);
    for (auto& b : w) b = (g() % 3) | ((g() % 3) << 2) | ((g() % 3) << 4) | ((g() % 3) << 6);
    std::vector<int32_t> xs(m), ref(m * o), got(m * o);
    bt::RowSums(x.data(), m, i, xs.data());
    bt::Problem p{x.data(), w.data(), ref.data(), xs.data(), m, i, r};
    bt::RunRows(bt::kScalar, p, 0, r);
    const int64_t cut = r > 2 ? (r / 2) | 1 : r;
    for (int isa : {bt::kAvx2, bt::kAvxVnni, bt::kAvx512Vnni}) {
      bt::Problem q = p; q.out = got.data();
      std::fill(got.begin(), got.end(), -7);
      bt::RunRows(isa, q, 0, r);
      ++cases;
      if (got != ref) ++bad, std::printf("ternary mismatch isa=%d m=%ld i=%ld o=%ld\n", isa, m, i,
                                         o);
      std::fill(got.begin(), got.end(), -7);
      bt::RunRows(isa, q, 0, cut);
      bt::RunRows(isa, q, cut, r);
      ++cases;
      if (got != ref) ++bad, std::printf("ternary split mismatch isa=%d m=%ld i=%ld\n", isa, m, i);
    }
    // int8 head kernel on the same x, w8 in [-127, 127]
    const int64_t v = o + 3;
    std::vector<int8_t> w8(v * i);
    for (auto& b : w8) b = static_cast<int8_t>(static_cast<int>(g() % 255) - 127);
    w8[0] = 127;
    w8[1] = -127;
    std::vector<uint8_t> xa(m * i);
    bt::AbsBytes(x.data(), m * i, xa.data());
    std::vector<int32_t> r8(m * v), g8(m * v);
    bt::Int8Problem p8{x.data(), xa.data(), w8.data(), r8.data(), xs.data(), m, i, v};
    bt::RunRows(bt::kScalar, p8, 0, v);
    const int64_t cut8 = (v / 2) | 1;
    for (int isa : {bt::kAvx2, bt::kAvxVnni, bt::kAvx512Vnni}) {
      bt::Int8Problem q8 = p8; q8.out = g8.data();
      std::fill(g8.begin(), g8.end(), -7);
      bt::RunRows(isa, q8, 0, v);
      ++cases;
      if (g8 != r8) ++bad, std::printf("int8 mismatch isa=%d m=%ld i=%ld v=%ld\n", isa, m, i, v);
      std::fill(g8.begin(), g8.end(), -7);
      bt::RunRows(isa, q8, 0, cut8);
      bt::RunRows(isa, q8, cut8, v);
      ++cases;
      if (g8 != r8) ++bad, std::printf("int8 split mismatch isa=%d m=%ld i=%ld\n", isa, m, i);
    }
  }
  // Per-token quantisation (the fused linear): every path's codes and absmax equal the scalar
  // path's, column tails, an all-zero row and exact .5 ties included.
  for (int64_t i : {7, 16, 100, 1536}) {
    std::vector<float> x(3 * i);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    for (auto& v : x) v = normal(g);
    for (int64_t k = 0; k < i; ++k) x[k] = 0.0f;
    for (int64_t k = 0; k < i; k += 2) x[i + k] = 0.5f * static_cast<float>(k % 7);
    x[i + 1] = 127.0f;  // row 1: absmax 127, so x * 127 / absmax = x: ties at every .5
    std::vector<int8_t> qs(3 * i), qv(3 * i);
    std::vector<float> as(3), av(3);
    bt::QuantizeRows(bt::kScalar, x.data(), 3, i, qs.data(), as.data());
    for (int isa : {bt::kAvx2, bt::kAvx512Vnni}) {
      std::fill(qv.begin(), qv.end(), 99);
      bt::QuantizeRows(isa, x.data(), 3, i, qv.data(), av.data());
      ++cases;
      if (qv != qs || av != as) ++bad, std::printf("quantize mismatch isa=%d i=%ld\n", isa, i);
    }
  }
  std::printf("%d/%d emulated cases agree with the scalar path\n", cases - bad, cases);
  return bad != 0;
}
