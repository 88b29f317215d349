"""Decoding features over the public API: stop strings, streaming, logprobs, score, seeds, EOS options, validation."""

from __future__ import annotations

import math

import pytest
import torch

from lmgen import GenerationConfig
from lmgen.lm import LM
from lmgen.sampling import apply_processors, build_processors, sample
from lmgen.stopping import TextTracker

from .conftest import SEED_IDS, SEED_PROMPT

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def free(tiny_gpt2):
    """A greedy continuation with no stop strings, and the text of each of its tokens."""
    g = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=40)[0]
    pieces = [tiny_gpt2.tokenizer.decode(g.token_ids[: i + 1]) for i in range(len(g.token_ids))]
    return g, pieces


def streamed(lm, prompt, **params):
    out, prefixes = "", []
    for piece in lm.stream(prompt, **params):
        out += piece
        prefixes.append(out)
    return out, prefixes


def check_stop(lm, free_gen, stop, include=False, **extra):
    text = free_gen.text
    index = min(text.index(s) for s in stop if s in text)
    matched = min((s for s in stop if s in text), key=lambda s: (text.index(s), -len(s)))
    end = index + (len(matched) if include else 0)
    out = lm.generate(SEED_PROMPT, max_new_tokens=40, stop=stop, include_stop_str_in_output=include, **extra)[0]
    assert out.text == text[:end]
    assert out.finish_reason == "stop" and out.stop_reason == matched
    # Generation stops at the token that completes the stop string.
    k = next(i for i in range(len(free_gen.token_ids))
             if matched in lm.tokenizer.decode(free_gen.token_ids[: i + 1])[index:])
    assert out.token_ids == free_gen.token_ids[: k + 1]
    s, prefixes = streamed(lm, SEED_PROMPT, max_new_tokens=40, stop=stop, include_stop_str_in_output=include)
    assert s == out.text
    assert all(out.text.startswith(p) for p in prefixes)  # nothing shown is later taken back
    return out


def test_stop_string_split_across_tokens(tiny_gpt2, free):
    g, pieces = free
    for i in range(3, len(pieces)):
        cut = len(pieces[i - 1])
        stop = pieces[i][cut - 2: cut + 2]  # the last 2 characters of one token, the first 2 of the next
        if len(pieces[i]) - cut >= 2 and "\ufffd" not in stop and g.text.index(stop) == cut - 2:
            break
    else:
        pytest.fail("no token boundary to test")
    assert check_stop(tiny_gpt2, g, [stop]).token_ids == g.token_ids[: i + 1]
    check_stop(tiny_gpt2, g, [stop], include=True)


def test_stop_string_inside_one_token(tiny_gpt2, free):
    g, pieces = free
    for i in range(2, len(pieces)):
        token_text = pieces[i][len(pieces[i - 1]):]
        inner = token_text[1:-1]
        if len(token_text) >= 4 and "\ufffd" not in token_text and g.text.index(inner) == len(pieces[i - 1]) + 1:
            break
    else:
        pytest.fail("no long token to test")
    stop = token_text[1:-1]
    out = check_stop(tiny_gpt2, g, [stop])
    assert out.token_ids == g.token_ids[: i + 1]


def test_several_stop_strings_earliest_wins(tiny_gpt2, free):
    g, _ = free
    late, early = g.text[-6:-2], g.text[5:9]
    check_stop(tiny_gpt2, g, [late, early])


def test_stop_string_never_found(tiny_gpt2, free):
    g, _ = free
    out = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=40, stop=["\u2603 not there"])[0]
    assert out.text == g.text and out.finish_reason == "length" and out.stop_reason is None
    assert streamed(tiny_gpt2, SEED_PROMPT, max_new_tokens=40, stop=["\u2603 not there"])[0] == g.text


