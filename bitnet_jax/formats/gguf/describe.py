"""describe(GGUFFile): the report of `bitnet-jax inspect FILE` (bitnet_jax/cli/inspect.py):
architecture, config, tensor table and tokenizer of a GGUF file."""

from __future__ import annotations

import dataclasses
from collections import Counter

from bitnet_jax.errors import GGUFError
from bitnet_jax.formats.gguf.arch import config_from_gguf
from bitnet_jax.formats.gguf.reader import GGUFFile


def _tokenizer_lines(meta: dict) -> list[str]:
    k = "tokenizer.ggml."
    if k + "model" not in meta:
        return ["  (none: the file carries no tokenizer.ggml.* metadata)"]
    tokens = meta.get(k + "tokens") or []

    def show(key):
        tid = meta.get(k + key)
        if not isinstance(tid, int) or isinstance(tid, bool):
            return "-"
        text = tokens[tid] if 0 <= tid < len(tokens) else "?"
        return f"{tid} {text!r}"

    lines = [f"  model: {meta.get(k + 'model')}  pre: {meta.get(k + 'pre', '-')}",
             f"  vocab size: {len(tokens)}  merges: {len(meta.get(k + 'merges') or [])}",
             f"  bos: {show('bos_token_id')}  eos: {show('eos_token_id')}  "
             f"eot: {show('eot_token_id')}  pad: {show('padding_token_id')}",
             f"  add_bos: {meta.get(k + 'add_bos_token', '-')}  "
             f"chat template: {'yes' if meta.get('tokenizer.chat_template') else 'no'}"]
    return lines


def describe(g: GGUFFile) -> str:
    """A human-readable report of a parsed GGUF file."""
    meta = g.metadata
    lines = [f"file: {g.path} ({g.file_size:,} bytes, GGUF v{g.version}, {len(g.tensors)} "
             f"tensors, {len(meta)} metadata keys, alignment {g.alignment})",
             f"architecture: {g.architecture}  name: {meta.get('general.name', '-')}  "
             f"file_type: {meta.get('general.file_type', '-')}"]
    try:
        cfg, _ = config_from_gguf(meta, {n: t.type_name for n, t in g.tensors.items()},
                                  {n: t.shape for n, t in g.tensors.items()}, g.path)
    except GGUFError as exc:
        lines.append(f"config: bitnet_jax cannot run this file ({exc})")
    else:
        lines.append("config:")
        for field in dataclasses.fields(cfg):
            lines.append(f"  {field.name}: {getattr(cfg, field.name)}")
    counts = Counter(t.type_name for t in g.tensors.values())
    lines.append("tensors (" + ", ".join(f"{n} {t}" for t, n in counts.most_common()) + "):")
    width = max((len(n) for n in g.tensors), default=4)
    lines.append(f"  {'name':<{width}}  {'type':<6}  {'shape':<18}  bytes")
    for t in g.tensors.values():
        shape = "x".join(str(s) for s in t.shape)
        lines.append(f"  {t.name:<{width}}  {t.type_name:<6}  {shape:<18}  {t.nbytes:,}")
    lines.append("tokenizer:")
    lines.extend(_tokenizer_lines(meta))
    return "\n".join(lines)
