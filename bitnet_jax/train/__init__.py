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

from bitnet_jax._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "bitnet_jax.train.config",
    "config_from_dict": "bitnet_jax.train.config",
    "load_train_config": "bitnet_jax.train.config",
    "parse_overrides": "bitnet_jax.train.config",
    "batch_at": "bitnet_jax.train.data",
    "eval_windows": "bitnet_jax.train.data",
    "load_tokens": "bitnet_jax.train.data",
    "eval_step": "bitnet_jax.train.perplexity",
    "evaluate": "bitnet_jax.train.perplexity",
    "strided_nll": "bitnet_jax.train.perplexity",
    "token_nll": "bitnet_jax.train.perplexity",
    "STATE_FILE": "bitnet_jax.train.state",
    "export": "bitnet_jax.train.state",
    "latent_from_ternary": "bitnet_jax.train.state",
    "load_state": "bitnet_jax.train.state",
    "model_for": "bitnet_jax.train.state",
    "save_state": "bitnet_jax.train.state",
    "LossPlot": "bitnet_jax.train.plot",
    "plot_metrics": "bitnet_jax.train.plot",
    "METRICS_FILE": "bitnet_jax.train.loop",
    "loss_fn": "bitnet_jax.train.loop",
    "make_optimizer": "bitnet_jax.train.loop",
    "optimizer_for": "bitnet_jax.train.loop",
    "train": "bitnet_jax.train.loop",
    "train_step": "bitnet_jax.train.loop",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the keys of _EXPORTS, all strings)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
