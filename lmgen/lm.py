"""LM: a loaded model with its tokenizer, and the notebook's operations as methods."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import batch_sampler
from .batch_sampler import Distribution
from .cache import KVCache
from .compiled import CompiledDecode
from .constraints import Constraints, constraint_of
from .core import EngineCore, Event, Generate, PromptScore, Work, beam_work, continuations
from .generate import Generation, TokenLogprob
from .params import BOUNDS, GenerationConfig, ParameterError
from .tokenizer import Tokenizer

Prompt = str | list[int]
COMPILED_SLOTS = 4  # a compiled LM's core keeps this many slots, so batches up to it reuse the compiled graph
# Prompt tokens a step of LM's own core takes: a call's prompts all arrive together, and no other stream waits on
# them (the server's core keeps EngineCore's small default, for its running streams' inter-token times).
PROMPT_BUDGET = 1024
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's \ud800 escapes decode to these; no tokenizer takes them


class TokenProb(NamedTuple):
    """One row of a next-token table."""

    token_id: int
    token_text: str
    probability: float


class LM:
    """A causal language model ready to generate: model, tokenizer and a reusable KV cache."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, name: str = "model",
                 eos_token_ids: tuple[int, ...] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.weights = str(self.dtype).removeprefix("torch.")  # which path the weights take: see loading.load
        self.eos_token_ids = tuple(eos_token_ids if eos_token_ids is not None else tokenizer.eos_token_ids)
        self._core: EngineCore | None = None
        self._compiled = None
        self._constraints: Constraints | None = None

    def compile(self) -> "LM":
        """Compile single-sequence decoding with torch.compile, and on a GPU replay it as a CUDA graph.

        On a small CPU the first compile takes minutes; torch caches it on disk for later processes.
        """
        self._compiled = CompiledDecode(self.model)
        self._core = None
        return self

    @property
    def constraints(self) -> Constraints:
        """The mask library's set-up for this tokenizer, made on first use (a first constraint, `lmgen serve`'s start):
        about 0.2 s for a 49k vocabulary, 2 s for Gemma's 262k, which a load without constraints need not pay."""
        if self._constraints is None:
            self._constraints = Constraints(self.tokenizer, self.vocab_size)
        return self._constraints

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt ids of a conversation rendered by the chat template; ValueError without a template."""
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.name} has no chat template, so it takes no messages: give a prompt")
        text = self.tokenizer.apply_chat_template(messages, tools=tools)
        return self.encode(self.tokenizer.encode(text, add_special_tokens=False))

    def check_constraint(self, config: GenerationConfig) -> None:
        """Raise ParameterError (naming the field) unless the config's constraint compiles for this tokenizer."""
        found = constraint_of(config)
        if found is not None:
            self.constraints.compile(*found)

    @property
    def config(self):
        """The architecture's config dataclass."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer (can exceed the tokenizer's vocabulary)."""
        return self.config.vocab_size

    @property
    def context_length(self) -> int:
        """The most tokens (prompt and generated) one sequence can hold."""
        return self.config.max_position_embeddings

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids for a prompt given as text or ids; ValueError for an empty prompt or bad ids."""
        if isinstance(prompt, str):
            at = lone_surrogate(prompt)
            if at is not None:
                raise ValueError(f"prompt holds a lone UTF-16 surrogate ({prompt[at]!r}) at character {at}: "
                                 "it is not valid Unicode text")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            ids = [int(i) for i in prompt]
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            if self.tokenizer.bos_token_id is None:
                raise ValueError("prompt is empty, and this model has no BOS token to start from")
            ids = [self.tokenizer.bos_token_id]
        if len(ids) >= self.context_length:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.context_length}")
        return ids

    @torch.inference_mode()
    def logits(self, prompt: Prompt) -> torch.Tensor:
        """Logits [T, V] at every position of the prompt (float32, on the CPU)."""
        ids = torch.tensor([self.encode(prompt)], device=self.device)
        return self.model(ids).float().cpu()

    @torch.inference_mode()
    def next_token_logits(self, prompt: Prompt) -> torch.Tensor:
        """Logits [V] for the token after the prompt."""
        ids = self.encode(prompt)
        tokens = torch.tensor([ids], device=self.device)
        return self.model(tokens, rows=torch.tensor([len(ids) - 1], device=self.device))[0].float().cpu()

    def next_token_probs(self, prompt: Prompt) -> torch.Tensor:
        """The next-token distribution [V] (softmax of the last logits), summing to 1."""
        return torch.softmax(self.next_token_logits(prompt), dim=-1)

    def top_tokens(self, prompt: Prompt, k: int = 10) -> TopTokens:
        """The k most likely next tokens as (token_id, token_text, probability), most likely first."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        probs = self.next_token_probs(prompt)
        values, ids = torch.topk(probs, min(k, probs.numel()))
        return TopTokens(TokenProb(int(i), self.tokenizer.token_text(int(i)), float(p)) for p, i in zip(values, ids))

    def distribution(self, prompt: Prompt, **params) -> Distribution:
        """The next-token distribution before and after sampling parameters (temperature, top_k, top_p, min_p,
        typical_p, repetition_penalty, ...), as the engine's batched sampler processes it; sampling is implied."""
        config = GenerationConfig.from_params(**{"do_sample": True, **params})
        if not batch_sampler.batched(config) or constraint_of(config):
            raise ValueError("distribution takes the batched sampler's parameters: temperature, top_k, top_p, min_p, "
                             "typical_p, logit_bias and the penalties")
        ids = self.encode(prompt)
        found = batch_sampler.explain(self.next_token_logits(ids), ids, config)
        found.token_text = self.tokenizer.token_text  # not a field: for a notebook's display, as on Generation
        return found

    def explore(self, **options):
        """The token explorer on this model, served from a background thread: a notebook shows the returned Explorer
        as a frame; stop() it, or use it in a with block. Options: see lmgen.server.notebook.explore."""
        from .server.notebook import explore

        return explore(self, **options)

    def generate(self, prompt: Prompt | list[Prompt], config: GenerationConfig | None = None,
                 **params) -> list[Generation]:
        """Generate continuations; a list of prompts gives num_return_sequences results per prompt, in order.

        Parameters are GenerationConfig's fields (Hugging Face names): max_new_tokens, do_sample,
        temperature, top_k, top_p, min_p, repetition_penalty, stop, num_beams, seed, logprobs, ...
        """
        config = GenerationConfig.from_params(config, **params)
        prompts = [self.encode(p) for p in _prompt_list(prompt)]
        works = self._works(prompts, config)
        results: dict[int, dict[int, Generation]] = {id(w): {} for w in works}
        for work, event in self._drive(works):
            if event.generation is not None:
                results[id(work)][event.index] = event.generation
        out = [g for w in works for _, g in sorted(results[id(w)].items())]
        for g in out:
            g.token_text = self.tokenizer.token_text
        if config.prompt_logprobs is not None:
            per_prompt = {id(ids): self.prompt_logprobs(ids, config.prompt_logprobs) for ids in prompts}
            for g in out:
                g.prompt_logprobs = per_prompt[id(g.prompt_token_ids)]
        return out

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, **params) -> Iterator[str]:
        """Yield the text of one continuation as it is generated: never part of a character or a stop string."""
        for event in self.stream_events(prompt, config, **params):
            if event.text:
                yield event.text

    def stream_events(self, prompt: Prompt, config: GenerationConfig | None = None,
                      **params) -> Iterator[StreamEvent]:
        """Yield one event per generated token (its id, released text, logprob); the last carries the Generation."""
        config = GenerationConfig.from_params(config, **params)
        if config.num_return_sequences != 1 or config.num_beams != 1 or _is_prompt_list(prompt):
            raise ValueError("streaming takes one prompt, with num_return_sequences=1 and num_beams=1")
        for _, e in self._drive(self._works([self.encode(prompt)], config)):
            yield StreamEvent(e.token_id, e.text, e.logprob, e.generation)

    def prompt_logprobs(self, prompt: Prompt, top_n: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first)."""
        bound = BOUNDS["prompt_logprobs"]
        if top_n is None or not bound.ok(top_n):
            raise ParameterError("top_n", bound.text().removeprefix("None or "), top_n)
        work = PromptScore(self.encode(prompt), top_n)
        for _ in self._drive([work]):
            pass
        return work.logprobs

    def score(self, text: Prompt, top_n: int = 5) -> Score:
        """Per-token log-probabilities of a text (with each token's rank, the entropy and the top_n alternatives at
        its step), its total log-likelihood and its perplexity."""
        ids = self.encode(text)
        if len(ids) < 2:
            raise ValueError(f"text must have at least 2 tokens to be scored, got {len(ids)}")
        tokens = self.prompt_logprobs(ids, top_n)[1:]
        logprobs = [lp.logprob for lp in tokens]
        total = math.fsum(logprobs)
        return Score(ids, logprobs, total, math.exp(-total / (len(ids) - 1)), tokens, self.tokenizer.token_text)

    def core(self, n_slots: int = 1) -> EngineCore:
        """The engine core this LM generates with, with at least n_slots slots (made anew when busy or small)."""
        c = self._core
        if self._compiled is not None:  # a compiled step is compiled for its cache's shape: keep a few slots
            n_slots = max(n_slots, COMPILED_SLOTS)
        if c is None or c.cache.n_slots < n_slots or c.has_work():
            c = self._core = None  # free the old cache first
            cache = KVCache.for_model(self.model, max(n_slots, 1), self.context_length)
            c = self._core = EngineCore(self.model, cache, prompt_budget=PROMPT_BUDGET, decode_one=self._compiled)
        return c

    def work(self, ids: list[int], config: GenerationConfig, max_length: int, index0: int = 0,
             base_seed: int | None = None) -> Work:
        """The core's request for one prompt: beam search, or num_return_sequences continuations seeded from
        base_seed + index0 (config.seed, or a random seed)."""
        if config.num_beams > 1:
            return beam_work(ids, config, self.eos_token_ids, max_length, self.tokenizer.decode)
        seed = _base_seed(config, base_seed)
        constraints = self.constraints if constraint_of(config) else None
        seqs = continuations(ids, config, config.num_return_sequences, seed, self.eos_token_ids,
                             self.tokenizer.detokenizer, index0, self.device, constraints)
        return Generate(ids, seqs, max_length)

    def _works(self, prompts: list[list[int]], config: GenerationConfig) -> list[Work]:
        base_seed = _base_seed(config)  # one per request: sequence i samples from base_seed + i
        n = max(config.num_return_sequences, config.num_beams)
        self.core(len(prompts) * n)
        return [self.work(ids, config, self.context_length, k * n, base_seed) for k, ids in enumerate(prompts)]

    def _drive(self, works: list[Work]) -> Iterator[tuple[Work, Event]]:
        """Run the works on this LM's core until they finish, yielding their events; an error is raised."""
        core = self.core(sum(len(w.tracks) for w in works))
        for w in works:
            core.add(w)
        left = set(map(id, works))
        try:
            while left:
                for work, event in core.step():
                    if event.error is not None:
                        raise event.error
                    yield work, event
                    if work.finished:
                        left.discard(id(work))
        finally:
            for w in works:
                core.abort(w)


