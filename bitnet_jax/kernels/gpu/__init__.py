"""GPU kernels (Pallas, Triton backend) and the tools to check them without a GPU.

  pallas.py     packed ternary matmul: several weights per call, stacked weights read in place
  attention.py  causal GQA attention over one layer of the stacked KV cache, in place
  fallback.py   kernel="auto": a Pallas kernel that does not compile falls back to XLA, warning once
  platform.py   the platform a traced program targets (jax's default device, else the backend)
  aot.py        compile-only H100/H200 devices from XLA target descriptions
  hlo.py        kernels and bytes of a compiled program, read from its optimized HLO
"""
