"""`benchmark`: prefill and decode throughput on random prompts (the `bitnet-jax bench` command)."""

from __future__ import annotations

import statistics

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
              backend: str = "auto", policy=None, seed: int = 0, repetitions: int = 1) -> dict:
    """Measure prefill and decode throughput on random prompts, after a warm-up run.

    The same prompts run `repetitions` times after the warm-up (llama-bench repeats 5 times);
    the reported speeds are the medians of the runs, so one run slowed by a busy machine does
    not decide the figure.

    Returns:
      A dict with prefill_tokens_per_s, decode_tokens_per_s (all rows together) and the
      seconds behind them (prefill_s, decode_s), each the median over the runs; the speeds of
      every run (prefill_runs, decode_runs), compile_s (from the warm-up run), batch,
      repetitions, the token counts and the device.
    """
    if repetitions < 1:
        raise GenerationError(f"benchmark repetitions must be at least 1, got {repetitions}; "
                              "pass repetitions=1 or more.")
    check_fits(prompt_tokens, gen_tokens, model.config.max_position_embeddings)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, model.config.vocab_size, (batch, prompt_tokens)).tolist()
    kwargs = dict(max_new_tokens=gen_tokens, sampling=SamplingParams(temperature=0.0),
                  backend=backend, policy=policy, ignore_eos=True)
    first = generate(model, prompts, **kwargs)
    runs = [_timed(generate(model, prompts, **kwargs), batch * prompt_tokens)
            for _ in range(repetitions)]
    device = resolve_device(backend)
    return {
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repetitions": repetitions,
        "prefill_s": _median(runs, "prefill_s"),
        "decode_s": _median(runs, "decode_s"),
        "prefill_tokens_per_s": _median(runs, "prefill_tokens_per_s"),
        "decode_tokens_per_s": _median(runs, "decode_tokens_per_s"),
        "prefill_runs": [r["prefill_tokens_per_s"] for r in runs],
        "decode_runs": [r["decode_tokens_per_s"] for r in runs],
        "compile_s": first[0].timings.compile_s,
        "backend": device.platform,
        "device": describe(device),
        "policy": resolve_policy(device, policy, model.policy).compute_dtype,
        "jax_version": jax.__version__,
    }


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _timed(results, prompt_total: int) -> dict:
    """Seconds and tokens/s of one generate() call's results."""
    prefill_s = sum(r.timings.prefill_s for r in results)  # each prompt is prefilled alone
    decode_s = max(r.timings.decode_s for r in results)  # the rows decode together
    steps = sum(len(r.token_ids) - 1 for r in results)
    return {"prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tokens_per_s": prompt_total / prefill_s if prefill_s else 0.0,
            "decode_tokens_per_s": steps / decode_s if decode_s else 0.0}
