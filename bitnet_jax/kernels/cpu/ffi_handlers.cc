// XLA FFI handlers for bitnet_jax's CPU kernels, and the C entry points library.py calls:
//
//   bitnet_ternary_matmul  packed ternary x int8 matmul, one or several weights (ternary_paths.h
//                          GEMV for M = 1, ternary_gemm.h GEMM for M >= 2)
//   bitnet_ternary_linear  the same with BitLinear's activation quantisation and output scaling
//                          in the call: float32 in, float32 out (quantize_cpu.h); optionally
//                          with the RMSNorm before and the residual add or act(gate) * up after
//                          (fused_cpu.h)
//   bitnet_int8_matmul     int8 x int8 LM head (int8_cpu.h GEMV, int8_gemm.h GEMM)
//   bitnet_int8_linear     the same from float32 activations to float32 logits (quantisation
//                          and dequantisation in the call: ffi_int8.h)
//   bitnet_attention       attention over one layer of the stacked KV cache (attention_cpu.h)
//   bitnet_greedy          greedy next tokens of penalised logits, and their finiteness
//                          (greedy_cpu.h)
//   bitnet_quantize_kv     keys and values as the int8 KV cache's rows (kv_quantize_cpu.h)
//   bitnet_half_linear     the float LM head from a float16 / bfloat16 table (half_head_cpu.h)
//
// Built by setup.py against the FFI headers shipped in jaxlib (jax.ffi.include_dir()) into
// bitnet_jax/kernels/cpu/_ternary_cpu*.so, loaded with ctypes and registered as CPU targets by
// bitnet_jax/kernels/cpu/library.py (jax-notes §2.2). The handlers check shapes and run the
// kernels on several threads (ffi_runtime.h); the ISA path (isa.h) is one process-wide choice.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "ffi_attention.h"
#include "ffi_problems.h"
#include "ffi_runtime.h"
#include "fused_cpu.h"
#include "ffi_int8.h"
#include "greedy_cpu.h"
#include "half_head_cpu.h"
#include "int8_gemm.h"
#include "isa.h"
#include "kv_quantize_cpu.h"
#include "quantize_cpu.h"
#include "ternary_amx.h"
#include "ternary_gemm.h"
#include "xla/ffi/api/ffi.h"

// jaxlib whose FFI headers this was compiled against (set by setup.py). XLA runs handlers
// built with older FFI headers, not newer ones, so library.py refuses a newer build jaxlib.
#ifndef BITNET_JAXLIB_VERSION
#define BITNET_JAXLIB_VERSION "unknown"
#endif

namespace ffi = xla::ffi;
namespace bt = bitnet_ternary;
using bitnet_ffi::ChunkRows;
using bitnet_ffi::Collect;
using bitnet_ffi::CollectGated;
using bitnet_ffi::Dims;
using bitnet_ffi::Job;
using bitnet_ffi::Prologue;
using bitnet_ffi::ReadyFuture;
using bitnet_ffi::Run;
using bitnet_ffi::RunProblems;
using bitnet_ffi::Same;

