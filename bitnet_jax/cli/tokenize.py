"""`bitnet-jax tokenize`: print the token ids of a text (and, with --verbose, each token)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def tokenize_main(argv: Sequence[str] | None = None) -> int:
    """`bitnet-jax tokenize --model PATH --text TEXT [--verbose] [--add-special] [--parse-special]`

    Prints the ids space-separated on one line; with --verbose, then one `id<TAB>repr(piece)` line
    per token. A bad path or file raises TokenizerError for the CLI layer to print.

    Returns:
      The exit status, 0.
    """
    from bitnet_jax.tokenizer._load import load_tokenizer

    parser = argparse.ArgumentParser(prog="bitnet-jax tokenize",
                                     description="Show how a model's tokenizer splits a text.")
    parser.add_argument("--model", required=True,
                        help="GGUF file, tokenizer.model/.json, vocab.json or HF folder")
    parser.add_argument("--text", required=True, help="the text to tokenize")
    parser.add_argument("--verbose", action="store_true",
                        help="also print one id and piece per line")
    parser.add_argument("--add-special", action="store_true",
                        help="add BOS/EOS as the model's add_bos/add_eos flags say")
    parser.add_argument("--parse-special", action="store_true",
                        help="turn control-token text such as <|eot_id|> into its id")
    args = parser.parse_args(argv)
    tok = load_tokenizer(args.model)
    ids = tok.encode(args.text, add_special=args.add_special, parse_special=args.parse_special)
    print(" ".join(str(i) for i in ids))
    if args.verbose:
        for i in ids:
            print(f"{i}\t{tok.token_to_piece(i)!r}")
    return 0
