"""Parity with the reference implementation: Hugging Face transformers (marker `torch`).

A tiny random `BitNetForCausalLM` (V=97 D=64 F=96 L=3 N=4 K=2, relu², tied) is saved in every
weight convention bitnet_jax reads (spec §1.3, §1.4) and loaded both by transformers and by
`bitnet_jax.load_model`:

  online      latent f32 + {"linear_class": "autobitlinear", "quantization_mode": "online"}
  auto        packed uint8 + bf16 weight_scale = γ, autobitlinear offline (2B4T's format)
  div         packed uint8 + bf16 weight_scale = 1/γ, default "bitlinear" class (Falcon3)
  silu        latent fp16, SiLU FFN (HF names); `1bitllm` is the same weights under 1bitLLM's
              custom-code names, which transformers cannot run, so it is compared with `silu`
  llama       a float `LlamaForCausalLM` (no quantisation, untied lm_head)

How transformers builds these: `BitNetConfig(quantization_config=...)` alone does not convert
the model; `from_pretrained` sees the config's quantization_config, runs `BitNetHfQuantizer`,
which calls `integrations.bitnet.replace_with_bitnet_linear` (AutoBitLinear or BitLinear on the
meta device, lm_head kept) and, for packed autobitlinear, unpacks uint8 weights while loading
(`BitNetDeserialize`). So the random model is built and saved unquantised and then loaded back.

Numerics (house style §5.5 BitNet caution). Every variant is checked three ways:
  1. each BitLinear on transformers' own input (identical int8 activations by construction):
     worst error 4e-7 of max(1, |y|);
  2. each decoder layer on transformers' hidden state (teacher forcing): worst 4e-7 of max(1, |h|);
  3. end to end, at MODEL_TOL with argmax agreement at every position: max abs logit diffs
     online 5.7e-6, auto 5.3e-6, div 4.8e-6, silu 5.3e-6, llama 6.7e-6 (logit std ~3.9).
End to end, float noise of up to ~1e-4 of an int8 step (measured) can flip an activation that
sits that close to k + 1/2, and one flip moves logits by 1e-2..4e-1. Over 16 random token
batches about one in five per BitNet variant had such a flip (its first flipped value lay
6e-6..2e-5 from k + 1/2). TOKEN_SEED picks a batch with none in any variant; torch runs
single-threaded so its summation order is fixed. If an end-to-end case fails while (1) and (2)
pass, the failure message reports the flipped activations (`_int8_flip_report`).
torch.compile (used by transformers' quantisers) is disabled: eager torch is the reference
formula and inductor would need a C++ toolchain and minutes of compile time.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed; parity tests need the test extra: "
    "pip install -e '.[test]'")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed; parity tests need the test extra: "
    "pip install -e '.[test]'")
if not hasattr(transformers, "BitNetForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no BitNetForCausalLM (needs >= 4.52)",
                allow_module_level=True)

import bitnet_jax  # noqa: E402
from bitnet_jax.model.cache import attention_mask  # noqa: E402
from bitnet_jax.model.bitlinear import bitlinear  # noqa: E402
from bitnet_jax.model.layers import rms_norm, rope_frequencies  # noqa: E402
from bitnet_jax.model.transformer import block  # noqa: E402
from bitnet_jax.model.params import layer  # noqa: E402
from conftest import LEAF_TOL, MODEL_TOL  # noqa: E402

pytestmark = [pytest.mark.torch,
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")]

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, rope_theta=5000.0, bos_token_id=1, eos_token_id=2)
# Large init so logits are O(5) and top-2 gaps dwarf float noise: argmax is meaningful.
INIT_RANGE = 0.5
PROMPT = [1, 17, 42, 5]
NEW_TOKENS = 32
VARIANTS = ("online", "auto", "div", "silu")
TOKEN_SEED = 0  # a batch with no int8 tie in any variant (module docstring); 1 has one in online


def _tokens(seed: int = TOKEN_SEED) -> np.ndarray:
    gen = np.random.default_rng(seed)
    return gen.integers(0, SIZES["vocab_size"], size=(2, 12)).astype(np.int32)


@pytest.fixture(scope="module", autouse=True)
def _torch_settings():
    dynamo = getattr(torch, "_dynamo", None)
    disabled = dynamo.config.disable if dynamo else None
    threads = torch.get_num_threads()
    if dynamo:
        dynamo.config.disable = True
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    if dynamo:
        dynamo.config.disable = disabled


def _randomise_norms(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF inits gains to 1; random gains catch a swapped norm
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))


def _pack_dir(src, dst, linear_class: str):
    """Rewrite a latent checkpoint in the packed offline format (spec §1.3)."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.bitnet import pack_weights

    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                  "quantization_mode": "offline"}
    (dst / "config.json").write_text(json.dumps(cfg))
    out = {}
    for name, w in load_file(src / "model.safetensors").items():
        if name.endswith("_proj.weight"):
            w = w.float()
            gamma = w.abs().mean().clamp(min=1e-5)  # WeightQuant's absmean
            t = (w / gamma).round().clamp(-1, 1)
            out[name] = pack_weights(t.clone())
            scale = gamma if linear_class == "autobitlinear" else 1.0 / gamma
            out[name + "_scale"] = scale.reshape(1).to(torch.bfloat16)
        else:
            out[name] = w
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


