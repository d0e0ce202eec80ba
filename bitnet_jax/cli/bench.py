"""`bitnet-jax bench`: prefill and decode speed on random prompts, after a warm-up run.

The report goes to stderr, or, with --json, one JSON line to stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

from bitnet_jax.cli import common
from bitnet_jax.errors import BitNetError
from bitnet_jax.formats.gguf.reader import read_gguf
from bitnet_jax.model.config import load_config
from bitnet_jax.runtime.benchmark import benchmark, check_fits
from bitnet_jax.runtime.generate import MAX_BATCH  # larger batches would run as several calls
from bitnet_jax.cli.parser import CommandParser


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="bitnet-jax bench",
        description="Time prefill and decode on random prompts after a warm-up run (compile "
                    "time is reported separately), as the medians of --repetitions runs. "
                    "--prompt-tokens + --gen-tokens must fit in the model's context.")
    common.add_model_args(parser)
    parser.add_argument("--prompt-tokens", type=common.positive_int, default=128, metavar="N",
                        help="tokens in each random prompt (default 128)")
    parser.add_argument("--gen-tokens", type=common.positive_int, default=64, metavar="N",
                        help="tokens to generate per prompt (default 64)")
    parser.add_argument("--batch", type=_batch, default=1, metavar="B",
                        help=f"prompts run together, 1 to {MAX_BATCH} (default 1)")
    parser.add_argument("--repetitions", "-r", type=common.positive_int, default=3, metavar="N",
                        help="timed runs after the warm-up; the report gives their medians "
                             "(default 3)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line to stdout instead of the report")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    path = common.resolve_model(args.model)
    # Checked here before the weights load, when the header tells the context cheaply; the
    # runtime's benchmark() runs the same check_fits after loading in any case.
    context = _peek_context(path)
    if context is not None:
        check_fits(args.prompt_tokens, args.gen_tokens, context)
    model = common.load_model_from_args(args)
    policy = common.run_policy(args, model)
    stats = benchmark(model, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                      batch=args.batch, backend=args.backend, policy=policy,
                      repetitions=args.repetitions)
    stats["lm_head"] = policy.lm_head
    stats["kv_cache"] = policy.kv_cache.name
    stats["model"] = str(model.source or path)
    stats["peak_rss_mb"] = _peak_rss_mb()
    if args.json:
        print(json.dumps(stats), flush=True)
    else:
        print(f"model {stats['model']} on {stats['device']} (jax {stats['jax_version']}), "
              f"batch {stats['batch']}, median of {stats['repetitions']} runs\n"
              f"prefill: {stats['prompt_tokens']} tokens/row, "
              f"{stats['prefill_tokens_per_s']:.1f} tokens/s\n"
              f"decode:  {stats['gen_tokens']} tokens/row, "
              f"{stats['decode_tokens_per_s']:.1f} tokens/s\n"
              f"compile: {stats['compile_s']:.1f} s, peak RSS {stats['peak_rss_mb']:.0f} MiB",
              file=sys.stderr)
    return 0


def _batch(text: str) -> int:
    value = common.positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_BATCH}, "
                                         f"got {text!r}")
    return value


def _peek_context(path: Path) -> int | None:
    """The model's context length from its header or config.json, without loading weights;
    None when it cannot be read cheaply (loading then reports the problem)."""
    try:
        if path.is_dir() or path.name == "config.json":
            return load_config(path).max_position_embeddings
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
        meta = read_gguf(path).metadata
        value = meta.get(f"{meta.get('general.architecture')}.context_length")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
    except (BitNetError, OSError, ValueError):
        return None


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB
