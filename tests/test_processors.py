"""Logits processors: each one, and build_processors' chains, against transformers' own processors."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmgen import sampling as S
from lmgen.params import GenerationConfig

transformers = pytest.importorskip("transformers")
lp = pytest.importorskip("transformers.generation.logits_process")

NEG_INF = float("-inf")
SHAPES = [(3, 50, 1), (3, 257, 6), (1, 1000, 17), (3, 1000, 40)]  # (batch, vocab, input length)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: threads only add overhead (milliseconds per op on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(batch: int, vocab: int, length: int, seed: int, masked: bool = False, dtype=torch.float32):
    """Random scores and input ids drawn from few tokens, so that repeats and n-gram matches happen."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, vocab, generator=g) * 3
    if masked:  # some tokens already banned by an earlier processor
        scores[torch.rand(batch, vocab, generator=g) < 0.2] = NEG_INF
    ids = torch.randint(0, 5, (batch, length), generator=g)
    ids[0] = torch.arange(length) % 5  # periodic: every n-gram repeats
    ids[-1, ::3] = torch.randint(0, vocab, (len(range(0, length, 3)),), generator=g)
    return ids, scores.to(dtype)


def cases(dtypes=(torch.float32,)):
    for i, (b, v, n) in enumerate(SHAPES):
        for masked in (False, True):
            for dtype in dtypes:
                yield make_inputs(b, v, n, seed=i, masked=masked, dtype=dtype)


def run_ours(proc, ids, scores):
    before = scores.clone()
    out = proc(ids, scores)
    assert torch.equal(scores, before), "a processor modified its input scores"
    assert out is not scores and out.shape == scores.shape and out.dtype == scores.dtype
    return out


def assert_same(ours, ref):
    assert torch.equal(ours == NEG_INF, ref == NEG_INF), "different tokens masked to -inf"
    torch.testing.assert_close(ours, ref)


def check(ours_factory, ref_factory, params, dtypes=(torch.float32,)):
    """Ours == transformers' on every case and parameter; returns how many outputs differ from the input."""
    changed = 0
    for ids, scores in cases(dtypes):
        for p in params:
            vocab = scores.shape[-1]
            ours = run_ours(ours_factory(p, vocab), ids, scores)
            ref = ref_factory(p, vocab)(ids, scores.clone())
            assert_same(ours, ref)
            changed += not torch.equal(ours, scores)
    return changed


WARPERS = [
    (S.temperature_warper, lambda p, m: lp.TemperatureLogitsWarper(p), [0.5, 1.7]),
    (lambda p, m: S.top_k_warper(p, m), lambda p, m: lp.TopKLogitsWarper(p, min_tokens_to_keep=m), [1, 5, 10**6]),
    (S.top_p_warper, lambda p, m: lp.TopPLogitsWarper(p, min_tokens_to_keep=m), [0.1, 0.5, 0.95]),
    (S.min_p_warper, lambda p, m: lp.MinPLogitsWarper(p, min_tokens_to_keep=m), [0.05, 0.2, 1.0]),
    (S.typical_p_warper, lambda p, m: lp.TypicalLogitsWarper(p, min_tokens_to_keep=m), [0.2, 0.9]),
    (S.epsilon_cutoff_warper, lambda p, m: lp.EpsilonLogitsWarper(p, min_tokens_to_keep=m), [3e-4, 0.01, 0.2]),
    (S.eta_cutoff_warper, lambda p, m: lp.EtaLogitsWarper(p, min_tokens_to_keep=m), [3e-4, 0.01, 0.2]),
]


