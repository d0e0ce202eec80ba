"""`bitnet-jax perplexity`: strided perplexity of a model on a UTF-8 text file.

Needs no [train] extra. Prints one JSON line on stdout: tokens, scored tokens, context, stride,
mean NLL (nats), perplexity, bits per token and seconds.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

from bitnet_jax.cli import common
from bitnet_jax.errors import ConfigError
from bitnet_jax.formats.loader import load_model
from bitnet_jax.model.policy import POLICIES
from bitnet_jax.train.perplexity import strided_nll
from bitnet_jax.cli.parser import CommandParser

DEFAULT_CONTEXT = 1024  # capped at the model's max_position_embeddings


def main(argv: list[str]) -> int:
    """`bitnet-jax perplexity [--model PATH] --text FILE [--context N] [--stride S]`.

    Returns:
      0. User errors raise BitNetError; bad arguments (e.g. --stride 0) exit 2 (argparse).
    """
    parser = CommandParser(prog="bitnet-jax perplexity",
                                     description="Strided perplexity of a model on a text file.")
    common.add_model_argument(parser)
    parser.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    parser.add_argument("--context", type=common.positive_int, default=None, metavar="N",
                        help=f"window length (default min(max_position_embeddings, "
                             f"{DEFAULT_CONTEXT}))")
    parser.add_argument("--stride", type=common.positive_int, default=None, metavar="S",
                        help="window step, 1..context (default context/2)")
    parser.add_argument("--policy", default="cpu", choices=sorted(POLICIES),
                        help="precision preset (default cpu)")
    args = parser.parse_args(argv)

    text = common.read_text_file(args.text, "--text")
    path = common.resolve_model(args.model)
    model = load_model(path, policy=args.policy)
    if model.tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer; perplexity needs one to read text.")
    tok = model.tokenizer
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
    if len(ids) < 2:
        raise ConfigError(f"--text {args.text} holds fewer than two tokens.")
    limit = model.config.max_position_embeddings
    context = args.context or min(limit, DEFAULT_CONTEXT)
    stride = args.stride or max(context // 2, 1)
    if not 2 <= context <= limit:
        raise ConfigError(f"--context={context} must be in [2, {limit}] for this model.")
    if stride > context:
        raise ConfigError(f"--stride={stride} must be in [1, --context={context}].")
    t0 = time.perf_counter()
    total, count = strided_nll(model.params, np.asarray(ids), model.config, model.policy,
                               context, stride)
    print(json.dumps({"model": str(path), "tokens": len(ids), "scored": count,
                      "context": context, "stride": stride, "nll": total / count,
                      "perplexity": math.exp(total / count),
                      "bits_per_token": total / count / math.log(2),
                      "seconds": round(time.perf_counter() - t0, 2)}))
    return 0

