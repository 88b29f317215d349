"""Constrained decoding through the Python API: regex, choice, grammar and JSON schema outputs that always match,
EOS only where the constraint accepts, the mask before every other processor, and every bad input named."""

from __future__ import annotations

import json
import re

import jsonschema_rs
import pytest
import torch

import lmgen
from lmgen.constraints import Constraints, Matcher, allowed_tokens
from lmgen.params import ParameterError

DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "pets": {"type": "array", "items": {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer"}}, "required": ["kind"]}},
    "email": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["name", "age", "pets"]}


@pytest.fixture(scope="module")
def lm(smollm_default):
    return smollm_default


def chat(lm, text: str) -> list[int]:
    return lm.tokenizer.encode(lm.tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                               add_special_tokens=False)


@pytest.mark.parametrize("pattern, prompt", [(DATE, "When did the first moon landing happen? The date:"),
                                             (PHONE, "Call us at")])
def test_regex_output_matches_and_stops(lm, pattern, prompt):
    g = lm.generate(prompt, max_new_tokens=40, regex=pattern)[0]
    assert re.fullmatch(pattern, g.text), g.text
    assert g.finish_reason == "stop"


def test_choice_greedy_sampled_and_top_k_after_the_mask(lm):
    options = ["positive", "negative", "neutral"]
    assert lm.generate(chat(lm, "Is 'I love it' positive or negative?"), choice=options)[0].text in options
    # top_k=1 runs after the mask: the one token it keeps is an allowed one (before it, every token could be masked).
    gens = lm.generate("The mood:", choice=options, do_sample=True, top_k=1, seed=3, num_return_sequences=2)
    assert all(g.text in options and g.finish_reason == "stop" for g in gens)


@pytest.mark.parametrize("grammar", [
    'root ::= "(" [a-z]+ ")" | "none"',  # GBNF, as llama.cpp takes it
    'start: "(" WORD ")" | "none"\nWORD: /[a-z]+/',  # llguidance's Lark
])
def test_grammar_gbnf_and_lark(lm, grammar):
    g = lm.generate("A word in brackets:", max_new_tokens=30, grammar=grammar)[0]
    assert re.fullmatch(r"\([a-z]+\)|none", g.text), g.text


def test_json_schema_validates_greedy_sampled_n2_and_streamed(lm):
    validator = jsonschema_rs.validator_for(SCHEMA)
    prompt = chat(lm, "Describe Ann, 31, and her pets as JSON.")
    greedy = lm.generate(prompt, max_new_tokens=200, json_schema=SCHEMA, frequency_penalty=0.5)[0]
    assert greedy.finish_reason == "stop" and validator.is_valid(json.loads(greedy.text)), greedy.text
    for g in lm.generate(prompt, max_new_tokens=200, json_schema=json.dumps(SCHEMA), do_sample=True, seed=1,
                         num_return_sequences=2, frequency_penalty=0.5):
        assert g.finish_reason == "stop" and validator.is_valid(json.loads(g.text)), g.text
    streamed = "".join(lm.stream(prompt, max_new_tokens=200, json_schema=SCHEMA, frequency_penalty=0.5))
    assert streamed == greedy.text


def test_stop_strings_never_cut_a_constrained_output(lm):
    prompt = chat(lm, "Describe Ann, 31, and her pets as JSON.")
    g = lm.generate(prompt, max_new_tokens=200, json_schema=SCHEMA, frequency_penalty=0.5, stop=['"', "}"])[0]
    assert g.finish_reason == "stop" and jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(g.text))


