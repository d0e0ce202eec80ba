"""Which platform a traced program targets, for kernel choices made at trace time.

`jax.default_backend()` names the platform of the default *backend*; programs compiled for
another device (a GPU with the CPU as default backend, or a compile-only H100 from
jax.experimental.topologies on a machine without a GPU) are traced under
`jax.default_device(device)`, which Pallas's Triton lowering also reads to find the GPU's
compute capability (jax/_src/pallas/triton/gpu_info.py). This module reads the same setting.
"""

from __future__ import annotations

import jax

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def default_device() -> jax.Device:
    """jax's default device if one is set (a Device, or the first device of a platform name),
    else the first device of the default backend."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.devices()[0]
    return jax.devices(device)[0] if isinstance(device, str) else device


def default_platform() -> str:
    """Platform of `default_device()` ("cpu", "gpu", ...), without creating a backend for it."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend()
    return device if isinstance(device, str) else device.platform


def on_gpu(platform: str | None = None) -> bool:
    """True if `platform` (default: the target platform) is a GPU."""
    return (platform or default_platform()) in GPU_PLATFORMS
