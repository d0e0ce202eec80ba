"""Tensor and data parallelism: a ("data", "tensor") mesh, the sharding rules, placement.

The model code knows nothing of devices. Its params and the decode state get `NamedSharding`s
from the rules below; under `jax.jit` the compiler partitions the XLA ops (GSPMD / Shardy: the
absmax of a split BitLinear input and the sub-norm sums become all-reduces), and the custom
kernels run per shard inside `shard_map` (kernels/sharded.py). This is Megatron-LM's tensor
parallelism (Shoeybi et al. 2019, §3: column-parallel then row-parallel linears, one all-reduce
per pair) plus a data axis for the batch:

  leaf                               sharded form                    PartitionSpec
  q/k/v/gate/up_proj packed          blocked [L, tp, O/(4tp), I]     (None, "tensor", None, None)
  o/down_proj packed                 [L, O/4, I]                     (None, None, "tensor")
  q/k/v/gate/up_proj latent float    [L, O, I]                       (None, "tensor", None)
  o/down_proj latent float           [L, O, I]                       (None, None, "tensor")
  embed_tokens, lm_head [V, D]       (int8 copy: q8 [V, D], scale [V])  ("tensor", None)
  norms, weight scales               as loaded                       replicated
  KV cache [L, B, K, S, H]                                           (None, "data", "tensor", ..)
  per-slot state [B, ...]                                            ("data",)

Column-parallel packed weights are *blocked* (kernels/sharded.py): quant.py's layout puts rows
r + i·O/4 in one byte, so a plain split of its O/4 axis would hand each device four scattered
strips of rows; the blocked form keeps tp packed matrices of O/tp consecutive rows (whole heads,
whole F columns), and a split on the block axis gives each device one of them.

Choices, where a mesh does not divide a dimension:
  * query heads N, and F, must split into whole heads / whole 4-row packed groups: otherwise
    ShardingError names the dimension (a model cannot run on such a mesh).
  * kv heads K < tp (or not a multiple of tp): k/v_proj and the KV cache are replicated over
    "tensor" (they are small next to q/o at GQA ratios) and attention uses XLA, partitioned by
    query heads.
  * a vocabulary V that tp does not divide (e.g. the 61-token test model): the LM head and
    embedding stay replicated.
  * a batch B that the data axis does not divide (one prompt on a dp=2 mesh): the rows are
    replicated over "data", so the result is the same, without the speed-up.

Any mesh given is rebuilt with Auto axis types (jax.make_mesh makes Explicit ones, whose typed
shardings would demand annotations inside the model code).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bitnet_jax.errors import BitNetError
from bitnet_jax.model.config import ModelConfig

DATA, TENSOR = "data", "tensor"
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


class ShardingError(BitNetError, ValueError):
    """A mesh cannot hold this model (the message names the dimension) or is malformed."""


# ------------------------------------------------------------------------------------------------
# Meshes


def make_mesh(tensor: int = 1, data: int = 1, devices=None) -> Mesh:
    """A data x tensor mesh over `devices` (default: every device JAX sees, all processes).

    Raises:
      ShardingError: fewer devices than data·tensor.
    """
    devices = list(jax.devices() if devices is None else devices)
    if tensor < 1 or data < 1 or tensor * data > len(devices):
        problem = (f"a data x tensor mesh of {data} x {tensor} needs {data * tensor} devices but "
                   f"JAX sees {len(devices)}")
        raise ShardingError(f"{problem}; use a smaller mesh or more devices.",
                            cli_message=f"{problem}; lower --data-parallel / --tensor-parallel.")
    return jax.make_mesh((data, tensor), (DATA, TENSOR), axis_types=(AxisType.Auto,) * 2,
                         devices=devices[:data * tensor])


def auto_mesh(mesh: Mesh) -> Mesh:
    """`mesh` with Auto axis types, after checking its axis names are "data" and/or "tensor"."""
    if not isinstance(mesh, Mesh):
        raise ShardingError(f"expected a jax.sharding.Mesh, got {type(mesh).__name__}; build "
                            "one with jax.make_mesh((dp, tp), ('data', 'tensor')).")
    extra = [a for a in mesh.axis_names if a not in (DATA, TENSOR)]
    if extra:
        raise ShardingError(f"mesh axis {extra[0]!r} is not known; name the axes 'data' "
                            "(batch) and 'tensor' (model).")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def axis_size(mesh: Mesh, axis: str) -> int:
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(axis, 1)


def mesh_of(tree) -> Mesh | None:
    """The mesh a pytree's arrays are sharded over (more than one device), or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def _if_divides(mesh: Mesh, axis: str, n: int) -> str | None:
    size = axis_size(mesh, axis)
    return axis if size > 1 and n % size == 0 else None


# ------------------------------------------------------------------------------------------------
# Parameter rules


