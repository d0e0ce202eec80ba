"""QAT training and perplexity (bitnet_jax/train.py) on the tiny model (configs/tiny.json).

Each test keeps shapes tiny; the jitted train step compiles once per process and is shared.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.train import loop as T
from bitnet_jax.model.bitlinear import bitlinear
from bitnet_jax.quant import fake_quantize_activations, quantize_weights
from bitnet_jax.errors import ConfigError
from bitnet_jax.model.transformer import forward
from bitnet_jax.model.params import init_params
from bitnet_jax.model.policy import Policy
from conftest import CONFIGS, TINY_CONFIG

F32 = Policy()
SEQ = 16


def _run_config(tmp_path, out: str, **kw) -> T.TrainConfig:
    """A 4-step tiny run on a learnable synthetic stream (a repeating ramp of token ids)."""
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        ramp = np.tile(np.arange(3, 40, dtype=np.uint16), 40)
        ramp.tofile(data / "train.bin")
        ramp[:200].tofile(data / "valid.bin")
    d = dict(model=str(TINY_CONFIG), data=str(data), out=str(tmp_path / out), seq_len=SEQ,
             batch_size=2, grad_accum=2, steps=4, warmup_steps=1, lr=1e-2, eval_every=2,
             save_every=100, log_every=1, plot=False)
    d.update(kw)
    return T.config_from_dict(d)


def test_ste_gradients_equal_plain_linear_on_quantised_operands(rng):
    # Straight-through: d/dW and d/dx of the latent BitLinear are the gradients of a plain
    # linear evaluated at the ternarised weight t·γ and the fake-quantised input.
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(scale=0.1, size=(24, 32)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32)
    gw, gx = jax.grad(lambda w, x: jnp.sum(bitlinear(x, w, F32) * cot), argnums=(0, 1))(w, x)

    t, gamma = quantize_weights(w)
    wq = t.astype(jnp.float32) * gamma
    xq = fake_quantize_activations(x)
    pw, px = jax.grad(lambda w, x: jnp.sum(jnp.einsum("bti,oi->bto", x, w) * cot),
                      argnums=(0, 1))(wq, xq)
    np.testing.assert_allclose(gw, pw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, px, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(gw).max()) > 0


def test_one_train_step_lowers_the_loss(tmp_path, tiny_cfg):
    params = init_params(tiny_cfg, jax.random.PRNGKey(0), F32, std=0.1)
    batch = jnp.asarray(np.tile(np.arange(3, 3 + SEQ + 1), (2, 2, 1)), jnp.int32)  # [A, B, T+1]
    # The same optimiser, shapes and policy as _run_config, so the resume test reuses this compile.
    optimizer, _ = T.optimizer_for(_run_config(tmp_path, "unused"))
    state = optimizer.init(params)
    before = float(T.loss_fn(params, batch[0], tiny_cfg, F32))
    params, state, m = T.train_step(params, state, batch, tiny_cfg, F32, optimizer)
    after = float(T.loss_fn(params, batch[0], tiny_cfg, F32))
    assert math.isclose(float(m["loss"]), before, rel_tol=1e-5)
    assert after < before - 0.01


def test_resume_continues_bit_identically(tmp_path):
    straight = _run_config(tmp_path, "straight")
    T.train(straight, progress=False)
    split = _run_config(tmp_path, "split")
    T.train(split, stop_after=2, progress=False)
    assert json.loads(np.load(tmp_path / "split" / T.STATE_FILE)["meta"].item())["step"] == 2
    T.train(split, progress=False)

    a = np.load(tmp_path / "straight" / T.STATE_FILE)
    b = np.load(tmp_path / "split" / T.STATE_FILE)
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        if key != "meta":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    meta_a, meta_b = json.loads(a["meta"].item()), json.loads(b["meta"].item())
    assert (meta_a["step"], meta_a["position"]) == (meta_b["step"], meta_b["position"]) == (4, 16)
    # The loss log matches too, and the packed export exists once the schedule is done.
    losses = [[json.loads(l)["loss"] for l in (tmp_path / r / T.METRICS_FILE).read_text()
               .splitlines()] for r in ("straight", "split")]
    assert losses[0] == losses[1]
    assert (tmp_path / "split" / "final" / "model.safetensors").exists()


def test_batches_are_a_function_of_position():
    tokens = np.arange(1000, dtype=np.uint16)
    rng = np.array([0, 7], np.uint32)
    whole = T.batch_at(tokens, rng, 0, 200, 8)  # more than one epoch (123 windows)
    np.testing.assert_array_equal(whole[50:60], T.batch_at(tokens, rng, 50, 10, 8))
    assert (np.diff(whole, axis=1) == 1).all()  # contiguous windows
    assert len({int(r[0]) for r in whole[:123]}) == 123  # an epoch visits every window once


def test_override_parser_types_and_errors():
    got = T.parse_overrides(["--lr=1e-3", "--steps", "20", "--plot=false", "--init-from=null",
                             "--out=123", "--warmup_steps=0", "--model=configs/tiny.json"])
    assert got == {"lr": 1e-3, "steps": 20, "plot": False, "init_from": None, "out": "123",
                   "warmup_steps": 0, "model": "configs/tiny.json"}
    assert T.parse_overrides(["--lr=1"]) == {"lr": 1.0} and isinstance(
        T.parse_overrides(["--lr=1"])["lr"], float)
    with pytest.raises(ConfigError, match="unknown run-config field --stepz"):
        T.parse_overrides(["--stepz=3"])
    with pytest.raises(ConfigError, match="steps"):
        T.parse_overrides(["--steps=1.5"])
    with pytest.raises(ConfigError, match="steps"):
        T.parse_overrides(["--steps=many"])
    with pytest.raises(ConfigError, match="plot"):
        T.parse_overrides(["--plot=3"])
    with pytest.raises(ConfigError, match="needs a value"):
        T.parse_overrides(["--lr"])
    with pytest.raises(ConfigError, match="overrides look like"):
        T.parse_overrides(["lr=3"])
    with pytest.raises(ConfigError, match="unknown field 'lrr'"):
        T.config_from_dict({"lrr": 1.0})
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        T.config_from_dict({"min_lr_ratio": 2.0})


def test_shipped_run_configs_parse():
    for path in sorted(CONFIGS.glob("train-*.json")):
        tcfg = T.load_train_config(path, ["--steps=7"])
        assert tcfg.steps == 7


def test_train_main_reports_config_errors(tmp_path, capsys):
    assert T.train_main(["--config", str(tmp_path / "missing.json")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_perplexity_matches_direct_nll(tiny_cfg, tiny_params, rng):
    ids = rng.integers(0, tiny_cfg.vocab_size, size=40).astype(np.int32)

    fwd = jax.jit(forward, static_argnames=("cfg", "policy"))

    def direct(seq):  # -log p of seq[1:] under one unpadded forward pass
        logp = jax.nn.log_softmax(fwd(tiny_params, jnp.asarray(seq)[None], tiny_cfg, F32))
        return -np.asarray(logp[0, np.arange(len(seq) - 1), seq[1:]], np.float64)

    # One window covering everything: exactly exp(mean NLL) of a plain forward pass.
    total, count = T.strided_nll(tiny_params, ids, tiny_cfg, F32, context=48, stride=24)
    want = direct(ids)
    assert count == len(ids) - 1
    assert math.isfinite(total)
    np.testing.assert_allclose(math.exp(total / count), math.exp(want.mean()), rtol=1e-5)

    # Strided windows (context 16, stride 8): each token is scored by the window whose history
    # ends nearest before it, computed here without padding.
    total, count = T.strided_nll(tiny_params, ids, tiny_cfg, F32, context=16, stride=8)
    parts = [direct(ids[0:16])] + [direct(ids[b: b + 16])[-8:] for b in (8, 16, 24)]
    want = np.concatenate(parts)
    assert count == len(ids) - 1 == want.size
    np.testing.assert_allclose(total / count, want.mean(), rtol=1e-5)


def test_init_from_packed_folder_keeps_the_models_function(tmp_path, tiny_cfg, tiny_params):
    # Fine-tuning a packed-only checkpoint must start from the packed model's own function: the
    # latent weights re-ternarise to the same codes t and the same scale σ.
    T.export(tmp_path / "hf", tiny_cfg, tiny_params)
    tcfg = _run_config(tmp_path, "ft", init_from=str(tmp_path / "hf"))
    cfg, params, tok_dir = T.model_for(tcfg, F32)
    assert cfg.hidden_size == tiny_cfg.hidden_size and cfg.quantized
    assert tok_dir == tmp_path / "hf"
    for mod, name in (("self_attn", "q_proj"), ("mlp", "down_proj")):
        t, gamma = quantize_weights(tiny_params["layers"][mod][name])
        t2, gamma2 = quantize_weights(params["layers"][mod][name])
        np.testing.assert_array_equal(t2, t)
        np.testing.assert_allclose(gamma2, gamma, rtol=1e-5)  # float32 mean, two summations
    np.testing.assert_array_equal(params["embed_tokens"], tiny_params["embed_tokens"])
    # Latent float weights (not of the form t·σ) pass through unchanged.
    same = T.latent_from_ternary(tiny_params)
    np.testing.assert_array_equal(same["layers"]["mlp"]["up_proj"],
                                  tiny_params["layers"]["mlp"]["up_proj"])
