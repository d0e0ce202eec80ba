"""Cross-validation against llama.cpp itself (llama-cpp-python, extra `crossval`).

A tiny BitNet with llama.cpp's `bitnet` graph (1bitLLM: SiLU, sub-norms, tied embeddings) and the
Llama-2 SentencePiece vocabulary is written by OUR converter as TQ2_0 and TQ1_0; llama.cpp and
`bitnet_jax.forward` then score the same tokens. llama.cpp quantizes activations per 256-value
block (Q8_K) instead of per token, and keeps the KV cache in F16, so logits are close, not equal:
we require argmax agreement on >= 95% of positions and cosine >= 0.999 at every position.
Weights are random ternary with unit-variance outputs and a unit-variance embedding, which makes
the logits peaked (a near-uniform distribution would make argmax agreement meaningless).

`test_llamacpp_converter_output` runs llama.cpp's own convert_hf_to_gguf.py (set LLAMA_CPP_DIR to
a llama.cpp source tree; needs torch) on an HF 1bitLLM-style folder and checks that our loader
reads that file like llama.cpp does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.crossval

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[crossval]' "
    "(it builds llama.cpp from source)")

import jax  # noqa: E402

import bitnet_jax as bj  # noqa: E402
from bitnet_jax.model.config import ModelConfig  # noqa: E402
from bitnet_jax.formats.gguf import load_gguf, read_gguf, write_model_gguf  # noqa: E402
from bitnet_jax.formats.gguf import quants  # noqa: E402
from bitnet_jax.formats.base import Model  # noqa: E402
from bitnet_jax.model.params import linear_shapes  # noqa: E402

N_TOKENS = 48
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def spm_vocab() -> dict:
    path = SHARED / "llama-vocab" / "ggml-vocab-llama-spm.gguf"
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path} is absent (the Llama-2 vocabulary)")
    return {k: v for k, v in read_gguf(path).metadata.items() if k.startswith("tokenizer.")}


def _tiny_bitnet(vocab: dict, seed: int = 0) -> Model:
    """1bitLLM graph, D=256 F=512 L=2 N=K=4 (H=64), V=32000, random ternary weights."""
    from bitnet_jax.tokenizer import from_gguf_metadata

    cfg = ModelConfig(vocab_size=32000, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                      hidden_act="silu", tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, architecture="BitnetForCausalLM", model_type="bitnet",
                      use_sub_norms=True, linear_class="autobitlinear")
    rng = np.random.default_rng(seed)
    n_layers, d, f = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size

    def gains(*shape):
        return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float16).astype(np.float32)

    layers = {"self_attn": {"attn_sub_norm": gains(n_layers, d)},
              "mlp": {"ffn_sub_norm": gains(n_layers, f)},
              "input_layernorm": gains(n_layers, d), "post_attention_layernorm": gains(n_layers, d)}
    for (mod, name), (o, i) in linear_shapes(cfg).items():
        codes = rng.choice(np.array([0, 1, 2], np.uint8), size=(n_layers, o, i), p=[.3, .4, .3])
        # σ = 1/sqrt(0.6·I): unit-variance outputs; fp16-exact so TQ's fp16 d equals σ.
        sigma = np.float16(1 / np.sqrt(0.6 * i)).astype(np.float32)
        layers[mod][name] = {"packed": np.stack([quants.pack_codes(c) for c in codes]),
                             "scale": np.full(n_layers, sigma, np.float32)}
    embed = rng.standard_normal((cfg.vocab_size, d)).astype(np.float16).astype(np.float32)
    params = jax.tree.map(jax.numpy.asarray, {"embed_tokens": embed, "layers": layers,
                                              "norm": gains(d)})
    return Model(cfg, params, from_gguf_metadata(vocab))


def _llamacpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_batch=128,
                          n_threads=2, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)], np.float32)
    finally:
        llm.close()


def _compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    return agree, float(cos.min())


def _tokens(seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, 32000, N_TOKENS - 1).tolist()


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llamacpp_matches_bitnet_jax_on_our_file(qtype, spm_vocab, tmp_path):
    model = _tiny_bitnet(spm_vocab)
    path = tmp_path / f"tiny-{qtype}.gguf"
    assert write_model_gguf(model, path, qtype) == "bitnet"
    tokens = _tokens()
    ref = _llamacpp_logits(path, tokens)
    loaded = load_gguf(path)
    ours = np.asarray(bj.forward(loaded.params, np.array([tokens]), loaded.config))[0]
    agree, cos = _compare(ours, ref)
    print(f"{qtype}: argmax agreement {agree:.3f}, min cosine {cos:.6f}, "
          f"max |logit| {np.abs(ref).max():.1f}")
    assert agree >= 0.95
    assert cos >= 0.999


def _hf_1bitllm_folder(model: Model, folder: Path) -> None:
    """An HF folder the way 1bitLLM ships it: latent fp32 weights, 1bitLLM sub-norm names."""
    from bitnet_jax.formats.safetensors import write_safetensors

    cfg, params = model.config, jax.tree.map(np.asarray, model.params)
    names = {"attn_sub_norm": "self_attn.inner_attn_ln", "ffn_sub_norm": "mlp.ffn_layernorm"}
    tensors = {"model.embed_tokens.weight": params["embed_tokens"],
               "model.norm.weight": params["norm"]}
    layers = params["layers"]
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        tensors[pre + "input_layernorm.weight"] = layers["input_layernorm"][i]
        tensors[pre + "post_attention_layernorm.weight"] = layers["post_attention_layernorm"][i]
        tensors[pre + names["attn_sub_norm"] + ".weight"] = layers["self_attn"]["attn_sub_norm"][i]
        tensors[pre + names["ffn_sub_norm"] + ".weight"] = layers["mlp"]["ffn_sub_norm"][i]
        for mod in ("self_attn", "mlp"):
            for name, leaf in layers[mod].items():
                if isinstance(leaf, dict):  # latent = t·σ plus noise below γ/2: same ternary
                    t = quants.codes_to_ternary(quants.unpack_codes(leaf["packed"][i]))
                    noise = np.random.default_rng(i).uniform(-0.2, 0.2, t.shape)
                    tensors[pre + f"{mod}.{name}.weight"] = (
                        (t + noise * (t == 0)) * leaf["scale"][i]).astype(np.float32)
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    hf = {"architectures": ["BitnetForCausalLM"], "model_type": "llama",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
          "num_attention_heads": cfg.num_attention_heads,
          "num_key_value_heads": cfg.num_key_value_heads,
          "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True,
          "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llamacpp_converter_output(qtype, spm_vocab, tmp_path):
    root = os.environ.get("LLAMA_CPP_DIR")
    if not root or not (Path(root) / "convert_hf_to_gguf.py").exists():
        pytest.skip("set LLAMA_CPP_DIR to a llama.cpp source tree (convert_hf_to_gguf.py) to run "
                    "llama.cpp's own converter")
    pytest.importorskip("torch", reason="llama.cpp's converter needs torch")
    spm = SHARED / "tokenizers" / "llama2-spm" / "tokenizer.model"
    if not spm.exists():
        pytest.skip(f"../shared/data not found: {spm} is absent")
    model = _tiny_bitnet(spm_vocab, seed=2)
    hf = tmp_path / "hf"
    hf.mkdir()
    _hf_1bitllm_folder(model, hf)
    shutil.copy(spm, hf / "tokenizer.model")
    out = tmp_path / f"upstream-{qtype}.gguf"
    env = dict(os.environ, PYTHONPATH=str(Path(root) / "gguf-py"))
    proc = subprocess.run([sys.executable, str(Path(root) / "convert_hf_to_gguf.py"), str(hf),
                           "--outtype", qtype, "--outfile", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    g = read_gguf(out)
    assert g.architecture == "bitnet"
    assert g.tensors["blk.0.attn_q.weight"].type_name == qtype.upper()
    assert g.tensors["token_embd.weight"].type_name == "F16"
    tokens = _tokens(seed=3)
    ref = _llamacpp_logits(out, tokens)
    loaded = load_gguf(out)
    assert loaded.tokenizer is not None and loaded.tokenizer.encode("Hello world") == [15043, 3186]
    ours = np.asarray(bj.forward(loaded.params, np.array([tokens]), loaded.config))[0]
    agree, cos = _compare(ours, ref)
    print(f"upstream {qtype}: argmax agreement {agree:.3f}, min cosine {cos:.6f}")
    assert agree >= 0.95 and cos >= 0.999
    # The same weights through our HF loader: identical ternary codes, σ up to fp16 rounding.
    direct = bj.load_model(hf, tokenizer=False)
    for mod, name in (("self_attn", "q_proj"), ("mlp", "down_proj")):
        a, b = direct.params["layers"][mod][name], loaded.params["layers"][mod][name]
        np.testing.assert_array_equal(np.asarray(a["packed"]), np.asarray(b["packed"]))
        np.testing.assert_allclose(np.asarray(a["scale"]), np.asarray(b["scale"]), rtol=2 ** -10)
