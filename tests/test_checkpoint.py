"""Hugging Face directories <-> params, and load_model's errors (checkpoint.py, loading.py,
safetensors_io.py).

Checkpoints here are written with the independent `safetensors` package where possible, so the
reader is not only tested against our own writer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from bitnet_jax import load_model
from bitnet_jax.quant import is_packed
from bitnet_jax.formats.hf import load_hf, save_hf
from bitnet_jax.quant import unpack_ternary_np
from bitnet_jax.errors import BitNetError, CheckpointError, ConfigError
from bitnet_jax.model.params import BITLINEAR_PATHS
from bitnet_jax.formats.safetensors import read_safetensors, write_safetensors
from conftest import TINY_CONFIG


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _hf_tensors(cfg, params) -> dict[str, np.ndarray]:
    """HF-named latent float tensors of a latent params tree (the 2B4T -bf16 layout)."""
    layers = params["layers"]
    out = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]),
           "model.norm.weight": np.asarray(params["norm"])}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = np.asarray(layers["input_layernorm"][i])
        out[pre + "post_attention_layernorm.weight"] = np.asarray(
            layers["post_attention_layernorm"][i])
        out[pre + "self_attn.attn_sub_norm.weight"] = np.asarray(
            layers["self_attn"]["attn_sub_norm"][i])
        out[pre + "mlp.ffn_sub_norm.weight"] = np.asarray(layers["mlp"]["ffn_sub_norm"][i])
        for mod, name in BITLINEAR_PATHS:
            out[pre + f"{mod}.{name}.weight"] = np.asarray(layers[mod][name][i])
    return out


def _write(folder: Path, config: dict, tensors: dict, name="model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / name),
              metadata={"format": "pt"})
    return folder


@pytest.fixture
def latent_dir(tmp_path, tiny_cfg, tiny_params):
    """An HF folder holding tiny_params as latent float32 (online autobitlinear)."""
    return _write(tmp_path / "latent", json.loads(TINY_CONFIG.read_text()),
                  _hf_tensors(tiny_cfg, tiny_params))


def _one_sentence(err: BaseException) -> str:
    msg = str(err)
    assert isinstance(err, BitNetError), type(err)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


# ---- round trips and conventions --------------------------------------------------------------


def test_packed_save_load_roundtrip(tmp_path, tiny_cfg, tiny_packed_params):
    save_hf(tmp_path, tiny_cfg, tiny_packed_params)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["quantization_config"] == {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                         "quantization_mode": "offline"}
    tensors = read_safetensors(tmp_path / "model.safetensors")
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (8, 48)  # [O/4, I] uint8
    assert tensors["model.layers.1.mlp.down_proj.weight_scale"].shape == (1,)
    cfg, params = load_hf(tmp_path)
    assert cfg == tiny_cfg.replace(quantization_mode="offline")
    _assert_trees_equal(params, tiny_packed_params)


def test_latent_checkpoint_is_packed_at_load(latent_dir, tiny_cfg, tiny_params,
                                             tiny_packed_params):
    cfg, packed = load_hf(latent_dir)
    assert cfg == tiny_cfg
    for mod, name in BITLINEAR_PATHS:
        got, want = packed["layers"][mod][name], tiny_packed_params["layers"][mod][name]
        np.testing.assert_array_equal(np.asarray(got["packed"]), np.asarray(want["packed"]))
        # NumPy (float64 mean) vs XLA (float32 mean) absmean: equal to float32 rounding.
        np.testing.assert_allclose(np.asarray(got["scale"]), np.asarray(want["scale"]), rtol=1e-6)
    _, latent = load_hf(latent_dir, packed=False)  # QAT: the latent weights as stored
    _assert_trees_equal(latent, tiny_params)


def test_packed_checkpoint_loaded_latent_gives_effective_weights(tmp_path, tiny_cfg,
                                                                 tiny_packed_params):
    save_hf(tmp_path, tiny_cfg, tiny_packed_params)
    _, latent = load_hf(tmp_path, packed=False)
    for mod, name in BITLINEAR_PATHS:
        w, leaf = latent["layers"][mod][name], tiny_packed_params["layers"][mod][name]
        assert not is_packed(w) and w.dtype == np.float32
        for i in range(2):  # σ·t per layer
            t = unpack_ternary_np(np.asarray(leaf["packed"][i])).astype(np.float32)
            np.testing.assert_array_equal(np.asarray(w[i]), t * np.asarray(leaf["scale"][i]))


def test_bitlinear_class_divides_by_weight_scale(tmp_path, tiny_cfg, tiny_packed_params):
    # Default linear_class "bitlinear" (Falcon3, Llama3-8B-1.58): weight_scale = 1/σ, stored in
    # bf16 (spec §1.3). "autobitlinear" (2B4T) multiplies.
    save_hf(tmp_path / "auto", tiny_cfg, tiny_packed_params)
    tensors = dict(read_safetensors(tmp_path / "auto" / "model.safetensors"))
    inverse = {}
    for name, arr in tensors.items():
        if name.endswith("weight_scale"):
            inverse[name] = (1.0 / arr.astype(np.float32)).astype(ml_dtypes.bfloat16)
            tensors[name] = inverse[name]
    hf = json.loads((tmp_path / "auto" / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "bitnet"}  # linear_class defaults to bitlinear
    folder = tmp_path / "div"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    write_safetensors(folder / "model.safetensors", tensors)
    cfg, params = load_hf(folder)
    assert (cfg.linear_class, cfg.quantization_mode) == ("bitlinear", "offline")
    q = params["layers"]["self_attn"]["q_proj"]
    want = [1.0 / float(inverse[f"model.layers.{i}.self_attn.q_proj.weight_scale"][0])
            for i in range(2)]
    np.testing.assert_allclose(np.asarray(q["scale"]), want, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(q["scale"]),
                               np.asarray(tiny_packed_params["layers"]["self_attn"]["q_proj"]
                                          ["scale"]), rtol=1e-2)  # bf16 round trip of 1/σ


def test_1bitllm_names_and_fp16_load(tmp_path, tiny_cfg, tiny_params):
    # 1bitLLM: BitnetForCausalLM, model_type llama, inner_attn_ln / ffn_layernorm, latent fp16,
    # no quantization_config, rotary inv_freq buffers in the file (spec §1.4).
    tensors = {}
    for name, arr in _hf_tensors(tiny_cfg, tiny_params).items():
        name = name.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln")
        name = name.replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm")
        tensors[name] = arr.astype(np.float16)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    hf = json.loads(TINY_CONFIG.read_text()) | {
        "architectures": ["BitnetForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
        "input_bits": 8, "weight_bits": 1}
    del hf["quantization_config"]
    cfg, params = load_hf(_write(tmp_path, hf, tensors), packed=False)
    assert cfg.architecture == "BitnetForCausalLM" and cfg.use_sub_norms and cfg.quantized
    assert params["layers"]["self_attn"]["attn_sub_norm"].dtype == np.float32
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["mlp"]["ffn_sub_norm"]),
        np.asarray(tiny_params["layers"]["mlp"]["ffn_sub_norm"]).astype(np.float16)
        .astype(np.float32))


def test_sharded_checkpoint_and_file_paths(tmp_path, tiny_cfg, tiny_params, latent_dir):
    tensors = _hf_tensors(tiny_cfg, tiny_params)
    names = sorted(tensors)
    folder = _write(tmp_path / "sharded", json.loads(TINY_CONFIG.read_text()),
                    {n: tensors[n] for n in names[::2]}, "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[1::2]},
              str(folder / "model-00002-of-00002.safetensors"))
    _, sharded = load_hf(folder, packed=False)
    _assert_trees_equal(sharded, tiny_params)
    # load_model accepts the folder, its config.json or a weight file.
    for path in (latent_dir, latent_dir / "config.json", latent_dir / "model.safetensors"):
        model = load_model(path, packed=False)
        assert model.config == tiny_cfg and model.tokenizer is None
        assert model.source == str(latent_dir)


def test_tied_model_ignores_a_stored_lm_head(tmp_path, tiny_cfg, tiny_params):
    tensors = _hf_tensors(tiny_cfg, tiny_params)
    tensors["lm_head.weight"] = np.zeros((61, 32), np.float32)  # transformers may save it
    _, params = load_hf(_write(tmp_path, json.loads(TINY_CONFIG.read_text()), tensors))
    assert "lm_head" not in params


def test_untied_float_llama_loads_lm_head(tmp_path, tiny_float_cfg, tiny_float_params):
    cfg = tiny_float_cfg.replace(tie_word_embeddings=False)
    params = dict(tiny_float_params, lm_head=tiny_float_params["embed_tokens"] * 2)
    save_hf(tmp_path, cfg, params)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in hf
    loaded_cfg, loaded = load_hf(tmp_path)
    assert loaded_cfg == cfg and not loaded_cfg.quantized
    _assert_trees_equal(loaded, params)  # float weights are kept as float, never ternarised


# ---- errors: each a BitNetError subclass with one sentence that names the problem ------------


def test_error_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_model(tmp_path / "nowhere")
    _one_sentence(info.value)


def test_error_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json") as info:
        load_model(tmp_path)
    _one_sentence(info.value)


def test_error_unsupported_architecture(latent_dir):
    hf = json.loads((latent_dir / "config.json").read_text())
    hf["architectures"] = ["MistralForCausalLM"]
    (latent_dir / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="MistralForCausalLM") as info:
        load_model(latent_dir)
    _one_sentence(info.value)


def test_error_invalid_config_json(latent_dir):
    (latent_dir / "config.json").write_text('{"architectures": [')
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        load_model(latent_dir)
    _one_sentence(info.value)


@pytest.mark.parametrize("keep", [4, 100, 0.6])
def test_error_truncated_safetensors(latent_dir, keep):
    # Cut inside the 8-byte length, inside the JSON header, or inside the tensor data.
    path = latent_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_model(latent_dir)
    assert "model.safetensors" in _one_sentence(info.value)


def test_error_corrupt_safetensors_header(latent_dir):
    path = latent_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_model(latent_dir)
    _one_sentence(info.value)


def test_error_only_pickled_weights(latent_dir):
    (latent_dir / "model.safetensors").unlink()
    (latent_dir / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles") as info:
        load_model(latent_dir)
    _one_sentence(info.value)
    with pytest.raises(CheckpointError, match="pickled") as info:  # the file itself
        load_model(latent_dir / "pytorch_model.bin")
    _one_sentence(info.value)


def test_error_no_weight_files(latent_dir):
    (latent_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors") as info:
        load_model(latent_dir)
    _one_sentence(info.value)


def test_error_neither_gguf_nor_hf_file(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="neither a GGUF file nor an HF model folder") as info:
        load_model(path)
    _one_sentence(info.value)


def _rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    edit(tensors)
    path.unlink()
    save_file(tensors, str(path))


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.bias",
                                  "model.layers.1.mlp.experts.0.weight",
                                  "model.vision_tower.weight",
                                  "model.layers.2.input_layernorm.weight",
                                  # regression: a scale with no projection was silently ignored
                                  "model.layers.0.self_attn.rotary.weight_scale"])
def test_error_unknown_tensor(latent_dir, name):
    _rewrite(latent_dir, lambda t: t.__setitem__(name, np.ones(32, np.float32)))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as info:
        load_model(latent_dir)
    _one_sentence(info.value)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.norm.weight",
                                  "model.layers.1.self_attn.attn_sub_norm.weight",
                                  "model.layers.0.mlp.down_proj.weight"])
def test_error_missing_tensor(latent_dir, name):
    _rewrite(latent_dir, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " is missing") as info:
        load_model(latent_dir)
    _one_sentence(info.value)


def test_error_missing_lm_head_of_untied_model(latent_dir):
    hf = json.loads((latent_dir / "config.json").read_text()) | {"tie_word_embeddings": False}
    (latent_dir / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight is missing") as info:
        load_model(latent_dir)
    _one_sentence(info.value)


@pytest.mark.parametrize("name,shape", [
    ("model.embed_tokens.weight", (60, 32)),
    ("model.norm.weight", (33,)),
    ("model.layers.1.post_attention_layernorm.weight", (48,)),
    ("model.layers.0.self_attn.k_proj.weight", (32, 32)),
])
def test_error_misshaped_tensor(latent_dir, name, shape):
    _rewrite(latent_dir, lambda t: t.__setitem__(name, np.ones(shape, np.float32)))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " has shape") as info:
        load_model(latent_dir)
    _one_sentence(info.value)


def test_error_misshaped_or_unscaled_packed_tensor(tmp_path, tiny_cfg, tiny_packed_params):
    save_hf(tmp_path, tiny_cfg, tiny_packed_params)
    name = "model.layers.1.mlp.gate_proj.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, np.zeros((8, 32), np.uint8)))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " has packed shape") as e:
        load_model(tmp_path)
    assert "(12, 32)" in _one_sentence(e.value)
    shutil.rmtree(tmp_path)
    save_hf(tmp_path, tiny_cfg, tiny_packed_params)
    _rewrite(tmp_path, lambda t: t.pop(name + "_scale"))
    with pytest.raises(CheckpointError, match="weight_scale is missing") as e:
        load_model(tmp_path)
    _one_sentence(e.value)


def test_error_packed_tensor_with_code_3(tmp_path, tiny_cfg, tiny_packed_params):
    # Code 3 is no ternary value, and the CPU kernels read packed bytes as codes 0-2 only.
    save_hf(tmp_path, tiny_cfg, tiny_packed_params)
    name = "model.layers.0.self_attn.k_proj.weight"

    def corrupt(tensors):
        bad = np.array(tensors[name])
        bad[0, 0] = 0b11000000
        tensors[name] = bad

    _rewrite(tmp_path, corrupt)
    with pytest.raises(CheckpointError, match="code 3") as e:
        load_model(tmp_path)
    _one_sentence(e.value)