@pytest.mark.parametrize("ours,ref,params", WARPERS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("keep", [1, 3])
def test_warpers_match_transformers(ours, ref, params, keep):
    if ours is S.temperature_warper:
        changed = check(lambda p, v: ours(p), lambda p, v: ref(p, keep), params, (torch.float32, torch.bfloat16))
    else:
        changed = check(lambda p, v: ours(p, keep), lambda p, v: ref(p, keep), params,
                        (torch.float32, torch.bfloat16))
    assert changed > 0


def test_top_k_larger_than_vocab_keeps_everything():
    ids, scores = make_inputs(3, 50, 4, seed=0)
    assert torch.equal(S.top_k_warper(60)(ids, scores), scores)
    assert (S.top_k_warper(5)(ids, scores) > NEG_INF).sum(-1).tolist() == [5, 5, 5]


def test_min_tokens_to_keep_survives_a_strict_cutoff():
    ids, scores = make_inputs(3, 257, 4, seed=1)
    for proc in (S.top_p_warper(1e-9, 4), S.epsilon_cutoff_warper(0.99, 4), S.min_p_warper(1.0, 4)):
        assert (proc(ids, scores) > NEG_INF).sum(-1).tolist() == [4, 4, 4]


def test_repetition_penalty_matches_transformers():
    changed = check(lambda p, v: S.repetition_penalty_processor(p),
                    lambda p, v: lp.RepetitionPenaltyLogitsProcessor(p), [0.7, 1.3], (torch.float32, torch.bfloat16))
    assert changed > 0


def test_repetition_penalty_covers_the_prompt_and_nothing_else():
    scores = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    out = S.repetition_penalty_processor(2.0)(torch.tensor([[0, 1, 1]]), scores)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_logit_bias_matches_transformers():
    def bias(v):
        return {0: 5.0, 7: -100.0, v - 1: 0.5, 3: 100.0}

    changed = check(lambda p, v: S.logit_bias_processor(bias(v)),
                    lambda p, v: lp.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias(v).items()]), [None],
                    (torch.float32, torch.bfloat16))
    assert changed > 0
    with pytest.raises(ValueError, match="logit_bias"):
        S.logit_bias_processor({60: 1.0})(*make_inputs(1, 50, 2, seed=0))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_no_repeat_ngram_matches_transformers(n):
    changed = check(lambda p, v: S.no_repeat_ngram_processor(p), lambda p, v: lp.NoRepeatNGramLogitsProcessor(p), [n])
    assert changed > 0


def test_no_repeat_ngram_bans_the_completing_token():
    ids = torch.tensor([[5, 6, 7, 5, 6], [5, 6, 7, 6, 5]])
    out = S.no_repeat_ngram_processor(3)(ids, torch.zeros(2, 10))
    assert (out == NEG_INF).nonzero().tolist() == [[0, 7]]


BAD_WORDS = [[[3]], [[3], [4, 5]], [[2, 3, 4], [7]], [[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4]],
             [[0, 1], [1, 0], [2, 2]]]


@pytest.mark.parametrize("eos", [None, [3], [0, 7]])
def test_bad_words_match_transformers(eos):
    changed = 0
    for ids, scores in cases():
        ids = ids.clone()
        ids[0, -1:] = 4  # row 0 ends with the prefix of [4, 5], row 1 with that of [2, 3, 4]
        if ids.shape[0] > 1 and ids.shape[1] >= 2:
            ids[1, -2:] = torch.tensor([2, 3])
        for words in BAD_WORDS:
            kept = [w for w in words if not (len(w) == 1 and eos and w[0] in eos)]
            ours = run_ours(S.bad_words_processor(words, eos or ()), ids, scores)
            if not kept:  # transformers refuses an empty list; ours is a no-op
                assert torch.equal(ours, scores)
                continue
            assert_same(ours, lp.NoBadWordsLogitsProcessor(words, eos)(ids, scores.clone()))
            changed += not torch.equal(ours, scores)
    assert changed > 0


def test_multi_token_bad_word_needs_its_prefix():
    ids = torch.tensor([[1, 4], [4, 1]])
    out = S.bad_words_processor([[4, 5], [9]])(ids, torch.zeros(2, 10))
    assert (out == NEG_INF).nonzero().tolist() == [[0, 5], [0, 9], [1, 9]]


@pytest.mark.parametrize("eos", [[0], [0, 5, 9]])
@pytest.mark.parametrize("prompt_len,min_new", [(3, 5), (3, 1), (0, 1), (10, 100)])
def test_min_new_tokens_matches_transformers(eos, prompt_len, min_new):
    for ids, scores in cases():
        ours = run_ours(S.min_new_tokens_processor(prompt_len, min_new, eos), ids, scores)
        ref = lp.MinNewTokensLengthLogitsProcessor(prompt_len, min_new, eos)(ids, scores.clone())
        assert_same(ours, ref)
        if ids.shape[1] - prompt_len < min_new:
            assert (ours[:, eos] == NEG_INF).all()
        else:
            assert torch.equal(ours[:, eos], scores[:, eos])
        assert torch.equal(ours[:, 1:5], scores[:, 1:5])


