"""Where generation runs: backend choice, precision policy, parameter placement.

* `resolve_device("cpu" | "gpu" | "auto")` picks a jax.Device, or raises DeviceError saying
  how to install CUDA jax when a GPU is requested but none is visible.
* `place_params` puts a model's params on a device once (packed weights travel packed) and
  caches the placed copy per (model, device, dtype); a sharded model's params stay on their mesh
  (model/sharding.py). `ensure_on_device` moves each call's inputs (to a device or a sharding).
* `resolve_policy` picks the precision policy: the `gpu` preset (bf16 compute and KV cache) on a
  GPU unless one is given, and pins `kernel="auto"` to the device's platform, because the kernel
  dispatcher otherwise follows jax.default_backend(), not the device we run on (on a GPU it stays
  "auto", so that a Pallas kernel that does not compile falls back to XLA: kernels/gpu/fallback.py).
* `place_params` first checks that the params fit in the device's free memory (runtime/memory.py).
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.errors import DeviceError
from bitnet_jax.kernels import choose_kernel
from bitnet_jax.model.params import lm_head_format, placed_dtype, quantize_lm_head
from bitnet_jax.model.policy import Policy, get_policy
from bitnet_jax.model import sharding
from bitnet_jax.runtime import memory

BACKENDS = ("cpu", "gpu", "auto")
CUDA_INSTALL = 'pip install -U "jax[cuda13]"'
# CUDA 13 jax (>= 0.11) has wheels for Python >= 3.12 only (pyproject's [cuda] extra).
_CUDA_PYTHON = ("" if sys.version_info >= (3, 12) else
                f" in a Python >= 3.12 environment (this is Python {sys.version_info[0]}."
                f"{sys.version_info[1]}, which CUDA 13 jax has no wheels for)")

# (id(model), device, param dtype) -> (weakref to the model, id(model.params), placed params)
_PLACED: dict[tuple, tuple] = {}


def resolve_device(backend: str = "auto") -> jax.Device:
    """Return the device to run on.

    Args:
      backend: "cpu", "gpu" (first CUDA/ROCm device) or "auto" (a GPU when JAX sees one).

    Raises:
      DeviceError: unknown backend name, or "gpu" with no GPU visible to JAX.
    """
    if backend not in BACKENDS:
        raise DeviceError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}.")
    if backend in ("gpu", "auto"):
        gpus = _gpu_devices()
        if gpus:
            return gpus[0]
        if backend == "gpu":
            raise DeviceError(
                f"backend 'gpu' was requested but JAX {jax.__version__} sees no GPU "
                f"(devices: {', '.join(d.platform for d in jax.devices())}); install CUDA jax "
                f"with `{CUDA_INSTALL}`{_CUDA_PYTHON} or use backend 'cpu'."
            )
    # This process's own devices: on several processes (jax.distributed) jax.devices() also
    # lists the others', which this one cannot run on.
    return jax.local_devices(backend="cpu")[0]


def _gpu_devices() -> list:
    try:
        return jax.local_devices(backend="gpu")
    except RuntimeError:  # no CUDA/ROCm plugin, or no device behind it
        return []


def is_gpu(device: jax.Device) -> bool:
    return device.platform in ("gpu", "cuda", "rocm")


def describe(device: jax.Device) -> str:
    """Human-readable device name, e.g. "cpu (AMD EPYC 7B13)" or "gpu (NVIDIA H100)"."""
    if is_gpu(device):
        return f"gpu ({device.device_kind})"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return f"cpu ({device.device_kind})"


def resolve_policy(device: jax.Device, policy: Policy | str | None = None,
                   model_policy: Policy | None = None) -> Policy:
    """The precision policy for a run on `device`.

    An explicit `policy` wins; otherwise the `gpu` preset on a GPU and the model's own (or the
    `cpu` preset) elsewhere. kernel="auto" is pinned to the device's platform, except on a GPU,
    where the dispatcher resolves it while tracing for the GPU and falls back to XLA where a
    Pallas kernel does not compile (kernels/gpu/fallback.py).
    """
    if policy is not None:
        chosen = get_policy(policy)
    elif is_gpu(device):
        chosen = get_policy("gpu")
    else:
        chosen = model_policy or get_policy("cpu")
    if chosen.kernel == "auto" and not is_gpu(device):
        chosen = chosen.replace(kernel=choose_kernel("auto", device.platform))
    return chosen




def ensure_on_device(tree, device: jax.Device | jax.sharding.Sharding):
    """Return `tree` with every array leaf committed to `device` (leaves already there are kept).

    Args:
      tree: a pytree of jax or numpy arrays (or Python scalars).
      device: the target jax.Device, or a jax.sharding.Sharding (a sharded model's inputs,
        e.g. model.sharding.replicated(mesh)).
    """
    if isinstance(device, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _put_sharded(x, device), tree)

    def put(x):
        if isinstance(x, jax.Array) and x.committed and x.devices() == {device}:
            return x
        return jax.device_put(x, device)

    return jax.tree.map(put, tree)


def _put_sharded(x, sharding: jax.sharding.Sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    # make_array_from_callback also works when the sharding spans other processes' devices.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_params(model, device: jax.Device, policy: Policy) -> dict:
    """The model's params on `device`, float leaves in `policy.param_dtype`, placed once.

    Packed ternary leaves and their float32 scales travel as they are. The placed copy is cached
    per (model, device, param dtype) for as long as the model object lives and keeps the same
    params. A sharded model (model/sharding.py) keeps its params where they are, on their
    mesh: `device` is then not used.
    """
    key = (id(model), device, policy.param_dtype, policy.lm_head)
    hit = _PLACED.get(key)
    if hit is not None and hit[0]() is model and hit[1] == id(model.params):
        return hit[2]
    if sharding.mesh_of(model.params) is not None:
        params = _cast_floats(model.params, policy.param)  # elementwise: shardings are kept
    else:
        # Refuse params that cannot fit before copying them (runtime/memory.py); an
        # out-of-memory while copying becomes the same clear error.
        fit = dict(slots=0, context=0, device=device)
        memory.check_fit(model.config, policy, params_bytes=memory.placed_bytes(model.params,
                                                                                policy), **fit)
        with memory.memory_errors(model.config, policy, **fit):
            params = ensure_on_device(_cast_floats(model.params, policy.param), device)
    if lm_head_format(policy.lm_head, model.config, device.platform) == "int8":
        params = quantize_lm_head(params, model.config)
    _PLACED[key] = (weakref.ref(model, lambda _, k=key: _PLACED.pop(k, None)),
                    id(model.params), params)
    return params


def _cast_floats(params: dict, dtype) -> dict:
    def cast(path, x):
        target = placed_dtype(path, x.dtype, params, dtype)
        return x if x.dtype == target else jnp.asarray(x, target)

    return jax.tree_util.tree_map_with_path(cast, params)
