"""End-to-end generation speed: prefill and decode tokens/s through the real engine.

One JSON line per batch size on stdout:

  {"model": ..., "batch": B, "prompt_tokens": ..., "gen_tokens": ...,
   "prefill_tokens_per_s": ..., "decode_tokens_per_s": ..., "prefill_s": ..., "decode_s": ...,
   "compile_s": ..., "backend": ..., "device": ..., "policy": ..., "kernel": ...,
   "jax_version": ...}

Decode is timed on the jitted decode chunks that `generate` runs (greedy, EOS ignored, so every
row produces exactly gen_tokens), after a warm-up run whose compile time is reported apart.

The model is a checkpoint (--model PATH: HF folder or .gguf) or a config with random weights
(--config tiny | bitnet_b1_58-large | any configs/*.json). Random ternary weights are drawn as
2-bit codes straight into the packed layout (bitlinear.py), with no float copy of the matrices.

  python benchmarks/bench_decode.py --config tiny
  python benchmarks/bench_decode.py --config bitnet_b1_58-large --prompt-tokens 64 --gen-tokens 32
  python benchmarks/bench_decode.py --model path/to/model.gguf --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitnet_jax.model.config import ModelConfig, load_config  # noqa: E402
from bitnet_jax.runtime.placement import resolve_device, resolve_policy  # noqa: E402
from bitnet_jax.runtime.benchmark import benchmark  # noqa: E402
from bitnet_jax.formats.loader import Model, load_model  # noqa: E402
from bitnet_jax.model.params import linear_shapes, param_shapes  # noqa: E402


def random_packed_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random inference params: packed ternary projections, float32 embeddings and norms.

    Each 2-bit field is a uniform code in {0, 1, 2} (weights -1, 0, +1) drawn as uint8, and
    σ = sqrt(3 / (2·I)) keeps the output variance near the input's (2/3 of weights are nonzero).
    """
    rng = np.random.default_rng(seed)
    L = cfg.num_hidden_layers
    shapes = param_shapes(cfg)
    params = {"layers": {"self_attn": {}, "mlp": {}}}
    for name in ("embed_tokens", "lm_head"):
        if name in shapes:
            params[name] = jnp.asarray(rng.standard_normal(shapes[name], dtype=np.float32))
    params["norm"] = jnp.ones(shapes["norm"], jnp.float32)
    for name, shape in shapes["layers"].items():
        if isinstance(shape, tuple):
            params["layers"][name] = jnp.ones(shape, jnp.float32)
    for mod in ("self_attn", "mlp"):
        for name, shape in shapes["layers"][mod].items():
            if name.endswith("_norm"):
                params["layers"][mod][name] = jnp.ones(shape, jnp.float32)
    for (mod, name), (o, i) in linear_shapes(cfg).items():
        packed = np.zeros((L, o // 4, i), np.uint8)
        for k in range(4):
            packed |= rng.integers(0, 3, packed.shape, dtype=np.uint8) << np.uint8(2 * k)
        scale = np.full((L,), np.sqrt(3.0 / (2.0 * i)), np.float32)
        params["layers"][mod][name] = {"packed": jnp.asarray(packed), "scale": jnp.asarray(scale)}
    return params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="HF folder or .gguf file")
    source.add_argument("--config", default="tiny",
                        help="configs/ name or config.json path, with random packed weights")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--backend", choices=("cpu", "gpu", "auto"), default="auto")
    parser.add_argument("--kernel", choices=("auto", "xla", "ffi", "pallas"), default="auto",
                        help="ternary matmul implementation (policy.kernel)")
    args = parser.parse_args(argv)

    if args.model:
        model, name = load_model(args.model), args.model
    else:
        cfg = load_config(args.config)
        model, name = Model(cfg, random_packed_params(cfg)), f"random:{args.config}"
    device = resolve_device(args.backend)
    policy = resolve_policy(device, None, model.policy)
    if args.kernel != "auto":
        policy = policy.replace(kernel=args.kernel)
    for batch in args.batch:
        stats = benchmark(model, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                          batch=batch, backend=args.backend, policy=policy)
        print(json.dumps({"model": name, **stats, "kernel": policy.kernel}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
