"""`bitnet-jax tokenize`: show how a model's tokenizer encodes a text, or decode token ids.

Encoding prints the ids space-separated on one line; with --verbose, then one `id<TAB>piece`
line per token. --decode prints the text of the given ids (control tokens such as BOS are
dropped, as in generation); with --verbose, then the same per-token lines.
"""

from __future__ import annotations

import argparse
import re

from bitnet_jax.cli import common
from bitnet_jax.formats.tokenizer import load_tokenizer
from bitnet_jax.cli.parser import CommandParser


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="bitnet-jax tokenize",
        description="Show how a model's tokenizer encodes a text into token ids, or decode "
                    "token ids back into text.")
    common.add_model_argument(
        parser, help="GGUF file, tokenizer.model/.json, vocab.json or HF folder (default: the "
                     "bundled model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="TEXT", help="the text to encode; - reads stdin")
    source.add_argument("--file", metavar="PATH", help="encode the contents of a UTF-8 file")
    source.add_argument("--decode", metavar="IDS", type=_token_ids,
                        help='decode token ids, e.g. "1 15043 3186" (commas also work)')
    parser.add_argument("--verbose", action="store_true",
                        help="also print one id and piece per line")
    parser.add_argument("--add-special", action="store_true",
                        help="add BOS/EOS as the model's add_bos/add_eos flags say")
    parser.add_argument("--parse-special", action="store_true",
                        help="turn control-token text such as <|eot_id|> into its id")
    return parser


def main(argv: list[str]) -> int:
    """Run `bitnet-jax tokenize`; a bad path or file raises TokenizerError (BitNetError)."""
    args = build_parser().parse_args(argv)
    if args.decode is not None:
        ids = args.decode
        tok = _load(args.model)
        print(tok.decode(ids))
    else:
        text = _read_text(args)
        tok = _load(args.model)
        ids = tok.encode(text, add_special=args.add_special, parse_special=args.parse_special)
        print(" ".join(str(i) for i in ids))
    if args.verbose:
        for i in ids:
            print(f"{i}\t{tok.token_to_piece(i)!r}")
    return 0


def _load(model: str | None):
    return load_tokenizer(common.resolve_model(model))


def _read_text(args: argparse.Namespace) -> str:
    if args.file is not None:
        return common.read_text_file(args.file, "--file")
    if args.text == "-":
        return common.read_stdin("the text on stdin (--text -)")
    return common.check_utf8(args.text, "--text", "pass UTF-8 text or --file PATH")


def _token_ids(text: str) -> list[int]:
    parts = [p for p in re.split(r"[\s,]+", text.strip().strip("[]")) if p]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(
            f'expected token ids (integers >= 0) such as "1 15043 3186", got {text!r}')
    return ids
