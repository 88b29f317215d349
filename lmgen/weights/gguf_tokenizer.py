"""Rebuild a GGUF file's tokenizer from its metadata (llama.cpp's key names) as a `tokenizers` Tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import itemgetter

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from ..errors import CorruptFileError, UnsupportedModelError
from ..store import cached_array
from ..tokenizer import Tokenizer, add_bos_eos, byte_level_bpe

# GGUF token types (llama.cpp's llama_token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Split regexes of byte-level vocabularies, by `tokenizer.ggml.pre` (llama.cpp's names).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")
_SPLITS = {name: _LLAMA3_SPLIT for name in _LLAMA3_NAMES}
_SPLITS.update({name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen")})
# These isolate every digit, then split like GPT-2 (llama.cpp's regex_exprs for them).
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
GGUF_TOKENIZER_MODELS = ("gpt2", "llama")
_GEMMA = ("gemma", "gemma2", "gemma3")
# Merges rebuilt from a vocabulary this large are kept in lmgen's cache (Gemma's 262k tokens: ~1 s to rebuild).
CACHE_MERGES_FROM = 65536


def tokenizer_from_gguf(metadata: dict[str, object]) -> Tokenizer:
    """Rebuild the tokenizer a GGUF file describes in its metadata (llama.cpp's key names)."""
    model = metadata.get("tokenizer.ggml.model")
    if model not in GGUF_TOKENIZER_MODELS:
        raise UnsupportedModelError(f"GGUF tokenizer model {model!r} is not supported "
                                    f"(supported: {', '.join(GGUF_TOKENIZER_MODELS)})")
    tokens = _required(metadata, "tokenizer.ggml.tokens")
    types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise CorruptFileError(f"GGUF metadata: {len(tokens)} tokens but {len(types)} token types")
    gemma = model == "llama" and metadata.get("general.architecture") in _GEMMA
    spelled = _gemma_spelling(tokens) if gemma else tokens
    vocab = {t: i for i, t in enumerate(spelled)}
    if model == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre")
        # Llama 3 vocabularies take a whole pre-token that is in the vocabulary before merging
        # (llama.cpp's ignore_merges; "ignore_merges": true in their tokenizer.json).
        backend = byte_level_bpe(vocab, _merges(_required(metadata, "tokenizer.ggml.merges")),
                                 _gguf_pre_tokenizer(pre), ignore_merges=pre in _LLAMA3_NAMES)
    else:
        backend = _sentencepiece(metadata, spelled, vocab)

    # Control tokens (and <unk>) are special; user-defined ones (like "<think>") are plain added
    # tokens, printed even when special tokens are skipped, as llama.cpp does. Both match whole,
    # except respelled ones (Gemma's runs of spaces), which BPE reaches like transformers does.
    added = [AddedToken(t, special=ty != _USER_DEFINED, normalized=False)
             for t, s, ty in zip(tokens, spelled, types) if ty in (_UNKNOWN, _CONTROL, _USER_DEFINED) and t == s]
    backend.add_tokens(added)

    def get_id(key: str) -> int | None:
        value = metadata.get(key)
        return int(value) if isinstance(value, int) and 0 <= value < len(tokens) else None

    bos = get_id("tokenizer.ggml.bos_token_id")
    ends = [get_id(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    if gemma:
        # Gemma files name no end-of-turn token; llama.cpp ends a generation at <end_of_turn> by its text, and
        # Google's generation_config.json lists it beside <eos>.
        ends.append(vocab.get("<end_of_turn>"))
    eos_ids = [i for i in dict.fromkeys(ends) if i is not None]
    # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise.
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama")) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and bool(eos_ids)
    if add_bos or add_eos:
        add_bos_eos(backend, bos if add_bos else None, eos_ids[0] if add_eos else None)
    template = metadata.get("tokenizer.chat_template")
    return Tokenizer(backend, bos_token_id=bos, eos_token_ids=eos_ids,
                     pad_token_id=get_id("tokenizer.ggml.padding_token_id"),
                     chat_template=template if isinstance(template, str) else None)


def _required(metadata: dict, key: str):
    if key not in metadata:
        raise CorruptFileError(f"GGUF metadata has no {key}, which a {metadata.get('tokenizer.ggml.model')} "
                               "tokenizer needs")
    return metadata[key]


def _merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        pair = m.split(" ")
        if len(pair) != 2:
            raise CorruptFileError(f"GGUF metadata: tokenizer.ggml.merges has a bad merge {m!r}")
        out.append((pair[0], pair[1]))
    return out


def _gguf_pre_tokenizer(pre: object):
    """How a byte-level vocabulary splits text before BPE, after llama.cpp's llama-vocab.cpp."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT:
        # llama.cpp isolates \p{N} first, then applies GPT-2's regex: exactly the Digits +
        # ByteLevel pair in SmolLM2's own tokenizer.json. (Order matters: "  1" -> "ĠĠ", "1".)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level  # "gpt2", "default" and unknown names: GPT-2's regex


def _sentencepiece(metadata: dict, tokens: list[str], vocab: dict[str, int]) -> tokenizers.Tokenizer:
    """SentencePiece as BPE with byte fallback, like transformers' LlamaTokenizer built from a GGUF."""
    if "tokenizer.ggml.merges" in metadata:
        merges = _merges(metadata["tokenizer.ggml.merges"])
    elif metadata.get("general.architecture") in _GEMMA:
        # Gemma's scores do not follow its merge order; the tokens' order in the file does (transformers'
        # gemma_tokenizer ranks by it).
        merges = _merges_from_scores(tokens, vocab, range(0, -len(tokens), -1))
    else:
        merges = _merges_from_scores(tokens, vocab, _required(metadata, "tokenizer.ggml.scores"))
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))  # the space the encoder prepended
    tok.decoder = decoders.Sequence(steps)
    return tok


def _gemma_spelling(tokens: list[str]) -> list[str]:
    # Gemma files store its tokens of two or more spaces as spaces; its pieces spell them "▁▁" (as
    # transformers' gemma_tokenizer respells them, so merges reach them from single "▁").
    return ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]