def _fp16_dir(src, dst, config: dict, rename=()):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(config))
    out = {}
    for name, w in load_file(src / "model.safetensors").items():
        for old, new in rename:
            name = name.replace(old, new)
        out[name] = w.half()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Every checkpoint variant as an HF folder: name -> Path."""
    root = tmp_path_factory.mktemp("parity")
    torch.manual_seed(0)
    cfg = transformers.BitNetConfig(
        **SIZES, hidden_act="relu2", tie_word_embeddings=True, initializer_range=INIT_RANGE,
        quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear",
                             "quantization_mode": "online"})
    model = transformers.BitNetForCausalLM(cfg)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear  # not converted yet
    _randomise_norms(model, 1)
    out = {"online": root / "online"}
    model.save_pretrained(out["online"])
    out["auto"], out["div"] = root / "auto", root / "div"
    _pack_dir(out["online"], out["auto"], "autobitlinear")
    _pack_dir(out["online"], out["div"], "bitlinear")

    hf = json.loads((out["online"] / "config.json").read_text()) | {"hidden_act": "silu"}
    out["silu"] = root / "silu"
    _fp16_dir(out["online"], out["silu"], hf)
    one_bit = {"architectures": ["BitnetForCausalLM"], "model_type": "llama", **SIZES,
               "hidden_act": "silu", "tie_word_embeddings": True, "pad_token_id": 0,
               "torch_dtype": "float16", "input_bits": 8, "weight_bits": 1}
    out["1bitllm"] = root / "1bitllm"
    _fp16_dir(out["online"], out["1bitllm"], one_bit,
              rename=[("attn_sub_norm", "inner_attn_ln"), ("ffn_sub_norm", "ffn_layernorm")])

    torch.manual_seed(2)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SIZES, hidden_act="silu", tie_word_embeddings=False, initializer_range=0.1))
    _randomise_norms(llama, 3)
    with torch.no_grad():  # float weights of 0.5 would make activations ~1e2; peak only the head
        llama.lm_head.weight.mul_(5.0)
    out["llama"] = root / "llama"
    llama.save_pretrained(out["llama"])
    return out


@functools.cache
def _hf_model(path):
    cls = transformers.LlamaForCausalLM if path.name == "llama" else transformers.BitNetForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@functools.cache
def _ours(path):
    """bitnet_jax's load of an HF folder, its config normalised for the forward pass.

    linear_class / quantization_mode only steer loading (the packed params carry σ); giving
    every variant the same values lets online/auto/div share compiled forwards.
    """
    model = bitnet_jax.load_model(path)
    model.loaded_config = model.config
    if model.config.quantized:
        model.config = model.config.replace(linear_class="autobitlinear",
                                            quantization_mode="online")
    return model


jit_forward = jax.jit(bitnet_jax.forward, static_argnums=(2, 3))


def _bitlinear_inputs_hf(hf_model, tokens):
    """Every BitLinear call of transformers' forward, in order: [(module name, input, output)]."""
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear

    seen = []
    hooks = [mod.register_forward_hook(
        lambda m, args, out, n=n: seen.append((n, args[0].numpy().copy(), out.numpy().copy())))
        for n, mod in hf_model.named_modules() if isinstance(mod, (AutoBitLinear, BitLinear))]
    try:
        with torch.no_grad():
            hf_model(torch.from_numpy(tokens).long())
    finally:
        for h in hooks:
            h.remove()
    return seen


