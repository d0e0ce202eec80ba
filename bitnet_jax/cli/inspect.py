"""`bitnet-jax inspect FILE`: architecture, config, tensor table and tokenizer of a GGUF file.

Imported as bitnet_jax.cli.inspect, so it does not shadow the standard library's `inspect`
(never run the files of this folder as scripts).
"""

from __future__ import annotations


from bitnet_jax.formats.gguf.describe import describe
from bitnet_jax.formats.gguf.reader import read_gguf
from bitnet_jax.cli.parser import CommandParser


def build_parser() -> CommandParser:
    parser = CommandParser(prog="bitnet-jax inspect",
                                     description="Show what a GGUF file holds.")
    parser.add_argument("file", metavar="FILE", help=".gguf file")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    print(describe(read_gguf(args.file)))
    return 0
