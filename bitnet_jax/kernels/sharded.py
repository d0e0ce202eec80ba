"""Custom kernels on sharded operands: `shard_map` around the calls XLA cannot partition.

Under `jax.jit` the compiler partitions the XLA path of a sharded model by itself (GSPMD /
Shardy propagation: a contraction over a split axis becomes local partial sums and an
all-reduce). A custom call (the CPU FFI kernels, Pallas) is opaque to it: left alone it would
be gathered onto every device and run whole. So dispatch.py hands those calls here, and when
an operand lives on a mesh with a "data" or "tensor" axis they run once per shard inside
`jax.shard_map` (Megatron-LM's tensor parallelism, Shoeybi et al. 2019, §3):

  column-parallel  x_q replicated over "tensor", weight split on O  -> output split on O
  row-parallel     x_q and weight split on I -> int32 partial sums, `psum` over "tensor"
                   (exact: integer addition is associative)
  LM head          int8 [V, D] split on V (column-parallel)
  attention        q split on heads N, the cache on kv heads K (query head j uses kv head
                   j // G, so a shard's queries only read its own kv heads)
Rows (x_q's M = B·T, the cache's B) are split over "data" when they divide it.

No quantisation runs inside these shard_maps: BitLinear quantises its input (per-token absmax)
before dispatch, in XLA, over the whole feature vector, so the compiler turns the absmax of a
split input into an all-reduce max and every shard sees the same int8 values and step as the
single-device model (issue 15, item 2). The kernels only ever receive int8 operands.

Which weights are split how is decided by model/sharding.py; the kernels read it from the
layout alone:
  * a *blocked* packed weight [(L,) P, O/(4P), I] (rank one higher than usual) is P standard
    packed matrices of O/P consecutive output rows each. The standard layout interleaves rows
    r + i·O/4 in one byte (quant.py), so a split of its O/4 axis would give each shard four
    scattered strips of outputs; blocks make a split on P give each shard whole heads / whole
    F columns in order. Blocked weights are column-parallel: P is split over "tensor" when it
    divides P, else the weight is replicated (kv heads fewer than the tensor axis).
  * a standard packed weight [(L,) O/4, I] is row-parallel: I is split over "tensor" when it
    divides I.
The in_specs only say where the kernel wants its operands; the compiler moves data to match
(correct whatever the actual placement, and free when model/sharding.py placed it so).
`check_vma=False`: a kernel's outputs carry no varying-axes type (Pallas refuses to guess one);
the out_specs above state it, and the psums make the row-parallel sums equal on every shard.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bitnet_jax.kernels.xla import ternary_matmul_xla

DATA, TENSOR = "data", "tensor"


# ------------------------------------------------------------------------------------------------
# The mesh of the operands


def mesh_of(*arrays):
    """The mesh (concrete or abstract) the operands live on, if it has a "data" or "tensor"
    axis of size > 1; else None (one device: no shard_map needed)."""
    for a in arrays:
        # A concrete array knows its real mesh (eager calls); a tracer's type carries the
        # abstract one, which shard_map accepts as well.
        concrete = isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)
        sharding = a.sharding if concrete else None
        if not isinstance(sharding, jax.sharding.NamedSharding):
            sharding = getattr(jax.typeof(a), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and not mesh.empty and (_size(mesh, DATA) > 1
                                                     or _size(mesh, TENSOR) > 1):
            return mesh
    return None


def _size(mesh, axis: str) -> int:
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(axis, 1)


def _split(mesh, axis: str, n: int) -> str | None:
    """`axis` if it splits a dimension of size n over more than one device, else None."""
    size = _size(mesh, axis)
    return axis if size > 1 and n % size == 0 else None


def is_blocked(packed: jax.Array, layer) -> bool:
    """True for the blocked layout [(L,) P, O/(4P), I] (module docstring)."""
    return packed.ndim == (4 if layer is not None else 3)


# ------------------------------------------------------------------------------------------------
# Ternary matmuls


def blocked_matmul_xla(x_q: jax.Array, packed: jax.Array, layer=None) -> jax.Array:
    """XLA ternary matmul of a blocked weight: [M, I] x [(L,) P, R, I] -> [M, 4·P·R] int32.

    One batched dot over the P blocks (vmap of kernels.xla), so a split of P stays local to each
    shard under the compiler's partitioning.
    """
    if layer is not None:
        packed = jax.lax.dynamic_index_in_dim(packed, layer, 0, keepdims=False)
    acc = jax.vmap(ternary_matmul_xla, in_axes=(None, 0))(x_q, packed)  # [P, M, 4R]
    return acc.transpose(1, 0, 2).reshape(x_q.shape[0], -1)  # block p -> columns p·4R..


def ternary_many(kernel: Callable, x_q: jax.Array, packed: list, layer=None) -> list:
    """Run a custom ternary kernel over several weights sharing x_q, per shard when sharded.

    Args:
      kernel: (x_q [M, I], [standard packed [(L,) O_j/4, I]], layer) -> [[M, O_j] int32], the
        single-device implementation (one call for all weights).
      x_q: [M, I] int8 activations.
      packed: standard or blocked uint8 weights (module docstring).
      layer: int32 scalar (weights stacked on L) or None.

    Returns:
      list of [M, O_j] int32, in natural output order.
    """
    mesh = mesh_of(x_q, *packed)
    if mesh is None:
        return _local_many(kernel, x_q, packed, layer)
    stacked = (None,) if layer is not None else ()
    rows = _split(mesh, DATA, x_q.shape[0])
    blocked = [is_blocked(w, layer) for w in packed]
    # Row-parallel only when no weight of the call wants x_q whole. A call with both (q/k/v
    # when k/v are replicated because kv heads < tp) keeps its standard weights whole.
    cols = None if any(blocked) else _split(mesh, TENSOR, x_q.shape[1])
    w_specs, out_specs = [], []
    for w, b in zip(packed, blocked):
        split = _split(mesh, TENSOR, w.shape[-3]) if b else None
        w_specs.append(P(*stacked, split, None, None) if b else P(*stacked, None, cols))
        out_specs.append(P(rows, split if b else None))

    def body(x_local, layer_local, *w_local):
        accs = _local_many(kernel, x_local, list(w_local), layer_local if stacked else None)
        if cols is not None:
            accs = [jax.lax.psum(a, TENSOR) for a in accs]  # int32 partial sums over I
        return tuple(accs)

    layer_op = jnp.asarray(layer if layer is not None else 0, jnp.int32)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(rows, cols), P(), *w_specs),
                       out_specs=tuple(out_specs), check_vma=False)
    return list(fn(x_q, layer_op, *packed))


def _local_many(kernel: Callable, x_q: jax.Array, packed: list, layer) -> list:
    """`kernel` on one device; a blocked weight [.., P, R, I] is passed as the standard matrix
    [.., P·R, I] (a free reshape) and its output columns, which come out as [M, 4, P, R]
    (quant.py's interleave over the merged rows), are put back in block order [M, P, 4, R]."""
    flat, shapes = [], []
    for w in packed:
        if is_blocked(w, layer):
            *lead, p, r, i = w.shape
            flat.append(w.reshape(*lead, p * r, i))
            shapes.append((p, r))
        else:
            flat.append(w)
            shapes.append(None)
    accs = kernel(x_q, flat, layer)
    out = []
    for acc, shape in zip(accs, shapes):
        if shape is not None and shape[0] > 1:
            m = acc.shape[0]
            acc = acc.reshape(m, 4, *shape).transpose(0, 2, 1, 3).reshape(m, -1)
        out.append(acc)
    return out


# ------------------------------------------------------------------------------------------------
# The int8 LM head and cached attention


def int8_head(kernel: Callable, x_q: jax.Array, w: jax.Array) -> jax.Array:
    """A custom int8 matmul [M, D] x [V, D] -> [M, V] int32, split on V when sharded."""
    mesh = mesh_of(x_q, w)
    if mesh is None:
        return kernel(x_q, w)
    rows, vocab = _split(mesh, DATA, x_q.shape[0]), _split(mesh, TENSOR, w.shape[0])
    return jax.shard_map(kernel, mesh=mesh, in_specs=(P(rows, None), P(vocab, None)),
                         out_specs=P(rows, vocab), check_vma=False)(x_q, w)


def attention_shardable(q: jax.Array, cache_k: jax.Array) -> bool:
    """False when a tensor axis cannot split both query heads N and kv heads K (then the caller
    uses XLA attention, which the compiler partitions by query heads)."""
    mesh = mesh_of(q, cache_k)
    if mesh is None or _size(mesh, TENSOR) == 1:
        return True
    return bool(_split(mesh, TENSOR, q.shape[2]) and _split(mesh, TENSOR, cache_k.shape[2]))


def attention(kernel: Callable, q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer,
              rows: jax.Array, pos: jax.Array) -> jax.Array:
    """A custom cached-attention kernel per shard: heads over "tensor", cache rows over "data".

    Args:
      kernel: (q, cache_k, cache_v, layer, rows, pos) -> [Bq, T, N, H] on one device.
      q: [Bq, T, N, H]; cache_k, cache_v: [L, B, K, S, H]; layer: int32 [];
      rows, pos: int32 [Bq] (the cache row and first position of each query row).

    With Bq == B the query rows are the cache rows in order (model/cache.cache_rows) and split
    with them. Otherwise (one slot's prefill) every data shard runs the queries against its own
    cache rows, masks the rows it does not hold and a psum over "data" picks the owner's result.
    """
    mesh = mesh_of(q, cache_k, cache_v)
    if mesh is None:
        return kernel(q, cache_k, cache_v, layer, rows, pos)
    heads = _split(mesh, TENSOR, q.shape[2]) if _split(mesh, TENSOR, cache_k.shape[2]) else None
    b_cache = cache_k.shape[1]
    data = _split(mesh, DATA, b_cache)
    qrows = data if q.shape[0] == b_cache else None
    cache_spec = P(None, data, heads, None, None)

    def body(q_l, k_l, v_l, layer_l, rows_l, pos_l):
        if data is None:
            return kernel(q_l, k_l, v_l, layer_l, rows_l, pos_l)
        local = rows_l - jax.lax.axis_index(DATA) * k_l.shape[1]  # global -> local cache row
        mine = (local >= 0) & (local < k_l.shape[1])
        out = kernel(q_l, k_l, v_l, layer_l, jnp.clip(local, 0, k_l.shape[1] - 1), pos_l)
        if qrows is not None:
            return out
        return jax.lax.psum(jnp.where(mine[:, None, None, None], out, 0.0), DATA)

    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(P(qrows, None, heads, None), cache_spec, cache_spec, P(),
                                 P(qrows), P(qrows)),
                       out_specs=P(qrows, None, heads, None), check_vma=False)
    return fn(q, cache_k, cache_v, jnp.asarray(layer, jnp.int32), jnp.asarray(rows, jnp.int32),
              jnp.asarray(pos, jnp.int32))
