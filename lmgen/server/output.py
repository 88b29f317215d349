"""Turning engine events into OpenAI choices: text, finish reasons, token counts and logprobs objects."""

from __future__ import annotations

import math
import re
from functools import lru_cache

from tokenizers import decoders

from ..generate import TokenLogprob
from ..tokenizer import Tokenizer

MIN_LOGPROB = -9999.0  # JSON has no -Infinity: a masked token's logprob is sent as this


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are shifted past 255.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenStrings:
    """A token's raw bytes and the string OpenAI shows for it ("bytes:\\xe2" when not valid UTF-8 alone)."""

    def __init__(self, tokenizer: Tokenizer, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids  # vLLM's return_tokens_as_token_ids: the string is "token_id:<id>"
        self.byte_level = isinstance(tokenizer.backend.decoder, decoders.ByteLevel)
        self.info = lru_cache(maxsize=65536)(self._info)

    def _info(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.backend.id_to_token(token_id)
        if piece is not None and self.byte_level and all(c in _BYTE_OF for c in piece):
            raw = bytes(_BYTE_OF[c] for c in piece)
        elif piece is not None and (m := _BYTE_FALLBACK.fullmatch(piece)):
            raw = bytes([int(m[1], 16)])
        else:
            raw = self.tokenizer.token_text(token_id).encode("utf-8")
        if self.as_ids:
            return f"token_id:{token_id}", list(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)


def clean(logprob: float) -> float:
    """A logprob JSON can carry."""
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class Choice:
    """One choice being built from its sequence's events."""

    def __init__(self, index: int, prefix: str = "", finish_reason: str | None = None):
        self.index = index
        self.text = prefix
        self.tokens = 0
        self.finish_reason = finish_reason
        self.logprobs: list[tuple[TokenLogprob, int]] = []  # with each token's offset in the text

    def add(self, event) -> list[tuple[TokenLogprob, int]]:
        """Take one event; return the logprob entries it added."""
        added = []
        if event.token_id is not None:
            self.tokens += 1
            if event.logprob is not None:
                added.append((event.logprob, len(self.text)))
        self.text += event.text
        if event.generation is not None:
            self.finish_reason = event.generation.finish_reason
            self.tokens = max(self.tokens, len(event.generation.token_ids))  # beam search sends its tokens at the end
        self.logprobs += added
        return added


def echo_logprobs(lm, ids: list[int], scored: list[TokenLogprob | None]) -> list[tuple[TokenLogprob, int]]:
    """The prompt's logprob entries (`scored`, from prompt scoring) with their offsets in its decoded text; the
    first token's logprob is None."""
    first = TokenLogprob(ids[0], None)
    # The streaming detokenizer, as generated tokens get theirs: linear, where decoding each prefix is quadratic.
    text, offsets, done = lm.tokenizer.detokenizer(), [], 0
    for token in ids:
        offsets.append(done)
        done += len(text.add(token))
    return list(zip([first] + scored[1:], offsets))


def completion_logprobs(entries: list[tuple[TokenLogprob, int]], strings: TokenStrings) -> dict:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset.

    As OpenAI and vLLM do, each step's top_logprobs holds the chosen token too: up to logprobs + 1 entries.
    """
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp, offset in entries:
        token = strings.info(lp.token_id)[0]
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        if lp.logprob is None:  # the prompt's first token: nothing before it to condition on
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(clean(lp.logprob))
        top = {strings.info(t)[0]: clean(v) for t, v in lp.top}
        top.setdefault(token, clean(lp.logprob))
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(entries: list[tuple[TokenLogprob, int]], strings: TokenStrings) -> dict:
    """Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token_id: int, logprob: float) -> dict:
        text, raw = strings.info(token_id)
        return {"token": text, "logprob": clean(logprob), "bytes": raw}

    content = [dict(item(lp.token_id, lp.logprob), top_logprobs=[item(t, v) for t, v in lp.top])
               for lp, _ in entries]
    return {"content": content, "refusal": None}


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    """The usage object."""
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
