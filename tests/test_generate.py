"""The generation engine (bitnet_jax/engine.py, bitnet_jax/generate.py) on the tiny config.

The model is conftest's `chat_model` (tests/tiny_chat.py): logits are peaked, so greedy choices
are far from float ties and token-level equalities are exact.
Most tests share batch bucket 4 and cache length 32 so they reuse compiled programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.runtime import engine
from bitnet_jax.model.cache import init_cache
from bitnet_jax.model import transformer as model_lib
from bitnet_jax.errors import GenerationError
from bitnet_jax.runtime.benchmark import benchmark
from bitnet_jax.runtime.generate import SamplingParams, generate, stream, warmup
from bitnet_jax.formats.base import Model
from bitnet_jax.model.params import pack_params
from tiny_chat import peaked as _peaked

CONTEXT = 64  # tiny.json max_position_embeddings


@pytest.fixture(scope="module")
def model(chat_model):
    return chat_model


@pytest.fixture(scope="module")
def reference(greedy_reference):
    return greedy_reference


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 61, n).tolist() for n in lengths]


@pytest.mark.parametrize("packed", [False, True], ids=["latent", "packed"])
def test_prefill_into_slots_plus_decode_steps_equal_one_forward(tiny_cfg, tiny_params, packed):
    # The engine's cache layout: each prompt prefilled into its own slot (a one-row call with a
    # traced slot and a right-padded chunk), then one-token steps of every slot at its own
    # position (teacher-forced), compared with a forward pass over each whole sequence.
    params = _peaked(pack_params(tiny_params, tiny_cfg) if packed else tiny_params)
    seqs = _prompts([12, 9, 11], seed=1)
    plens = [7, 3, 6]
    steps, b, t = 4, len(seqs), 8
    cache = init_cache(tiny_cfg, b, 16)

    @jax.jit
    def prefill(params, cache, tokens, slot):
        h, cache = model_lib.apply(params, tokens, tiny_cfg, cache=cache,
                                   pos=jnp.zeros((1,), jnp.int32), slot=slot)
        return model_lib.unembed(params, h, tiny_cfg), cache

    @jax.jit
    def step(params, cache, tokens, pos):
        h, cache = model_lib.apply(params, tokens, tiny_cfg, cache=cache, pos=pos)
        return model_lib.unembed(params, h, tiny_cfg), cache

    got = [np.zeros((b, tiny_cfg.vocab_size), np.float32) for _ in range(steps + 1)]
    for r in (2, 0, 1):  # any slot order
        chunk = np.zeros((1, t), np.int32)
        chunk[0, :plens[r]] = seqs[r][:plens[r]]
        logits, cache = prefill(params, cache, jnp.asarray(chunk), jnp.int32(r))
        got[0][r] = np.asarray(logits[0, plens[r] - 1])
    for j in range(steps):
        tokens = np.array([[s[n + j]] for s, n in zip(seqs, plens)], np.int32)
        pos = jnp.asarray([n + j for n in plens], jnp.int32)
        logits, cache = step(params, cache, jnp.asarray(tokens), pos)
        got[j + 1] = np.asarray(logits[:, 0])
    # Each row's whole sequence, right-padded: causal attention keeps the padding out of reach.
    full = np.zeros((b, 16), np.int32)
    for r, seq in enumerate(seqs):
        full[r, :len(seq)] = seq
    want = np.asarray(jax.jit(model_lib.forward, static_argnums=2)(params, full, tiny_cfg))
    for r, n in enumerate(plens):
        for j in range(steps + 1):
            np.testing.assert_allclose(got[j][r], want[r, n - 1 + j], atol=1e-5, rtol=0)


def test_greedy_generation_matches_uncached_reference(model, reference):
    prompts = _prompts([5, 11, 2])
    results = generate(model, prompts, max_new_tokens=9, temperature=0, ignore_eos=True)
    for p, r in zip(prompts, results):
        assert r.token_ids == reference(model.params, p, 9)
        assert r.finish_reason == "length"
        assert r.prompt_tokens == len(p)


def test_batched_equals_single(model):
    prompts = _prompts([4, 13, 8], seed=2)
    sampling = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_k=8, seed=5),
                SamplingParams(temperature=1.2, top_p=0.9, repetition_penalty=1.3, seed=6)]
    batched = generate(model, prompts, max_new_tokens=10, sampling=sampling, ignore_eos=True)
    for p, s, r in zip(prompts, sampling, batched):
        alone = generate(model, [p], max_new_tokens=10, sampling=s, ignore_eos=True)[0]
        assert alone.token_ids == r.token_ids


def test_no_recompile_inside_a_bucket_or_for_new_request_values(model):
    generate(model, _prompts([3]), max_new_tokens=5, temperature=0)
    before = dict(engine.TRACES)
    # Another length in the same 16-token bucket, every sampling knob and max_new changed.
    generate(model, _prompts([9], seed=3), max_new_tokens=7, temperature=0.7, top_k=3, top_p=0.8,
             min_p=0.05, repetition_penalty=1.4, seed=9)
    generate(model, _prompts([16], seed=4), max_new_tokens=2, temperature=0)
    assert dict(engine.TRACES) == before
    generate(model, _prompts([17], seed=5), max_new_tokens=5, temperature=0)  # next bucket
    assert engine.TRACES["prefill"] == before["prefill"] + 1


def test_long_prompt_is_prefilled_in_chunks(model, reference, monkeypatch):
    monkeypatch.setattr(engine, "MAX_PREFILL_CHUNK", 16)
    assert engine.prefill_plan(40, 64) == [(0, 16), (16, 16), (32, 16)]
    prompt = _prompts([40], seed=6)[0]
    result = generate(model, [prompt], max_new_tokens=6, temperature=0, ignore_eos=True)[0]
    assert result.token_ids == reference(model.params, prompt, 6)


def test_finish_reasons(model, reference):
    prompt = _prompts([6], seed=7)[0]
    free = reference(model.params, prompt, 10)
    eos = free[4]
    stopping = Model(model.config.replace(eos_token_id=eos), model.params, None)
    r = generate(stopping, [prompt], max_new_tokens=10, temperature=0)[0]
    assert (r.finish_reason, r.token_ids) == ("stop", free[:free.index(eos)])

    r = generate(model, [prompt], max_new_tokens=3, temperature=0, ignore_eos=True)[0]
    assert (r.finish_reason, len(r.token_ids)) == ("length", 3)

    r = generate(model, [prompt], max_new_tokens=0)[0]
    assert (r.finish_reason, r.token_ids, r.text) == ("length", [], "")

    long_prompt = _prompts([60], seed=8)[0]
    r = generate(model, [long_prompt], max_new_tokens=20, temperature=0, ignore_eos=True)[0]
    # 60 prompt slots + 4 decode writes fill the 64-slot context; the 5th token needs no slot.
    assert (r.finish_reason, len(r.token_ids)) == ("context_full", 5)


def test_stop_strings_end_the_text_and_stream_concatenates_to_it(model):
    free = generate(model, "the cat", max_new_tokens=12, temperature=0, ignore_eos=True)[0]
    full = free.text
    assert len(free.token_ids) == 12 and len(full) >= 8  # ids 0-2 (pad, BOS, EOS) have no text
    stop = full[5:7]
    cut = full[:full.find(stop)]
    r = generate(model, "the cat", max_new_tokens=12, temperature=0, ignore_eos=True,
                 stop=[stop, "never seen"])[0]
    assert (r.text, r.finish_reason) == (cut, "stop")
    pieces = stream(model, "the cat", max_new_tokens=12, temperature=0, ignore_eos=True,
                    stop=stop)
    parts = list(pieces)
    assert "".join(parts) == cut == pieces.result.text
    assert len(parts) > 1  # text arrives in several pieces, as decode chunks return
    assert "".join(stream(model, "the cat", max_new_tokens=12, temperature=0,
                          ignore_eos=True)) == full


def test_chat_prompt_uses_the_template(model):
    tok = model.tokenizer
    r = generate(model, "hi", max_new_tokens=2, chat=True, system="be brief", temperature=0)[0]
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hi"}])
    assert r.prompt_tokens == len(tok.encode(text))
    r2 = generate(model, [{"role": "user", "content": "hi"}], max_new_tokens=2, temperature=0)[0]
    assert r2.prompt_tokens == len(tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "hi"}])))


def test_seed_gives_the_same_text_every_time(model):
    kwargs = dict(max_new_tokens=12, temperature=1.5, ignore_eos=True)
    a = generate(model, "abc", seed=3, **kwargs)[0]
    b = generate(model, "abc", seed=3, **kwargs)[0]
    c = generate(model, "abc", seed=4, **kwargs)[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_invalid_requests_raise_clear_errors(model):
    with pytest.raises(GenerationError, match="token id 61.*vocabulary"):
        generate(model, [[3, 61]], max_new_tokens=2)
    with pytest.raises(GenerationError, match="70 tokens.*truncate=True") as exc:
        generate(model, [_prompts([70])[0]], max_new_tokens=2)
    assert "--truncate" in exc.value.cli_message and "truncate=True" not in exc.value.cli_message
    r = generate(model, [_prompts([70])[0]], max_new_tokens=8, truncate=True, temperature=0)[0]
    assert r.prompt_tokens == CONTEXT - 8
    bare = Model(model.config, model.params, None)
    with pytest.raises(GenerationError, match="no tokenizer"):
        generate(bare, "text", max_new_tokens=2)
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [[]], max_new_tokens=2)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(model, "a", max_new_tokens=-1)


def test_non_finite_logits_raise(model):
    broken = Model(model.config, dict(model.params, norm=model.params["norm"] * np.nan), None)
    with pytest.raises(GenerationError, match="non-finite logits"):
        generate(broken, [[3, 4, 5]], max_new_tokens=3, temperature=0)


def test_warmup_compiles_what_a_request_then_uses(model):
    # Eight slots: a shape no other test here compiles.
    seconds = warmup(model, batch_sizes=(8,), prompt_lengths=(12,), max_new_tokens=40)
    assert seconds > 0
    before = dict(engine.TRACES)
    generate(model, _prompts([12, 5, 9, 1, 7], seed=9), max_new_tokens=40, temperature=0)
    assert dict(engine.TRACES) == before
    assert warmup(model, batch_sizes=(8,), prompt_lengths=(12,), max_new_tokens=40) == 0.0


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_warmup_compiles_the_16_bit_cache_programs(model, kv):
    # The CLI's CPU default is a float16 KV cache: warmup must compile the programs that requests
    # with that cache dtype run, not float32-cache ones.
    policy = model.policy.replace(kv_cache_dtype=kv)
    assert warmup(model, batch_sizes=(4,), prompt_lengths=(9,), max_new_tokens=24,
                  policy=policy) > 0
    before = dict(engine.TRACES)
    r = generate(model, _prompts([9, 3, 6]), max_new_tokens=24, temperature=0, policy=policy)
    assert dict(engine.TRACES) == before
    assert all(x.timings.compile_s == 0.0 for x in r)


def test_benchmark_refuses_more_tokens_than_the_context(model):
    context = model.config.max_position_embeddings
    with pytest.raises(GenerationError, match=f"do not fit the model's {context}-token") as exc:
        benchmark(model, prompt_tokens=context - 12, gen_tokens=100)
    assert "--gen-tokens" in exc.value.cli_message


def test_timings_are_reported(model):
    r = generate(model, _prompts([7]), max_new_tokens=16, temperature=0, ignore_eos=True)[0]
    t = r.timings
    assert t.prefill_s > 0 and t.decode_s > 0 and t.compile_s >= 0
    assert t.tokens_per_s == pytest.approx(15 / t.decode_s)