TRICKY = ["Emoji 👍🏽 and 🦊!", "日本語のテキスト", "cafe\u0301 and e\u0301", "mixed 中文 ✓ ok",
          "\n\n  tabs\tand\u00a0nbsp"]


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("stop", [[], ["and"], ["🦊"], ["テキ"], ["\u0301 a"]])
def test_tracker_on_the_real_smollm2_tokenizer(smollm, text, stop):
    tok = smollm.tokenizer
    ids = tok.encode(text)
    tracker = TextTracker(tok.detokenizer(), stop)
    pieces = []
    for i in ids:
        pieces.append(tracker.add(i))
        if tracker.matched:
            break
    else:
        pieces.append(tracker.finish())
    full = tok.decode(ids)
    found = [full.index(s) for s in stop if s in full]
    expected = full[: min(found)] if found else full
    assert "".join(pieces) == expected == tracker.text
    assert all("\ufffd" not in p for p in pieces)
    byte_tokens = [i for i in ids if "\ufffd" in tok.decode([i])]
    if any(ord(c) > 0xFFFF for c in text):
        assert byte_tokens  # the emoji really is split into partial-byte tokens


def test_greedy_logprobs_equal_the_reference_log_softmax(tiny_llama_dir):
    import lmgen

    lm = lmgen.load(tiny_llama_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    out = lm.generate(SEED_IDS, max_new_tokens=12, logprobs=5)[0]
    full = torch.tensor([SEED_IDS + out.token_ids])
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(full).logits[0], dim=-1)
    for step, entry in enumerate(out.logprobs):
        row = ref_lp[len(SEED_IDS) - 1 + step]
        assert entry.token_id == out.token_ids[step]
        assert abs(entry.logprob - float(row[entry.token_id])) < 1e-4
        values, ids = torch.topk(row, 5)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert max(abs(a - float(b)) for (_, a), b in zip(entry.top, values)) < 1e-4
    prompt_lp = lm.generate(SEED_IDS, max_new_tokens=1, prompt_logprobs=2)[0].prompt_logprobs
    assert prompt_lp[0] is None and len(prompt_lp) == len(SEED_IDS)
    for i in range(1, len(SEED_IDS)):
        assert abs(prompt_lp[i].logprob - float(ref_lp[i - 1, SEED_IDS[i]])) < 1e-4


def test_raw_and_processed_logprobs(tiny_gpt2):
    params = dict(max_new_tokens=6, do_sample=True, temperature=0.5, top_k=3, seed=4, logprobs=3)
    raw = tiny_gpt2.generate(SEED_PROMPT, **params)[0]
    processed = tiny_gpt2.generate(SEED_PROMPT, logprobs_mode="processed", **params)[0]
    assert raw.token_ids == processed.token_ids
    for step, (r, p) in enumerate(zip(raw.logprobs, processed.logprobs)):
        logits = tiny_gpt2.next_token_logits(SEED_IDS + raw.token_ids[:step])
        assert abs(r.logprob - float(torch.log_softmax(logits, -1)[r.token_id])) < 1e-4
        kept = torch.topk(logits, 3).values
        expected = torch.log_softmax(kept / 0.5, -1)
        assert max(abs(a - float(b)) for (_, a), b in zip(p.top, expected)) < 1e-4
        assert p.logprob >= r.logprob  # sharpened and truncated: the chosen token gains


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama_dir"])
def test_score_perplexity_equals_exp_of_the_reference_loss(request, fixture):
    import lmgen

    value = request.getfixturevalue(fixture)
    lm = value if isinstance(value, LM) else lmgen.load(value)
    folder = value if not isinstance(value, LM) else request.getfixturevalue("tiny_gpt2_dir")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    text = "The quick brown fox jumped over the lazy dog, and then it ran away."
    s = lm.score(text)
    ids = torch.tensor([s.token_ids])
    with torch.no_grad():
        loss = float(ref(ids, labels=ids).loss)
    assert abs(s.perplexity - math.exp(loss)) / math.exp(loss) < 1e-4
    assert len(s.logprobs) == len(s.token_ids) - 1
    assert abs(s.total_logprob - sum(s.logprobs)) < 1e-6


def test_score_needs_two_tokens(tiny_gpt2):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        tiny_gpt2.score("The")


def test_seeded_requests_alone_and_batched_with_seven_others(tiny_gpt2):
    prompts = [SEED_PROMPT, "Hello there", "A", "Once upon a time", "x y z", "1 2 3", "Q:", "The end"]
    batched = tiny_gpt2.generate(prompts, do_sample=True, top_p=0.9, max_new_tokens=12, seed=50)
    for i, p in enumerate(prompts):
        alone = tiny_gpt2.generate(p, do_sample=True, top_p=0.9, max_new_tokens=12, seed=50 + i)[0]
        assert alone.token_ids == batched[i].token_ids


