"""LM: a loaded model with its tokenizer, and the notebook's operations as methods."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import NamedTuple

import torch

from . import sampling
from .cache import KVCache
from .compiled import CompiledDecode
from .generate import Generation, Sequence, TokenLogprob, generate_tokens, token_logprob
from .params import GenerationConfig
from .stopping import TextTracker
from .tokenizer import Tokenizer

Prompt = str | list[int]
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
        self.eos_token_ids = tuple(eos_token_ids if eos_token_ids is not None else tokenizer.eos_token_ids)
        self._caches: dict[str, KVCache] = {}  # "main", and "batch" for a compiled LM's batches: see _cache_for
        self._compiled = None

    def compile(self) -> "LM":
        """Compile single-sequence decoding with torch.compile, and on a GPU replay it as a CUDA graph.

        On a small CPU the first compile takes minutes; torch caches it on disk for later processes.
        """
        self._compiled = CompiledDecode(self.model)
        return self

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
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        return self.model(ids, positions)[0].float().cpu()

    @torch.inference_mode()
    def next_token_logits(self, prompt: Prompt) -> torch.Tensor:
        """Logits [V] for the token after the prompt."""
        ids = self.encode(prompt)
        tokens = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        last = torch.tensor([len(ids) - 1], device=self.device)
        return self.model(tokens, positions, last=last)[0].float().cpu()

    def next_token_probs(self, prompt: Prompt) -> torch.Tensor:
        """The next-token distribution [V] (softmax of the last logits), summing to 1."""
        return torch.softmax(self.next_token_logits(prompt), dim=-1)

    def top_tokens(self, prompt: Prompt, k: int = 10) -> list[TokenProb]:
        """The k most likely next tokens as (token_id, token_text, probability), most likely first."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        probs = self.next_token_probs(prompt)
        values, ids = torch.topk(probs, min(k, probs.numel()))
        return [TokenProb(int(i), self.tokenizer.token_text(int(i)), float(p)) for p, i in zip(values, ids)]

    def generate(self, prompt: Prompt | list[Prompt], config: GenerationConfig | None = None,
                 **params) -> list[Generation]:
        """Generate continuations; a list of prompts gives num_return_sequences results per prompt, in order.

        Parameters are GenerationConfig's fields (Hugging Face names): max_new_tokens, do_sample,
        temperature, top_k, top_p, min_p, repetition_penalty, stop, num_beams, seed, logprobs, ...
        """
        config = GenerationConfig.from_params(config, **params)
        prompts = [self.encode(p) for p in _prompt_list(prompt)]
        if config.num_beams > 1:
            results = [g for ids in prompts for g in self._beam_search(ids, config)]
        else:
            seqs = self.sequences(prompts, config)
            for _ in self._run(seqs):
                pass
            results = [self.result(s) for s in seqs]
        if config.prompt_logprobs is not None:
            per_prompt = {id(ids): self.prompt_logprobs(ids, config.prompt_logprobs) for ids in prompts}
            for g in results:
                g.prompt_logprobs = per_prompt[id(g.prompt_token_ids)]
        return results

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
        seqs = self.sequences([self.encode(prompt)], config)
        for step in self._run(seqs):
            for s, token, piece in step:
                done = self.result(s) if s.finish_reason else None
                yield StreamEvent(token, piece, s.logprobs[-1] if s.logprobs else None, done)
        if not seqs[0].tokens:  # finished before its first token (max_new_tokens=0)
            yield StreamEvent(None, "", None, self.result(seqs[0]))

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: Prompt, top_n: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first)."""
        ids = self.encode(prompt)
        logits = self.logits(ids)
        return [None] + [token_logprob(logits[i - 1], ids[i], top_n) for i in range(1, len(ids))]

    def score(self, text: Prompt) -> Score:
        """Per-token log-probabilities of a text, its total log-likelihood and its perplexity."""
        ids = self.encode(text)
        if len(ids) < 2:
            raise ValueError(f"text must have at least 2 tokens to be scored, got {len(ids)}")
        logprobs = torch.log_softmax(self.logits(ids)[:-1], dim=-1)
        token_lp = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].double()
        total = float(token_lp.sum())
        return Score(ids, token_lp.tolist(), total, math.exp(-total / (len(ids) - 1)))

    def sequences(self, prompts: list[list[int]], config: GenerationConfig) -> list[Sequence]:
        """Sequence objects for the prompts, num_return_sequences each, seeded seed + index."""
        seqs = []
        base_seed = config.seed if config.seed is not None else int(torch.randint(2**62, ()))
        for ids in prompts:
            for _ in range(config.num_return_sequences):
                # One generator per sequence, seeded by its index in the request, so the same
                # request gives the same tokens however it is batched.
                gen = None
                if config.sampling:
                    gen = torch.Generator(self.device).manual_seed(base_seed + len(seqs))
                text = TextTracker(self.tokenizer.detokenizer(), config.stop or (), config.include_stop_str_in_output)
                seqs.append(Sequence(ids, config, gen, self.eos_token_ids, text))
        return seqs

    def _max_length(self, lengths: list[int], config: GenerationConfig) -> int:
        return min(self.context_length, max(lengths) + config.max_new_tokens)

    @torch.inference_mode()
    def _run(self, seqs: list[Sequence]):
        max_length = self._max_length([s.length for s in seqs], seqs[0].config)
        cache = self._cache_for(len(seqs), max_length)
        yield from generate_tokens(self.model, cache, seqs, max_length, self._compiled)

    @torch.inference_mode()
    def _beam_search(self, ids: list[int], config: GenerationConfig) -> list[Generation]:
        from .beam import beam_search

        max_length = self._max_length([len(ids)], config)
        cache = self._cache_for(config.num_beams, max_length)
        eos = config.stop_token_ids(self.eos_token_ids)
        processors = sampling.build_processors(config, len(ids), eos)
        beams = beam_search(self.model, cache, ids, config, eos, max_length, processors)
        out = []
        for b in beams:
            ended_on_eos = b.finish_reason == "stop" and b.tokens and b.tokens[-1] in eos
            text = self.tokenizer.decode(b.tokens[:-1] if ended_on_eos else b.tokens)
            out.append(Generation(text, b.tokens, b.finish_reason, ids,
                                  stop_reason=b.tokens[-1] if ended_on_eos else None, score=b.score))
        return out

    def _cache_for(self, n_slots: int, max_length: int) -> KVCache:
        # A compiled step is compiled (and on a GPU captured) for its cache's shape: a compiled LM keeps its
        # batches (decoded eagerly) in a second cache, so a batch in between costs no recompile.
        key = "batch" if self._compiled is not None and n_slots > 1 else "main"
        c = self._caches.pop(key, None)
        if c is None or c.n_slots < n_slots or c.max_len < max_length or c.free_slots < c.n_slots:
            c = None  # free the old one before allocating
            if self._compiled is None:
                length = min(self.context_length, -(-max_length // 16) * 16)  # a little room to reuse it
            else:  # a compiled step has fixed shapes: power-of-two lengths from 128, each compiled once
                length = min(self.context_length, 1 << max(7, (max_length - 1).bit_length()))
            c = KVCache.for_model(self.model, n_slots, length)
        self._caches[key] = c
        return c

    def result(self, s: Sequence) -> Generation:
        """The Generation a finished (or running) sequence has produced."""
        return Generation(s.text.text if s.text else "", list(s.tokens), s.finish_reason, s.prompt,
                          stop_reason=s.stop_reason, logprobs=s.logprobs)


class StreamEvent(NamedTuple):
    """One step of a stream: the token, the text it released, its logprob, and at the end the Generation."""

    token_id: int | None
    text: str
    logprob: TokenLogprob | None
    generation: Generation | None


class Score(NamedTuple):
    """What score() returns: the text's ids, the log-probability of each token after the first, and totals."""

    token_ids: list[int]
    logprobs: list[float]
    total_logprob: float
    perplexity: float


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone UTF-16 surrogate in text, or None (text is valid Unicode)."""
    m = None if text.isascii() else _SURROGATE.search(text)
    return m.start() if m else None


def _prompt_list(prompt) -> list:
    prompts = prompt if _is_prompt_list(prompt) else [prompt]
    if not prompts:
        raise ValueError("prompt list is empty")
    return prompts


def _is_prompt_list(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and (not prompt or isinstance(prompt[0], (str, list, tuple)))
