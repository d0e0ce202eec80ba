"""What a run starts from, keeps and ends with: initial params, the state file, the exported model.

  state file  <out>/state.npz: params, optimiser state, step, position, rng and run metadata in
              one file, replaced atomically (temp file in the same folder, fsync, os.replace), so
              a crash at any moment leaves the previous state readable; resuming continues
              bit-identically (same XLA program, same inputs)
  init        fresh params (init_std normal) or a loaded BitNet whose ternary matrices t·σ are
              rescaled to re-quantise to themselves (latent_from_ternary)
  export      the packed model as an HF folder, with the corpus' tokenizer files beside it
"""

from __future__ import annotations

import contextlib
import json
import os
import typing
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.errors import CheckpointError, ConfigError
from bitnet_jax.formats.hf import save_hf
from bitnet_jax.formats.loader import load_model
from bitnet_jax.model.config import ModelConfig, from_hf, load_config
from bitnet_jax.model.params import BITLINEAR_PATHS, init_params, pack_params
from bitnet_jax.model.policy import Policy
from bitnet_jax.train.config import TrainConfig

STATE_FILE = "state.npz"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def save_state(path: str | Path, params: dict, opt_state, meta: dict) -> None:
    """Write params, optimiser state and metadata (step, position, rng, ...) to one .npz file.

    Leaves are stored under their key paths ("params['layers']['mlp']['up_proj']"). The bytes go
    to a temporary file in the same folder, are flushed to disk, then os.replace()d over `path`:
    readers see the old state or the new one, never a half-written file, even if this process
    dies mid-write. A failed write removes its temporary file.
    """
    path = Path(path)
    arrays = {"params" + k: v for k, v in _flatten(params).items()}
    arrays.update({"opt" + k: v for k, v in _flatten(opt_state).items()})
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def load_state(path: str | Path, params_like: dict, opt_like) -> tuple[dict, typing.Any, dict]:
    """Read a state file into pytrees shaped like `params_like` / `opt_like`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"training state {path} cannot be read ({exc}); delete it to "
                              "start over.") from None
    params = _unflatten(params_like, arrays, "params", path)
    opt_state = _unflatten(opt_like, arrays, "opt", path)
    return params, opt_state, meta


def model_for(tcfg: TrainConfig, policy: Policy) -> tuple[ModelConfig, dict, Path | None]:
    """(cfg, latent params, tokenizer source folder or None) for a run."""
    if tcfg.init_from:
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


def export(path: Path, cfg: ModelConfig, params: dict, tokenizer_dir: Path | None = None) -> None:
    """Save the packed model as an HF folder, copying the tokenizer files of `tokenizer_dir`."""
    save_hf(path, cfg, pack_params(params, cfg), packed=True)
    for name in TOKENIZER_FILES:
        if tokenizer_dir is not None and (tokenizer_dir / name).exists():
            (path / name).write_bytes((tokenizer_dir / name).read_bytes())


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


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
