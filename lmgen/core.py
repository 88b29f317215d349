"""The engine core: one batched step (schedule, execute, update) that generation, streaming, scoring, beam search
and the server all drive. It has no threads; engine.py runs it on one for the server.

Scheduling has no prefill or decode phase. Each track (a slot's row of tokens) catches its computed tokens up to
the tokens it holds: every track with one token to go (decoding) runs each step, then prompts go in whole,
position-aligned pieces of CHUNK tokens while the step's prompt budget lasts. A long prompt is spread over steps
while the others keep decoding; a piece's boundaries depend on the request alone, never on the load, so a seeded
request gives the same tokens however it is batched. A new track starts from the longest cached prefix of its
prompt (cache.PrefixIndex), which is the same rule: its computed tokens start further on.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import batch_sampler, constraints, sampling
from .beam import Beam, BeamState
from .cache import KVCache, Span
from .generate import Continuation, Generation, TokenLogprob, token_logprobs
from .stopping import TextTracker

CHUNK = 64  # prompt tokens per piece; pieces start at multiples of CHUNK (or where a cached prefix ends)


class Event(NamedTuple):
    """One step of one sequence of a request; the sequence's last event carries its Generation."""

    index: int
    token_id: int | None
    text: str
    logprob: TokenLogprob | None
    generation: Generation | None
    error: Exception | None = None  # what ended the request, when it failed


class Track:
    """One slot's row: the tokens it holds (or will), and how many of them have keys in the cache."""

    def __init__(self, ids: list[int], held: bool = False):
        self.ids = list(ids)
        self.computed = 0
        self.slot = -1
        self.held = held  # waiting for another track (a fork), not scheduled
        self.all_logits = False  # every position's logits (scoring), not only the last one's

    @property
    def pending(self) -> int:
        """Tokens still to compute."""
        return 0 if self.held else len(self.ids) - self.computed


class Work:
    """A request the core runs: its tracks, and what it does with their logits.

    Subclasses: Generate, BeamSearch, PromptScore.
    """

    cacheable = True  # whether its slots' tokens may be reused by later requests

    def __init__(self, prompt: list[int], n_tracks: int):
        self.prompt = prompt
        self.tracks = [Track(prompt, held=i > 0) for i in range(n_tracks)]
        self.finished = False
        self.prompt_hit = 0  # prompt tokens found in the prefix cache

    def admit(self, cache: KVCache) -> list[Event]:
        """Take the slots; the first track starts from the longest cached prefix of the prompt. Returns the events
        of a request that is over before it starts (nothing to generate)."""
        first = self.tracks[0]
        first.slot, first.computed = cache.allocate_prefix(first.ids if self.cacheable else ())
        self.prompt_hit = first.computed
        for t in self.tracks[1:]:
            t.slot = cache.allocate()
        return []

    def fork(self, cache: KVCache) -> None:
        """Give every held track the first track's prompt keys."""
        for t in self.tracks[1:]:
            cache.copy_prefix(self.tracks[0].slot, t.slot, len(self.prompt))
            t.computed, t.held = len(self.prompt), False

    def update(self, logits: dict[int, torch.Tensor], core: "EngineCore") -> list[Event]:
        """Use this step's logits (by track index) and return the events."""
        raise NotImplementedError

    def close(self, cache: KVCache) -> None:
        """Free the slots (their tokens stay reusable when cacheable)."""
        for t in self.tracks:
            if t.slot >= 0:
                cache.release(t.slot, keep=self.cacheable)
                t.slot = -1
        self.finished = True

    def fail(self, error: Exception, cache: KVCache) -> list[Event]:
        """End with an error: one event per sequence."""
        self.close(cache)
        return [Event(i, None, "", None, None, error) for i in range(self.n_outputs)]

    @property
    def n_outputs(self) -> int:
        return len(self.tracks)


