"""The Pallas GPU kernels (pallas.py)."""
