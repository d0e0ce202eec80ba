"""Matmul and attention kernels behind one signature each; dispatch.py chooses between them.

  dispatch.py   the one place that picks "xla", "ffi" (CPU) or "pallas" (GPU)
  stacked.py    the layer scan over stacked params whose packed weights the kernels read in place
  xla.py        the plain XLA reference every other kernel is tested against
  sharded.py    the custom kernels per shard inside shard_map on a sharded model
  cpu/          the jax.ffi CPU kernels (C++ sources and their loader)
  gpu/          the Pallas GPU kernels (ternary matmul, cached attention, the fused decode
                layer pieces), the kernel="auto"
                fallback, and the compile-only GPU tools (aot.py, hlo.py)
"""

from bitnet_jax.kernels.dispatch import (attention_kernel, cached_attention_ffi,
                                         cached_attention_pallas, choose_kernel,
                                         decode_attention, fused_bitlinear, fused_decode,
                                         greedy_tokens, greedy_usable, half_linear,
                                         half_linear_usable, int8_linear,
                                         int8_linear_usable, int8_matmul, linear_fusable,
                                         quantize_kv, quantize_kv_usable, ternary_linear_many,
                                         ternary_matmul, ternary_matmul_many)

__all__ = ["attention_kernel", "cached_attention_ffi", "cached_attention_pallas",
           "choose_kernel", "decode_attention", "fused_bitlinear", "fused_decode", "greedy_tokens",
           "greedy_usable", "half_linear", "half_linear_usable", "int8_linear",
           "int8_linear_usable", "int8_matmul", "linear_fusable", "quantize_kv",
           "quantize_kv_usable", "ternary_linear_many", "ternary_matmul", "ternary_matmul_many"]