class StreamEvent(NamedTuple):
    """One step of a stream: the token, the text it released, its logprob, and at the end the Generation."""

    token_id: int | None
    text: str
    logprob: TokenLogprob | None
    generation: Generation | None


@dataclass
class Score:
    """What score() returns: the text's ids, the log-probability of each token after the first, totals, and each
    token after the first's entry (rank, entropy, alternatives)."""

    token_ids: list[int]
    logprobs: list[float]
    total_logprob: float
    perplexity: float
    tokens: list[TokenLogprob] = field(default_factory=list, repr=False)
    token_text: Callable[[int], str] | None = field(default=None, repr=False, compare=False)  # for displays


class TopTokens(list):
    """top_tokens()'s rows: a list of TokenProb (its own type so a notebook can show it as a table)."""


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone UTF-16 surrogate in text, or None (text is valid Unicode)."""
    m = None if text.isascii() else _SURROGATE.search(text)
    return m.start() if m else None


def _base_seed(config: GenerationConfig, given: int | None = None) -> int:
    """`given`, else the config's seed, else a random one."""
    if given is not None:
        return given
    return config.seed if config.seed is not None else int(torch.randint(2**62, ()))


def _prompt_list(prompt) -> list:
    prompts = prompt if _is_prompt_list(prompt) else [prompt]
    if not prompts:
        raise ValueError("prompt list is empty")
    return prompts


def _is_prompt_list(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and (not prompt or isinstance(prompt[0], (str, list, tuple)))
