"""Scoring text: per-token NLL, held-out loss over fixed windows, strided perplexity.

Perplexity follows the strided sliding-window recipe of Hugging Face's perplexity guide: windows
of `context` tokens advance by `stride`, and each token is scored once, by the window that ends
nearest after it, so every scored token sees at least context - stride tokens of history.

Needs no optax: `bitnet-jax perplexity` works without the [train] extra.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.errors import ConfigError
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.policy import Policy, get_policy
from bitnet_jax.model.transformer import forward


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) [B, T] from logits [B, T, V] (log-softmax in float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def eval_step(params: dict, batch: jax.Array, cfg: ModelConfig, policy: Policy) -> jax.Array:
    """Summed next-token NLL per row [B] of batch [B, T+1] int32."""
    logits = forward(params, batch[:, :-1], cfg, policy)
    return token_nll(logits, batch[:, 1:]).sum(axis=-1)


def evaluate(params: dict, windows: np.ndarray, cfg: ModelConfig, policy: Policy,
             batch_size: int) -> dict:
    """Held-out {"loss", "ppl", "tokens"} over windows [W, T+1]."""
    total = 0.0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i: i + batch_size]
        pad = batch_size - len(chunk)
        # A fixed batch shape keeps one compiled program; padded rows are dropped below.
        full = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        total += float(np.asarray(eval_step(params, jnp.asarray(full), cfg, policy))[: len(chunk)]
                       .astype(np.float64).sum())
    count = windows.shape[0] * (windows.shape[1] - 1)
    return {"loss": total / count, "ppl": math.exp(total / count), "tokens": count}


def strided_nll(params: dict, ids: np.ndarray, cfg: ModelConfig, policy: Policy | str | None,
                context: int, stride: int) -> tuple[float, int]:
    """(summed NLL, scored tokens) of a token sequence by strided sliding windows.

    Each token is scored at most once, by the window that ends nearest after it, with at least
    context - stride tokens of history (except near the start). With stride < context every
    token but the first is scored; with stride == context the first token of each window has no
    history and is skipped, as in Hugging Face's guide. Windows are right-padded to `context`,
    which the causal mask makes harmless, so one compiled program serves every window.

    Args:
      ids: [N] token ids.
      context: window length (<= max_position_embeddings).
      stride: how far each window advances (1 <= stride <= context).
    """
    if not 1 <= stride <= context:
        raise ConfigError(f"stride={stride} must be in [1, context={context}].")
    policy = get_policy(policy)
    ids = np.asarray(ids, np.int32)
    n = ids.size
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + context, n)
        window = np.zeros((1, context + 1), np.int32)
        window[0, : end - begin] = ids[begin:end]
        nll = np.asarray(_window_nll(params, jnp.asarray(window), cfg, policy))[0]  # [context]
        # nll[j] scores ids[begin + j + 1]; score only targets past the previous window's end.
        first = max(prev_end, begin + 1) - begin - 1
        total += float(nll[first: end - begin - 1].astype(np.float64).sum())
        count += end - begin - 1 - first
        prev_end = end
        if end == n:
            break
    return total, count


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def _window_nll(params, window, cfg, policy):
    logits = forward(params, window[:, :-1], cfg, policy)
    return token_nll(logits, window[:, 1:])
