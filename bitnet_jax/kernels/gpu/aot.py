"""Compile for an H100 or H200 on a machine without a GPU (ahead-of-time, nothing runs).

XLA:GPU compiles for a target described by a `GpuTargetConfigProto` (*.txtpb from openxla/xla,
read from ../shared/data/gpu/ or $BITNET_JAX_GPU_TARGETS):
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)` gives a
compile-only device, and `jax.jit(f).trace(*abstract args on it).lower().compile()`
builds real sm_90a code (Pallas Triton kernels included), reports `memory_analysis()` and the
optimized HLO, and fails on real errors ("Shared memory size limit exceeded"). Needs jax >= 0.11
(Python >= 3.12) with `jax-cuda13-plugin` and `jax-cuda13-pjrt` (installable with --no-deps:
no NVIDIA libraries) and JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1, which `device` sets; `.ci/gpu_aot.sh`
builds that environment.

Trace and lower under `jax.default_device(device)` (`on`): Pallas's Triton lowering and
kernel="auto" read the target GPU from it (kernels/gpu/platform.py).

Compiled with `COMPILER_OPTIONS`: without a device XLA cannot query CUB's scratch size for a
one-row sort of a large vocabulary (sampling's top-k/top-p branch) and fails with "invalid
device ordinal"; DEVICELESS_CUB_DISABLED makes it use XLA's own sort there instead (slower at
run time, only in that sampling branch; a GPU machine compiles the CUB sort).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
from pathlib import Path

import jax

from bitnet_jax.errors import DeviceError

TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
# XLA's own target descriptions (openxla/xla: xla/backends/gpu/target_config/specs/, Apache-2.0)
# are read where they lie, never copied into the package: BITNET_JAX_GPU_TARGETS names a folder
# holding them; a source checkout finds them in ../shared/data/gpu/ beside the repository.
TARGETS_ENV = "BITNET_JAX_GPU_TARGETS"
SHARED_TARGETS = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "gpu"


def target_dir() -> Path:
    """The folder the target descriptions are read from (TARGETS_ENV, else SHARED_TARGETS)."""
    return Path(os.environ.get(TARGETS_ENV) or SHARED_TARGETS)
COMPILER_OPTIONS = {"xla_gpu_deviceless_cub_mode": "DEVICELESS_CUB_DISABLED"}


def unavailable_reason() -> str | None:
    """None if the CUDA plugin that compiles for a compile-only device is installed, else why
    this environment cannot compile for a GPU."""
    try:
        plugin = importlib.util.find_spec("jax_plugins.xla_cuda13")
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        plugin = None
    if plugin is None:
        return (f"the CUDA 13 plugin is not installed (jax {jax.__version__}; needs jax >= 0.11 "
                "on Python >= 3.12 with `pip install --no-deps jax-cuda13-plugin==<jax version> "
                "jax-cuda13-pjrt==<jax version>`: .ci/gpu_aot.sh builds that venv)")
    missing = [name for name in TARGETS.values() if not (target_dir() / name).is_file()]
    if missing:
        return (f"XLA's GPU target descriptions {missing} are not in {target_dir()}; set "
                f"{TARGETS_ENV} to a folder holding them (openxla/xla: "
                "xla/backends/gpu/target_config/specs/)")
    return None


def target_config(target: str) -> str:
    """The GpuTargetConfigProto text of "h100" or "h200"."""
    if target not in TARGETS:
        raise DeviceError(f"Unknown GPU target {target!r}; use one of {sorted(TARGETS)}.")
    path = target_dir() / TARGETS[target]
    if not path.is_file():
        raise DeviceError(f"No XLA target description for {target} at {path}; set "
                          f"{TARGETS_ENV} to a folder holding {TARGETS[target]} (openxla/xla: "
                          "xla/backends/gpu/target_config/specs/).")
    return path.read_text()


def target_info(target: str) -> dict:
    """{"memory_bandwidth": bytes/s, "device_memory_size": bytes, "core_count": SMs} of a target."""
    text = target_config(target)
    return {key: int(re.search(rf"\b{key}: (\d+)", text).group(1))
            for key in ("memory_bandwidth", "device_memory_size", "core_count")}


@functools.lru_cache(maxsize=None)
def device(target: str = "h100") -> jax.Device:
    """A compile-only CUDA device for `target` ("h100" or "h200").

    Raises:
      DeviceError: this environment cannot compile for a GPU (`unavailable_reason`).
    """
    reason = unavailable_reason()
    if reason:
        raise DeviceError(f"Cannot compile for a GPU here: {reason}.")
    # The plugin is installed without NVIDIA's runtime libraries, which only running needs.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    # Deferred: jax.experimental.topologies is only needed for compile-only devices.
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                        target_config=target_config(target), topology="1x1x1")
    return topo.devices[0]


@contextlib.contextmanager
def on(dev: jax.Device):
    """Trace and lower for `dev` (module docstring)."""
    with jax.default_device(dev):
        yield


def abstract(tree, dev: jax.Device):
    """ShapeDtypeStructs on `dev` mirroring a pytree of arrays or ShapeDtypeStructs."""
    sharding = jax.sharding.SingleDeviceSharding(dev)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compile_lowered(lowered: jax.stages.Lowered, dev: jax.Device) -> jax.stages.Compiled:
    """Compile a program lowered for `dev` with COMPILER_OPTIONS."""
    with on(dev):
        return lowered.compile(compiler_options=COMPILER_OPTIONS)


def compile_fn(fn, *args, dev: jax.Device, **static) -> jax.stages.Compiled:
    """jit, trace, lower and compile `fn(*args, **static)` for `dev` (args abstract, on dev)."""
    with on(dev):
        lowered = jax.jit(fn, static_argnames=tuple(static)).trace(*args, **static).lower()
    return compile_lowered(lowered, dev)
