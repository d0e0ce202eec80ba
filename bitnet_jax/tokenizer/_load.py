"""`load_tokenizer(path)`: read a tokenizer from a GGUF file, a tokenizer file or an HF folder."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bitnet_jax.errors import TokenizerError
from bitnet_jax.tokenizer import _files
from bitnet_jax.tokenizer._core import Tokenizer

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from any of the files BitNet models ship.

    Args:
      path: a `.gguf` file (its `tokenizer.ggml.*` metadata); a SentencePiece or tiktoken
        `tokenizer.model`; an HF `tokenizer.json`; a `vocab.json` (with `merges.txt` beside it);
        or a folder holding one of those. `tokenizer_config.json`, `special_tokens_map.json`,
        `added_tokens.json` and `generation_config.json` next to the file add the chat template,
        special tokens and added tokens.

    Returns:
      The Tokenizer.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(
            f"tokenizer path {path} does not exist; pass a .gguf file, a tokenizer file or an "
            "HF folder."
        )
    if path.is_dir():
        return _load_dir(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"GGUF":
        return Tokenizer.from_gguf_metadata(read_gguf_tokenizer_metadata(path))
    cfg = _hf_config(path.parent)
    if path.name == "merges.txt":
        return _files.vocab_merges_files(path.parent / "vocab.json", path, cfg)
    if path.suffix == ".json":
        if path.name == "vocab.json":
            return _files.vocab_merges_files(path, path.parent / "merges.txt", cfg)
        return _files.hf_json_file(path, cfg)
    if _looks_tiktoken(head):
        return _files.tiktoken_file(path, cfg)
    return _files.sentencepiece_file(path, cfg)


def read_gguf_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The `tokenizer.*` key/values of a GGUF file as plain Python values.

    Uses bitnet_jax's own GGUF parser: it reads bitnet.cpp's I2_S files (type 36, which the
    gguf package rejects) and the 128256-token llama3 vocabulary in about a second.
    """
    from bitnet_jax.errors import GGUFError
    from bitnet_jax.formats.gguf.reader import read_gguf

    try:
        metadata = read_gguf(path).metadata
    except GGUFError as e:
        raise TokenizerError(f"cannot read GGUF tokenizer metadata: {e}") from None
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


def _load_dir(path: Path) -> Tokenizer:
    cfg = _hf_config(path)
    model_file = path / "tokenizer.model"
    tiktoken_model = model_file.exists() and _looks_tiktoken(_head(model_file))
    if model_file.exists() and not tiktoken_model:
        # The SentencePiece file is what HF's tokenizer.json was converted from; prefer it.
        return _files.sentencepiece_file(model_file, cfg)
    if (path / "tokenizer.json").exists():
        return _files.hf_json_file(path / "tokenizer.json", cfg)
    if tiktoken_model:
        return _files.tiktoken_file(model_file, cfg)
    if (path / "vocab.json").exists():
        return _files.vocab_merges_files(path / "vocab.json", path / "merges.txt", cfg)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_tokenizer(ggufs[0])
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
