"""Decoding one GGUF tensor: ternary codes into the packed layout, floats and dequantised blocks.

Helpers of load.py, which walks the file and assembles the params. Ternary tensors are decoded
in row chunks straight from the file's memory map into the stacked destination buffer, by
integer operations only (quants.py holds the block codecs).
"""

from __future__ import annotations

import numpy as np

from bitnet_jax.errors import GGUFError
from bitnet_jax.formats.gguf import quants
from bitnet_jax.formats.gguf.reader import GGUFFile, TensorInfo

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# Float-valued tensors (embeddings, norms) may also be block-quantised; Q8_0 is decoded by us,
# the rest by gguf.quants (bitnet.cpp's --quant-embd writes Q6_K embeddings, spec §2.2.2).
DEQUANT_TYPES = FLOAT_TYPES + ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                               "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
CHUNK_VALUES = 1 << 22  # ternary values decoded per step (bounds temporaries to a few MiB)
CHUNK_BYTES = 8 << 20  # float rows read per step


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised 64-byte-aligned array: JAX's CPU client can alias such buffers."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + n].view(dtype).reshape(shape)


# ------------------------------------------------------------------------------------------------
# Ternary tensors


def row_source(g: GGUFFile, info: TensorInfo, o: int, i: int):
    """A function rows(index) -> (codes uint8 [n, I], fp16 block scales [n, I/256] or None)."""
    raw = g.tensor_bytes(info)
    if info.type_name in ("TQ2_0", "TQ1_0"):
        per_block = quants.TQ2_0_BYTES if info.type_name == "TQ2_0" else quants.TQ1_0_BYTES
        decode = quants.decode_tq2_0 if info.type_name == "TQ2_0" else quants.decode_tq1_0
        rows2d = raw.reshape(o, i // quants.QK * per_block)
        return (lambda idx: decode(rows2d[idx], i)), None
    n = o * i
    scale = quants.i2s_scale(raw, n)
    if i % quants.I2S_BLOCK == 0:
        body = raw[:n // 4].reshape(o, i // 4)
        return (lambda idx: (quants.decode_i2s_rows(body[idx], i), None)), scale
    # Rows that do not hold whole 128-value blocks: decode the flattened tensor once.
    codes = quants.decode_i2s_rows(raw[:n // 4].reshape(1, n // 4), n).reshape(o, i)
    return (lambda idx: (codes[idx], None)), scale


def decode_ternary(g: GGUFFile, info: TensorInfo, o: int, i: int, perm: np.ndarray | None,
                    out: np.ndarray) -> float | None:
    """Decode a TQ1_0/TQ2_0/I2_S weight into our packed layout.

    Args:
      info: the tensor, numpy shape (O, I).
      perm: our row r is file row perm[r] (llama Q/K), or None.
      out: uint8 [O/4, I] destination (a slice of the stacked buffer).

    Returns:
      σ (W = σ·t), or None when the TQ block scales differ (not a BitNet conversion).
    """
    rows, i2s_scale = row_source(g, info, o, i)
    q = o // 4
    step = max(1, CHUNK_VALUES // max(i, 1))
    seen: set[int] = set()  # fp16 bit patterns of the scales of blocks holding nonzeros
    for r0 in range(0, q, step):
        r1 = min(q, r0 + step)
        for k in range(4):
            lo, hi = k * q + r0, k * q + r1
            codes, d = rows(perm[lo:hi] if perm is not None else slice(lo, hi))
            if d is not None and not block_scales(g, info, codes, d, seen):
                return None
            if k == 0:
                np.copyto(out[r0:r1], codes)
            else:
                out[r0:r1] |= codes << np.uint8(2 * k)
    # A 2-bit field holding 3 (both bits set) is not a ternary code; checked on the packed bytes.
    if (out & (out >> np.uint8(1)) & np.uint8(0x55)).any():
        raise GGUFError(f"{g.path}: tensor {info.name!r} holds the 2-bit code 3, which is not a "
                        "ternary value; the file is corrupt.")
    if i2s_scale is not None:
        if not np.isfinite(i2s_scale):
            raise GGUFError(f"{g.path}: I2_S tensor {info.name!r} has a non-finite scale; the "
                            "file is corrupt.")
        return i2s_scale
    if not seen:  # an all-zero matrix: any σ will do
        return 1e-5
    return float(np.array(list(seen), np.uint16).view(np.float16)[0])


def block_scales(g: GGUFFile, info: TensorInfo, codes: np.ndarray, d: np.ndarray,
                  seen: set[int]) -> bool:
    """Track the TQ block scales of a chunk; False once two blocks with nonzeros differ.

    Zeroes the codes of blocks whose d is 0 (their values are 0 whatever the codes say).
    """
    bits = d.view(np.uint16)  # fp16 bit patterns: numpy's float16 arithmetic is slow
    if ((bits & 0x7C00) == 0x7C00).any():
        raise GGUFError(f"{g.path}: tensor {info.name!r} has a non-finite block scale; the "
                        "file is corrupt.")
    blocks = codes.reshape(codes.shape[0], -1, quants.QK)
    zero = (bits & 0x7FFF) == 0
    if zero.any():
        blocks[zero] = 1
    nonzero = bits[~zero]
    if nonzero.size == 0:
        return True
    lo, hi = int(nonzero.min()), int(nonzero.max())
    if lo == hi:  # the BitNet case: one d everywhere (cheap check)
        seen.add(lo)
        return len(seen) <= 1
    # Several d values: only blocks that hold nonzero codes count (a converter may write any d
    # for an all-zero block).
    used = (blocks != 1).any(axis=2) & ~zero
    seen.update(np.unique(bits[used]).tolist())
    return len(seen) <= 1


def dequantize_ternary(g: GGUFFile, info: TensorInfo, o: int, i: int) -> np.ndarray:
    """A TQ tensor as float32 [O, I] = (c-1)·d per block (the latent fallback)."""
    rows, scale = row_source(g, info, o, i)
    codes, d = rows(slice(0, o))
    t = codes.astype(np.float32).reshape(o, -1, quants.QK) - 1.0
    if d is None:
        return t.reshape(o, i) * np.float32(scale)
    return (t * d.astype(np.float32)[:, :, None]).reshape(o, i)


def read_float(g: GGUFFile, info: TensorInfo, dtype=np.float32, out=None) -> np.ndarray:
    """Dequantise a float (or Q8_0/...) tensor, reading rows in chunks from short-lived maps."""
    shape = info.shape
    if out is None:
        out = np.empty(shape, dtype)
    rows = shape[0] if len(shape) > 1 else 1
    row_bytes = info.nbytes // max(rows, 1)
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    flat = out.reshape(rows, -1)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw = np.memmap(g.path, np.uint8, "r", offset=info.offset + r0 * row_bytes,
                        shape=((r1 - r0) * row_bytes,)) if row_bytes else np.zeros(0, np.uint8)
        if info.type_name in ("F32", "F16", "BF16"):
            # Cast while assigning: no float32 temporary of the chunk.
            flat[r0:r1] = quants.typed_view(raw, info.type_name).reshape(r1 - r0, -1)
        else:
            flat[r0:r1] = quants.dequantize(raw, info.type_name, (r1 - r0, flat.shape[1]), dtype)
        del raw
    return out


# ------------------------------------------------------------------------------------------------
# The params pytree