namespace {

// Path used by every call; chosen once from cpuid (and BITNET_JAX_CPU_ISA), changeable from
// Python for tests and benchmarks through bitnet_ternary_set_isa().
int InitialIsa() {
#if BITNET_TERNARY_X86
  __builtin_cpu_init();
#endif
  int isa = bt::BestIsa();
  if (const char* env = std::getenv("BITNET_JAX_CPU_ISA")) {
    for (int cand = bt::kScalar; cand <= bt::kAmx; ++cand) {
      if (std::strcmp(env, bt::IsaName(cand)) == 0 && bt::IsaSupported(cand)) isa = cand;
    }
  }
  return isa;
}

std::atomic<int> g_isa{InitialIsa()};

// x [M, I] int8 and a layer index (int32 scalar), then n >= 1 weights [(L,) O_j/4, I] -> n
// outputs out_j [M, O_j] int32. Reading stacked weights in place spares the per-layer slice copy
// XLA makes for a custom call inside lax.scan; taking several weights that share x (q/k/v,
// gate/up) in one call halves the thread hand-offs of a decode step.
ffi::Future TernaryMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                          ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs weights,
                          ffi::RemainingRets outs) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || layer.element_count() != 1) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_ternary_matmul expects x [M, I], a scalar layer, and as many packed weights "
        "[(L,) O/4, I] as outputs [M, O]"));
  }
  const int64_t m = xd[0], i = xd[1];
  std::vector<bt::Problem> problems;
  std::vector<int64_t> first_row;
  auto job = std::make_shared<Job>();
  job->xsum.resize(m);
  ffi::Error error = Collect<ffi::S32>("bitnet_ternary_matmul", m, i, layer.typed_data()[0],
                                       x.typed_data(), job->xsum.data(), weights, 0, outs,
                                       problems, first_row);
  if (!error.success()) return ReadyFuture(std::move(error));
  const int64_t rows = first_row.back();
  if (m == 0 || rows == 0) return ReadyFuture();
  bt::RowSums(x.typed_data(), m, i, job->xsum.data());
  const int isa = g_isa.load(std::memory_order_relaxed);
  job->rows = [problems, first_row, isa](int64_t r0, int64_t r1) {
    RunProblems(isa, problems, first_row, r0, r1, [](size_t, int64_t, int64_t) {});
  };
  return Run(pool, job, rows, ChunkRows(i, rows), m * rows * i, bitnet_ffi::kRowAlign);
}

