"""Stop strings on the decoded text, and text release that never shows part of one."""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import StreamingDetokenizer


class TextTracker:
    """Turns a sequence's tokens into text, finds stop strings in it, and releases safe text.

    Text is released only when it is complete UTF-8 (the detokenizer holds back partial
    characters) and cannot be the start of a stop string, so a stream never shows a
    piece that the final text will not contain.
    """

    def __init__(self, detokenizer: StreamingDetokenizer, stop: Sequence[str] = (),
                 include_stop: bool = False):
        self.detok = detokenizer
        self.stop = list(stop)
        self.include_stop = include_stop
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""           # everything decoded so far (cut at a stop string once one is found)
        self.released = 0        # how much of self.text has been handed out
        self.matched: str | None = None

    def add(self, token_id: int) -> str:
        """Add a token; return the newly released text. Sets `matched` when a stop string appears."""
        return self._extend(self.detok.add(token_id))

    def finish(self) -> str:
        """The end of the sequence: release everything still held back."""
        piece = self._extend(self.detok.flush(), final=True) if self.matched is None else ""
        piece += self.text[self.released:]
        self.released = len(self.text)
        return piece

    def _extend(self, piece: str, final: bool = False) -> str:
        if self.matched is not None:
            return ""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        if self.stop and piece:
            found = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if found:
                index, s = min(found, key=lambda f: (f[0], -len(f[1])))
                self.matched = s
                self.text = self.text[:index + (len(s) if self.include_stop else 0)]
                return self.finish()
        safe = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.released:safe]
        self.released = max(self.released, safe)
        return out

    def _held_back(self) -> int:
        # The longest tail of the text that could still grow into a stop string.
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
