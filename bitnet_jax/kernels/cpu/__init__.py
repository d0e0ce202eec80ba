"""The jax.ffi CPU kernels: C++ sources (ternary, int8 and attention), library.py (loading the
shared object, choosing its ISA path) and ffi.py (the kernels as JAX functions)."""
