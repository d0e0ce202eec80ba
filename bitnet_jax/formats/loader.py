"""`load_model`: one entry point for HF folders, GGUF files and llama2.c exports."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import jax

from bitnet_jax.errors import CheckpointError
from bitnet_jax.formats.base import DEFAULT_MODEL, Model  # re-exported: load_model returns it
from bitnet_jax.formats.gguf.load import load_gguf
from bitnet_jax.formats.hf import load_hf
from bitnet_jax.formats.llama2c import is_llama2c, load_llama2c
from bitnet_jax.formats.tokenizer import load_tokenizer
from bitnet_jax.model import sharding
from bitnet_jax.model.policy import Policy, get_policy

__all__ = ["DEFAULT_MODEL", "Model", "load_model"]


def load_model(path: str | Path, policy: Policy | str | None = None, packed: bool = True,
               tokenizer: bool = True, mesh: jax.sharding.Mesh | None = None) -> Model:
    """Load a BitNet (or float Llama) model from a local HF directory or a GGUF file.

    Args:
      path: HF folder (config.json + *.safetensors) or a .gguf file.
      policy: precision policy or preset name ("cpu", "gpu", "train"); default "cpu".
      packed: keep BitLinear weights packed (inference, default) or latent float (fine-tuning).
      tokenizer: attach the tokenizer found beside the weights / in the GGUF metadata.
      mesh: a jax.sharding.Mesh with axes "data" and/or "tensor": shard the params over it
        (model/sharding.py). The file is read into host memory (the CPU device) and each
        leaf then goes straight to its shards, so no accelerator ever holds the whole model;
        on several processes each one places only its own devices' shards.

    Returns:
      Model with .config, .params, .tokenizer.
    """
    if mesh is not None:
        return _load_sharded(path, policy, packed, tokenizer, mesh)
    path = Path(path).expanduser()
    policy = get_policy(policy)
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist; pass an HF folder or a .gguf file.")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return load_gguf(path, policy=policy, packed=packed, tokenizer=tokenizer)
        if path.suffix == ".bin":
            if is_llama2c(path):  # karpathy's llama2.c export, not a pickle
                cfg, params = load_llama2c(path, dtype=policy.param)
                return Model(cfg, params, None, policy, str(path))
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise CheckpointError(
                f"{path} is a pickled checkpoint; bitnet_jax never unpickles: convert it to "
                "safetensors in an HF folder first."
            )
        if path.name == "config.json" or path.suffix == ".safetensors":
            path = path.parent
        else:
            raise CheckpointError(
                f"{path} is neither a GGUF file nor an HF model folder; pass one of those."
            )
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; point to a Hugging Face model folder.")
    cfg, params = load_hf(path, policy=policy, packed=packed)
    tok = None
    if tokenizer:
        tok = _hf_tokenizer(path)
    return Model(cfg, params, tok, policy, str(path))


def _load_sharded(path, policy, packed: bool, tokenizer: bool, mesh) -> Model:
    sharding.auto_mesh(mesh)  # a malformed mesh fails before the file is read
    host = _host_device()
    with jax.default_device(host) if host is not None else contextlib.nullcontext():
        model = load_model(path, policy, packed, tokenizer)
    # Hand the only reference to shard_params, which frees each host leaf once it is placed.
    held = [model.params]
    model = dataclasses.replace(model, params={})
    return dataclasses.replace(model, params=sharding.shard_params(held.pop(), model.config,
                                                                   mesh))


def _host_device():
    """This process's CPU device (host memory), or None when JAX has no CPU backend."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def _hf_tokenizer(path: Path):
    names = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if not any((path / n).exists() for n in names):
        return None
    return load_tokenizer(path)
