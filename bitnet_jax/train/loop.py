"""Quantisation-aware training (QAT) of BitNet b1.58 models, and strided perplexity.

Training keeps float32 latent weights; every forward pass ternarises them (absmean) and
fake-quantises activations (per-token int8) with straight-through estimators, so gradients reach
the latent weights unchanged (bitlinear.py; BitNet b1.58, Ma et al. 2024, §2; jax-notes
"Recommended design" 2). optax is used only here.

  optimiser   clip_by_global_norm -> AdamW (no decay on norm gains), linear warmup + cosine decay
  batches     [A, B, T+1] windows of a uint16 token stream: A accumulation micro-batches of B rows,
              summed inside one jitted step (lax.scan) so accumulation costs no extra dispatch
  data order  each epoch a fresh permutation of non-overlapping windows with an epoch-dependent
              shift; a pure function of (rng, epoch), so the sample position alone resumes it
  state file  <out>/state.npz: params, optimiser state, step, position, rng and run metadata in
              one file; resuming continues bit-identically (same XLA program, same inputs)

Perplexity follows the strided sliding-window recipe of Hugging Face's perplexity guide: windows
of `context` tokens advance by `stride`, and each token is scored once, by the window that ends
nearest after it, so every scored token sees at least context - stride tokens of history.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
import types
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.model.config import ModelConfig, from_hf, load_config
from bitnet_jax.errors import BitNetError, CheckpointError, ConfigError
from bitnet_jax.model.transformer import forward
from bitnet_jax.model.params import BITLINEAR_PATHS, init_params, pack_params
from bitnet_jax.model.policy import Policy, get_policy

STATE_FILE = "state.npz"
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run; fields map 1:1 to the keys of configs/train-*.json.

    Attributes:
      model: HF config.json path, configs/ preset name, or an inline HF config object.
      data: corpus folder with train.bin and valid.bin (uint16 token ids, bitnet_jax.train.corpus);
        a tokenizer.model there is copied beside the exported model.
      out: run folder (state, metrics, loss plot, final model).
      init_from: HF folder or GGUF to fine-tune from (its config replaces `model`), or null.
      policy: precision preset ("cpu" f32, "train" f32 params / bf16 compute).
      seed: seeds parameter init and the data order.
      seq_len: T, tokens per training row.
      batch_size: B, rows per micro-batch.
      grad_accum: A, micro-batches summed per optimiser step.
      steps: optimiser steps in the whole run (the schedule's length).
      lr, warmup_steps, min_lr_ratio: peak LR, linear warmup steps, cosine floor as a fraction.
      weight_decay, b1, b2, eps: AdamW hyperparameters (no decay on norm gains).
      clip_norm: global gradient-norm clip (0 disables).
      init_std: std of the normal init of float weights.
      eval_every, eval_tokens: held-out evaluation period (steps) and size (0 = whole split).
      save_every: state-file period in steps (the last step always saves).
      log_every: metrics.jsonl period in steps.
      plot: write loss.png into the run folder after each evaluation.
      notes: free text kept with the run (e.g. why this policy).
    """

    model: str | dict = "tiny"
    data: str = "runs/corpus"
    out: str = "runs/train"
    init_from: str | None = None
    policy: str = "cpu"
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    init_std: float = 0.02
    eval_every: int = 100
    eval_tokens: int = 0
    save_every: int = 100
    log_every: int = 10
    plot: bool = True
    notes: str = ""


# ================================================================================================
# Run configs