// BitLinear in one call (issue 16 item 2; quantize_cpu.h, fused_cpu.h): x [M, I] float32, a
// layer index, then (with attribute norm = 1) the RMSNorm gain [I] or [L, I], (with residual =
// 1) the residual [M, O], then n scales (each float32 [] or [L], read at `layer`: the weight's
// dequantisation scale), then n weights [(L,) O_j/4, I] -> y_j [M, O_j] float32 = (x_q · t_jᵀ) ·
// step · scale_j, where x_q, step is the per-token absmax int8 quantisation of x (of
// RMSNorm(x; gain, eps) with norm): quantize_activations' codes, so the int32 matmul's products
// exactly, and bitlinear_many's float32 scaling (to a few ulp, quantize_cpu.h). residual = 1
// (one weight) returns residual + y; act = 1 / 2 (two weights, gate and up of the same shape)
// returns the one output act(y_0) · y_1 with act silu / relu2.
ffi::Future TernaryLinear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs args,
                          ffi::RemainingRets outs, float eps, int32_t norm, int32_t residual,
                          int32_t act) {
  const auto xd = x.dimensions();
  const size_t lead = (norm ? 1 : 0) + (residual ? 1 : 0);
  const size_t n = args.size() >= lead ? (args.size() - lead) / 2 : 0;
  const bool gated = act != bt::kActNone;
  if (xd.size() != 2 || layer.element_count() != 1 || n == 0 || args.size() != lead + 2 * n ||
      act < bt::kActNone || act > bt::kActRelu2 || (gated && (n != 2 || residual)) ||
      (residual && n != 1) || outs.size() != (gated ? 1 : n)) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_ternary_linear expects x [M, I] float32, a scalar layer, [a norm gain], [a "
        "residual], one scale per weight, and as many packed weights [(L,) O/4, I] as outputs "
        "[M, O] (one output for a residual with one weight, or act with two weights)"));
  }
  const int64_t m = xd[0], i = xd[1], at = layer.typed_data()[0];
  const float* gain = nullptr;
  const float* res = nullptr;
  if (norm) {
    auto g = args.get<ffi::Buffer<ffi::F32>>(0);
    const bool stacked = g.has_value() && g->dimensions().size() == 2;
    if (!g.has_value() || g->dimensions().back() != i || g->dimensions().size() > 2 ||
        (stacked && (at < 0 || at >= g->dimensions()[0]))) {
      return ReadyFuture(ffi::Error::InvalidArgument(
          "bitnet_ternary_linear norm gain must be float32 [I] or [L, I] with the layer in it"));
    }
    gain = g->typed_data() + (stacked ? at * i : 0);
  }
  std::vector<float> scale(n);
  for (size_t j = 0; j < n; ++j) {
    auto s = args.get<ffi::Buffer<ffi::F32>>(lead + j);
    if (!s.has_value() || s->element_count() == 0 ||
        (s->element_count() > 1 && (at < 0 || at >= static_cast<int64_t>(s->element_count())))) {
      return ReadyFuture(ffi::Error::InvalidArgument("bitnet_ternary_linear scale " +
                                                     std::to_string(j) +
                                                     " must be float32 [] or [L] "
                                                     "with the layer inside it"));
    }
    scale[j] = s->typed_data()[s->element_count() == 1 ? 0 : at];
  }
  std::vector<bt::Problem> problems;
  std::vector<int64_t> first_row;
  auto job = std::make_shared<Job>();
  job->xsum.resize(m);
  job->xq.resize(m * i);
  job->absmax.resize(m);
  float* gated_out = nullptr;
  ffi::Error error =
      gated ? CollectGated(m, i, at, job.get(), args, lead + n, outs, problems, &gated_out)
            : Collect<ffi::F32>("bitnet_ternary_linear", m, i, at, job->xq.data(), job->xsum.data(),
                                args, lead + n, outs, problems, first_row);
  if (!error.success()) return ReadyFuture(std::move(error));
  if (residual) {
    auto r = args.get<ffi::Buffer<ffi::F32>>(norm ? 1 : 0);
    auto o = outs.get<ffi::Buffer<ffi::F32>>(0);
    if (!r.has_value() || !o.has_value() || !Same(r->dimensions(), (*o)->dimensions())) {
      return ReadyFuture(ffi::Error::InvalidArgument(
          "bitnet_ternary_linear residual must be float32 with the output's shape [M, O]"));
    }
    res = r->typed_data();
  }
  const int64_t rows = gated ? problems[0].r : first_row.back();
  if (m == 0 || rows == 0) return ReadyFuture();
  const int isa = g_isa.load(std::memory_order_relaxed);
  Prologue(pool, isa, x.typed_data(), m, i, gain, eps, job.get());
  const float* absmax = job->absmax.data();
  if (gated) {
    const bool vec = bitnet_ffi::FloatSimd(isa);
    job->rows = [problems, isa, scale, absmax, act, vec, gated_out](int64_t r0, int64_t r1) {
      const bt::Problem &g = problems[0], &u = problems[1];
      bt::RunRows(isa, g, r0, r1);
      bt::RunRows(isa, u, r0, r1);
      bt::ActRows(act, vec, g.out, u.out, gated_out, g.m, g.r, r0, r1, absmax, scale[0],
                  scale[1]);
    };
  } else {
    job->rows = [problems, first_row, isa, scale, absmax, res](int64_t r0, int64_t r1) {
      RunProblems(isa, problems, first_row, r0, r1, [&](size_t j, int64_t lo, int64_t hi) {
        const bt::Problem& p = problems[j];
        float* y = reinterpret_cast<float*>(p.out);
        bt::ScaleRows(y, p.m, p.r, lo, hi, absmax, scale[j], res);
      });
    };
  }
  return Run(pool, job, rows, ChunkRows(i, rows), m * rows * i * (gated ? 2 : 1),
             bitnet_ffi::kRowAlign);
}

// The int8 LM head (ffi_int8.h) with the process-wide ISA path.
ffi::Future Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                       ffi::ResultBuffer<ffi::S32> out) {
  return bitnet_ffi::Int8Matmul(pool, x, w, out, g_isa.load(std::memory_order_relaxed));
}

ffi::Future Int8Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> out) {
  return bitnet_ffi::Int8Linear(pool, x, w, scale, out, g_isa.load(std::memory_order_relaxed));
}

// bitnet_attention (ffi_attention.h) with the process-wide ISA path.
ffi::Future Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                      ffi::AnyBuffer v, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                      ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> out) {
  return bitnet_ffi::Attention(pool, q, k, v, layer, rows, pos, out,
                               g_isa.load(std::memory_order_relaxed));
}

