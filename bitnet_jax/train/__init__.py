"""Quantisation-aware training (needs the [train] extra: optax, flax).

  loop.py   config, optimizer, data, the training loop, state I/O, export, perplexity
  corpus.py the bundled model's corpus builder
"""