def reference_penalties(ids, scores, frequency, presence, prompt_len):
    out = scores.clone()
    for b in range(ids.shape[0]):
        generated = ids[b, prompt_len:].tolist()
        for t in set(generated):
            count = generated.count(t)
            out[b, t] -= frequency * count + presence * (count > 0)
    return out


@pytest.mark.parametrize("frequency,presence", [(0.5, 0.0), (0.0, 1.5), (-0.7, 0.3), (2.0, -2.0)])
@pytest.mark.parametrize("prompt_len", [0, 3, 1000])
def test_frequency_presence_penalties_match_a_reference_loop(frequency, presence, prompt_len):
    for ids, scores in cases((torch.float32, torch.bfloat16)):
        ours = run_ours(S.frequency_presence_processor(frequency, presence, prompt_len), ids, scores)
        assert_same(ours, reference_penalties(ids, scores, frequency, presence, prompt_len))


def test_frequency_presence_count_generated_tokens_only():
    ids = torch.tensor([[4, 4, 4, 1, 1, 2]])  # prompt [4, 4, 4], generated [1, 1, 2]
    out = S.frequency_presence_processor(1.0, 10.0, 3)(ids, torch.zeros(1, 6))
    assert out.tolist() == [[0.0, -12.0, -11.0, 0.0, 0.0, 0.0]]
    many = torch.tensor([[0] + [1] * 300])  # a count past 256 stays exact with bfloat16 scores
    out = S.frequency_presence_processor(0.01, 0.0, 1)(many, torch.zeros(1, 4, dtype=torch.bfloat16))
    assert out.tolist() == [[0.0, -3.0, 0.0, 0.0]]


# ---- build_processors -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    return transformers.LlamaForCausalLM(cfg)


