"""QAT training (bitnet_jax/train/, bitnet_jax/cli/train.py) on the tiny model (configs/tiny.json).

Each test keeps shapes tiny; the jitted train step compiles once per process and is shared.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, ROOT, TINY_CONFIG

from bitnet_jax import train as T
from bitnet_jax.cli import main as cli_main
from bitnet_jax.cli import train as cli_train
from bitnet_jax.errors import CheckpointError, ConfigError
from bitnet_jax.model.bitlinear import bitlinear
from bitnet_jax.model.params import init_params
from bitnet_jax.model.policy import Policy
from bitnet_jax.quant import fake_quantize_activations, quantize_weights

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


def test_train_command_raises_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        cli_train.main(["--config", str(tmp_path / "missing.json")])
    assert cli_main.main(["train", "--config", str(tmp_path / "missing.json")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: run config") and "does not exist" in err[0]


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


def _hide_matplotlib(monkeypatch):
    """Make `import matplotlib` (and its submodules) fail as on a plain install."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)


def test_training_without_matplotlib_warns_once_and_finishes(tmp_path, monkeypatch):
    # Issue 12: a plain install has no matplotlib; the first evaluation used to kill the run.
    _hide_matplotlib(monkeypatch)
    tcfg = _run_config(tmp_path, "noplot", plot=True)  # evaluations at steps 2 and 4, then final
    with pytest.warns(RuntimeWarning) as caught:
        last = T.train(tcfg, progress=False)
    assert [str(w.message) for w in caught if "loss plot" in str(w.message)] == [
        str(caught[0].message)]
    assert len(caught) == 1 and "matplotlib" in str(caught[0].message)
    assert last["step"] == 4 and "valid_loss" in last
    run = tmp_path / "noplot"
    assert (run / "final" / "model.safetensors").exists()
    assert not (run / "loss.png").exists()


def test_loss_plot_is_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "loss": 3.0, "tokens": 64},
        {"step": 2, "loss": 2.5, "tokens": 128, "valid_loss": 2.7})))
    plot = T.LossPlot(metrics, tmp_path / "loss.png")
    assert plot.update() and (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_crash_mid_run_leaves_a_resumable_state(tmp_path, monkeypatch):
    # Issue 12: an exception inside step k leaves the state saved before it loadable, and a
    # rerun continues to the same result (params, optimiser state, logged losses) as a run that
    # never stopped.
    from bitnet_jax.train import loop

    real, calls = loop.train_step, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure in step 4")
        return real(*args, **kwargs)

    crashed = _run_config(tmp_path, "crashed", save_every=2)
    monkeypatch.setattr(loop, "train_step", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        T.train(crashed, progress=False)
    monkeypatch.undo()

    run = tmp_path / "crashed"
    assert sorted(p.name for p in run.iterdir()) == [T.METRICS_FILE, T.STATE_FILE]  # no temp
    assert json.loads(np.load(run / T.STATE_FILE)["meta"].item())["step"] == 2
    steps = [json.loads(l)["step"] for l in (run / T.METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 3 was logged but never saved
    T.train(crashed, progress=False)

    straight = _run_config(tmp_path, "straight")
    T.train(straight, progress=False)
    a = np.load(tmp_path / "straight" / T.STATE_FILE)
    b = np.load(run / T.STATE_FILE)
    for key in a.files:
        if key != "meta":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    logs = [[json.loads(l) for l in (tmp_path / r / T.METRICS_FILE).read_text().splitlines()]
            for r in ("straight", "crashed")]
    assert [(r["step"], r["loss"]) for r in logs[0]] == [(r["step"], r["loss"]) for r in logs[1]]


def test_a_failed_state_write_keeps_the_previous_state(tmp_path, monkeypatch):
    path = tmp_path / T.STATE_FILE
    params, opt = {"w": np.arange(3, dtype=np.float32)}, (np.zeros(2, np.float32),)
    T.save_state(path, params, opt, {"step": 1})

    def torn_write(f, **arrays):  # dies half-way through, as a full disk or a kill would
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", torn_write)
    with pytest.raises(OSError, match="No space"):
        T.save_state(path, {"w": np.ones(3, np.float32)}, opt, {"step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [T.STATE_FILE]  # the temp file is gone
    got, _, meta = T.load_state(path, params, opt)
    assert meta == {"step": 1}
    np.testing.assert_array_equal(got["w"], params["w"])


def test_an_unreadable_state_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / T.STATE_FILE
    params, opt = {"w": np.arange(3, dtype=np.float32)}, ()
    T.save_state(path, params, opt, {"step": 1})
    path.write_bytes(path.read_bytes()[:100])  # truncated, e.g. by a copy that failed
    with pytest.raises(CheckpointError, match="cannot be read"):
        T.load_state(path, params, opt)


def test_without_the_train_extra_commands_explain_and_imports_still_work():
    # optax and flax move to the [train] extra: `train` must say which extra to install, while
    # `perplexity`, the corpus builder and `train --help` need neither.
    script = textwrap.dedent("""
        import runpy, sys
        sys.modules["optax"] = None
        sys.modules["flax"] = None
        import bitnet_jax.cli.perplexity, bitnet_jax.train.corpus
        from bitnet_jax.cli import train
        from bitnet_jax.errors import BitNetError
        try:
            train.main(["--help"])
        except SystemExit as exc:
            print("help exit", exc.code)
        try:
            train.main(["--config", "configs/train-default.json"])
        except BitNetError as exc:
            print("error:", exc)
        sys.argv = ["corpus", "--help"]
        try:
            runpy.run_module("bitnet_jax.train.corpus", run_name="__main__")
        except SystemExit as exc:
            print("corpus exit", exc.code)
        print("loop loaded:", "bitnet_jax.train.loop" in sys.modules)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "help exit 0" in lines and "corpus exit 0" in lines
    assert "loop loaded: False" in lines
    errors = [l for l in lines if l.startswith("error:")]
    want = ("error: `bitnet-jax train` needs the [train] extra (optax is not installed): "
            "pip install 'bitnet-jax[train]'")
    assert errors == [want]

