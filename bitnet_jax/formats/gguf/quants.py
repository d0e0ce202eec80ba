"""GGUF tensor encodings <-> ternary codes, in vectorised numpy integer arithmetic.

Ternary tensors travel as *codes* c = t+1 ∈ {0, 1, 2}, uint8 [R, I] (R rows = output features,
I = input features), never as float matrices. From codes, `pack_codes` gives our packed leaf
layout (bitlinear.py: bits 2i..2i+1 of packed row r hold row r + i·R/4).

Layouts (bitnet-spec §2.1, §2.2.3):

  TQ2_0  256 values -> 66 bytes: qs[64] then fp16 d. Value e = 128·h + 32·n + m sits in
         qs[32·h + m] at bits 2n..2n+1.
  TQ1_0  256 values -> 54 bytes: qs[48], qh[4], fp16 d. qs[m] (m < 32) holds values m + 32n,
         n = 0..4; qs[32+m] (m < 16) values 160 + m + 16n; qh[j] values 240 + j + 4n (n < 4).
         A byte is ⌈q·256/243⌉ of the base-3 number q = Σ c_n·3^(4-n) (qh: 4 trits, then ×3);
         trit n decodes as ((b·3ⁿ mod 256)·3) >> 8.
  I2_S   (bitnet.cpp, x86 layout) the tensor flattened row-major in 128-value blocks of 32
         bytes: value j in byte j mod 32 at shift 6 − 2·⌊j/32⌋; then a 32-byte tail whose first
         4 bytes are the float32 scale. The ARM build at bitnet.cpp HEAD uses 64-value blocks
         instead; the bytes carry no marker of which layout wrote them (any byte is valid in
         both), so it cannot be detected and is read as the x86 layout.

Codes are exact for all three; TQ1_0/TQ2_0 also carry one fp16 scale d per 256-value block.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from bitnet_jax.quant import ternarize_np

QK = 256  # TQ block size (QK_K)
TQ2_0_BYTES = 66
TQ1_0_BYTES = 54
I2S_BLOCK = 128

_POW3 = np.array([1, 3, 9, 27, 81], np.uint8)
_TRIT_WEIGHTS5 = np.array([81, 27, 9, 3, 1], np.uint16)
_TRIT_WEIGHTS4 = np.array([81, 27, 9, 3], np.uint16)  # qh: 4 trits, lowest trit 0 (×3)


# ------------------------------------------------------------------------------------------------
# Our packed layout


def pack_codes(codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Codes uint8 [O, I] -> packed uint8 [O/4, I] (bits 2i..2i+1 of row r = row r + i·O/4)."""
    o = codes.shape[0]
    q = o // 4
    if out is None:
        out = np.empty((q,) + codes.shape[1:], np.uint8)
    np.copyto(out, codes[:q])
    for i in range(1, 4):
        out |= codes[i * q:(i + 1) * q] << np.uint8(2 * i)
    return out


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """Packed uint8 [O/4, I] -> codes uint8 [O, I] (raw 2-bit fields, 3 included)."""
    return np.concatenate([(packed >> np.uint8(2 * i)) & np.uint8(3) for i in range(4)], axis=0)


def codes_to_ternary(codes: np.ndarray) -> np.ndarray:
    """Codes -> int8 t = c - 1."""
    return codes.astype(np.int8) - np.int8(1)


# ------------------------------------------------------------------------------------------------
# TQ2_0


