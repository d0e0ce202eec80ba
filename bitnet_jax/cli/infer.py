"""`bitnet-jax infer` (alias `generate`): stream a continuation of a prompt to stdout.

stdout carries only the generated text (and a final newline); the statistics line goes to
stderr.
"""

from __future__ import annotations

import argparse
import sys

from bitnet_jax.cli import common
from bitnet_jax.errors import BitNetError
from bitnet_jax.runtime.generate import stream
from bitnet_jax.cli.parser import CommandParser


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="bitnet-jax infer",
        description="Stream a continuation of a prompt to stdout (statistics go to stderr).")
    common.add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT",
                        help="the prompt text; - reads it from stdin")
    source.add_argument("--prompt-file", metavar="PATH",
                        help="read the prompt from a UTF-8 file (one final newline is dropped)")
    common.add_sampling_args(parser)
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the model's chat template as a user turn")
    parser.add_argument("--system", metavar="TEXT", help="system message (needs --chat)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when this text appears (repeatable)")
    parser.add_argument("--truncate", action="store_true",
                        help="when the prompt is too long for the context, keep its last tokens "
                        "(default: refuse)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.system is not None and not args.chat:
        raise BitNetError("--system only applies to chat prompts; add --chat.")
    if args.system is not None:
        common.check_utf8(args.system, "--system")
    for text in args.stop:
        if not text:
            raise BitNetError("--stop needs a non-empty text.")
        common.check_utf8(text, "--stop")
    prompt = read_prompt(args)
    model = common.load_model_from_args(args)
    pieces = stream(model, prompt, max_new_tokens=args.max_tokens,
                    sampling=common.sampling_params(args), backend=args.backend, chat=args.chat,
                    system=args.system, stop=args.stop or None, truncate=args.truncate,
                    policy=common.run_policy(args, model))
    text = print_stream(pieces)
    if text and not text.endswith("\n"):
        print(flush=True)
    print_stats(pieces.result)
    return 0


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from --prompt TEXT, --prompt - (stdin) or --prompt-file PATH."""
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return common.strip_final_newline(common.read_stdin("the prompt on stdin"))
        return common.strip_final_newline(
            common.read_text_file(args.prompt_file, "--prompt-file"))
    if args.prompt == "-":
        return common.strip_final_newline(common.read_stdin("the prompt on stdin (--prompt -)"))
    return common.check_utf8(args.prompt, "--prompt", "pass UTF-8 text or --prompt-file PATH")


def print_stream(pieces) -> str:
    """Write each text piece to stdout as it arrives; return the whole text."""
    parts = []
    for piece in pieces:
        parts.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    return "".join(parts)


def print_stats(result) -> None:
    t = result.timings
    prefill_rate = result.prompt_tokens / t.prefill_s if t.prefill_s else 0.0
    print(f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, "
          f"prefill {prefill_rate:.1f} tok/s, decode {t.tokens_per_s:.1f} tok/s, "
          f"compile {t.compile_s:.1f} s]", file=sys.stderr)
