// Every x86 kernel path of ternary_paths.h / int8_cpu.h against the portable one, bit for bit,
// through the dispatcher of isa.h, built with SIMDe (tests/emulated/immintrin.h) by
// tests/test_kernels_emulated.py.
#include "ternary_paths.h"
#include "int8_cpu.h"
#include <cstdio>
#include <random>
#include <vector>
namespace bt = bitnet_ternary;
int main() {
  std::mt19937 g(1);
  int bad = 0, cases = 0;
  const int shapes[][3] = {{1, 32, 4}, {1, 100, 48}, {3, 320, 12}, {2, 1000, 1024}, {5, 64, 8}, {8, 77, 12}, {4, 4100, 8}};
  for (auto& sh : shapes) {
    const int64_t m = sh[0], i = sh[1], o = sh[2], r = o / 4;
    std::vector<int8_t> x(m * i);
    for (auto& v : x) v = static_cast<int8_t>(static_cast<int>(g() % 256) - 128);
    std::vector<uint8_t> w(r * i);
    for (auto& b : w) b = (g() % 3) | ((g() % 3) << 2) | ((g() % 3) << 4) | ((g() % 3) << 6);
    std::vector<int32_t> xs(m), ref(m * o), got(m * o);
    bt::RowSums(x.data(), m, i, xs.data());
    bt::Problem p{x.data(), w.data(), ref.data(), xs.data(), m, i, r};
    bt::RunRows(bt::kScalar, p, 0, r);
    for (int isa : {bt::kAvx2, bt::kAvxVnni, bt::kAvx512Vnni}) {
      bt::Problem q = p; q.out = got.data();
      std::fill(got.begin(), got.end(), -7);
      bt::RunRows(isa, q, 0, r);
      ++cases; if (got != ref) { ++bad; std::printf("ternary mismatch isa=%d m=%ld i=%ld o=%ld\n", isa, m, i, o); }
    }
    // int8 head kernel on the same x, w8 in [-127, 127]
    const int64_t v = o + 3;
    std::vector<int8_t> w8(v * i);
    for (auto& b : w8) b = static_cast<int8_t>(static_cast<int>(g() % 255) - 127);
    std::vector<uint8_t> xa(m * i);
    bt::AbsBytes(x.data(), m * i, xa.data());
    std::vector<int32_t> r8(m * v), g8(m * v);
    bt::Int8Problem p8{x.data(), xa.data(), w8.data(), r8.data(), m, i, v};
    bt::RunRows(bt::kScalar, p8, 0, v);
    for (int isa : {bt::kAvx2, bt::kAvxVnni, bt::kAvx512Vnni}) {
      bt::Int8Problem q8 = p8; q8.out = g8.data();
      std::fill(g8.begin(), g8.end(), -7);
      bt::RunRows(isa, q8, 0, v);
      ++cases; if (g8 != r8) { ++bad; std::printf("int8 mismatch isa=%d m=%ld i=%ld v=%ld\n", isa, m, i, v); }
    }
  }
  std::printf("%d/%d emulated cases agree with the scalar path\n", cases - bad, cases);
  return bad != 0;
}