def decode_tq2_0(raw: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """TQ2_0 rows -> (codes uint8 [R, I], d float16 [R, I/256]).

    Args:
      raw: uint8 [R, I/256·66], whole rows of a TQ2_0 tensor.
      n_cols: I, a multiple of 256.
    """
    r, nb = raw.shape[0], n_cols // QK
    blocks = np.asarray(raw).reshape(r, nb, TQ2_0_BYTES)
    qs = blocks[:, :, :64].reshape(r, nb, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    codes = (qs >> shifts) & np.uint8(3)  # [R, nb, h, n, m]: value 128h + 32n + m
    d = np.ascontiguousarray(blocks[:, :, 64:66]).view(np.float16).reshape(r, nb)
    return codes.reshape(r, n_cols), d


def encode_tq2_0(codes: np.ndarray, d: np.ndarray | float) -> np.ndarray:
    """Codes uint8 [R, I] (I a multiple of 256) + scale(s) -> TQ2_0 bytes uint8 [R, I/256·66].

    `d` is one value for every block or a [R, I/256] array; stored as fp16.
    """
    r, n_cols = codes.shape
    nb = n_cols // QK
    c = codes.reshape(r, nb, 2, 4, 32)
    qs = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)
    d16 = np.broadcast_to(np.asarray(d, np.float16), (r, nb)).reshape(r, nb, 1)
    out = np.concatenate([qs.reshape(r, nb, 64), np.ascontiguousarray(d16).view(np.uint8)],
                         axis=2)
    return out.reshape(r, nb * TQ2_0_BYTES)


# ------------------------------------------------------------------------------------------------
# TQ1_0


def _trits(b: np.ndarray, n: int) -> np.ndarray:
    """The first n trits of base-3 fixed-point bytes: b [..., k] uint8 -> [..., n, k] codes."""
    u = b[..., None, :] * _POW3[:n].reshape(n, 1)  # uint8 wrap = mod 256
    return ((u.astype(np.uint16) * np.uint16(3)) >> np.uint16(8)).astype(np.uint8)


def decode_tq1_0(raw: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """TQ1_0 rows -> (codes uint8 [R, I], d float16 [R, I/256])."""
    r, nb = raw.shape[0], n_cols // QK
    blocks = np.asarray(raw).reshape(r, nb, TQ1_0_BYTES)
    v0 = _trits(blocks[:, :, 0:32], 5).reshape(r, nb, 160)    # values n·32 + m
    v1 = _trits(blocks[:, :, 32:48], 5).reshape(r, nb, 80)    # 160 + n·16 + m
    v2 = _trits(blocks[:, :, 48:52], 4).reshape(r, nb, 16)    # 240 + n·4 + j
    codes = np.concatenate([v0, v1, v2], axis=2)
    d = np.ascontiguousarray(blocks[:, :, 52:54]).view(np.float16).reshape(r, nb)
    return codes.reshape(r, n_cols), d


def _pack_trits(c: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """c [..., n, k] codes -> [..., k] bytes ⌈q·256/243⌉ with q = Σ c_n·weights_n."""
    q = (c.astype(np.uint16) * weights.reshape(-1, 1)).sum(axis=-2, dtype=np.uint16)
    return ((q * np.uint16(256) + np.uint16(242)) // np.uint16(243)).astype(np.uint8)


def encode_tq1_0(codes: np.ndarray, d: np.ndarray | float) -> np.ndarray:
    """Codes uint8 [R, I] (I a multiple of 256) + scale(s) -> TQ1_0 bytes uint8 [R, I/256·54]."""
    r, n_cols = codes.shape
    nb = n_cols // QK
    c = codes.reshape(r, nb, QK)
    qs0 = _pack_trits(c[:, :, :160].reshape(r, nb, 5, 32), _TRIT_WEIGHTS5)
    qs1 = _pack_trits(c[:, :, 160:240].reshape(r, nb, 5, 16), _TRIT_WEIGHTS5)
    qh = _pack_trits(c[:, :, 240:].reshape(r, nb, 4, 4), _TRIT_WEIGHTS4)
    d16 = np.ascontiguousarray(
        np.broadcast_to(np.asarray(d, np.float16), (r, nb)).reshape(r, nb, 1)).view(np.uint8)
    return np.concatenate([qs0, qs1, qh, d16], axis=2).reshape(r, nb * TQ1_0_BYTES)


# ------------------------------------------------------------------------------------------------
# I2_S (bitnet.cpp)


def decode_i2s_rows(body: np.ndarray, n_cols: int) -> np.ndarray:
    """I2_S packed rows -> codes uint8 [R, I]; I must be a multiple of 128 (blocks in a row).

    Args:
      body: uint8 [R, I/4], rows of the packed part (the tail with the scale excluded).
    """
    r = body.shape[0]
    blocks = np.asarray(body).reshape(r, n_cols // I2S_BLOCK, 1, 32)
    shifts = np.array([6, 4, 2, 0], np.uint8).reshape(1, 1, 4, 1)
    return ((blocks >> shifts) & np.uint8(3)).reshape(r, n_cols)  # [R, blk, g, m]: j = 32g + m


def i2s_scale(raw: np.ndarray, n_values: int) -> float:
    """The float32 per-tensor scale stored at byte n/4 of an I2_S tensor."""
    return float(np.asarray(raw[n_values // 4:n_values // 4 + 4]).view("<f4")[0])


def encode_i2s(codes: np.ndarray, scale: float) -> np.ndarray:
    """Codes uint8 [O, I] (O·I a multiple of 128) -> I2_S bytes [O·I/4 + 32].

    The tensor is flattened row-major, so blocks may cross rows when I is not a multiple of 128
    (bitnet.cpp does the same).
    """
    flat = np.ascontiguousarray(codes).reshape(-1, 4, 32)  # [blocks, g, m]
    body = (flat[:, 0] << 6) | (flat[:, 1] << 4) | (flat[:, 2] << 2) | flat[:, 3]
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).astype("<f4").tobytes(), np.uint8)
    return np.concatenate([body.reshape(-1), tail])


# ------------------------------------------------------------------------------------------------
# Float types


# The numpy dtype of each plain float tensor type.
FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                "BF16": np.dtype(ml_dtypes.bfloat16)}


def typed_view(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Bytes of an F32/F16/BF16 tensor viewed as that dtype (1-D, no copy)."""
    return np.asarray(raw).view(FLOAT_DTYPES[type_name])


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...],
               dtype=np.float32) -> np.ndarray:
    """Float tensor bytes -> numpy array of `shape` in `dtype`.

    F32/F16/BF16 are views or one cast; Q8_0 is decoded here (34-byte blocks: fp16 d, then 32
    int8); other upstream quant types go through `gguf.quants.dequantize`.
    """
    raw = np.asarray(raw)
    if type_name == "F32":
        return raw.view("<f4").reshape(shape).astype(dtype, copy=False)
    if type_name == "F16":
        return raw.view("<f2").reshape(shape).astype(dtype, copy=False)
    if type_name == "BF16":
        return raw.view(ml_dtypes.bfloat16).reshape(shape).astype(dtype, copy=False)
    if type_name == "F64":
        return raw.view("<f8").reshape(shape).astype(dtype)
    if type_name == "Q8_0":
        blocks = raw.reshape(-1, 34)
        d = np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(shape).astype(dtype, copy=False)
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.dequantize(raw.reshape(shape[:-1] + (-1,)), qtype).reshape(shape).astype(
        dtype, copy=False)


def ternarize_float(w: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """A float linear weight -> (codes uint8 [O, I], σ, exact).

    A weight written as t·γ in float (llama.cpp's BitNet converter, bitnet.cpp's f32 step; spec
    §2.1, §2.2.2) has every nonzero |W| equal to one value a: then σ = a and t = sign(W),
    reproducing t·γ exactly (absmean would give γ·mean|t|, a different scale). Any other float
    weight is a latent (master) weight: it is ternarised with BitNet's absmean rule
    (bitlinear.quantize_weights), and `exact` is False.
    """
    a = np.abs(w)
    amax = float(a.max()) if a.size else 0.0
    if amax == 0.0:
        return np.ones(w.shape, np.uint8), 1e-5, True
    nonzero = a != 0
    if np.all(a[nonzero] == a.max()):
        codes = np.where(nonzero, np.where(w > 0, 2, 0), 1).astype(np.uint8)
        return codes, amax, True
    t, gamma = ternarize_np(w)
    return (t + 1).astype(np.uint8), float(gamma), False
