"""Run configs: TrainConfig, configs/train-*.json files, `--field=value` overrides, validation.

Needs no optax: a run config can be read and checked without the [train] extra.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from bitnet_jax.errors import ConfigError
from bitnet_jax.model.policy import get_policy


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
      plot: write loss.png into the run folder after each evaluation (needs matplotlib; without
        it the run warns once and goes on unplotted).
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
