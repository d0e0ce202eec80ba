"""`load_tokenizer(path)` for every file a model ships, GGUF included (`bitnet_jax.load_tokenizer`).

GGUF files are read here, with bitnet_jax's own GGUF parser (it reads bitnet.cpp's I2_S files,
type 36, which the gguf package rejects, and the 128256-token llama3 vocabulary in about a
second); every other path goes to `bitnet_jax.tokenizer.load_tokenizer_files`. The tokenizer
package knows nothing of GGUF files, so `bitnet_jax.formats` -> `bitnet_jax.tokenizer` is the
only direction of import between the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitnet_jax.errors import GGUFError, TokenizerError
from bitnet_jax.formats.gguf.reader import read_gguf
from bitnet_jax.tokenizer import (
    TOKENIZER_FILES, Tokenizer, from_gguf_metadata, load_tokenizer_files,
)

__all__ = ["load_tokenizer", "read_gguf_tokenizer_metadata"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from any of the files BitNet models ship.

    Args:
      path: a `.gguf` file (its `tokenizer.ggml.*` metadata); a SentencePiece or tiktoken
        `tokenizer.model`; an HF `tokenizer.json`; a `vocab.json` (with `merges.txt` beside it);
        or a folder holding one of those, or holding a single `.gguf` and no tokenizer file.
        `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json` and
        `generation_config.json` next to a tokenizer file add the chat template, special tokens
        and added tokens.

    Returns:
      The Tokenizer.

    Raises:
      TokenizerError: a missing or unreadable path, or a tokenizer that is not supported.
    """
    path = Path(path).expanduser()
    if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    if path.is_file() and _is_gguf(path):
        return from_gguf_metadata(read_gguf_tokenizer_metadata(path))
    return load_tokenizer_files(path)


def read_gguf_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The `tokenizer.*` key/values of a GGUF file as plain Python values.

    Raises:
      TokenizerError: the file is not a readable GGUF ('cannot read GGUF tokenizer metadata: ...').
    """
    try:
        metadata = read_gguf(path).metadata
    except GGUFError as e:
        raise TokenizerError(f"cannot read GGUF tokenizer metadata: {e}") from None
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror or e}.") from None
