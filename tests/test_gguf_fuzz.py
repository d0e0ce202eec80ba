"""Fuzz the GGUF reader and loader with mutations of a real small file.

A valid TQ2_0 model file with a SentencePiece-style vocabulary in its metadata (strings, arrays of
strings, float and int arrays, bools) is mutated several hundred ways with a fixed seed: bit flips
in the header, truncations anywhere, every numeric header field (counts, lengths, value types,
dims, tensor types, offsets) overwritten with boundary values, and random byte splats. Loading
each mutant must either succeed or raise a BitNetError: never another exception, a hang, or a
large allocation.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from bitnet_jax.model.config import ModelConfig
from bitnet_jax.errors import BitNetError
from bitnet_jax.formats.gguf import load_gguf, write_gguf
from bitnet_jax.formats.gguf.write import model_metadata, model_tensors
from bitnet_jax.formats.gguf import quants

SEED = 20240611
BOUNDARY_U64 = (0, 1, 2, 3, 7, 255, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 62, (1 << 63) + 5,
                (1 << 64) - 1)
BOUNDARY_U32 = (0, 1, 4, 5, 8, 9, 12, 13, 34, 35, 36, 37, 39, 99, (1 << 31), (1 << 32) - 1)


def _vocab(n: int) -> dict:
    """A small SentencePiece-style vocabulary (unk, bos, eos, 256 byte tokens, pieces)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(n - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [-float(i) for i in range(n)],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": "{{ messages }}"}


def _base_file(path) -> bytes:
    cfg = ModelConfig(vocab_size=300, hidden_size=256, intermediate_size=256,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      hidden_act="relu2", tie_word_embeddings=True, use_sub_norms=True,
                      architecture="BitNetForCausalLM", model_type="bitnet",
                      linear_class="autobitlinear", bos_token_id=1, eos_token_id=2)
    rng = np.random.default_rng(0)
    layers = {"self_attn": {}, "mlp": {}}
    from bitnet_jax.model.params import linear_shapes

    for (mod, name), (o, i) in linear_shapes(cfg).items():
        codes = rng.integers(0, 3, size=(1, o, i)).astype(np.uint8)
        layers[mod][name] = {"packed": np.stack([quants.pack_codes(codes[0])]),
                             "scale": np.array([0.03], np.float32)}
    layers["input_layernorm"] = np.ones((1, 256), np.float32)
    layers["post_attention_layernorm"] = np.ones((1, 256), np.float32)
    layers["self_attn"]["attn_sub_norm"] = np.ones((1, 256), np.float32)
    layers["mlp"]["ffn_sub_norm"] = np.ones((1, 256), np.float32)
    params = {"embed_tokens": rng.standard_normal((300, 256)).astype(np.float32),
              "layers": layers, "norm": np.ones(256, np.float32)}
    meta = model_metadata(cfg, "bitnet-b1.58", "tq2_0", "fuzz")
    meta.update(_vocab(300))
    write_gguf(path, meta, model_tensors(cfg, params, "bitnet-b1.58", "tq2_0"))
    return path.read_bytes()


def _numeric_fields(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """(offset, size) of every count/length/type/shape/offset field; and the header length."""
    fields = []
    pos = 8
    fields += [(pos, 8), (pos + 8, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16

    def value(vtype, pos):
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        if vtype in sizes:
            fields.append((pos, sizes[vtype]))
            return pos + sizes[vtype]
        if vtype == 8:
            fields.append((pos, 8))
            (n,) = struct.unpack_from("<Q", data, pos)
            return pos + 8 + n
        etype, count = struct.unpack_from("<IQ", data, pos)
        fields.extend([(pos, 4), (pos + 4, 8)])
        pos += 12
        for k in range(count):
            before = len(fields)
            pos = value(etype, pos)
            if k > 2:  # keep three elements' fields per array
                del fields[before:]
        return pos

    for _ in range(n_kv):
        fields.append((pos, 8))
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        fields.append((pos, 4))
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos = value(vtype, pos + 4)
    for _ in range(n_tensors):
        fields.append((pos, 8))
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        fields.append((pos, 4))
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4
        fields += [(pos + 8 * d, 8) for d in range(n_dims)]
        pos += 8 * n_dims
        fields += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return fields, pos


def _mutants(data: bytes):
    rng = np.random.default_rng(SEED)
    fields, header_len = _numeric_fields(data)
    for _ in range(120):  # bit flips in the header
        b = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            bit = int(rng.integers(0, header_len * 8))
            b[bit // 8] ^= 1 << (bit % 8)
        yield "bitflip", bytes(b)
    for _ in range(60):  # truncations anywhere, biased to the header
        cut = int(rng.integers(0, header_len + 64)) if rng.random() < 0.7 else int(
            rng.integers(0, len(data)))
        yield "truncate", data[:cut]
    for k in rng.integers(0, len(fields), size=200):  # numeric fields <- boundary values
        off, size = fields[int(k)]
        pool = BOUNDARY_U64 if size == 8 else BOUNDARY_U32 if size == 4 else (0, 1, 255)
        v = int(pool[int(rng.integers(0, len(pool)))]) % (1 << (8 * size))
        b = bytearray(data)
        b[off:off + size] = v.to_bytes(size, "little")
        yield "field", bytes(b)
    for _ in range(40):  # random byte splats, header or data
        b = bytearray(data)
        start = int(rng.integers(0, len(data) - 16))
        b[start:start + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        yield "splat", bytes(b)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:.*different scales per 256-value block")
def test_mutated_files_raise_only_bitnet_errors(tmp_path):
    data = _base_file(tmp_path / "base.gguf")
    assert load_gguf(tmp_path / "base.gguf").tokenizer is not None
    counts = {"ok": 0, "error": 0}
    path = tmp_path / "mutant.gguf"
    n = 0
    for kind, blob in _mutants(data):
        n += 1
        path.write_bytes(blob)
        try:
            load_gguf(path)
        except BitNetError as exc:
            counts["error"] += 1
            assert "\n" not in str(exc)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{kind} mutant #{n} raised {type(exc).__name__}: {exc}")
        else:
            counts["ok"] += 1
    assert n == 420
    assert counts["error"] > n // 4  # most header damage is detected, not silently accepted