def config_from_dict(d: dict, source: str = "run config") -> TrainConfig:
    """Build a TrainConfig from a JSON object; keys starting with "_" are comments."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_"):
            continue
        if key not in fields:
            raise ConfigError(f"{source} has unknown field {key!r}; known fields: "
                              f"{', '.join(fields)}.")
        kwargs[key] = _check_type(key, value, _field_type(key), source)
    return _validate(TrainConfig(**kwargs))


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read configs/train-<name>.json and apply `--field=value` overrides."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"run config {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"run config {path} is not valid JSON ({exc}).") from None
    if not isinstance(d, dict):
        raise ConfigError(f"run config {path} must hold a JSON object.")
    d.update(parse_overrides(overrides))
    return config_from_dict(d, str(path))


def parse_overrides(args: list[str]) -> dict:
    """Parse ["--lr=1e-3", "--plot", "false", ...] into typed TrainConfig values.

    Values are read as JSON when they parse (numbers, true/false/null, objects), else as strings,
    then checked against the field's type.
    """
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --field=value.")
        name, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{name} needs a value (--{name}=VALUE).")
            raw, i = args[i + 1], i + 1
        name = name.replace("-", "_")
        try:
            ftype = _field_type(name)
        except KeyError:
            known = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
            raise ConfigError(
                f"unknown run-config field --{name}; known fields: {known}.") from None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if _accepts(ftype, str) and not isinstance(value, str) and value is not None and not (
                isinstance(value, dict) and _accepts(ftype, dict)):
            value = raw  # e.g. --out=123 or --notes=true stay strings
        out[name] = _check_type(name, value, ftype, "override")
        i += 1
    return out


# ================================================================================================
# Loss, optimiser, steps


def loss_fn(params: dict, batch: jax.Array, cfg: ModelConfig, policy: Policy) -> jax.Array:
    """Mean next-token cross-entropy (nats) of one batch [B, T+1] int32."""
    nll_sum, count = _nll(params, batch, cfg, policy)
    return nll_sum / count


@functools.lru_cache(maxsize=8)
def make_optimizer(lr: float, warmup_steps: int, steps: int, min_lr_ratio: float,
                   weight_decay: float, b1: float, b2: float, eps: float, clip_norm: float):
    """AdamW with linear warmup + cosine decay and global-norm clipping (cached, so jit reuses it).

    Returns:
      (optax.GradientTransformation, schedule(step) -> lr).
    """
    import optax

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
    import optax

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


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def eval_step(params: dict, batch: jax.Array, cfg: ModelConfig, policy: Policy) -> jax.Array:
    """Summed next-token NLL per row [B] of batch [B, T+1] int32."""
    logits = forward(params, batch[:, :-1], cfg, policy)
    return _token_nll(logits, batch[:, 1:]).sum(axis=-1)


# ================================================================================================
# Data


def load_tokens(path: str | Path) -> np.ndarray:
    """Memory-map a uint16 token file written by bitnet_jax.train.corpus."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"token file {path} does not exist; build the corpus first "
                          "(python -m bitnet_jax.train.corpus --out DIR) and point `data` at DIR.")
    return np.memmap(path, dtype=np.uint16, mode="r")


def batch_at(tokens: np.ndarray, rng: np.ndarray, position: int, n: int, seq_len: int):
    """The n training windows starting at sample `position` of the epoch-shuffled order.

    Args:
      tokens: [N] uint16 stream.
      rng: [2] uint32 run key; epoch e's order is a function of (rng, e) only.
      position: index of the first sample (counts across epochs).
      n: number of windows.

    Returns:
      [n, T+1] int32.
    """
    nwin = (tokens.size - seq_len - 1) // seq_len
    if nwin < 1:
        raise ConfigError(
            f"the token file holds {tokens.size} tokens, too few for seq_len={seq_len}.")
    rows = []
    for p in range(position, position + n):
        epoch, j = divmod(p, nwin)
        shift, perm = _epoch_order(tuple(int(x) for x in rng), epoch, nwin, seq_len)
        start = shift + int(perm[j]) * seq_len
        rows.append(np.asarray(tokens[start: start + seq_len + 1], np.int32))
    return np.stack(rows)


@functools.lru_cache(maxsize=4)
def _epoch_order(rng: tuple, epoch: int, nwin: int, seq_len: int):
    gen = np.random.default_rng([*rng, epoch])
    return int(gen.integers(seq_len)), gen.permutation(nwin)


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """Non-overlapping held-out windows [W, T+1] (the first max_tokens tokens, 0 = all)."""
    n = tokens.size if max_tokens <= 0 else min(tokens.size, max_tokens)
    w = (n - 1) // seq_len
    if w < 1:
        raise ConfigError(f"the held-out split holds {n} tokens, too few for seq_len={seq_len}.")
    idx = np.arange(w)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens[: w * seq_len + 1], np.int32)[idx]


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