def _merges_from_scores(tokens: list[str], vocab: dict[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    # SentencePiece stores scores, not merges: every split of a token into two vocabulary pieces is
    # a merge, ranked by the merged token's score (transformers' generate_merges, same tie order).
    if len(scores) != len(tokens):
        raise CorruptFileError(f"GGUF metadata: {len(tokens)} tokens but {len(scores)} scores")
    if len(tokens) < CACHE_MERGES_FROM:
        pairs = _merge_pairs(tokens, vocab, scores)
    else:
        # The key: every token (their lengths keep the joined text unambiguous) and every score.
        key = b"lmgen merges 1" + np.fromiter(map(len, tokens), np.int64, len(tokens)).tobytes()
        key += "".join(tokens).encode("utf-8", "surrogatepass") + np.asarray(scores, np.float64).tobytes()
        pairs = cached_array("merges", key, lambda: _merge_pairs(tokens, vocab, scores),
                             lambda a: _pairs_fit(a, len(tokens)))
    return list(zip(map(tokens.__getitem__, pairs[:, 0].tolist()), map(tokens.__getitem__, pairs[:, 1].tolist())))


def _merge_pairs(tokens: list[str], vocab: dict[str, int], scores: Sequence[float]) -> np.ndarray:
    """The merges as rows of (left id, right id), best first: each token's splits found one cut at a time."""
    first = dict(zip(tokens, scores))  # a token listed twice: scored by its last, ordered by its first place
    pieces = list(first)
    lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
    order = np.argsort(-lengths, kind="stable")  # longest first: the tokens long enough for a cut lead the list
    ordered = [pieces[k] for k in order.tolist()]
    found = []
    for cut in range(1, int(lengths.max(initial=0))):
        n = int(np.count_nonzero(lengths > cut))
        left = _ids(vocab, map(itemgetter(slice(None, cut)), ordered[:n]), n)
        hit = np.flatnonzero(left >= 0)
        right = _ids(vocab, (ordered[k][cut:] for k in hit.tolist()), len(hit))
        hit, ok = hit[right >= 0], right >= 0
        found.append((order[hit], left[hit], right[ok], lengths[order[hit]] - cut))
    if not found:
        return np.zeros((0, 2), np.int32)
    where, left, right, right_len = (np.concatenate(c) for c in zip(*found))
    score = np.fromiter(first.values(), np.float64, len(pieces))[where]
    left_len = lengths[where] - right_len
    # Best score first, then the longer left piece (transformers' sort key), then file order.
    rank = np.lexsort((right, left, where, -right_len, -left_len, -score))
    return np.stack([left[rank], right[rank]], axis=1).astype(np.int32)


def _pairs_fit(pairs: np.ndarray, n: int) -> bool:
    # A cached file read back: rows of two ids, each one of the n tokens.
    if pairs.dtype.kind not in "iu" or pairs.ndim != 2 or pairs.shape[1] != 2:
        return False
    return pairs.size == 0 or (pairs.min() >= 0 and pairs.max() < n)


def _ids(vocab: dict[str, int], pieces, n: int) -> np.ndarray:
    return np.fromiter(map(vocab.get, pieces, repeat(-1)), np.int64, n)
