"""The jax.ffi CPU kernels: C++ sources (ternary, int8 and attention) and ffi.py, their loader."""
