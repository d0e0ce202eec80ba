// The int8 LM head's FFI handler bodies (ffi_handlers.cc binds them with the process-wide ISA
// path): bitnet_int8_matmul (int8 activations -> int32 products) and bitnet_int8_linear (float32
// activations -> float32 logits, quantised and dequantised in the call as transformer.unembed
// does with XLA ops: quantize_activations, the product, acc * step * scale).

#ifndef BITNET_JAX_KERNELS_CPU_FFI_INT8_H_
#define BITNET_JAX_KERNELS_CPU_FFI_INT8_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "ffi_problems.h"
#include "ffi_runtime.h"
#include "int8_gemm.h"
#include "isa.h"
#include "quantize_cpu.h"
#include "xla/ffi/api/ffi.h"

namespace bitnet_ffi {

// The operands of an int8 head call (`who`): x [M, I], w [V, I], out [M, V], and with `scale`
// (bitnet_int8_linear) [V] row scales.
inline ffi::Error CheckHead(const char* who, ffi::Span<const int64_t> xd,
                            ffi::Span<const int64_t> wd, ffi::Span<const int64_t> od,
                            const ffi::Buffer<ffi::F32>* scale) {
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || wd[1] != xd[1] ||
      od[0] != xd[0] || od[1] != wd[0] ||
      (scale != nullptr && static_cast<int64_t>(scale->element_count()) != wd[0])) {
    return ffi::Error::InvalidArgument(
        std::string(who) + " expects x [M, I], w [V, I]" + (scale ? ", scale [V]" : "") +
        " and out [M, V]; got x " + Dims(xd) + ", w " + Dims(wd) + ", out " + Dims(od));
  }
  return ffi::Error::Success();
}

// x [M, I] int8, w [V, I] int8 (no -128) -> out [M, V] int32: the int8 LM head.
inline ffi::Future Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                              ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> out, int isa) {
  const auto xd = x.dimensions();
  ffi::Error error =
      CheckHead("bitnet_int8_matmul", xd, w.dimensions(), out->dimensions(), nullptr);
  if (error.failure()) return ReadyFuture(std::move(error));
  const int64_t m = xd[0], i = xd[1], v = w.dimensions()[0];
  if (m == 0 || v == 0) return ReadyFuture();
  auto job = std::make_shared<Job>();
  job->xabs.resize(m * i);
  bt::AbsBytes(x.typed_data(), m * i, job->xabs.data());
  job->xsum.resize(m);
  bt::RowSums(x.typed_data(), m, i, job->xsum.data());
  const bt::Int8Problem problem{x.typed_data(), job->xabs.data(), w.typed_data(),
                                out->typed_data(), job->xsum.data(), m, i, v};
  job->rows = [problem, isa](int64_t r0, int64_t r1) { bt::RunRows(isa, problem, r0, r1); };
  return Run(pool, job, v, ChunkRows(i, v), m * v * i, bitnet_ffi::kRowAlign);
}

// x [M, I] float32, w [V, I] int8 (no -128), scale [V] float32 -> out [M, V] float32 logits:
// x quantised per token as quant.quantize_activations (the fused linear's prologue), the int8
// product as bitnet_int8_matmul, each chunk of vocabulary rows then dequantised in place
// (quantize_cpu.h ScaleHeadRows).
inline ffi::Future Int8Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale,
                              ffi::ResultBuffer<ffi::F32> out, int isa) {
  const auto xd = x.dimensions();
  ffi::Error error =
      CheckHead("bitnet_int8_linear", xd, w.dimensions(), out->dimensions(), &scale);
  if (error.failure()) return ReadyFuture(std::move(error));
  const int64_t m = xd[0], i = xd[1], v = w.dimensions()[0];
  if (m == 0 || v == 0) return ReadyFuture();
  auto job = std::make_shared<Job>();
  job->xq.resize(m * i);
  job->absmax.resize(m);
  job->xsum.resize(m);
  Prologue(pool, isa, x.typed_data(), m, i, nullptr, 0.0f, job.get());
  job->xabs.resize(m * i);
  bt::AbsBytes(job->xq.data(), m * i, job->xabs.data());
  float* y = out->typed_data();
  const bt::Int8Problem problem{job->xq.data(), job->xabs.data(), w.typed_data(),
                                reinterpret_cast<int32_t*>(y), job->xsum.data(), m, i, v};
  const float* absmax = job->absmax.data();
  const float* s = scale.typed_data();
  job->rows = [problem, isa, y, absmax, s](int64_t r0, int64_t r1) {
    bt::RunRows(isa, problem, r0, r1);
    bt::ScaleHeadRows(y, problem.m, problem.r, r0, r1, absmax, s);
  };
  return Run(pool, job, v, ChunkRows(i, v), m * v * i, kRowAlign);
}

}  // namespace bitnet_ffi

#endif  // BITNET_JAX_KERNELS_CPU_FFI_INT8_H_
