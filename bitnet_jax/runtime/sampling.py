"""Token samplers: pure functions from logits [B, V] to token ids [B], vectorised over rows.

Every knob is a per-row array, so changing a request's temperature, top-k or seed never
recompiles the decode loop (jax-notes §1.2 and recommended design 6). The order follows Hugging
Face's logits processors: repetition penalty over the tokens seen so far (Keskar et al. 2019,
"CTRL", §4.1), temperature, top-k, top-p (Holtzman et al. 2019, "nucleus sampling"), min-p
(Nguyen et al. 2024), then a Gumbel-max draw. Temperature 0 means greedy: the argmax of the
penalised logits.

Randomness: row b's token at generation step n uses the key fold_in(key(seed[b]), n) and Gumbel
noise laid out in vocabulary order, so a row's sample depends only on its own logits, seed and
step. The same prompt therefore gives the same text alone, in any batch and with any decode
chunking.

`SamplingParams` is the host-side record of one request's knobs; `knob_arrays` stacks a list of
them into the [B] arrays the jitted code takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import kernels
from bitnet_jax.errors import GenerationError

KNOB_DTYPES = {
    "temperature": np.float32,
    "top_k": np.int32,
    "top_p": np.float32,
    "min_p": np.float32,
    "repetition_penalty": np.float32,
    "seed": np.uint32,
}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token for one request.

    Attributes:
      temperature: logits are divided by it; 0 means greedy (argmax).
      top_k: keep only the k most likely tokens; 0 turns it off.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p;
        1.0 turns it off.
      min_p: drop tokens less likely than min_p times the most likely one; 0 turns it off.
      repetition_penalty: > 1 discourages every token already in the prompt or the output
        (positive logits are divided by it, negative ones multiplied); 1.0 turns it off.
      seed: random seed; the same seed, prompt and settings give the same text every time.
    """

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        checks = (
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0,
             "must be an integer >= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 turns it off)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1] (0 turns it off)"),
            ("repetition_penalty", self.repetition_penalty > 0,
             "must be > 0 (1 turns it off)"),
            ("seed", isinstance(self.seed, (int, np.integer)) and 0 <= self.seed < 2**32,
             "must be an integer in [0, 2**32)"),
        )
        for name, ok, rule in checks:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not np.isfinite(value)):
                raise GenerationError(f"sampling parameter {name}={value!r} {rule}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def knob_arrays(params: Sequence[SamplingParams]) -> dict[str, np.ndarray]:
    """Stack per-request SamplingParams into {name: [B] array} for the jitted sampler."""
    return {name: np.array([getattr(p, name) for p in params], dtype)
            for name, dtype in KNOB_DTYPES.items()}


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """CTRL repetition penalty on the tokens seen so far.

    Args:
      logits: [B, V] float32.
      seen: [B, V] bool, True for every token in the row's prompt or output.
      penalty: [B] float32; 1 leaves the row unchanged.

    Returns:
      [B, V] float32; seen tokens have positive logits divided by the penalty and negative
      ones multiplied by it, so a penalty > 1 always makes them less likely.
    """
    p = penalty[:, None]
    penalised = jnp.where(logits > 0, logits / p, logits * p)
    return jnp.where(seen, penalised, logits)


def keep_mask(sorted_logits: jax.Array, top_k: jax.Array, top_p: jax.Array,
              min_p: jax.Array) -> jax.Array:
    """Which sorted candidates survive top-k, then top-p, then min-p.

    Args:
      sorted_logits: [B, V] temperature-scaled logits, each row sorted in descending order.
      top_k: [B] int32, 0 = off.  top_p: [B] float32, 1 = off.  min_p: [B] float32, 0 = off.

    Returns:
      [B, V] bool over the sorted positions; position 0 (the most likely token) is always kept.
    """
    rank = jax.lax.broadcasted_iota(jnp.int32, sorted_logits.shape, 1)
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    # top-p and min-p act on the distribution left after top-k (HF applies them in sequence).
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (top_p[:, None] >= 1.0) | (mass_before < top_p[:, None])
    keep &= probs >= min_p[:, None] * probs[:, :1]
    return keep | (rank == 0)


def gumbel_noise(seeds: jax.Array, steps: jax.Array, vocab: int) -> jax.Array:
    """Per-row Gumbel(0, 1) noise [B, V] from key fold_in(key(seed), step), in vocabulary order."""

    def one_row(seed, step):
        rng = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.gumbel(rng, (vocab,), jnp.float32)

    return jax.vmap(one_row)(seeds, steps)


def sample(logits: jax.Array, seen: jax.Array, knobs: dict, steps: jax.Array, *,
           kernel: str = "auto") -> jax.Array:
    """Choose one token per row.

    Args:
      logits: [B, V] float32 next-token logits.
      seen: [B, V] bool tokens already in each row (for the repetition penalty).
      knobs: {name: [B] array} from `knob_arrays` (temperature, top_k, top_p, min_p,
        repetition_penalty, seed).
      steps: [B] int32 generation step of each row (folded into its random key).
      kernel: the policy's kernel: "ffi" (and "auto" on a CPU) takes the greedy choice from
        the CPU kernel (kernels.greedy_tokens; the same tokens).

    Returns:
      [B] int32 token ids.
    """
    return sample_checked(logits, seen, knobs, steps, kernel=kernel)[0]


def sample_checked(logits: jax.Array, seen: jax.Array, knobs: dict, steps: jax.Array, *,
                   kernel: str = "auto") -> tuple[jax.Array, jax.Array]:
    """`sample`, and whether each row's logits are all finite ([B] bool; the engine ends a row
    whose logits are not), the two from one pass over the logits where the CPU kernel runs."""
    logits = logits.astype(jnp.float32)
    penalty = knobs["repetition_penalty"]
    penalised = None  # the XLA path's penalised logits, shared by its argmax and the draw
    if kernels.greedy_usable(kernel, logits):
        greedy, finite = kernels.greedy_tokens(logits, seen, penalty)
    else:
        penalised = apply_repetition_penalty(logits, seen, penalty)
        greedy = jnp.argmax(penalised, axis=-1).astype(jnp.int32)
        finite = jnp.all(jnp.isfinite(logits), axis=-1)
    temperature = knobs["temperature"]
    random_rows = temperature > 0

    def draw(_):
        # With the kernel only the rows that draw need them: computed in this branch alone.
        pen = apply_repetition_penalty(logits, seen, penalty) if penalised is None else penalised
        scaled = pen / jnp.where(random_rows, temperature, 1.0)[:, None]
        noise = gumbel_noise(knobs["seed"], steps, logits.shape[-1])
        filtering = random_rows & ((knobs["top_k"] > 0) | (knobs["top_p"] < 1.0)
                                   | (knobs["min_p"] > 0.0))
        # The sort only runs when some row filters; both branches give the same token for a
        # row that does not filter (same noise, same argmax), so batching never changes a row.
        return jax.lax.cond(jnp.any(filtering), _filtered_draw, _plain_draw, scaled, noise, knobs)

    drawn = jax.lax.cond(jnp.any(random_rows), draw, lambda _: greedy, None)
    return jnp.where(random_rows, drawn, greedy), finite


def _plain_draw(scaled, noise, knobs):
    return jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)


def _filtered_draw(scaled, noise, knobs):
    ids = jax.lax.broadcasted_iota(jnp.int32, scaled.shape, 1)
    neg_sorted, order = jax.lax.sort((-scaled, ids), dimension=1, num_keys=1)  # stable, desc
    keep = keep_mask(-neg_sorted, knobs["top_k"], knobs["top_p"], knobs["min_p"])
    score = jnp.where(keep, -neg_sorted + jnp.take_along_axis(noise, order, axis=1), -jnp.inf)
    choice = jnp.argmax(score, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=1)[:, 0]