def _int8_flip_report(model, hf_model, tokens) -> str:
    """Diagnose an end-to-end mismatch: which int8 activations differ, and how far from a tie.

    Runs our layers one by one with `bitlinear` wrapped to record its inputs (only on failure:
    this is op-by-op and slow), and compares the int8 codes with transformers' at each call.
    """
    import bitnet_jax.model.attention as attention_mod
    import bitnet_jax.model.transformer as model_mod

    ours, original = [], bitlinear

    def recording(x, w, policy, quantized=True):
        ours.append(np.asarray(x))
        return original(x, w, policy, quantized)

    cfg, params = model.config, model.params
    b, t = tokens.shape
    cos, sin = rope_frequencies(jnp.broadcast_to(jnp.arange(t), (b, t)), cfg.head_dim,
                                cfg.rope_theta)
    mask = attention_mask(jnp.zeros((b,), jnp.int32), t, t)
    x = jnp.asarray(np.asarray(params["embed_tokens"])[tokens])
    attention_mod.bitlinear = model_mod.bitlinear = recording
    try:
        for i in range(cfg.num_hidden_layers):
            x, _ = block(layer(params, i), x, cos, sin, mask, cfg, bitnet_jax.get_policy("cpu"))
    finally:
        attention_mod.bitlinear = model_mod.bitlinear = original
    first, flips = None, 0
    for (module_name, x_ref, _), x_ours in zip(_bitlinear_inputs_hf(hf_model, tokens), ours):
        scaled = [v * (127.0 / np.maximum(np.abs(v).max(-1, keepdims=True), 1e-5))
                  for v in (x_ref.astype(np.float32), x_ours)]
        differ = np.round(scaled[0]) != np.round(scaled[1])
        flips += int(differ.sum())
        if differ.any() and first is None:
            tie = np.abs(np.abs(scaled[0] - np.floor(scaled[0])) - 0.5)[differ].max()
            first = f"; the first, in {module_name}, lies {tie:.2g} from k+1/2"
    return (f"an op-by-op rerun finds {flips} int8 activations that differ from "
            f"transformers'{first or ''}")


def _compare_logits(dirs, name):
    tokens = _tokens()
    hf_model = _hf_model(dirs[name])
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
    model = _ours(dirs[name])
    got = np.asarray(jit_forward(model.params, jnp.asarray(tokens), model.config, None))
    diff = float(np.abs(got - ref).max())
    print(f"{name}: max abs logit diff {diff:.3g} (logit std {ref.std():.2f})")
    report = "" if diff <= MODEL_TOL or name == "llama" else (
        " (" + _int8_flip_report(model, hf_model, tokens) + ")")
    assert diff <= MODEL_TOL, f"{name}: max abs diff {diff} > {MODEL_TOL}{report}"
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


# ---- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS + ("1bitllm", "llama"))
def test_config_read_from_transformers_files(dirs, name):
    cfg = _ours(dirs[name]).loaded_config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        97, 64, 96, 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 5000.0  # transformers 5 writes it under rope_parameters
    expect = {"online": ("relu2", "autobitlinear", "online"),
              "auto": ("relu2", "autobitlinear", "offline"),
              "div": ("relu2", "bitlinear", "offline"),
              "silu": ("silu", "autobitlinear", "online"),
              "1bitllm": ("silu", "bitlinear", "online"),
              "llama": ("silu", "bitlinear", "online")}[name]
    assert (cfg.hidden_act, cfg.linear_class, cfg.quantization_mode) == expect
    assert cfg.quantized == (name != "llama")
    assert cfg.tie_word_embeddings == (name != "llama")


def test_transformers_built_the_expected_modules(dirs):
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear

    for name, cls, online in (("online", AutoBitLinear, True), ("auto", AutoBitLinear, False),
                              ("div", BitLinear, None)):
        m = _hf_model(dirs[name])
        proj = m.model.layers[1].self_attn.o_proj
        assert type(proj) is cls, name
        if online is not None:
            assert proj.online_quant is online
        assert type(m.lm_head) is torch.nn.Linear  # the LM head is never quantised
    down = _hf_model(dirs["auto"]).model.layers[0].mlp.down_proj
    assert set(np.unique(down.weight.detach().numpy())) <= {-1.0, 0.0, 1.0}  # unpacked codes