class Generate(Work):
    """Sampling or greedy continuations of one prompt: one track each, sharing the prompt's prefill."""

    def __init__(self, prompt: list[int], continuations: list[Continuation], max_length: int):
        super().__init__(prompt, len(continuations))
        self.seqs, self.max_length = continuations, max_length

    def admit(self, cache):
        if all(s.config.max_new_tokens == 0 or s.length >= self.max_length for s in self.seqs):
            self.finished = True
            for s in self.seqs:
                s.finish_reason = "length"
            return [Event(i, None, "", None, s.result()) for i, s in enumerate(self.seqs)]
        return super().admit(cache)

    def choosing(self, track: int) -> list[Continuation]:
        """The continuations that choose from track's logits: all of them from the prompt's, once it is in."""
        return self.seqs if track == 0 and self.forks_next else [self.seqs[track]]

    @property
    def forks_next(self) -> bool:
        """Whether the prompt's logits are still to serve every continuation (several, none started)."""
        return len(self.tracks) > 1 and not self.seqs[0].tokens

    def rows(self, logits: dict[int, torch.Tensor], core: "EngineCore") -> dict[int, torch.Tensor]:
        """The logits row of each continuation choosing a token this step (the prompt's row serves them all)."""
        if 0 in logits and self.forks_next:
            self.fork(core.cache)  # the prompt is in: every continuation starts from its logits
            return dict.fromkeys(range(len(self.tracks)), logits[0])
        return logits

    def accept(self, i: int, token: int, logprob: TokenLogprob | None, core: "EngineCore") -> Event:
        """Append continuation i's chosen token; its event (with the Generation when it ended)."""
        s, t = self.seqs[i], self.tracks[i]
        piece = s.accept(token, logprob, self.max_length)
        t.ids.append(token)
        done = s.result() if s.finish_reason is not None else None
        if done is not None:
            core.cache.release(t.slot)
            t.slot, t.held = -1, True
        if all(s.finish_reason is not None for s in self.seqs):
            self.finished = True
        return Event(i, token, piece, logprob, done)

    def update(self, logits, core):
        return [ev for _, ev in sample_all([(self, logits)], core)]


def sample_all(works: list[tuple[Generate, dict]], core: "EngineCore") -> list[tuple[Work, Event]]:
    """Choose every continuation's token across these requests in one batched pass; a request whose scores leave
    no token fails alone."""
    rows, events = [], []
    for work, logits in works:
        rows += [(work, i, row) for i, row in work.rows(logits, core).items()]
    if not rows:
        return events
    batch = rows[0][2][None] if len(rows) == 1 else torch.stack([r for *_, r in rows])  # (one row: no copy)
    chosen = batch_sampler.choose([w.seqs[i] for w, i, _ in rows], batch)
    for (work, i, _), result in zip(rows, chosen):
        if work.finished:
            continue
        if isinstance(result, Exception):
            events += [(work, ev) for ev in work.fail(result, core.cache)]
        else:
            events.append((work, work.accept(i, *result, core)))
    return events


class BeamSearch(Work):
    """Beam search: num_beams tracks, reordered after each step as the beams change parents."""

    cacheable = False  # reordering rewrites slots behind the prefix index

    def __init__(self, prompt: list[int], state: BeamState, finish: Callable[[BeamState], list[Generation]]):
        super().__init__(prompt, state.n)
        self.state, self.finish = state, finish

    def admit(self, cache):
        if self.state.over:
            self.finished = True
            return [Event(i, None, "", None, g) for i, g in enumerate(self.finish(self.state))]
        return super().admit(cache)

    def update(self, logits, core):
        if self.tracks[1].held:
            self.fork(core.cache)
        n = self.state.n
        rows = torch.stack([logits[0]] * n) if len(logits) == 1 else torch.stack([logits[i] for i in range(n)])
        sources = self.state.advance(rows)
        if sources is None:
            return self._done(core.cache)
        plen, running = len(self.prompt), self.state.running
        length = plen + len(running[0]) - 1  # all but the newest token, which is fed next
        moved = [i for i, s in enumerate(sources) if s != i]
        if moved:
            slots = [t.slot for t in self.tracks]
            core.cache.reorder([slots[i] for i in moved], [slots[sources[i]] for i in moved], length)
        for t, tokens in zip(self.tracks, running):
            t.ids, t.computed = self.prompt + tokens, length
        return []

    def _done(self, cache):
        self.close(cache)
        results = self.finish(self.state)
        return [Event(i, None, g.text, None, g) for i, g in enumerate(results)]  # the whole text at the end

    @property
    def n_outputs(self) -> int:
        return self.state.config.num_return_sequences


