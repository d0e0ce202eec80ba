"""A Flax NNX `BitLinear` layer over the pure functions of bitlinear.py.

The rest of bitnet_jax keeps weights in plain dict pytrees (house style §5.3.1). This module is
for users who build their own models with Flax NNX and want BitNet b1.58's ternary linear
(Ma et al. 2024, §2): the layer holds one float32 latent weight [O, I] (Hugging Face
orientation) as an `nnx.Param`, and its call is exactly `bitlinear.bitlinear(x, weight)`:
absmean-ternarised weights and per-token int8 activations with straight-through gradients.
`packed()` gives the inference leaf {"packed", "scale"} that model.py and checkpoint.py use.

flax is imported here only; `import bitnet_jax` does not need it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bitnet_jax.model.bitlinear import bitlinear

from bitnet_jax.quant import pack_weights
from bitnet_jax.model.policy import Policy, get_policy


class BitLinear(nnx.Module):
    """y = BitLinear(x): ternary weight, int8 activations, no bias.

    Attributes:
      weight: nnx.Param float32 [O, I], the latent (QAT master) weight.
      policy: precision policy (compute dtype of the product; see policy.py).
      quantized: False makes it a plain float linear (for float baselines).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 policy: Policy | str | None = None, init_std: float = 0.02,
                 quantized: bool = True):
        """Create the layer with a normal(0, init_std) latent weight [O, I]."""
        self.policy = get_policy(policy)
        self.quantized = quantized
        w = init_std * jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32)
        self.weight = nnx.Param(w.astype(self.policy.param))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., I] -> [..., O] in the policy's compute dtype."""
        return bitlinear(x, self.weight[...], self.policy, self.quantized)

    def packed(self) -> dict:
        """The inference leaf {"packed": uint8 [O/4, I], "scale": f32 []} (bitlinear.py layout)."""
        return pack_weights(self.weight[...])