# ---- 1. each BitLinear on identical inputs ------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_each_bitlinear_matches_on_identical_inputs(dirs, name):
    seen = _bitlinear_inputs_hf(_hf_model(dirs[name]), _tokens())
    assert len(seen) == 3 * 7
    params = _ours(dirs[name]).params
    run = jax.jit(bitlinear, static_argnums=2)
    worst = 0.0
    for module_name, x, y in seen:
        _, _, i, mod, proj = module_name.split(".")
        leaf = jax.tree.map(lambda a: a[int(i)], params["layers"][mod][proj])
        got = np.asarray(run(jnp.asarray(x), leaf, bitnet_jax.get_policy("cpu")))
        err = float(np.abs(got - y).max() / max(1.0, np.abs(y).max()))
        worst = max(worst, err)
        assert err <= LEAF_TOL, f"{module_name}: {err}"
    print(f"{name}: worst BitLinear error {worst:.3g} (relative to max(1, |y|))")


# ---- 2. each decoder layer on transformers' hidden states ---------------------------------------


@pytest.mark.parametrize("name", VARIANTS + ("llama",))
def test_each_layer_matches_with_teacher_forcing(dirs, name):
    tokens = _tokens()
    with torch.no_grad():
        out = _hf_model(dirs[name])(torch.from_numpy(tokens).long(), output_hidden_states=True)
    hidden = [h.numpy() for h in out.hidden_states]  # embeddings, layers 1..L-1, final norm
    model = _ours(dirs[name])
    cfg, params = model.config, model.params
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = rope_frequencies(positions, cfg.head_dim, cfg.rope_theta)
    mask = attention_mask(jnp.zeros((b,), jnp.int32), t, t)
    run = jax.jit(lambda *a: block(*a)[0], static_argnums=(5, 6))
    emb = np.asarray(params["embed_tokens"])[tokens]
    np.testing.assert_array_equal(emb, hidden[0])
    worst = 0.0
    for i in range(cfg.num_hidden_layers):
        y = run(layer(params, i), jnp.asarray(hidden[i]), cos, sin, mask, cfg,
                bitnet_jax.get_policy("cpu"))
        if i == cfg.num_hidden_layers - 1:  # HF's last hidden state is after the final norm
            y = rms_norm(y, params["norm"], cfg.rms_norm_eps)
        err = float(np.abs(np.asarray(y) - hidden[i + 1]).max()
                    / max(1.0, np.abs(hidden[i + 1]).max()))
        worst = max(worst, err)
        assert err <= LEAF_TOL, f"{name} layer {i}: {err} (relative to max(1, |h|))"
    print(f"{name}: worst decoder-layer error {worst:.3g} (relative to max(1, |h|))")


# ---- 3. end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS + ("llama",))
def test_logits_match_transformers(dirs, name):
    _compare_logits(dirs, name)


def _greedy_ours(model, prompt, n):
    """Greedy decoding with full forwards over one fixed [1, P+n] buffer (one compilation:
    causal attention makes the unused tail irrelevant to earlier positions)."""
    ids = np.zeros((1, len(prompt) + n), np.int32)
    ids[0, :len(prompt)] = prompt
    for pos in range(len(prompt), len(prompt) + n):
        logits = jit_forward(model.params, jnp.asarray(ids), model.config, None)
        ids[0, pos] = int(jnp.argmax(logits[0, pos - 1]))
    return ids[0, len(prompt):].tolist()


def _greedy_hf(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["online", "auto"])
def test_greedy_32_tokens_match_transformers(dirs, name):
    ours = _greedy_ours(_ours(dirs[name]), PROMPT, NEW_TOKENS)
    ref = _greedy_hf(_hf_model(dirs[name]), PROMPT, NEW_TOKENS)
    assert ours == ref
    assert len(set(ref)) > 3  # a meaningful continuation, not one repeated id


def test_1bitllm_checkpoint_equals_its_hf_named_twin(dirs):
    # Same fp16 latent weights under 1bitLLM's names/config and under HF 2B4T names: identical
    # params, identical logits; `silu` itself is checked against transformers above.
    one_bit, twin = _ours(dirs["1bitllm"]), _ours(dirs["silu"])
    assert one_bit.config.architecture == "BitnetForCausalLM"
    assert one_bit.config.replace(architecture="BitNetForCausalLM", model_type="bitnet",
                                  pad_token_id=None) == twin.config
    la, ta = jax.tree.flatten(one_bit.params)
    lb, tb = jax.tree.flatten(twin.params)
    assert ta == tb
    for a, b in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(_tokens())
    np.testing.assert_array_equal(
        np.asarray(jit_forward(one_bit.params, tokens, one_bit.config, None)),
        np.asarray(jit_forward(twin.params, tokens, twin.config, None)))
