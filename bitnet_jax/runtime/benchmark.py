"""`benchmark`: prefill and decode throughput on random prompts (the `bitnet-jax bench` command)."""

from __future__ import annotations

import jax
import numpy as np

from bitnet_jax.errors import GenerationError
from bitnet_jax.runtime.generate import generate
from bitnet_jax.runtime.placement import describe, resolve_device, resolve_policy
from bitnet_jax.runtime.sampling import SamplingParams


def check_fits(prompt_tokens: int, gen_tokens: int, context: int) -> None:
    """Refuse a benchmark whose prompt plus generated tokens exceed the model's context."""
    if prompt_tokens + gen_tokens > context:
        where = (f"{prompt_tokens} prompt + {gen_tokens} generated tokens do not fit the model's "
                 f"{context}-token context (max_position_embeddings); ")
        raise GenerationError(where + "lower prompt_tokens or gen_tokens.",
                              cli_message=where + "lower --prompt-tokens or --gen-tokens.")


def benchmark(model, *, prompt_tokens: int = 128, gen_tokens: int = 64, batch: int = 1,
              backend: str = "auto", policy=None, seed: int = 0) -> dict:
    """Measure prefill and decode throughput on random prompts, after a warm-up run.

    Returns:
      A dict with prefill_tokens_per_s, decode_tokens_per_s (all rows together), the seconds
      behind them, compile_s (from the warm-up run), batch, the token counts and the device.
    """
    check_fits(prompt_tokens, gen_tokens, model.config.max_position_embeddings)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, model.config.vocab_size, (batch, prompt_tokens)).tolist()
    kwargs = dict(max_new_tokens=gen_tokens, sampling=SamplingParams(temperature=0.0),
                  backend=backend, policy=policy, ignore_eos=True)
    first = generate(model, prompts, **kwargs)
    results = generate(model, prompts, **kwargs)
    prefill_s = sum(r.timings.prefill_s for r in results)  # each prompt is prefilled alone
    decode_s = max(r.timings.decode_s for r in results)  # the rows decode together
    steps = sum(len(r.token_ids) - 1 for r in results)
    device = resolve_device(backend)
    return {
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tokens_per_s": batch * prompt_tokens / prefill_s if prefill_s else 0.0,
        "decode_tokens_per_s": steps / decode_s if decode_s else 0.0,
        "compile_s": first[0].timings.compile_s,
        "backend": device.platform,
        "device": describe(device),
        "policy": resolve_policy(device, policy, model.policy).compute_dtype,
        "jax_version": jax.__version__,
    }