class PromptScore(Work):
    """A prompt's own log-probabilities: each token given those before it, with the top_n alternatives."""

    def __init__(self, prompt: list[int], top_n: int = 0):
        super().__init__(prompt, 1)
        self.tracks[0].all_logits = True
        self.top_n = top_n
        self.logprobs: list[TokenLogprob | None] = [None]

    def admit(self, cache):
        if len(self.prompt) < 2:
            self.finished = True
            return [Event(0, None, "", None, None)]
        self.tracks[0].slot = cache.allocate()  # every position's logits are needed: nothing to reuse
        return []

    def update(self, logits, core):
        rows, first = logits[0]
        ids = self.prompt
        n = min(len(rows), len(ids) - 1 - first)  # this step's rows that predict a prompt token
        self.logprobs += token_logprobs(rows[:n], ids[first + 1:first + 1 + n], self.top_n)
        if len(self.logprobs) < len(ids):
            return []
        self.close(core.cache)
        return [Event(0, None, "", None, None)]


class EngineCore:
    """Requests (Work) in, events out, one batched forward per step over a slot cache."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, *, chunk: int = CHUNK, prompt_budget: int | None = None,
                 decode_one: Callable | None = None):
        self.model, self.cache, self.chunk = model, cache, chunk
        # Prompt tokens a step takes beyond its first piece: on a CPU a step costs about its rows, so each prompt
        # token in it delays every running stream (16: inter-token p99 at llama-server's, BENCHMARKS.md).
        self.prompt_budget = prompt_budget or chunk // 4
        self.decode_one = decode_one  # a compiled single-sequence step (LM.compile()), for steps of one token
        self.waiting: collections.deque[Work] = collections.deque()
        self.running: list[Work] = []
        self.stats = dict(steps=0, batched_steps=0, max_batch=0, prompt_tokens=0, generated_tokens=0)

    def add(self, work: Work) -> None:
        """Queue a request; it takes its slots when enough are free."""
        self.waiting.append(work)

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def abort(self, work: Work) -> None:
        """Drop a request, freeing its slots."""
        if work in self.waiting:
            self.waiting.remove(work)
        if work in self.running:
            self.running.remove(work)
            work.close(self.cache)

    @torch.inference_mode()
    def step(self) -> list[tuple[Work, Event]]:
        """Admit what fits, run one forward over every scheduled token, and return the events it produced."""
        events = self._admit()
        scheduled = self.schedule()
        if not scheduled:
            return events
        try:
            results = self.execute(scheduled)
        except Exception as e:  # the forward failed: every request in it fails, the core goes on
            for work in {id(w): w for w, _, _ in scheduled}.values():
                events += [(work, ev) for ev in work.fail(e, self.cache)]
            self.running = [w for w in self.running if not w.finished]
            return events
        return events + self.update(results)

    def _admit(self) -> list[tuple[Work, Event]]:
        failed = []
        # The head of the queue goes in when its slots are free, or when nothing runs (so a request that can
        # never fit fails, naming the slots, instead of waiting forever).
        while self.waiting and (len(self.waiting[0].tracks) <= self.cache.free_slots or not self.running):
            work = self.waiting.popleft()
            try:
                failed += [(work, ev) for ev in work.admit(self.cache)]
            except Exception as e:
                failed += [(work, ev) for ev in work.fail(e, self.cache)]
                continue
            if not work.finished:
                self.running.append(work)
        return failed

    def schedule(self) -> list[tuple[Work, int, int]]:
        """(request, track index, tokens) to compute this step: every decoding track, then whole prompt pieces."""
        out, budget = [], self.prompt_budget
        for work in self.running:
            out += [(work, i, 1) for i, t in enumerate(work.tracks) if t.pending == 1]
        for work in self.running:
            for i, t in enumerate(work.tracks):
                if t.pending > 1:
                    n = min(t.pending, self.chunk - t.computed % self.chunk)
                    if n > budget and budget < self.prompt_budget:  # the first piece always goes in
                        return out
                    out.append((work, i, n))
                    budget -= n
        return out

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Work, int, int]]) -> list[tuple[Work, int, object]]:
        """One forward over the scheduled tokens; (request, track index, logits) for each track that needs them:
        [V] at a track's last token, or for scoring ([n, V] at every token, the first one's position)."""
        spans, tokens, rows, wants = [], [], [], []
        for work, i, n in scheduled:
            t = work.tracks[i]
            start = len(tokens)
            spans.append(Span(start, n, t.slot, t.computed))
            tokens += t.ids[t.computed:t.computed + n]
            if t.all_logits:
                wants.append((work, i, slice(len(rows), len(rows) + n), t.computed))
                rows += range(start, start + n)
            elif t.computed + n == len(t.ids):
                wants.append((work, i, len(rows), None))
                rows.append(start + n - 1)
        device = self.cache.k.device
        constraints.fill_ahead([s.matcher for w, i, _, _ in wants if isinstance(w, Generate)
                                for s in w.choosing(i) if s.matcher is not None], device)
        if self.decode_one is not None and len(spans) == 1 and spans[0].count == 1:
            self.cache.ensure(spans[0].first + 1)
            positions = torch.tensor([[spans[0].first]])
            logits = self.decode_one(torch.tensor([tokens]), positions, self.cache, spans[0].slot)
        else:
            step = self.cache.plan(spans)
            logits = self.model(torch.tensor([tokens], device=device), step, self.cache,
                                torch.tensor(rows, dtype=torch.long, device=device))
        logits = logits.float()
        for work, i, n in scheduled:
            t = work.tracks[i]
            self.stats["prompt_tokens"] += min(n, max(0, len(work.prompt) - t.computed))
            t.computed += n
            if work.cacheable:
                self.cache.prefix.record(t.slot, t.ids[:t.computed])
        self.stats["steps"] += 1
        self.stats["batched_steps"] += len(spans) > 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(spans))
        return [(w, i, logits[r] if first is None else (logits[r], first)) for w, i, r, first in wants]

    def update(self, results) -> list[tuple[Work, Event]]:
        """Hand each request its logits; collect the events and drop finished requests."""
        by_work: dict[int, tuple[Work, dict]] = {}
        for work, i, row in results:
            by_work.setdefault(id(work), (work, {}))[1][i] = row
        events, sampled = [], []
        for work, logits in by_work.values():
            if isinstance(work, Generate):
                sampled.append((work, logits))
                continue
            try:
                events += [(work, ev) for ev in work.update(logits, self)]
            except Exception as e:  # a bad request fails alone
                events += [(work, ev) for ev in work.fail(e, self.cache)]
        try:
            events += sample_all(sampled, self)
        except Exception as e:  # e.g. a stop string's text check: every request of the pass fails, the core goes on
            for work, _ in sampled:
                if not work.finished:
                    events += [(work, ev) for ev in work.fail(e, self.cache)]
        self.stats["generated_tokens"] += sum(ev.token_id is not None for _, ev in events)
        done = [w for w in self.running if w.finished]
        for work in done:
            self.running.remove(work)
            work.close(self.cache)
        return events


def continuations(prompt: list[int], config, n: int, base_seed: int, eos_ids, detokenizer, index0: int = 0,
                  device="cpu", constraints=None) -> list[Continuation]:
    """n Continuation objects for a prompt, seeded base_seed + index, so batching never changes a seeded result;
    `constraints` (constraints.Constraints) gives each its own matcher when the config has a constraint."""
    out = []
    matchers = constraints.matchers(config, config.stop_token_ids(eos_ids), n) if constraints else [None] * n
    for j in range(n):
        gen = None
        if config.sampling:
            gen = torch.Generator(device).manual_seed(base_seed + index0 + j)
        stop = () if matchers[j] else config.stop or ()  # a constraint says where its output ends
        text = TextTracker(detokenizer(), stop, config.include_stop_str_in_output)
        out.append(Continuation(prompt, config, gen, eos_ids, text, matchers[j]))
    return out


def beam_work(prompt: list[int], config, eos_ids, max_length: int, decode) -> BeamSearch:
    """A beam search request; `decode` turns token ids into text."""
    eos = config.stop_token_ids(eos_ids)
    state = BeamState(prompt, config, eos, max_length, sampling.build_processors(config, len(prompt), eos))

    def finish(state: BeamState) -> list[Generation]:
        out = []
        for b in state.results():
            ended_on_eos = b.finish_reason == "stop" and b.tokens and b.tokens[-1] in eos
            text = decode(b.tokens[:-1] if ended_on_eos else b.tokens)
            out.append(Generation(text, b.tokens, b.finish_reason, prompt,
                                  stop_reason=b.tokens[-1] if ended_on_eos else None, score=b.score))
        return out

    return BeamSearch(prompt, state, finish)


def beam_search(model, cache: KVCache, prompt: list[int], config, eos_ids, max_length: int,
                processors=()) -> list[Beam]:
    """One beam search run to its end on a core over `cache`, with these processors; the best beams."""
    state = BeamState(prompt, config, eos_ids, max_length, processors)
    work = BeamSearch(prompt, state, lambda _: [])
    core = EngineCore(model, cache)
    core.add(work)
    while not work.finished:
        for _, event in core.step():
            if event.error is not None:
                raise event.error
    return state.results()