# ================================================================================================
# State file


def save_state(path: str | Path, params: dict, opt_state, meta: dict) -> None:
    """Write params, optimiser state and metadata (step, position, rng, ...) to one .npz file.

    Leaves are stored under their key paths ("params['layers']['mlp']['up_proj']"); the write
    goes to a temporary file first so a crash never leaves a half-written state.
    """
    path = Path(path)
    arrays = {"params" + k: v for k, v in _flatten(params).items()}
    arrays.update({"opt" + k: v for k, v in _flatten(opt_state).items()})
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_state(path: str | Path, params_like: dict, opt_like) -> tuple[dict, typing.Any, dict]:
    """Read a state file into pytrees shaped like `params_like` / `opt_like`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"training state {path} cannot be read ({exc}); delete it to "
                              "start over.") from None
    meta = json.loads(str(arrays.pop("meta")))
    params = _unflatten(params_like, arrays, "params", path)
    opt_state = _unflatten(opt_like, arrays, "opt", path)
    return params, opt_state, meta


# ================================================================================================
# The run


def model_for(tcfg: TrainConfig, policy: Policy) -> tuple[ModelConfig, dict, Path | None]:
    """(cfg, latent params, tokenizer source folder or None) for a run."""
    if tcfg.init_from:
        from bitnet_jax.formats.loader import load_model

        # packed=False gives latent floats; packed-only sources come back as t·σ.
        m = load_model(tcfg.init_from, policy=policy, packed=False, tokenizer=False)
        if not m.config.quantized:
            raise ConfigError(f"init_from={tcfg.init_from} is a float Llama; QAT needs a BitNet.")
        src = Path(tcfg.init_from)
        return m.config, latent_from_ternary(m.params), src if src.is_dir() else None
    cfg = from_hf(tcfg.model) if isinstance(tcfg.model, dict) else load_config(tcfg.model)
    params = init_params(cfg, jax.random.PRNGKey(tcfg.seed), policy, std=tcfg.init_std)
    return cfg, params, None


def latent_from_ternary(params: dict) -> dict:
    """Make unpacked ternary weights t·σ re-quantise to exactly t·σ in the QAT forward.

    Absmean of t·σ is σ·mean|t|, so fake quantisation would shrink such a matrix by mean|t|
    (about 0.6). Dividing by mean|t| keeps the codes and restores the scale σ, so fine-tuning
    starts from the loaded model's own function. Matrices that are not of the form t·σ (latent
    float checkpoints) are left alone. Leaves: [L, O, I].
    """
    def fix(w):
        a = np.abs(np.asarray(w, np.float32))
        out = []
        for layer in a:  # per layer, since σ is per matrix
            nz = layer[layer > 0]
            out.append(nz.size and nz.min() == nz.max())
        if not all(out):
            return w
        frac = jnp.mean(jnp.abs(jnp.sign(w)), axis=(-2, -1), keepdims=True)
        return (w / jnp.maximum(frac, 1e-6)).astype(w.dtype)

    layers = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params["layers"].items()}
    for mod, name in BITLINEAR_PATHS:
        layers[mod][name] = fix(layers[mod][name])
    return {**params, "layers": layers}


def train(tcfg: TrainConfig, stop_after: int | None = None, progress: bool = True) -> dict:
    """Run (or resume) a training run; returns the last metrics.

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
    rng = np.asarray(meta["rng"], np.uint32)
    step, position = meta["step"], meta["position"]
    end = tcfg.steps if stop_after is None else min(stop_after, tcfg.steps)
    rows = tcfg.grad_accum * tcfg.batch_size
    bar = _bar(progress, step, tcfg.steps)
    last: dict = {"step": step, "tokens": position * tcfg.seq_len}
    t0 = time.perf_counter() - meta["elapsed_s"]
    with open(out / METRICS_FILE, "a") as log:
        while step < end:
            batch = batch_at(train_tokens, rng, position, rows, tcfg.seq_len)
            batch = jnp.asarray(batch.reshape(tcfg.grad_accum, tcfg.batch_size, -1))
            params, opt_state, m = train_step(params, opt_state, batch, cfg, policy, optimizer)
            step, position = step + 1, position + rows
            last = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                    "lr": float(schedule(step - 1)), "tokens": position * tcfg.seq_len,
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
            if "valid_loss" in last and tcfg.plot:
                plot_metrics(out / METRICS_FILE, out / "loss.png")
            if step % tcfg.save_every == 0 or step == end:
                meta.update(step=step, position=position, elapsed_s=time.perf_counter() - t0)
                save_state(state_path, params, opt_state, meta)
    if bar:
        bar.close()
    if step >= tcfg.steps:
        data = Path(tcfg.data)
        export(out / "final", cfg, params,
               data if (data / "tokenizer.model").exists() or tok_src is None else tok_src)
        if tcfg.plot:
            plot_metrics(out / METRICS_FILE, out / "loss.png")
    return last