def test_sampled_frequencies_match_the_processed_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, generator=g) * 2
    config = GenerationConfig(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01)
    processed = apply_processors(build_processors(config, 1, []), torch.zeros(1, 1, dtype=torch.long),
                                 logits[None])[0]
    probs = torch.softmax(processed, -1)
    draws = 20000
    gen = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.tensor([sample(processed, gen) for _ in range(draws)]), minlength=200)
    tv = 0.5 * float((counts / draws - probs).abs().sum())
    assert tv < 0.03
    assert counts[probs == 0].sum() == 0  # nothing outside the kept set is ever drawn


def test_eos_options(tiny_gpt2, free):
    g, _ = free
    a, b = g.token_ids[3], g.token_ids[6]
    out = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=40, eos_token_id=[b, a])[0]
    assert out.token_ids == g.token_ids[:4] and out.stop_reason == a and out.finish_reason == "stop"
    lm = LM(tiny_gpt2.model, tiny_gpt2.tokenizer, eos_token_ids=(a,))
    assert lm.generate(SEED_PROMPT, max_new_tokens=40)[0].token_ids == g.token_ids[:4]
    ignored = lm.generate(SEED_PROMPT, max_new_tokens=10, ignore_eos=True)[0]
    assert ignored.token_ids == g.token_ids[:10] and ignored.finish_reason == "length"
    late = lm.generate(SEED_PROMPT, max_new_tokens=10, min_new_tokens=6)[0]
    assert a not in late.token_ids[:6] and len(late.token_ids) >= 6


@pytest.mark.parametrize("params, name", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"),
    (dict(typical_p=0), "typical_p"),
    (dict(epsilon_cutoff=1), "epsilon_cutoff"), (dict(eta_cutoff=-0.1), "eta_cutoff"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(frequency_penalty=3), "frequency_penalty"), (dict(presence_penalty=-2.5), "presence_penalty"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=2, do_sample=True), "do_sample"),
    (dict(logit_bias={"50": 1.0}), "logit_bias"), (dict(logit_bias={50: 101}), "logit_bias"),
    (dict(stop=["x"] * 17), "stop"), (dict(stop=["x" * 257]), "stop"), (dict(stop=[""]), "stop"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs_mode="both"), "logprobs_mode"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"), (dict(early_stopping="sometimes"), "early_stopping"),
])
def test_invalid_values_raise_value_errors_naming_the_parameter(tiny_gpt2, params, name):
    with pytest.raises(ValueError, match=name) as info:
        tiny_gpt2.generate(SEED_PROMPT, **params)
    assert "must be" in str(info.value) or "not supported" in str(info.value)


def test_tracker_releases_a_trailing_partial_character_at_the_end(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("ok 🦊")
    partial = ids[:-1]  # the fox's last byte never arrives, as when max_new_tokens cuts it
    tracker = TextTracker(tok.detokenizer(), ["zzz"])
    pieces = [tracker.add(i) for i in partial] + [tracker.finish()]
    assert "".join(pieces) == tok.decode(partial) and pieces[-1].endswith("\ufffd")


def test_beam_search_through_generate(tiny_gpt2):
    outs = tiny_gpt2.generate(SEED_PROMPT, num_beams=4, num_return_sequences=2, max_new_tokens=8)
    assert len(outs) == 2 and all(o.score is not None for o in outs) and outs[0].score >= outs[1].score
    assert outs[0].text == tiny_gpt2.tokenizer.decode(
        outs[0].token_ids[:-1] if outs[0].finish_reason == "stop" else outs[0].token_ids)
    eos = outs[0].token_ids[2]
    lm = LM(tiny_gpt2.model, tiny_gpt2.tokenizer, eos_token_ids=(eos,))
    stopped = lm.generate(SEED_PROMPT, num_beams=4, max_new_tokens=8)[0]
    ignored = lm.generate(SEED_PROMPT, num_beams=4, max_new_tokens=8, ignore_eos=True)[0]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 8
    assert stopped.token_ids != ignored.token_ids