def test_max_tokens_mid_object_is_length_not_valid(lm):
    g = lm.generate(chat(lm, "Describe Ann as JSON."), max_new_tokens=5, json_schema=SCHEMA)[0]
    assert g.finish_reason == "length" and len(g.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(g.text)


def test_eos_only_where_the_constraint_accepts(tiny_gpt2):
    constraints = Constraints(tiny_gpt2.tokenizer, tiny_gpt2.vocab_size)
    eos = [50256, 13]  # the model's EOS and a stop token id of the request's (".")
    m = Matcher(constraints.compile("regex", "ab+"), "regex", eos, constraints)
    ids = tiny_gpt2.tokenizer.encode("ab", add_special_tokens=False)
    steps = []
    for token in ids:
        steps.append(allowed_tokens([m], tiny_gpt2.vocab_size)[0])
        m.accept(token)
    steps.append(allowed_tokens([m], tiny_gpt2.vocab_size)[0])
    assert not any(step[e] for step in steps[:-1] for e in eos)  # not before the text matches
    assert all(steps[-1][e] for e in eos)  # every EOS the request has, once "ab" matches (b+ may go on)
    assert steps[-1][tiny_gpt2.tokenizer.encode("b", add_special_tokens=False)[0]]


def test_constrained_rows_leave_other_rows_alone(tiny_gpt2):
    free = dict(max_new_tokens=12, do_sample=True, seed=5)
    alone = tiny_gpt2.generate("Hello there", **free)[0]
    works = [tiny_gpt2.work(tiny_gpt2.encode("Hello there"), lmgen.GenerationConfig(**free), 256),
             tiny_gpt2.work(tiny_gpt2.encode("Number:"), lmgen.GenerationConfig(max_new_tokens=12, regex="[0-9]+"),
                            256)]
    results = {}
    for work, event in tiny_gpt2._drive(works):
        if event.generation is not None:
            results[id(work)] = event.generation
    assert results[id(works[0])].token_ids == alone.token_ids
    assert re.fullmatch("[0-9]+", results[id(works[1])].text)


def test_schema_compiles_once_then_comes_from_the_cache(tiny_gpt2):
    constraints = Constraints(tiny_gpt2.tokenizer, tiny_gpt2.vocab_size)
    first = constraints.compile("json_schema", SCHEMA)
    second = constraints.compile("json_schema", json.dumps(SCHEMA))  # the same schema as text
    assert len(constraints._grammars) == 1 and first is not second  # each caller gets its own matcher
    assert constraints.setup_seconds > 0 and "llguidance" in constraints.describe()


@pytest.mark.parametrize("params, field, text", [
    (dict(regex="("), "regex", "regex is invalid"),
    (dict(json_schema={"type": "nonsense"}), "json_schema", "json_schema is invalid"),
    (dict(json_schema="{not json"), "json_schema", "json_schema is invalid"),
    (dict(grammar="root ::= missing"), "grammar", "grammar is invalid"),
    (dict(grammar="root ::= ("), "grammar", "grammar is invalid"),
    (dict(choice=[]), "choice", "choice must be"),
    (dict(choice=["a", 1]), "choice", "choice must be"),
    (dict(regex="a", choice=["a"]), "choice", "regex and choice cannot be used together"),
    (dict(regex="a", num_beams=2), "regex", "not supported with num_beams"),
])
def test_bad_constraints_name_their_field(tiny_gpt2, params, field, text):
    with pytest.raises(ParameterError) as e:
        tiny_gpt2.generate("x", max_new_tokens=2, **params)
    assert e.value.field == field and text in str(e.value)


def test_a_constraint_no_token_can_follow_ends_with_an_error(tiny_gpt2):
    # The grammar needs the EOS token inside the output, where EOS ends a sequence: nothing may come after "a".
    with pytest.raises(ValueError, match="the grammar constraint allows no token .* after 'a'"):
        tiny_gpt2.generate("x", max_new_tokens=5, grammar='start: "a" <|endoftext|> "b"')
    # And a constraint against the other processors names them.
    starts = [[t] for t in range(tiny_gpt2.vocab_size) if "yes".startswith(tiny_gpt2.tokenizer.decode([t]) or "-")]
    with pytest.raises(ValueError, match="bad_words_ids"):
        tiny_gpt2.generate("x", max_new_tokens=5, choice=["yes"], bad_words_ids=starts)


def test_masking_every_row_at_once(tiny_gpt2):
    constraints = Constraints(tiny_gpt2.tokenizer, tiny_gpt2.vocab_size)
    matchers = [Matcher(constraints.compile("choice", [w]), "choice", [50256], constraints) for w in ("cat", "dog")]
    allowed = allowed_tokens(matchers, tiny_gpt2.vocab_size)
    for row, word in zip(allowed, ("cat", "dog")):
        first = tiny_gpt2.tokenizer.encode(word, add_special_tokens=False)[0]
        assert row[first] and not row[50256] and int(row.sum()) < 10
    assert allowed.dtype == torch.bool and allowed.shape == (2, tiny_gpt2.vocab_size)


def test_the_mask_kernel_equals_the_torch_path_in_every_build(ops):
    from lmgen.constraints import apply_bitmask_torch

    torch.manual_seed(0)
    for rows, vocab in ((1, 49152), (3, 50257), (2, 70)):  # whole words, a partial last word, a tiny vocabulary
        bits = torch.randint(-2**31, 2**31 - 1, (rows, (vocab + 31) // 32 + 1), dtype=torch.int32)
        bits[0, :2] = 0  # whole words masked
        bits[-1, 2] = -1  # and a whole word allowed
        scores = torch.randn(rows, vocab)
        native, reference = scores.clone(), scores.clone()
        counts = ops.apply_token_bitmask(native, bits).tolist()
        assert counts == apply_bitmask_torch(reference, bits)
        assert torch.equal(native, reference)
        assert counts == torch.isfinite(native).sum(-1).tolist()


def test_masks_filled_ahead_during_the_forward_give_the_same_tokens(lm, monkeypatch):
    from lmgen import constraints

    calls = []
    fill = constraints.Matcher._fill_ahead
    monkeypatch.setattr(constraints.Matcher, "_fill_ahead", lambda self: calls.append(1) or fill(self))
    prompt = chat(lm, "Describe Ann, 31, and her pets as JSON.")
    tokens = {}
    for ahead in (False, True):  # inline (this 2-core machine's default), and on the worker thread
        monkeypatch.setattr(constraints, "FILL_AHEAD", ahead)
        gens = lm.generate(prompt, max_new_tokens=60, json_schema=SCHEMA, frequency_penalty=0.5, do_sample=True,
                           seed=2, num_return_sequences=2)
        tokens[ahead] = [g.token_ids for g in gens]
        assert bool(calls) == ahead
    assert tokens[True] == tokens[False]