def check_mesh(mesh: Mesh, cfg: ModelConfig) -> Mesh:
    """Refuse a tensor axis that does not split the model into whole heads and packed groups.

    Returns:
      the mesh with Auto axis types.
    """
    mesh = auto_mesh(mesh)
    tp = axis_size(mesh, TENSOR)
    if tp == 1:
        return mesh
    n, h, f = cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    fix = f"use a tensor-parallel size that divides it (now {tp})"
    if n % tp:
        raise ShardingError(f"num_attention_heads={n} does not split into whole heads over "
                            f"tensor-parallel size {tp}; {fix}.")
    if not cfg.quantized:  # a float Llama has no packed groups
        if f % tp:
            raise ShardingError(f"intermediate_size={f} does not split over tensor-parallel "
                                f"size {tp}; {fix}.")
        return mesh
    if (n // tp * h) % 4:
        raise ShardingError(f"q_proj rows per shard (num_attention_heads/tp x head_dim = "
                            f"{n // tp * h}) are not whole 4-row packed groups; {fix}.")
    if f % (4 * tp):
        raise ShardingError(f"intermediate_size={f} does not split into whole 4-row packed "
                            f"groups over tensor-parallel size {tp} (needs a multiple of "
                            f"{4 * tp}); {fix}.")
    return mesh


def kv_split(cfg: ModelConfig, tp: int) -> bool:
    """True if k/v_proj (and the KV cache) split over a tensor axis of size tp: whole kv heads
    of whole 4-row packed groups; otherwise they are replicated (module docstring)."""
    k = cfg.num_key_value_heads
    return tp > 1 and k % tp == 0 and (k // tp * cfg.head_dim) % 4 == 0


def _rule(path: tuple[str, ...], leaf, cfg: ModelConfig, tp: int) -> tuple[P, int | None]:
    """(PartitionSpec of the leaf's sharded form, number of blocks to cut a standard packed
    leaf into, or None)."""
    t = TENSOR if tp > 1 else None
    name = path[-1]
    if path[0] in ("embed_tokens", "lm_head"):
        split = t if cfg.vocab_size % tp == 0 else None
        return (P(split) if name == "scale" else P(split, None)), None
    if path[0] != "layers" or len(path) < 3 or path[2] not in COLUMN + ROW:
        return P(), None  # norms
    proj, packed = path[2], name in ("packed", "scale")
    if name == "scale":
        return P(), None
    if proj in ROW:
        return (P(None, None, t), None)
    if proj in ("k_proj", "v_proj") and not kv_split(cfg, tp):
        return P(), None
    if not packed:  # latent float [L, O, I]
        return P(None, t, None), None
    if t is None:
        return P(), None
    blocked_for_tp = len(leaf.shape) == 4 and leaf.shape[1] == tp
    return P(None, t, None, None), (None if blocked_for_tp else tp)


def _plan(mesh: Mesh, params: dict, cfg: ModelConfig):
    """[(path, leaf, NamedSharding, blocks)] for every leaf of `params`."""
    tp = axis_size(mesh, TENSOR)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    plan = []
    for keys, leaf in flat:
        path = tuple(str(getattr(k, "key", k)) for k in keys)
        spec, blocks = _rule(path, leaf, cfg, tp)
        plan.append((path, leaf, NamedSharding(mesh, spec), blocks))
    return plan, treedef


def param_shardings(mesh: Mesh, params: dict, cfg: ModelConfig) -> dict:
    """The NamedSharding of every leaf of the sharded params (`shard_params`' output), as a
    pytree shaped like `params` (for jit's in_shardings or AOT lowering)."""
    mesh = check_mesh(mesh, cfg)
    plan, treedef = _plan(mesh, params, cfg)
    return jax.tree_util.tree_unflatten(treedef, [s for _, _, s, _ in plan])


def abstract_params(params: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
    """ShapeDtypeStructs of the sharded params, shardings included: what `shard_params` would
    return, for ahead-of-time lowering (e.g. on compile-only devices) without placing anything.

    Args:
      params: arrays or ShapeDtypeStructs, standard or sharded form.
    """
    mesh = check_mesh(mesh, cfg)
    plan, treedef = _plan(mesh, params, cfg)
    out = []
    for _, leaf, sharding, blocks in plan:
        shape = tuple(leaf.shape)
        if blocks is not None:
            shape = (*shape[:-2], blocks, shape[-2] // blocks, shape[-1])
        out.append(jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding))
    return jax.tree_util.tree_unflatten(treedef, out)


def shard_params(params: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
    """Place every leaf on `mesh` by the rules (module docstring), one leaf at a time.

    Each device receives only its own slice, cut from the host copy (a numpy array or an array
    on the CPU), so no accelerator ever holds more than its share; on several processes each
    places only the shards of its own devices (jax.make_array_from_callback).

    Args:
      params: model params, standard or already sharded.
      cfg: the model config.
      mesh: a mesh with axes "data" and/or "tensor".

    Returns:
      params in their sharded form (column-parallel packed weights blocked).
    """
    mesh = check_mesh(mesh, cfg)
    plan, treedef = _plan(mesh, params, cfg)
    del params
    out = []
    for i, (path, leaf, sharding, blocks) in enumerate(plan):
        plan[i] = None  # drop the host copy of this leaf as soon as it is placed
        out.append(_place(leaf, sharding, blocks))
    return jax.tree_util.tree_unflatten(treedef, out)


def _place(leaf, sharding: NamedSharding, blocks: int | None) -> jax.Array:
    if blocks is None and isinstance(leaf, jax.Array) and leaf.sharding == sharding:
        return leaf
    host = host_value(leaf)
    if blocks is None:
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    if host.ndim == 4:  # blocked for another tensor-parallel size
        host = unblock_packed(host)
    *lead, rows, i = host.shape
    shape = (*lead, blocks, rows // blocks, i)
    return jax.make_array_from_callback(
        shape, sharding, lambda idx: block_packed(host, blocks, idx[-3])[idx[:-3]])


def block_packed(packed: np.ndarray, blocks: int, which: slice = slice(None)) -> np.ndarray:
    """Standard packed weights [..., O/4, I] -> blocked [..., P, O/(4P), I] (blocks `which`).

    Block p is the standard packing (quant.py) of rows p·O/P .. (p+1)·O/P - 1. Its packed row
    r, bit plane i holds row g = (4p + i)·Rb + r (Rb = O/(4P)), which the standard layout keeps
    in plane g // (O/4) of packed row g % (O/4); a run of Rb such rows never crosses a plane, so
    each (p, i) is one shifted, masked slice of the source: integer operations, no unpacking.
    """
    *lead, rows, i = packed.shape
    if rows % blocks:
        raise ShardingError(f"a packed weight with {rows * 4} output rows does not split into "
                            f"{blocks} blocks of whole 4-row groups.")
    rb = rows // blocks
    chosen = range(blocks)[which]
    out = np.zeros((*lead, len(chosen), rb, i), np.uint8)
    for j, p in enumerate(chosen):
        for plane in range(4):
            g0 = (4 * p + plane) * rb
            src_plane, r0 = divmod(g0, rows)
            codes = (packed[..., r0:r0 + rb, :] >> np.uint8(2 * src_plane)) & np.uint8(3)
            out[..., j, :, :] |= codes << np.uint8(2 * plane)
    return out


def unblock_packed(blocked: np.ndarray) -> np.ndarray:
    """Inverse of `block_packed`: [..., P, O/(4P), I] -> standard [..., O/4, I]."""
    *lead, blocks, rb, i = blocked.shape
    rows = blocks * rb
    out = np.zeros((*lead, rows, i), np.uint8)
    for p in range(blocks):
        for plane in range(4):
            src_plane, r0 = divmod((4 * p + plane) * rb, rows)
            codes = (blocked[..., p, :, :] >> np.uint8(2 * plane)) & np.uint8(3)
            out[..., r0:r0 + rb, :] |= codes << np.uint8(2 * src_plane)
    return out


def shard(model, mesh: Mesh):
    """A loaded model with its params placed on `mesh` (`shard_params`); the same model object
    kind (formats.base.Model), ready for forward / generate unchanged.

    Example:
      mesh = jax.make_mesh((1, 2), ("data", "tensor"))
      model = bitnet_jax.shard(bitnet_jax.load_model(path), mesh)
    """
    return dataclasses.replace(model, params=shard_params(model.params, model.config, mesh))


def unshard_params(params: dict) -> dict:
    """Sharded params back to the standard single-device form, as numpy arrays on the host
    (e.g. to save them): blocked packed weights are unblocked."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out[key] = unshard_params(value)
        else:
            host = host_value(value)
            out[key] = unblock_packed(host) if key == "packed" and host.ndim == 4 else host
    return out


# ------------------------------------------------------------------------------------------------
# Decode state and host values


def state_shardings(mesh: Mesh, state_tree) -> dict:
    """NamedShardings for a decode state pytree (arrays or ShapeDtypeStructs).

    The KV cache (rank-5 leaves [L, B, K, S, H] under a "cache" key) is split by B over "data"
    and by K over "tensor"; every other leaf whose leading dimension is the cache's B (per-slot
    arrays [B, ...]) by "data"; scalars and anything else are replicated. A dimension that an
    axis does not divide stays whole on it (module docstring).
    """
    mesh = auto_mesh(mesh)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state_tree)
    caches = [leaf for keys, leaf in flat if len(leaf.shape) == 5 and _under_cache(keys)]
    batch = caches[0].shape[1] if caches else None
    specs = []
    for keys, leaf in flat:
        shape = leaf.shape
        if len(shape) == 5 and _under_cache(keys):
            spec = P(None, _if_divides(mesh, DATA, shape[1]), _if_divides(mesh, TENSOR, shape[2]),
                     None, None)
        elif len(shape) >= 1 and batch is not None and shape[0] == batch:
            spec = P(_if_divides(mesh, DATA, batch))
        else:
            spec = P()
        specs.append(NamedSharding(mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, specs)


def _under_cache(keys) -> bool:
    return any(str(getattr(k, "key", "")) == "cache" for k in keys)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (inputs, and outputs the host reads)."""
    return NamedSharding(auto_mesh(mesh), P())


def host_value(x) -> np.ndarray:
    """The whole value of an array as numpy, on every process, whatever its sharding."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    # Deferred: multihost_utils is only needed when a process holds part of an array.
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
