"""The slot-based serving engine (runtime/scheduler.py, runtime/engine.py) on the tiny chat model.

Requests join and leave while others decode; every greedy result must equal the uncached
reference (and so `generate` alone); nothing recompiles after warm-up; cancellation, timeouts,
a full queue and one request's non-finite logits each end only the requests they concern.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest

from bitnet_jax.errors import GenerationError
from bitnet_jax.formats.base import Model
from bitnet_jax.runtime import engine
from bitnet_jax.runtime.generate import generate
from bitnet_jax.runtime.sampling import SamplingParams
from bitnet_jax.runtime.scheduler import Engine, QueueFull

GREEDY = SamplingParams(temperature=0.0)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 61, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def served(chat_model):
    """A warmed 4-slot engine with a 64-token context, stepped in the test's thread."""
    eng = Engine(chat_model, slots=4, context=64)
    eng.warmup()
    return eng


def test_requests_join_and_leave_while_others_decode(served, chat_model, greedy_reference):
    prompts = _prompts([5, 30, 2, 17, 9, 40], seed=1)
    lengths = [12, 3, 20, 7, 1, 15]
    handles = [served.submit(p, max_new_tokens=m, sampling=GREEDY, ignore_eos=True)
               for p, m in zip(prompts[:2], lengths[:2])]
    for _ in range(3):
        served.step()
    # More requests than free slots: the extra ones queue and take slots as they free up.
    handles += [served.submit(p, max_new_tokens=m, sampling=GREEDY, ignore_eos=True)
                for p, m in zip(prompts[2:], lengths[2:])]
    assert served.stats()["queue_depth"] > 0
    served.run_until_done(handles)
    for p, m, h in zip(prompts, lengths, handles):
        assert h.token_ids == greedy_reference(chat_model.params, p, m), p
        assert h.finish_reason == "length" and h.usage.completion_tokens == m
    assert served.stats() == {"slots": 4, "queue_depth": 0, "busy_slots": 0}


def test_fifty_mixed_requests_compile_nothing_after_warmup(served):
    before = dict(engine.TRACES)
    rng = np.random.default_rng(3)
    handles = []
    for i in range(50):
        n = int(rng.integers(1, 50))
        sampling = SamplingParams(temperature=float(rng.choice([0.0, 0.7, 1.3])),
                                  top_k=int(rng.choice([0, 5])), top_p=float(rng.choice([1, .9])),
                                  min_p=float(rng.choice([0, .05])),
                                  repetition_penalty=float(rng.choice([1, 1.3])), seed=i)
        handles.append(served.submit(
            _prompts([n], seed=i)[0], max_new_tokens=int(rng.integers(0, 64 - n)),
            sampling=sampling, stop=("ab",) if i % 3 == 0 else (),
            logprobs=int(rng.integers(0, 4)) if i % 4 == 0 else None))
        if i % 7 == 0:
            served.step()
    served.run_until_done(handles)
    assert dict(engine.TRACES) == before
    assert all(h.finish_reason in ("stop", "length", "context_full") for h in handles)


def test_sampled_results_do_not_depend_on_the_other_slots(served, chat_model):
    prompts = _prompts([4, 13, 8], seed=2)
    sampling = [SamplingParams(temperature=0.9, top_k=8, seed=5),
                SamplingParams(temperature=1.2, top_p=0.9, repetition_penalty=1.3, seed=6),
                SamplingParams(temperature=0.7, min_p=0.1, seed=7)]
    alone = [generate(chat_model, [p], max_new_tokens=10, sampling=s, ignore_eos=True)[0]
             for p, s in zip(prompts, sampling)]
    handles = [served.submit(p, max_new_tokens=10, sampling=s, ignore_eos=True)
               for p, s in zip(prompts, sampling)]
    served.run_until_done(handles)
    assert [h.token_ids for h in handles] == [r.token_ids for r in alone]


def test_a_long_prompt_is_prefilled_between_decode_chunks(served, monkeypatch):
    monkeypatch.setattr(engine, "MAX_PREFILL_CHUNK", 16)
    running = served.submit(_prompts([3])[0], max_new_tokens=40, sampling=GREEDY,
                            ignore_eos=True)
    while not running.token_ids:
        served.step()
    long = served.submit(_prompts([60], seed=4)[0], max_new_tokens=2, sampling=GREEDY)
    produced = []
    while long.usage.first_token is None:
        served.step()
        produced.append(len(running.token_ids))
    # 60 prompt tokens at 16 per chunk: 4 prefill chunks, each followed by a decode chunk of
    # the running stream.
    assert len(produced) >= 4 and produced[-2] > produced[0]
    served.run_until_done([running, long])


def test_cancel_and_timeout_free_their_slots(served, chat_model, greedy_reference):
    other = _prompts([6], seed=8)[0]
    keep = served.submit(other, max_new_tokens=40, sampling=GREEDY, ignore_eos=True)
    gone = served.submit(_prompts([6], seed=9)[0], max_new_tokens=50, sampling=GREEDY,
                         ignore_eos=True)
    late = served.submit(_prompts([6], seed=10)[0], max_new_tokens=50, sampling=GREEDY,
                         ignore_eos=True, timeout=0.0)
    served.step()
    gone.cancel()
    served.step()  # the slot is freed at the next step, within one decode chunk
    assert gone.finish_reason == "cancelled" and late.finish_reason == "timeout"
    assert served.stats()["busy_slots"] == 1
    served.run_until_done([keep])
    assert keep.token_ids == greedy_reference(chat_model.params, other, 40)


