"""`bitnet-jax convert SRC DST`: write an HF BitNet/Llama folder or a GGUF file as GGUF.

The encodings and what each writes are described in bitnet_jax/formats/gguf/write.py. The
output is written to DST.partial and renamed when complete, so a failed run leaves no DST.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from bitnet_jax.errors import BitNetError
from bitnet_jax.formats.gguf.write import QTYPES, write_model_gguf
from bitnet_jax.formats.loader import load_model
from bitnet_jax.cli.parser import CommandParser


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="bitnet-jax convert",
        description="Convert an HF BitNet/Llama folder or a GGUF file to GGUF.")
    parser.add_argument("src", metavar="SRC", help="HF model folder or .gguf file")
    parser.add_argument("dst", metavar="DST", help="output .gguf file (its folder must exist)")
    parser.add_argument("--type", dest="qtype", choices=QTYPES, default="tq2_0",
                        help="encoding of the linear weights (default tq2_0)")
    parser.add_argument("--name", help="general.name to store (default: DST's file name)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    _check_output(src, dst, args.dst)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # restored on exit
        model = load_model(src, packed=True)
        try:
            arch = write_model_gguf(model, dst, args.qtype, args.name,
                                    progress=sys.stderr.isatty())
        except OSError as exc:  # disk full, no permission, ...
            raise BitNetError(f"cannot write {args.dst} ({exc.strerror or exc}); nothing was "
                              "written.") from None
    size = dst.stat().st_size
    print(f"wrote {dst} ({size / 1e6:.1f} MB, architecture {arch}, {args.qtype} linear weights"
          f"{', with tokenizer' if model.tokenizer is not None else ', no tokenizer'})")
    return 0


def _check_output(src: Path, dst: Path, shown: str) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    folder = dst.parent
    if not folder.exists():
        raise BitNetError(f"the output folder {folder} of {shown} does not exist; create it "
                          "first or choose another DST.")
    if not folder.is_dir():
        raise BitNetError(f"{folder} is not a folder, so {shown} cannot be written there.")
    if dst.is_dir():
        raise BitNetError(f"{shown} is a folder; give the output .gguf file's path as DST.")
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise BitNetError(f"{shown} is the source file; choose a different output path.")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)
