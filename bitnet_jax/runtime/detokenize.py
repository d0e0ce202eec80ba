"""The text of one generated sequence: incremental detokenization and stop strings.

The host loop (generate.py) feeds each sampled token to a `SequenceText`, which decodes it with
the tokenizer's IncrementalDecoder (never half a UTF-8 character), cuts the text at the first
stop string, and hands out the pieces not yet yielded, holding back a tail that could still
become a stop string.
"""

from __future__ import annotations

from bitnet_jax.tokenizer import IncrementalDecoder, Tokenizer


class SequenceText:
    """Host-side progress of one sequence: ids, text, stop strings, what was already yielded."""

    def __init__(self, max_new: int, tokenizer: Tokenizer | None, stops: tuple[str, ...]):
        self.max_new = max_new
        self.stops = stops
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.produced = 0  # tokens the device sampled for this row, EOS included
        self.finish: str | None = None
        self.decode_s = 0.0

    def take(self, token: int, eos: set, elapsed: float = 0.0) -> None:
        """Add one sampled token; `elapsed` is the decode time so far (kept if it ends here)."""
        self.produced += 1
        if token in eos:
            self.end("stop", elapsed)
            return
        self.ids.append(token)
        if self.decoder is not None:
            before = len(self.text)
            self.text += self.decoder.push(token)
            if self._cut_at_stop(before):
                self.finish, self.decode_s = "stop", elapsed
                return
        if self.produced >= self.max_new:
            self.end("length", elapsed)

    def end(self, reason: str, decode_s: float) -> None:
        if self.decoder is not None:
            before = len(self.text)
            self.text += self.decoder.flush()
            if self._cut_at_stop(before):
                reason = "stop"
        self.finish, self.decode_s = reason, decode_s

    def _cut_at_stop(self, before: int) -> bool:
        if not self.stops:
            return False
        longest = max(len(s) for s in self.stops)
        start = max(0, before - longest + 1)
        hits = [p for p in (self.text.find(s, start) for s in self.stops) if p >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def pop_piece(self) -> str:
        """Text not yet yielded, holding back a tail that could begin a stop string."""
        safe = len(self.text)
        if self.finish is None and self.stops:
            for k in range(min(len(self.text), max(len(s) for s in self.stops) - 1), 0, -1):
                if any(s.startswith(self.text[-k:]) for s in self.stops):
                    safe -= k
                    break
        piece = self.text[self.emitted:max(safe, self.emitted)]
        self.emitted += len(piece)
        return piece
