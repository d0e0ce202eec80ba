"""ModelConfig / from_hf / load_config / Policy (bitnet_jax/config.py, policy.py)."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import pytest

from bitnet_jax.model.config import ModelConfig, from_hf, load_config
from bitnet_jax.errors import BitNetError, ConfigError
from bitnet_jax.model.policy import POLICIES, Policy, get_policy
from conftest import CONFIGS, TINY_CONFIG

PRESETS = sorted(CONFIGS.glob("*.json"))


def _tiny_hf() -> dict:
    return json.loads(TINY_CONFIG.read_text())


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_validates_and_roundtrips(path):
    raw = json.loads(path.read_text())
    if "architectures" not in raw:  # a run config (configs/train-*.json) naming its model
        from bitnet_jax.train import load_train_config

        run = load_train_config(path)
        raw = run.model if isinstance(run.model, dict) else load_config(run.model).to_hf()
    cfg = from_hf(raw)
    cfg.validate()
    assert cfg.num_attention_heads * cfg.head_dim >= cfg.hidden_size // 2
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    # to_hf is the inverse of from_hf for every field we keep.
    assert from_hf(cfg.to_hf()) == cfg


def test_presets_cover_the_published_variants():
    # spec §1.7: the facts that pick the forward-pass variant, per family.
    b2 = load_config(CONFIGS / "bitnet-b1.58-2B-4T.json")
    assert (b2.hidden_act, b2.use_sub_norms, b2.tie_word_embeddings) == ("relu2", True, True)
    assert (b2.linear_class, b2.quantization_mode, b2.quantized) == (
        "autobitlinear", "offline", True)
    assert (b2.head_dim, b2.num_groups, b2.rope_theta) == (128, 4, 500000.0)
    large = load_config(CONFIGS / "bitnet_b1_58-large.json")
    assert (large.hidden_act, large.use_sub_norms, large.tie_word_embeddings) == (
        "silu", True, True)
    assert (large.quant_method, large.quantization_mode) == ("bitnet", "online")  # latent fp16
    assert large.head_dim == 96
    falcon = load_config(CONFIGS / "Falcon3-1B-Instruct-1.58bit.json")
    assert (falcon.use_sub_norms, falcon.tie_word_embeddings, falcon.linear_class) == (
        False, False, "bitlinear")
    assert (falcon.head_dim, falcon.num_groups, falcon.bos_token_id) == (256, 2, None)
    llama3 = load_config(CONFIGS / "Llama3-8B-1.58-100B-tokens.json")
    assert (llama3.head_dim, llama3.quantized, llama3.linear_class) == (128, True, "bitlinear")


def test_tiny_preset_has_the_house_style_sizes(tiny_cfg):
    c = tiny_cfg
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (61, 32, 48)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_hidden_layers) == (
        4, 2, 8, 2)
    assert load_config("tiny") == c  # preset lookup by name


def test_config_is_hashable_and_a_jit_static_arg(tiny_cfg):
    same = from_hf(_tiny_hf())
    assert same == tiny_cfg and hash(same) == hash(tiny_cfg)
    assert len({tiny_cfg, same, tiny_cfg.replace(rope_theta=500.0)}) == 2
    traces = []

    def f(x, cfg):
        traces.append(cfg)
        return x * cfg.vocab_size

    jf = jax.jit(f, static_argnums=1)
    x = jnp.ones(3)
    assert float(jf(x, tiny_cfg)[0]) == 61.0
    jf(x, same)  # equal config: cache hit, no retrace
    assert len(traces) == 1
    assert float(jf(x, tiny_cfg.replace(vocab_size=67))[0]) == 67.0
    assert len(traces) == 2


def test_eos_list_becomes_a_tuple():
    hf = _tiny_hf() | {"eos_token_id": [2, 7]}
    cfg = from_hf(hf)
    assert cfg.eos_token_id == (2, 7) and cfg.eos_ids == (2, 7)
    hash(cfg)


def test_rope_theta_is_read_from_transformers5_rope_parameters():
    # Regression: transformers >= 5 writes rope_parameters instead of rope_theta, and the
    # loader silently fell back to θ = 10000.
    hf = _tiny_hf()
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    assert from_hf(hf).rope_theta == 500000.0
    hf["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="rope_parameters"):
        from_hf(hf)


def test_1bitllm_config_without_quantization_block_is_latent_bitnet():
    hf = json.loads((CONFIGS / "bitnet_b1_58-3B.json").read_text())
    assert "quantization_config" not in hf
    cfg = from_hf(hf)
    assert cfg.quantized and cfg.quantization_mode == "online" and cfg.use_sub_norms


def test_float_llama_without_quantization_is_not_quantized():
    hf = _tiny_hf() | {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                       "hidden_act": "silu"}
    del hf["quantization_config"]
    cfg = from_hf(hf)
    assert not cfg.quantized and cfg.quant_method is None and not cfg.use_sub_norms
    assert "quantization_config" not in cfg.to_hf()


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 7}, "head_dim"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"intermediate_size": 50}, "intermediate_size"),
        ({"bos_token_id": -1}, "bos_token_id"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
        ({"quantization_config": {"quant_method": "bitnet", "linear_class": "fancy"}},
         "linear_class"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ],
)
def test_invalid_config_names_the_bad_field(changes, field):
    hf = _tiny_hf() | changes
    with pytest.raises(ConfigError, match=field) as info:
        from_hf(hf)
    assert isinstance(info.value, BitNetError)
    assert "\n" not in str(info.value)


def test_missing_required_field_is_named():
    hf = _tiny_hf()
    del hf["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size.*missing"):
        from_hf(hf)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="num_attention_heads"):
        ModelConfig(vocab_size=10, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=0, num_key_value_heads=1)
    with pytest.raises(ConfigError, match="hidden_size"):  # sub-norm width needs N·H == D
        ModelConfig(vocab_size=10, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                    use_sub_norms=True)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)  # a folder means its config.json
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(bad)


# ---- Policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["param_dtype", "compute_dtype", "output_dtype"])
def test_policy_refuses_float16(field):
    with pytest.raises(ConfigError, match=f"{field}=float16") as info:
        Policy(**{field: "float16"})
    assert isinstance(info.value, BitNetError)
    with pytest.raises(ConfigError, match=field):
        Policy(**{field: jnp.float16})


def test_policy_kv_cache_dtype():
    # float16 is allowed for the KV cache only (cached projections, no relu² in them).
    assert Policy().kv_cache == jnp.float32 and get_policy("gpu").kv_cache == jnp.bfloat16
    p = Policy(kv_cache_dtype=jnp.float16)
    assert p.kv_cache_dtype == "float16" and p.kv_cache == jnp.float16 and p.compute == jnp.float32
    assert Policy(kv_cache_dtype="int8").kv_cache == jnp.int8  # int8 rows (model/cache.py)
    with pytest.raises(ConfigError, match="kv_cache_dtype=int16.*float16, bfloat16 or int8"):
        Policy(kv_cache_dtype="int16")


def test_policy_presets_and_normalisation():
    assert get_policy(None) == POLICIES["cpu"] == Policy()
    assert get_policy("gpu").compute == jnp.bfloat16 and get_policy("gpu").output == jnp.float32
    p = Policy(param_dtype=jnp.bfloat16)
    assert p.param_dtype == "bfloat16" and p == Policy("bfloat16")
    assert get_policy(p) is p
    hash(p)
    with pytest.raises(ConfigError, match="precision policy 'fp8'"):
        get_policy("fp8")
    with pytest.raises(ConfigError, match="kernel"):
        Policy(kernel="cuda")


def test_non_object_rope_scaling_is_a_config_error():
    # Regression: a string rope_scaling raised AttributeError instead of naming the field.
    from bitnet_jax.model.config import from_hf
    from bitnet_jax.errors import ConfigError

    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 11, "hidden_size": 8,
          "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
          "rope_scaling": "linear"}
    with pytest.raises(ConfigError, match="rope_scaling"):
        from_hf(hf)


def test_unknown_config_keys_warn_once():
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8,
              intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
              flux_capacitor_gain=1.21, id2label={"0": "a"})
    with pytest.warns(UserWarning, match=r"\['flux_capacitor_gain'\] are not used"):
        from_hf(hf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_hf(hf)  # the same keys again: no second warning
        from_hf({k: v for k, v in hf.items() if k != "flux_capacitor_gain"})  # known keys only