def export(path: Path, cfg: ModelConfig, params: dict, tokenizer_dir: Path | None = None) -> None:
    """Save the packed model as an HF folder, copying the tokenizer files of `tokenizer_dir`."""
    from bitnet_jax.formats.hf import save_hf

    save_hf(path, cfg, pack_params(params, cfg), packed=True)
    for name in _TOKENIZER_FILES:
        if tokenizer_dir is not None and (tokenizer_dir / name).exists():
            (path / name).write_bytes((tokenizer_dir / name).read_bytes())


def plot_metrics(metrics: str | Path, png: str | Path) -> None:
    """Plot train loss (and held-out loss) against tokens seen into a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
    ev = [r for r in rows if "valid_loss" in r]
    if ev:
        ax.plot([r["tokens"] for r in ev], [r["valid_loss"] for r in ev], "o-", label="held-out")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def train_main(argv: list[str] | None = None) -> int:
    """`bitnet-jax train --config configs/train-<name>.json [--init-from PATH] [--field=value]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="bitnet-jax train", description="Quantisation-aware training of a BitNet model.",
        epilog="Any run-config field can be overridden as --field=value (e.g. --steps=200).",
        allow_abbrev=False)  # so --no/--stop are never taken for our own flags
    parser.add_argument("--config", required=True, help="run config (configs/train-*.json)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps in all (rerun the command to resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    try:
        tcfg = load_train_config(args.config, rest)
        last = train(tcfg, args.stop_after, progress=not args.no_progress)
    except BitNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(last))
    return 0


# ================================================================================================
# Perplexity


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


def perplexity_main(argv: list[str] | None = None) -> int:
    """`bitnet-jax perplexity --model PATH --text FILE [--context N] [--stride S]`."""
    import argparse

    from bitnet_jax.formats.loader import load_model

    parser = argparse.ArgumentParser(prog="bitnet-jax perplexity",
                                     description="Strided perplexity of a model on a text file.")
    parser.add_argument("--model", required=True, help="HF folder or GGUF file")
    parser.add_argument("--text", required=True, help="UTF-8 text file")
    parser.add_argument("--context", type=int, default=None,
                        help="window length (default min(max_position_embeddings, 1024))")
    parser.add_argument("--stride", type=int, default=None, help="window step (default context/2)")
    parser.add_argument("--policy", default="cpu", help="precision preset (cpu, gpu, train)")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, policy=args.policy)
        if model.tokenizer is None:
            raise ConfigError(f"{args.model} has no tokenizer; perplexity needs one to read text.")
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"text file {args.text} cannot be read as UTF-8 ({exc}).") from None
        tok = model.tokenizer
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
        if len(ids) < 2:
            raise ConfigError(f"text file {args.text} holds fewer than two tokens.")
        context = args.context or min(model.config.max_position_embeddings, 1024)
        stride = args.stride or max(context // 2, 1)
        if not 2 <= context <= model.config.max_position_embeddings:
            raise ConfigError(f"--context={context} must be in [2, "
                              f"{model.config.max_position_embeddings}] for this model.")
        if not 1 <= stride <= context:
            raise ConfigError(f"--stride={stride} must be in [1, --context={context}].")
        t0 = time.perf_counter()
        total, count = strided_nll(model.params, np.asarray(ids), model.config, model.policy,
                                   context, stride)
    except BitNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"model": str(args.model), "tokens": len(ids), "scored": count,
                      "context": context, "stride": stride, "nll": total / count,
                      "perplexity": math.exp(total / count),
                      "bits_per_token": total / count / math.log(2),
                      "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def _window_nll(params, window, cfg, policy):
    logits = forward(params, window[:, :-1], cfg, policy)
    return _token_nll(logits, window[:, 1:])


# ================================================================================================
# Private helpers


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) [B, T] from float32 logits [B, T, V] (log-softmax in float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _nll(params, batch, cfg, policy):
    logits = forward(params, batch[:, :-1], cfg, policy)  # [B, T, V]
    nll = _token_nll(logits, batch[:, 1:])
    return nll.sum(), jnp.float32(nll.size)


def _rng(seed: int) -> list[int]:
    return [int(x) for x in np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)))]


def _flatten(tree) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _unflatten(like, arrays: dict, prefix: str, path: Path):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    out = []
    for p, ref in leaves:
        key = prefix + jax.tree_util.keystr(p)
        if key not in arrays:
            raise CheckpointError(f"training state {path} lacks {key}; it belongs to another "
                                  "model or optimiser: use a fresh `out` folder.")
        arr = arrays[key]
        if arr.shape != np.shape(ref) or arr.dtype != np.asarray(ref).dtype:
            raise CheckpointError(f"training state {path}: {key} has {arr.dtype}{arr.shape}, "
                                  f"expected {np.asarray(ref).dtype}{np.shape(ref)}; use a fresh "
                                  "`out` folder.")
        out.append(jnp.asarray(arr))
    return jax.tree.unflatten(treedef, out)


def _bar(progress: bool, step: int, total: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=step, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True)


def _field_type(name: str):
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints:
        raise KeyError(name)
    return hints[name]


def _accepts(ftype, py: type) -> bool:
    args = typing.get_args(ftype) if isinstance(ftype, types.UnionType) or typing.get_origin(
        ftype) is typing.Union else (ftype,)
    return py in args


def _check_type(name: str, value, ftype, source: str):
    """Return value coerced to the field type (int -> float allowed) or raise ConfigError."""
    if value is None and _accepts(ftype, type(None)):
        return None
    if isinstance(value, bool):
        if _accepts(ftype, bool):
            return value
    elif isinstance(value, int) and _accepts(ftype, int):
        return value
    elif isinstance(value, (int, float)) and _accepts(ftype, float):
        return float(value)
    elif isinstance(value, str) and _accepts(ftype, str):
        return value
    elif isinstance(value, dict) and _accepts(ftype, dict):
        return value
    want = " or ".join(getattr(t, "__name__", str(t)).replace("NoneType", "null")
                       for t in (typing.get_args(ftype) or (ftype,)))
    raise ConfigError(f"{source}: field {name}={value!r} must be {want}.")


def _validate(tcfg: TrainConfig) -> TrainConfig:
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "save_every",
                 "log_every"):
        if getattr(tcfg, name) < 1:
            raise ConfigError(f"run config field {name}={getattr(tcfg, name)} must be >= 1.")
    for name in ("lr", "init_std"):
        if not getattr(tcfg, name) > 0:
            raise ConfigError(f"run config field {name}={getattr(tcfg, name)} must be positive.")
    for name in ("warmup_steps", "eval_tokens"):
        if getattr(tcfg, name) < 0:
            raise ConfigError(f"run config field {name}={getattr(tcfg, name)} must be >= 0.")
    if not 0 <= tcfg.min_lr_ratio <= 1:
        raise ConfigError(f"run config field min_lr_ratio={tcfg.min_lr_ratio} must be in [0, 1].")
    get_policy(tcfg.policy)
    return tcfg


if __name__ == "__main__":
    raise SystemExit(train_main(sys.argv[1:]))
