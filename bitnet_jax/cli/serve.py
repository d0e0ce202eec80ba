"""`bitnet-jax serve`: the OpenAI-compatible HTTP server (bitnet_jax/server, [serve] extra).

Binds first (a busy port fails at once), loads the model, then serves while the engine warms
up; one line `bitnet-jax serve: ready at URL` goes to stderr when requests are taken.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path

from bitnet_jax.cli import common
from bitnet_jax.cli.parser import CommandParser
from bitnet_jax.errors import BitNetError
from bitnet_jax.runtime.scheduler import Engine

EXTRA = ("starlette", "uvicorn", "pydantic", "prometheus_client")
API_KEY_ENV = "BITNET_JAX_API_KEY"


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="bitnet-jax serve",
        description="Serve a model over HTTP with OpenAI's API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics). Needs the [serve] "
                    "extra.")
    common.add_model_args(parser)
    parser.add_argument("--alias", metavar="NAME",
                        help="model id clients name (default: the model file's stem)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=_port, default=8080,
                        help="TCP port (default 8080; 0 picks a free one)")
    parser.add_argument("--slots", type=common.positive_int, default=8, metavar="N",
                        help="requests decoded together (rounded up to 1, 2, 4, ..., 64; "
                        "default 8)")
    parser.add_argument("--ctx-size", type=common.positive_int, metavar="N",
                        help="KV cache length per slot: prompt + generated tokens (default: the "
                        "model's context)")
    parser.add_argument("--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV),
                        help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}; "
                        "none: no key)")
    parser.add_argument("--timeout", type=_seconds, default=600.0, metavar="S",
                        help="per-request time limit in seconds, queueing included (default "
                        "600)")
    parser.add_argument("--max-queue", type=common.positive_int, default=1024, metavar="N",
                        help="requests that may wait for a slot; beyond it 429 (default 1024)")
    parser.add_argument("--drain-timeout", type=_seconds, default=30.0, metavar="S",
                        help="on SIGTERM, seconds to let requests in flight finish (default 30)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise BitNetError(f"`bitnet-jax serve` needs the [serve] extra ({', '.join(missing)} "
                          "missing); install it with `pip install \"bitnet-jax[serve]\"`.")
    if (args.coordinator is not None or (args.num_processes or 1) > 1
            or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        # Every process would have to follow process 0's engine steps in lockstep, and the
        # requests reach process 0 only: not built. One host's devices can be used in full.
        raise BitNetError("`bitnet-jax serve` runs on one host; drop --coordinator/"
                          "--num-processes and use --tensor-parallel/--data-parallel over this "
                          "host's devices, or run one server per host behind a load balancer.")
    if args.api_key is not None and not args.api_key.strip():
        raise BitNetError("--api-key is empty; pass a non-empty key or leave it out.")
    # Imported once the extra is known to be there, so its absence is the one line above.
    # Deferred: uvicorn and starlette come with the [serve] extra.
    from bitnet_jax.server import run
    path = common.resolve_model(args.model)
    sock = run.bind(args.host, args.port)
    try:
        model = common.load_model_from_args(args)
        engine = Engine(model, slots=args.slots, context=args.ctx_size, backend=args.backend,
                        policy=common.run_policy(args, model), max_queue=args.max_queue)
        name = args.alias or path.stem or Path(path).name
        return run.serve(model, engine, name=name, sock=sock, api_key=args.api_key,
                         timeout=args.timeout, drain_timeout=args.drain_timeout)
    finally:
        sock.close()


def _port(text: str) -> int:
    value = common.non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value
