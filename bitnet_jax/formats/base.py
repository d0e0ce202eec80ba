"""The Model type every loader returns, and where the bundled default model lies."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.policy import Policy, get_policy

# The bundled default model: a 4-layer BitNet trained on the KJV Bible (README, Default model).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "default.gguf"


@dataclasses.dataclass
class Model:
    """A loaded model: config, params pytree, tokenizer (None when the files hold none).

    Attributes:
      config: the static ModelConfig.
      params: parameter pytree (model/transformer.py docstring); packed BitLinear leaves by default.
      tokenizer: a bitnet_jax.tokenizer.Tokenizer or None.
      policy: the precision policy the params were loaded for.
      source: the path it came from.
    """

    config: ModelConfig
    params: dict
    tokenizer: Any = None
    policy: Policy = dataclasses.field(default_factory=lambda: get_policy("cpu"))
    source: str = ""
