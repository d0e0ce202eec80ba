"""`bitnet-jax chat`: a multi-turn chat in the terminal.

Replies stream to stdout; the prompt marker and notes go to stderr. /reset clears the
conversation, /exit or Ctrl-D quits, and Ctrl-C during a reply stops that reply but keeps the
session (Ctrl-C at the prompt quits).
"""

from __future__ import annotations

import sys

from bitnet_jax.cli import common
from bitnet_jax.cli.infer import print_stream
from bitnet_jax.cli.main import error_message
from bitnet_jax.errors import CheckpointError, GenerationError
from bitnet_jax.runtime.generate import stream
from bitnet_jax.cli.parser import CommandParser


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="bitnet-jax chat",
        description="Chat in the terminal. /reset clears the conversation; /exit or Ctrl-D "
                    "quits; Ctrl-C stops a reply.")
    common.add_model_args(parser)
    common.add_sampling_args(parser)
    parser.add_argument("--system", metavar="TEXT", help="system message for the conversation")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.system is not None:
        common.check_utf8(args.system, "--system")
    model = common.load_model_from_args(args)
    if model.tokenizer is None:
        raise CheckpointError(f"{model.source} has no tokenizer; chat needs one.")
    sampling = common.sampling_params(args)
    policy = common.run_policy(args, model)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = _read_line()
        except UnicodeDecodeError:
            print("error: that line is not valid UTF-8; type it again.", file=sys.stderr)
            continue
        if not line or line.strip() == "/exit":
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        turn = messages + [{"role": "user", "content": line}]
        try:
            pieces = stream(model, turn, max_new_tokens=args.max_tokens, sampling=sampling,
                            backend=args.backend, policy=policy)
            reply = print_stream(pieces)
        except GenerationError as exc:  # e.g. the conversation outgrew the context
            print(f"error: {error_message(exc)} (/reset starts a new conversation)",
                  file=sys.stderr)
            continue
        except KeyboardInterrupt:  # stop a runaway reply, keep the session
            print("\n(reply interrupted; it is not kept in the conversation)", file=sys.stderr)
            continue
        print(flush=True)
        messages = turn + [{"role": "assistant", "content": reply}]
        if pieces.result.finish_reason == "context_full":
            print("(the context is full; /reset to start over)", file=sys.stderr)


def _read_line() -> str:
    """One line of stdin ('' at the end), decoded as strict UTF-8."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a replaced sys.stdin (tests, embedding)
        return sys.stdin.readline()
    return buffer.readline().decode("utf-8")
