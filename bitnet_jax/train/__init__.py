"""Quantisation-aware training and perplexity.

  config.py      TrainConfig, configs/train-*.json, --field=value overrides, validation
  data.py        token files, shuffled training windows, held-out windows (NumPy only)
  perplexity.py  per-token NLL, held-out evaluation, strided perplexity
  state.py       initial params, the atomic state file, latent_from_ternary, HF export
  plot.py        loss.png (matplotlib optional; never fatal)
  loop.py        loss, optimiser, train step, the training run (optax: the [train] extra)
  corpus.py      the bundled model's corpus builder (python -m bitnet_jax.train.corpus)

Imports run one way: loop imports the others, state imports config, and config, data,
perplexity, plot and corpus import nothing from this package. The commands live in
bitnet_jax.cli.train and bitnet_jax.cli.perplexity; nothing here imports the CLI.

The names below are imported on first use (PEP 562), as in `bitnet_jax`: the corpus builder and
`perplexity` need neither optax nor flax, so importing this package must not load loop.py.
`from bitnet_jax.train import train_step` (or `bitnet_jax.train.train_step`) loads it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "config_from_dict": "config",
    "load_train_config": "config",
    "parse_overrides": "config",
    "batch_at": "data",
    "eval_windows": "data",
    "load_tokens": "data",
    "eval_step": "perplexity",
    "evaluate": "perplexity",
    "strided_nll": "perplexity",
    "token_nll": "perplexity",
    "STATE_FILE": "state",
    "export": "state",
    "latent_from_ternary": "state",
    "load_state": "state",
    "model_for": "state",
    "save_state": "state",
    "LossPlot": "plot",
    "plot_metrics": "plot",
    "METRICS_FILE": "loop",
    "loss_fn": "loop",
    "make_optimizer": "loop",
    "optimizer_for": "loop",
    "train": "loop",
    "train_step": "loop",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the keys of _EXPORTS, all strings)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bitnet_jax.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
