"""Strided perplexity (bitnet_jax/train/perplexity.py) and `bitnet-jax perplexity`
(bitnet_jax/cli/perplexity.py)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.cli import main as cli
from bitnet_jax.cli import perplexity as cli_perplexity
from bitnet_jax.errors import ConfigError
from bitnet_jax.formats.loader import DEFAULT_MODEL
from bitnet_jax.model.policy import Policy
from bitnet_jax.model.transformer import forward
from bitnet_jax.train.perplexity import strided_nll

F32 = Policy()
VERSE = "In the beginning God created the heaven and the earth. And the earth was without form."


def test_perplexity_matches_direct_nll(tiny_cfg, tiny_params, rng):
    ids = rng.integers(0, tiny_cfg.vocab_size, size=40).astype(np.int32)

    fwd = jax.jit(forward, static_argnames=("cfg", "policy"))

    def direct(seq):  # -log p of seq[1:] under one unpadded forward pass
        logp = jax.nn.log_softmax(fwd(tiny_params, jnp.asarray(seq)[None], tiny_cfg, F32))
        return -np.asarray(logp[0, np.arange(len(seq) - 1), seq[1:]], np.float64)

    # One window covering everything: exactly exp(mean NLL) of a plain forward pass.
    total, count = strided_nll(tiny_params, ids, tiny_cfg, F32, context=48, stride=24)
    want = direct(ids)
    assert count == len(ids) - 1
    assert math.isfinite(total)
    np.testing.assert_allclose(math.exp(total / count), math.exp(want.mean()), rtol=1e-5)

    # Strided windows (context 16, stride 8): each token is scored by the window whose history
    # ends nearest before it, computed here without padding.
    total, count = strided_nll(tiny_params, ids, tiny_cfg, F32, context=16, stride=8)
    parts = [direct(ids[0:16])] + [direct(ids[b: b + 16])[-8:] for b in (8, 16, 24)]
    want = np.concatenate(parts)
    assert count == len(ids) - 1 == want.size
    np.testing.assert_allclose(total / count, want.mean(), rtol=1e-5)

    for stride in (0, -4, 17):  # never silently another stride
        with pytest.raises(ConfigError, match="stride"):
            strided_nll(tiny_params, ids, tiny_cfg, F32, context=16, stride=stride)


def test_perplexity_command_defaults_to_the_bundled_model(tmp_path, capsys):
    # Issue 12: like `infer`, `perplexity` needs no --model.
    text = tmp_path / "verse.txt"
    text.write_text(VERSE)
    assert cli_perplexity.main(["--text", str(text), "--context", "16", "--stride", "8"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["model"] == str(DEFAULT_MODEL)
    assert (got["context"], got["stride"]) == (16, 8)
    assert got["scored"] == got["tokens"] - 1 > 8
    assert 1 < got["perplexity"] < 4096  # the bundled model knows this text a little


@pytest.mark.parametrize("flags", [["--stride", "0"], ["--stride", "-8"], ["--context", "0"],
                                   ["--stride", "two"]])
def test_perplexity_rejects_non_positive_windows_as_argument_errors(tmp_path, capsys, flags):
    # Issue 12: --stride 0 used to fall back to context/2 silently.
    text = tmp_path / "verse.txt"
    text.write_text(VERSE)
    with pytest.raises(SystemExit) as exc:
        cli_perplexity.main(["--text", str(text), *flags])
    assert exc.value.code == 2
    assert flags[0] in capsys.readouterr().err
    assert cli.main(["perplexity", "--text", str(text), *flags]) == 2


def test_perplexity_command_user_errors(tmp_path):
    text = tmp_path / "verse.txt"
    text.write_text(VERSE)
    with pytest.raises(ConfigError, match="--stride=32 must be in"):
        cli_perplexity.main(["--text", str(text), "--context", "16", "--stride", "32"])
    with pytest.raises(ConfigError, match="--context=100000 must be in"):
        cli_perplexity.main(["--text", str(text), "--context", "100000"])