def hf_processors(model, c: GenerationConfig, prompt_len: int, eos: list[int]) -> list:
    """transformers' own processor list for the equivalent transformers.GenerationConfig."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc = transformers.GenerationConfig(
            do_sample=c.sampling, temperature=c.temperature if c.sampling else None, top_k=c.top_k, top_p=c.top_p,
            min_p=c.min_p, typical_p=c.typical_p, epsilon_cutoff=c.epsilon_cutoff, eta_cutoff=c.eta_cutoff,
            repetition_penalty=c.repetition_penalty, no_repeat_ngram_size=c.no_repeat_ngram_size,
            bad_words_ids=c.bad_words_ids, min_new_tokens=c.min_new_tokens or None, eos_token_id=eos,
            sequence_bias=[[[t], float(b)] for t, b in c.logit_bias.items()] if c.logit_bias else None)
        model._prepare_special_tokens(gc, device="cpu")
        procs = list(model._get_logits_processor(gc, input_ids_seq_length=prompt_len, device="cpu"))
    if c.frequency_penalty or c.presence_penalty:  # not in transformers: right after the repetition penalty
        at = next((i + 1 for i, p in enumerate(procs) if isinstance(p, lp.RepetitionPenaltyLogitsProcessor)),
                  int(bool(procs) and isinstance(procs[0], lp.SequenceBiasLogitsProcessor)))
        procs.insert(at, lambda ids, s: reference_penalties(ids, s, c.frequency_penalty, c.presence_penalty,
                                                            prompt_len))
    return procs


OURS_TO_HF = {
    "logit_bias_processor": "SequenceBiasLogitsProcessor",
    "repetition_penalty_processor": "RepetitionPenaltyLogitsProcessor",
    "frequency_presence_processor": "<lambda>", "no_repeat_ngram_processor": "NoRepeatNGramLogitsProcessor",
    "bad_words_processor": "NoBadWordsLogitsProcessor", "min_new_tokens_processor": "MinNewTokensLengthLogitsProcessor",
    "temperature_warper": "TemperatureLogitsWarper", "top_k_warper": "TopKLogitsWarper",
    "top_p_warper": "TopPLogitsWarper", "min_p_warper": "MinPLogitsWarper", "typical_p_warper": "TypicalLogitsWarper",
    "epsilon_cutoff_warper": "EpsilonLogitsWarper", "eta_cutoff_warper": "EtaLogitsWarper",
}


def names(procs) -> list[str]:
    return [p.__qualname__.split(".")[0] for p in procs]


COMBINED = [
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2, logit_bias={3: 4.0, 9: -50.0}),
    dict(do_sample=True, min_p=0.05, typical_p=0.9, epsilon_cutoff=3e-4, eta_cutoff=3e-3, no_repeat_ngram_size=2,
         bad_words_ids=[[3], [4, 5], [0]], min_new_tokens=5),
    dict(do_sample=True, temperature=1.3, top_k=5, top_p=0.8, min_p=0.1, typical_p=0.95, epsilon_cutoff=1e-3,
         eta_cutoff=1e-3, logit_bias={1: 2.5}, repetition_penalty=0.8, frequency_penalty=0.5, presence_penalty=0.4,
         no_repeat_ngram_size=3, bad_words_ids=[[2, 3, 4]], min_new_tokens=100),
    dict(do_sample=False, temperature=0.5, top_k=3, top_p=0.5, repetition_penalty=1.5, no_repeat_ngram_size=2,
         bad_words_ids=[[7]], min_new_tokens=2, presence_penalty=1.0),
    dict(do_sample=True, temperature=0.0, top_k=3, logit_bias={5: -3.0}, frequency_penalty=-1.0),
    dict(do_sample=True, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, temperature=1.0,
         repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=3),
]


@pytest.mark.parametrize("params", COMBINED)
@pytest.mark.parametrize("eos", [[0], [0, 6]])
def test_build_processors_matches_transformers_chain(hf_model, params, eos):
    c = GenerationConfig(**params)
    for b, v, n in [(3, 64, 6), (2, 64, 20)]:
        prompt_len = 4
        ours = S.build_processors(c, prompt_len, eos)
        ref = hf_processors(hf_model, c, prompt_len, eos)
        assert [OURS_TO_HF[name] for name in names(ours)] == [type(p).__name__ if type(p).__name__ != "function"
                                                              else "<lambda>" for p in ref]
        ids, scores = make_inputs(b, v, n, seed=n)
        expected = scores.clone()
        for p in ref:
            expected = p(ids, expected)
        assert_same(S.apply_processors(ours, ids, scores), expected)


def test_default_config_builds_nothing():
    assert S.build_processors(GenerationConfig(), 5, [0]) == []
    assert S.build_processors(GenerationConfig(do_sample=True), 5, [0]) == []
    assert S.build_processors(GenerationConfig(min_new_tokens=3), 5, []) == []  # no EOS: nothing to hold back


def test_no_warpers_without_sampling():
    warped = dict(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1, typical_p=0.5, epsilon_cutoff=0.01, eta_cutoff=0.01)
    for extra in (dict(do_sample=False), dict(do_sample=True, temperature=0.0)):
        c = GenerationConfig(**{**warped, **extra, "repetition_penalty": 1.1})
        assert names(S.build_processors(c, 5, [0])) == ["repetition_penalty_processor"]
    c = GenerationConfig(do_sample=True, **warped)
    assert names(S.build_processors(c, 5, [0])) == [
        "temperature_warper", "top_k_warper", "top_p_warper", "min_p_warper", "typical_p_warper",
        "epsilon_cutoff_warper", "eta_cutoff_warper"]


def test_legacy_warpers():
    assert S.warpers() == [] and S.warpers(1.0, 0, 1.0) == []
    assert names(S.warpers(0.5, 4, 0.9)) == ["temperature_warper", "top_k_warper", "top_p_warper"]


def test_samplers():
    g = torch.Generator().manual_seed(0)
    row = torch.full((10,), NEG_INF)
    row[[2, 7]] = torch.tensor([0.0, 5.0])
    assert {S.sample(row, g) for _ in range(50)} <= {2, 7}
    assert {S.sample_uniform(row, g) for _ in range(50)} == {2, 7}
    assert S.greedy(row[None]).tolist() == [7]
