"""`load_tokenizer_files(path)`: read a tokenizer from a tokenizer file or an HF folder.

GGUF files are not read here: this package does not depend on `bitnet_jax.formats`, which owns
the GGUF reader. `bitnet_jax.load_tokenizer(path)` (bitnet_jax/formats/tokenizer.py) reads GGUF
files itself and hands every other path to this function.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bitnet_jax.errors import TokenizerError
from bitnet_jax.tokenizer._core import Tokenizer
from bitnet_jax.tokenizer._files import (
    hf_json_file, sentencepiece_file, tiktoken_file, vocab_merges_files,
)

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")
# The names whose presence makes a folder a tokenizer folder (see `_load_dir`).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json")


def load_tokenizer_files(path: str | Path) -> Tokenizer:
    """Load a tokenizer from the tokenizer files a model ships (no GGUF).

    Args:
      path: a SentencePiece or tiktoken `tokenizer.model`; an HF `tokenizer.json`; a
        `vocab.json` (with `merges.txt` beside it); or a folder holding one of those.
        `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json` and
        `generation_config.json` next to the file add the chat template, special tokens and
        added tokens.

    Returns:
      The Tokenizer.

    Raises:
      TokenizerError: a missing or unreadable path, an unsupported tokenizer, or a GGUF file
        (or a folder whose only tokenizer is a .gguf): use `bitnet_jax.load_tokenizer` for those.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(
            f"tokenizer path {path} does not exist; pass a .gguf file, a tokenizer file or an "
            "HF folder."
        )
    if path.is_dir():
        return _load_dir(path)
    head = _head(path)
    if head[:4] == b"GGUF":
        raise TokenizerError(
            f"{path} is a GGUF file; load its tokenizer with bitnet_jax.load_tokenizer, which "
            "reads GGUF (bitnet_jax.tokenizer only reads tokenizer files)."
        )
    cfg = _hf_config(path.parent)
    if path.name == "merges.txt":
        return vocab_merges_files(path.parent / "vocab.json", path, cfg)
    if path.suffix == ".json":
        if path.name == "vocab.json":
            return vocab_merges_files(path, path.parent / "merges.txt", cfg)
        return hf_json_file(path, cfg)
    if _looks_tiktoken(head):
        return tiktoken_file(path, cfg)
    return sentencepiece_file(path, cfg)


def _load_dir(path: Path) -> Tokenizer:
    cfg = _hf_config(path)
    model_file = path / "tokenizer.model"
    tiktoken_model = model_file.exists() and _looks_tiktoken(_head(model_file))
    if model_file.exists() and not tiktoken_model:
        # The SentencePiece file is what HF's tokenizer.json was converted from; prefer it.
        return sentencepiece_file(model_file, cfg)
    if (path / "tokenizer.json").exists():
        return hf_json_file(path / "tokenizer.json", cfg)
    if tiktoken_model:
        return tiktoken_file(model_file, cfg)
    if (path / "vocab.json").exists():
        return vocab_merges_files(path / "vocab.json", path / "merges.txt", cfg)
    if len(list(path.glob("*.gguf"))) == 1:
        raise TokenizerError(
            f"{path} holds no tokenizer files, only a .gguf; load it with "
            "bitnet_jax.load_tokenizer, which reads GGUF."
        )
    raise TokenizerError(
        f"{path} holds no tokenizer: expected tokenizer.json, tokenizer.model, vocab.json + "
        "merges.txt or a single .gguf file."
    )


def _hf_config(folder: Path) -> dict[str, Any]:
    """Settings from the HF side files of a folder, flattened into one dict.

    Keys: bos_token / eos_token / unk_token / pad_token (text), add_bos_token, add_eos_token,
    chat_template, added_tokens ({id: text}), added_tokens_decoder ({id: {content, special}}),
    extra_eos_ids (generation_config.json eos_token_id).
    """
    cfg: dict[str, Any] = {}
    special_map = _json_or_empty(folder / "special_tokens_map.json")
    config = _json_or_empty(folder / "tokenizer_config.json")
    for source in (special_map, config):
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = source.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                cfg[name] = value
    for name in ("add_bos_token", "add_eos_token"):
        if isinstance(config.get(name), bool):
            cfg[name] = config[name]
    if isinstance(config.get("added_tokens_decoder"), dict):
        cfg["added_tokens_decoder"] = config["added_tokens_decoder"]
    added = _json_or_empty(folder / "added_tokens.json")
    if added:
        cfg["added_tokens"] = {int(v): k for k, v in added.items()}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif not template:
        template = _json_or_empty(folder / "chat_template.json").get("chat_template")
    if isinstance(template, str) and template:
        cfg["chat_template"] = template
    eos = _json_or_empty(folder / "generation_config.json").get("eos_token_id")
    if eos is not None:
        cfg["extra_eos_ids"] = tuple(eos) if isinstance(eos, list) else (eos,)
    return cfg


def _json_or_empty(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not readable JSON ({e}); fix or remove it.") from None
    return data if isinstance(data, dict) else {}


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


def _looks_tiktoken(head: bytes) -> bool:
    first = head.split(b"\n", 1)[0]
    return bool(_TIKTOKEN_LINE.match(first))
