"""Continuous batching: one scheduler thread owns the model's slot cache; requests join and leave between steps."""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import NamedTuple

import torch

from .cache import KVCache
from .errors import LmgenError
from .generate import Generation, Sequence, TokenLogprob, decode_step, prefill
from .lm import LM
from .params import GenerationConfig, ParameterError

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Fixed buckets, their counts and a sum: constant memory however long the engine runs."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        """A copy for reporting: buckets, counts (the last is +Inf), sum and count."""
        return {"buckets": self.buckets, "counts": list(self.counts), "sum": self.sum, "count": sum(self.counts)}


class EngineFull(LmgenError):
    """The waiting queue is full: try again later."""


class EngineStopped(LmgenError):
    """The engine stopped before the request finished."""


class Event(NamedTuple):
    """One step of one sequence of a request; the sequence's last event carries its Generation."""

    index: int
    token_id: int | None
    text: str
    logprob: TokenLogprob | None
    generation: Generation | None
    error: Exception | None = None  # what ended the request, when it failed


class Request:
    """A submitted request: n sequences whose events arrive as the engine steps."""

    _ids = itertools.count(1)

    def __init__(self, prompt: list[int], config: GenerationConfig):
        self.id = f"req-{next(self._ids)}"
        self.prompt, self.config, self.n = prompt, config, config.num_return_sequences
        self.seqs: list[Sequence] = []
        self.last_token_time = [0.0] * self.n
        self.submitted = time.perf_counter()
        self.cancelled = False
        self._events: collections.deque = collections.deque()
        self._done = False
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    def cancel(self) -> None:
        """Stop generating; the engine frees the request's slots before its next step."""
        self.cancelled = True

    def events(self) -> Iterator[Event]:
        """Events as they come (blocking), until every sequence has finished."""
        while True:
            with self._cond:
                while not self._events and not self._done:
                    self._cond.wait()
                batch, finished = list(self._events), self._done
                self._events.clear()
            yield from batch
            if finished:
                return

    async def aevents(self) -> AsyncIterator[Event]:
        """Events as they come, for asyncio code."""
        with self._cond:
            self._loop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
        while True:
            with self._cond:
                batch, finished = list(self._events), self._done
                self._events.clear()
                if not batch and not finished:
                    self._wakeup.clear()
            for event in batch:
                yield event
            if finished:
                return
            if not batch:
                await self._wakeup.wait()

    def _push(self, events: list[Event], done: bool = False) -> None:
        with self._cond:
            self._events.extend(events)
            self._done = self._done or done
            self._cond.notify_all()
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._wakeup.set)
                except RuntimeError:  # the consumer's event loop is gone: nobody is listening
                    self.cancelled = True