// logits [B, V] float32, seen [B, V] bool, penalty [B] float32 -> token [B] int32 (the argmax of
// the repetition-penalised logits) and finite [B] bool (every logit finite): greedy_cpu.h.
ffi::Future Greedy(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::PRED> seen,
                   ffi::Buffer<ffi::F32> penalty, ffi::ResultBuffer<ffi::S32> token,
                   ffi::ResultBuffer<ffi::PRED> finite) {
  const auto d = logits.dimensions();
  if (d.size() != 2 || !Same(seen.dimensions(), d) ||
      static_cast<int64_t>(penalty.element_count()) != d[0] ||
      static_cast<int64_t>(token->element_count()) != d[0] ||
      static_cast<int64_t>(finite->element_count()) != d[0]) {
    return ReadyFuture(ffi::Error::InvalidArgument(
        "bitnet_greedy expects logits [B, V], seen [B, V], penalty [B]; got logits " + Dims(d)));
  }
  const int64_t b = d[0], v = d[1];
  const float* x = logits.typed_data();
  const uint8_t* s = reinterpret_cast<const uint8_t*>(seen.typed_data());
  const float* p = penalty.typed_data();
  int32_t* tok = token->typed_data();
  bool* fin = finite->typed_data();
  const bool avx2 = bitnet_ffi::FloatSimd(g_isa.load(std::memory_order_relaxed));
  auto job = std::make_shared<Job>();
  job->rows = [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bitnet_greedy::Row row = bitnet_greedy::Greedy(avx2, x + r * v, s + r * v, p[r], v);
      tok[r] = row.token;
      fin[r] = row.finite;
    }
  };
  return Run(pool, job, b, 1, b * v);
}

ffi::Future QuantizeKv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                       ffi::ResultBuffer<ffi::S8> k8, ffi::ResultBuffer<ffi::S8> v8) {
  return bitnet_ffi::QuantizeKv(pool, k, v, k8, v8,
                                bitnet_ffi::FloatSimd(g_isa.load(std::memory_order_relaxed)));
}

ffi::Future HalfLinear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                       ffi::ResultBuffer<ffi::F32> out) {
  return bitnet_ffi::HalfLinear(pool, x, w, out, g_isa.load(std::memory_order_relaxed));
}

}  // namespace

// The handlers are exported although the library is built with -fvisibility=hidden (which keeps
// the many inline FFI template symbols private to this object).
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetTernaryMatmul, TernaryMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetTernaryLinear, TernaryLinear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("norm")
                                  .Attr<int32_t>("residual")
                                  .Attr<int32_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetGreedy, Greedy,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetInt8Linear, Int8Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetQuantizeKv, QuantizeKv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetHalfLinear, HalfLinear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

#pragma GCC visibility pop

// Plain C entry points for ctypes (library.py): kernel path introspection and selection.
extern "C" {

__attribute__((visibility("default"))) int bitnet_ternary_abi_version() { return 8; }

__attribute__((visibility("default"))) const char* bitnet_ternary_built_jaxlib() {
  return BITNET_JAXLIB_VERSION;
}

__attribute__((visibility("default"))) int bitnet_ternary_get_isa() { return g_isa.load(); }

__attribute__((visibility("default"))) int bitnet_ternary_best_isa() { return bt::BestIsa(); }

__attribute__((visibility("default"))) int bitnet_ternary_isa_supported(int isa) {
  return bt::IsaSupported(isa) ? 1 : 0;
}

__attribute__((visibility("default"))) const char* bitnet_ternary_isa_name(int isa) {
  return bt::IsaName(isa);
}

// Select path `isa`; returns the path now in use (unchanged if `isa` is unsupported here).
__attribute__((visibility("default"))) int bitnet_ternary_set_isa(int isa) {
  if (bt::IsaSupported(isa)) g_isa.store(isa);
  return g_isa.load();
}

}  // extern "C"
