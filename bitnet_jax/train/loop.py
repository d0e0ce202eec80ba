"""Quantisation-aware training (QAT) of BitNet b1.58 models: loss, optimiser, step, the run.

Training keeps float32 latent weights; every forward pass ternarises them (absmean) and
fake-quantises activations (per-token int8) with straight-through estimators, so gradients reach
the latent weights unchanged (bitlinear.py; BitNet b1.58, Ma et al. 2024, §2; jax-notes
"Recommended design" 2). optax is imported here only (the [train] extra).

  optimiser   clip_by_global_norm -> AdamW (no decay on norm gains), linear warmup + cosine decay
  step        A accumulation micro-batches of B rows summed inside one jitted step (lax.scan), so
              accumulation costs no extra dispatch
  run         metrics.jsonl, held-out evaluation, loss.png and state.npz in the run folder; a
              rerun resumes from the state file and drops the metrics logged after it, so a run
              that crashed continues as if it had never stopped
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from bitnet_jax.errors import ConfigError
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.policy import Policy, get_policy
from bitnet_jax.model.transformer import forward
from bitnet_jax.train.config import TrainConfig
from bitnet_jax.train.data import batch_at, eval_windows, load_tokens
from bitnet_jax.train.perplexity import evaluate, token_nll
from bitnet_jax.train.plot import LossPlot
from bitnet_jax.train.state import STATE_FILE, export, load_state, model_for, save_state

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
FINAL_DIR = "final"


def loss_fn(params: dict, batch: jax.Array, cfg: ModelConfig, policy: Policy) -> jax.Array:
    """Mean next-token cross-entropy (nats) of one batch [B, T+1] int32."""
    logits = forward(params, batch[:, :-1], cfg, policy)  # [B, T, V]
    nll = token_nll(logits, batch[:, 1:])
    return nll.sum() / jnp.float32(nll.size)


@functools.lru_cache(maxsize=8)
def make_optimizer(lr: float, warmup_steps: int, steps: int, min_lr_ratio: float,
                   weight_decay: float, b1: float, b2: float, eps: float, clip_norm: float):
    """AdamW with linear warmup + cosine decay and global-norm clipping (cached, so jit reuses it).

    Returns:
      (optax.GradientTransformation, schedule(step) -> lr).
    """
    def schedule(step):
        # Linear warmup lr·(s+1)/W (no wasted zero-lr step), then cosine to lr·min_lr_ratio.
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (step + 1) / max(warmup_steps, 1)
        frac = jnp.clip((step - warmup_steps) / max(steps - warmup_steps, 1), 0.0, 1.0)
        cosine = lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
        return jnp.where(step < warmup_steps, warm, cosine)

    # Norm gains are scale parameters: decaying them toward 0 only fights the model.
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "norm" not in jax.tree_util.keystr(path), params)

    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule


def optimizer_for(tcfg: TrainConfig):
    """The (optimizer, schedule) pair of a run config."""
    return make_optimizer(tcfg.lr, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio,
                          tcfg.weight_decay, tcfg.b1, tcfg.b2, tcfg.eps, tcfg.clip_norm)


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "optimizer"), donate_argnums=(0, 1))
def train_step(params: dict, opt_state, batch: jax.Array, cfg: ModelConfig, policy: Policy,
               optimizer) -> tuple[dict, typing.Any, dict]:
    """One optimiser step over A accumulated micro-batches.

    Args:
      params: latent float params (donated).
      opt_state: optax state (donated).
      batch: [A, B, T+1] int32 token windows.
      cfg, policy, optimizer: static.

    Returns:
      (params, opt_state, {"loss", "grad_norm"}) with the loss averaged over the A micro-batches.
    """
    grad_fn = jax.value_and_grad(loss_fn)

    def micro(acc, mb):
        loss, grads = grad_fn(params, mb, cfg, policy)
        return (acc[0] + loss, jax.tree.map(jnp.add, acc[1], grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(micro, (jnp.float32(0), zeros), batch)
    a = batch.shape[0]
    loss, grads = loss / a, jax.tree.map(lambda g: g / a, grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def train(tcfg: TrainConfig, stop_after: int | None = None, progress: bool = True) -> dict:
    """Run (or resume) a training run; returns the last metrics.

    The state file is written every save_every steps and at the end; an exception (or Ctrl-C)
    leaves the last one intact, and calling train() again resumes from it.

    Args:
      tcfg: the run config. A state file in tcfg.out is resumed.
      stop_after: stop once this many steps are done in total (the schedule still spans
        tcfg.steps); None runs to the end and exports the packed model to <out>/final.
      progress: show a tqdm bar on stderr.
    """
    policy = get_policy(tcfg.policy)
    out = Path(tcfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokens = load_tokens(Path(tcfg.data) / "train.bin")
    valid = eval_windows(load_tokens(Path(tcfg.data) / "valid.bin"), tcfg.seq_len,
                         tcfg.eval_tokens)
    cfg, params, tok_src = model_for(tcfg, policy)
    top = int(max(train_tokens.max(), valid.max()))
    if top >= cfg.vocab_size:
        raise ConfigError(f"the corpus holds token id {top} but the model's vocab_size is "
                          f"{cfg.vocab_size}; train the tokenizer and model with the same vocab.")
    optimizer, schedule = optimizer_for(tcfg)
    opt_state = optimizer.init(params)
    meta = {"step": 0, "position": 0, "elapsed_s": 0.0, "rng": _rng(tcfg.seed),
            "config": dataclasses.asdict(tcfg), "model": cfg.to_hf()}
    state_path = out / STATE_FILE
    if state_path.exists():
        params, opt_state, meta = load_state(state_path, params, opt_state)
    _truncate_metrics(out / METRICS_FILE, meta["step"])
    rng = np.asarray(meta["rng"], np.uint32)
    step, position = meta["step"], meta["position"]
    end = tcfg.steps if stop_after is None else min(stop_after, tcfg.steps)
    rows = tcfg.grad_accum * tcfg.batch_size
    plot = LossPlot(out / METRICS_FILE, out / PLOT_FILE, enabled=tcfg.plot)
    bar = _bar(progress, step, tcfg.steps)
    last: dict = {"step": step, "tokens": position * tcfg.seq_len}
    t0 = time.perf_counter() - meta["elapsed_s"]
    try:
        with open(out / METRICS_FILE, "a") as log:
            while step < end:
                batch = batch_at(train_tokens, rng, position, rows, tcfg.seq_len)
                batch = jnp.asarray(batch.reshape(tcfg.grad_accum, tcfg.batch_size, -1))
                params, opt_state, m = train_step(params, opt_state, batch, cfg, policy,
                                                  optimizer)
                step, position = step + 1, position + rows
                last = {"step": step, "loss": float(m["loss"]),
                        "grad_norm": float(m["grad_norm"]), "lr": float(schedule(step - 1)),
                        "tokens": position * tcfg.seq_len,
                        "elapsed_s": round(time.perf_counter() - t0, 2)}
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                if step % tcfg.eval_every == 0 or step == tcfg.steps:
                    ev = evaluate(params, valid, cfg, policy, tcfg.batch_size)
                    last.update(valid_loss=ev["loss"], valid_ppl=ev["ppl"])
                    if bar:
                        bar.write(f"step {step}: train {last['loss']:.4f}, held-out "
                                  f"{ev['loss']:.4f} (ppl {ev['ppl']:.2f})")
                if step % tcfg.log_every == 0 or "valid_loss" in last or step == end:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                if "valid_loss" in last:
                    plot.update()
                if step % tcfg.save_every == 0 or step == end:
                    meta.update(step=step, position=position,
                                elapsed_s=time.perf_counter() - t0)
                    save_state(state_path, params, opt_state, meta)
    finally:
        if bar:
            bar.close()
    if step >= tcfg.steps:
        data = Path(tcfg.data)
        export(out / FINAL_DIR, cfg, params,
               data if (data / "tokenizer.model").exists() or tok_src is None else tok_src)
        plot.update()
    return last


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after `step` (the saved state's), so a resumed run logs them once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if line.strip() and _logged_step(line) <= step]
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line torn by a crash mid-write
        return float("inf")


def _rng(seed: int) -> list[int]:
    return [int(x) for x in np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)))]


def _bar(progress: bool, step: int, total: int):
    if not progress:
        return None
    return tqdm(total=total, initial=step, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True)