class Engine:
    """Iteration-level scheduler over a slot cache: prefill newcomers, then one decode step for everyone."""

    def __init__(self, lm: LM, *, max_concurrent: int = 8, max_waiting: int = 64, max_model_len: int | None = None):
        if max_concurrent < 1 or max_waiting < 1:
            raise ValueError("max_concurrent and max_waiting must be >= 1")
        self.lm = lm
        self.max_concurrent, self.max_waiting = max_concurrent, max_waiting
        self.max_model_len = min(lm.context_length, max_model_len or 2048)
        self.cache = KVCache.for_model(lm.model, max_concurrent, self.max_model_len)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = dict(steps=0, batched_steps=0, max_batch=0, prompt_tokens=0, generated_tokens=0,
                           requests_finished=0, requests_cancelled=0, requests_failed=0)
        self._ttft, self._itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._loop, name="lmgen-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], config: GenerationConfig) -> Request:
        """Queue a request; raises EngineFull when the queue is full, ValueError when it cannot fit."""
        total = len(prompt_ids) + config.max_new_tokens
        if total > self.max_model_len:
            raise ParameterError("max_new_tokens", f"at most {self.max_model_len - len(prompt_ids)}",
                                 config.max_new_tokens, message=(
                                     f"the prompt has {len(prompt_ids)} tokens and max_tokens is "
                                     f"{config.max_new_tokens}: together {total}, more than the model's maximum "
                                     f"length {self.max_model_len}"))
        if config.num_return_sequences > self.max_concurrent:
            raise ParameterError("num_return_sequences", f"at most the server's {self.max_concurrent} concurrent "
                                 "sequences", config.num_return_sequences,
                                 message=f"n={config.num_return_sequences} is more than the server's "
                                         f"{self.max_concurrent} concurrent sequences")
        if config.num_beams > 1:
            raise ParameterError("num_beams", "1 on the server", config.num_beams,
                                 message="num_beams > 1 is not supported by the server")
        request = Request(list(prompt_ids), config)
        with self._cond:
            if self._stopping:
                raise EngineFull("the engine is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def stats(self) -> dict:
        """Counters for /metrics: sequences running and waiting, steps, tokens, latencies."""
        with self._cond:
            running = sum(1 for r in self._running for s in r.seqs if s.finish_reason is None)
            waiting = sum(r.n for r in self._waiting)
            return dict(self._stats, running=running, waiting=waiting, ttft=self._ttft.snapshot(),
                        itl=self._itl.snapshot())

    def stop(self) -> None:
        """Stop the scheduler; running and waiting requests end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for request in list(self._waiting) + self._running:
            stopped = EngineStopped("engine shutting down")
            request._push([Event(i, None, "", None, None, stopped) for i in range(request.n)], True)

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    return
            self._drop_cancelled()
            self._admit()
            self._step()

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._running if r.cancelled]:
            for s in request.seqs:
                if s.finish_reason is None:
                    s.finish_reason = "cancelled"
                    self.cache.release(s.slot)
            self._finish(request, "requests_cancelled")
        with self._cond:
            cancelled = [r for r in self._waiting if r.cancelled]
            for r in cancelled:
                self._waiting.remove(r)
        for r in cancelled:
            self._finish(r, "requests_cancelled")

    def _admit(self) -> None:
        # New requests join between decode steps, as long as their sequences fit in free slots.
        while True:
            with self._cond:
                if not self._waiting or self._waiting[0].n > self.cache.free_slots:
                    return
                request = self._waiting.popleft()
            try:
                request.seqs = self.lm.sequences([request.prompt], request.config)
                for s in request.seqs:
                    s.slot = self.cache.allocate()
                with self._cond:
                    self._running.append(request)
                logits = prefill(self.lm.model, self.cache, [request.prompt], [request.seqs[0].slot])[0]
                for s in request.seqs[1:]:
                    self.cache.copy_prefix(request.seqs[0].slot, s.slot, len(request.prompt))
                self._stats["prompt_tokens"] += len(request.prompt)
                self._advance(request, dict.fromkeys(range(request.n), logits))
            except Exception as e:  # one bad request must not stop the others
                self._fail(request, e)

    def _step(self) -> None:
        live = [(r, s) for r in self._running for s in r.seqs if s.finish_reason is None]
        if not live:
            return
        try:
            logits = decode_step(self.lm.model, self.cache, [s for _, s in live])
        except Exception as e:
            for request in list(self._running):
                self._fail(request, e)
            return
        self._stats["steps"] += 1
        self._stats["batched_steps"] += len(live) > 1
        self._stats["max_batch"] = max(self._stats["max_batch"], len(live))
        rows: dict[int, dict[int, torch.Tensor]] = {}
        for (request, s), row in zip(live, logits):
            rows.setdefault(id(request), {})[request.seqs.index(s)] = row
        for request in list(self._running):
            if id(request) in rows:
                try:
                    self._advance(request, rows[id(request)])
                except Exception as e:
                    self._fail(request, e)

    def _advance(self, request: Request, logits: dict[int, torch.Tensor]) -> None:
        """Choose each listed sequence's next token from its logits row and send the events."""
        now = time.perf_counter()
        events = []
        for index, row in logits.items():
            s = request.seqs[index]
            if not s.tokens:
                self._ttft.observe(now - request.submitted)
            else:
                self._itl.observe(now - request.last_token_time[index])
            request.last_token_time[index] = now
            piece = s.advance(row, self.max_model_len)
            self._stats["generated_tokens"] += 1
            done = None
            if s.finish_reason is not None:
                self.cache.release(s.slot)
                done = self.lm.result(s)
            events.append(Event(index, s.tokens[-1], piece, s.logprobs[-1] if s.logprobs else None, done))
        finished = all(s.finish_reason is not None for s in request.seqs)
        request._push(events)
        if finished:
            self._finish(request, "requests_finished")

    def _finish(self, request: Request, counter: str) -> None:
        with self._cond:
            if request in self._running:
                self._running.remove(request)
        self._stats[counter] += 1
        request._push([], done=True)

    def _fail(self, request: Request, error: Exception) -> None:
        for s in request.seqs:
            if s.finish_reason is None and s.slot >= 0:
                s.finish_reason = "error"
                self.cache.release(s.slot)
        request._push([Event(i, None, "", None, None, error) for i in range(request.n)])
        self._finish(request, "requests_failed")