def test_batch_mode_with_more_requests_than_slots(chat_model, greedy_reference):
    # generate()'s mode: the admitted prompts are all prefilled before the slots decode
    # together; queued requests take the slots that free up.
    eng = Engine(chat_model, slots=2, context=32, interleave=False)
    prompts = _prompts([3, 8, 5, 2, 6], seed=13)
    handles = [eng.submit(p, max_new_tokens=4 + i, sampling=GREEDY, ignore_eos=True)
               for i, p in enumerate(prompts)]
    eng.run_until_done(handles)
    for i, (p, h) in enumerate(zip(prompts, handles)):
        assert h.token_ids == greedy_reference(chat_model.params, p, 4 + i)


def test_queue_full_and_oversized_prompts_are_refused(chat_model):
    eng = Engine(chat_model, slots=1, context=32, max_queue=2)
    eng.submit([3, 4], max_new_tokens=1)
    eng.submit([3, 4], max_new_tokens=1)
    with pytest.raises(QueueFull, match="queue is full"):
        eng.submit([3, 4], max_new_tokens=1)
    with pytest.raises(GenerationError, match="33 tokens.*context holds 32"):
        Engine(chat_model, slots=1, context=32).submit([3] * 33, max_new_tokens=1)
    with pytest.raises(GenerationError, match="slots=65"):
        Engine(chat_model, slots=65)


def test_one_requests_non_finite_logits_end_it_alone(chat_model, greedy_reference):
    # A NaN embedding row for token 60 (the LM head untied and finite): only the request whose
    # prompt holds that token fails.
    params = dict(chat_model.params, lm_head=chat_model.params["embed_tokens"])
    params["embed_tokens"] = params["embed_tokens"].at[60].set(np.nan)
    cfg = dataclasses.replace(chat_model.config, tie_word_embeddings=False)
    broken = Model(cfg, params, chat_model.tokenizer)
    eng = Engine(broken, slots=2, context=32)
    good_prompt = [5, 6, 7]
    good = eng.submit(good_prompt, max_new_tokens=8, sampling=GREEDY, ignore_eos=True)
    bad = eng.submit([5, 60, 7], max_new_tokens=8, sampling=GREEDY, ignore_eos=True)
    eng.run_until_done([good, bad])
    assert bad.finish_reason == "error" and "non-finite logits" in bad.error
    assert good.finish_reason == "length"
    assert good.token_ids == greedy_reference(chat_model.params, good_prompt, 8)


def test_logprobs_are_the_models_log_softmax(served):
    h = served.submit([3, 9, 27], max_new_tokens=4, sampling=GREEDY, ignore_eos=True,
                      logprobs=3)
    served.run_until_done([h])
    events = [e for e in _drain(h) if e.logprobs]
    lps = [lp for e in events for lp in e.logprobs]
    assert [lp.token_id for lp in lps] == h.token_ids
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[0] == (lp.token_id, pytest.approx(lp.logprob))
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0
        assert sum(np.exp(v) for _, v in lp.top) <= 1 + 1e-5


def _drain(handle):
    events = []
    while (event := handle.poll()) is not None:
        events.append(event)
    return events


def test_background_thread_serves_threads_and_asyncio(chat_model, greedy_reference):
    eng = Engine(chat_model, slots=2, context=64)
    eng.start()
    prompts = _prompts([4, 9, 14, 2, 7], seed=12)
    results = {}

    def client(i):
        h = eng.submit(prompts[i], max_new_tokens=6, sampling=GREEDY, ignore_eos=True)
        results[i] = [t for e in h for t in e.token_ids]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()

    async def async_clients():
        async def one(i):
            h = eng.submit(prompts[i], max_new_tokens=6, sampling=GREEDY, ignore_eos=True)
            results[i] = [t async for e in h for t in e.token_ids]
        await asyncio.gather(one(3), one(4))

    asyncio.run(async_clients())
    for t in threads:
        t.join(60)
    eng.shutdown(drain=True, timeout=60)
    for i, p in enumerate(prompts):
        assert results[i] == greedy_reference(chat_model.params, p, 6)
    with pytest.raises(QueueFull, match="shutting down"):
        eng.submit([3], max_new_tokens=1)


def test_memory_stays_bounded_over_a_thousand_requests(served):
    # Finished requests leave nothing behind in the engine: no queue entry, no slot, no
    # per-request host or device buffers, no new programs; Python heap growth stays flat.
    import gc
    import tracemalloc

    def batch(seed):
        handles = [served.submit(_prompts([1 + i % 20], seed=seed + i)[0],
                                 max_new_tokens=1 + i % 3, sampling=GREEDY)
                   for i in range(100)]
        served.run_until_done(handles)

    batch(0)  # warm: lazily created objects exist before the measurement starts
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    before = dict(engine.TRACES)
    for k in range(1, 10):
        batch(1000 * k)
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    assert grown < 2_000_000, f"{grown} bytes kept after 900 requests"
    assert dict(engine.TRACES) == before
    assert served.stats() == {"slots": 4, "queue_depth": 0, "busy_slots": 0}


def test_an_engine_that_does_not_fit_is_refused_before_allocating(chat_model, monkeypatch):
    # BITNET_JAX_MEMORY_LIMIT is the budget (a GPU's free memory where the device reports it).
    from bitnet_jax.errors import DeviceError

    kv_per_slot = 2 * 2 * 2 * 8 * 64 * 4  # 2 (k, v) x L x K x H x S x float32: 16 KiB
    monkeypatch.setenv("BITNET_JAX_MEMORY_LIMIT", str(20 * kv_per_slot))
    with pytest.raises(DeviceError, match=r"use at most \d+ slots at context 64"):
        Engine(chat_model, slots=64, context=64)
    Engine(chat_model, slots=4, context=64)  # fits
