"""Continuous batching for the server: one thread drives the engine core; requests join and leave between steps."""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator

import torch

from .cache import KVCache
from .core import CHUNK, EngineCore, Event, PromptScore, Work
from .errors import LmgenError
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


class Request:
    """A submitted request: n sequences whose events arrive as the engine steps."""

    _ids = itertools.count(1)

    def __init__(self, prompt: list[int], config: GenerationConfig | None, work: Work):
        self.id = f"req-{next(self._ids)}"
        self.prompt, self.config, self.work, self.n = prompt, config, work, work.n_outputs
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
    """The server's engine: a thread stepping an EngineCore; requests are submitted from any thread."""

    def __init__(self, lm: LM, *, max_concurrent: int = 8, max_waiting: int = 64, max_model_len: int | None = None,
                 chunk: int = CHUNK, prefix_caching: bool = True, own_thread: bool = True):
        if max_concurrent < 1 or max_waiting < 1:
            raise ValueError("max_concurrent and max_waiting must be >= 1")
        self.lm = lm
        self.max_concurrent, self.max_waiting = max_concurrent, max_waiting
        self.max_model_len = min(lm.context_length, max_model_len or 2048)
        self.cache = KVCache.for_model(lm.model, max_concurrent, self.max_model_len)
        self.cache.prefix.enabled = prefix_caching
        self.core = EngineCore(lm.model, self.cache, chunk=chunk)
        self._waiting: collections.deque[Request] = collections.deque()  # submitted, not yet in the core
        self._calls: collections.deque = collections.deque()  # (future, fn, args) to run on the engine's thread
        self._requests: dict[int, Request] = {}  # id(work) -> request, for those in the core
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._driven = not own_thread  # run() drives it, from the caller's thread
        self._exited = threading.Event()
        self._counts = dict(requests_finished=0, requests_cancelled=0, requests_failed=0)
        self._ttft, self._itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)

    def start(self) -> None:
        """Start the scheduler thread (unless run() drives the engine from a thread of the caller's)."""
        if self._thread is None and not self._driven:
            self._thread = threading.Thread(target=self._loop, name="lmgen-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Drive the scheduler in this thread until stop(): the thread that loaded the model decodes fastest,
        since each new thread calling the native kernels brings its own OpenMP team, and two teams on the
        cores hand them back and forth (about half the tokens/s on 2 cores)."""
        self._driven = True
        try:
            self._loop()
        finally:
            self._exited.set()

    def submit(self, prompt_ids: list[int], config: GenerationConfig) -> Request:
        """Queue a generation request; raises EngineFull when the queue is full, ParameterError when it cannot fit."""
        total = len(prompt_ids) + config.max_new_tokens
        if total > self.max_model_len:
            raise ParameterError("max_new_tokens", f"at most {self.max_model_len - len(prompt_ids)}",
                                 config.max_new_tokens, message=(
                                     f"the prompt has {len(prompt_ids)} tokens and max_tokens is "
                                     f"{config.max_new_tokens}: together {total}, more than the model's maximum "
                                     f"length {self.max_model_len}"))
        field = "num_beams" if config.num_beams > 1 else "num_return_sequences"
        wanted = max(config.num_beams, config.num_return_sequences)
        if wanted > self.max_concurrent:
            raise ParameterError(field, f"at most the server's {self.max_concurrent} concurrent sequences", wanted,
                                 message=f"{'n' if wanted == config.num_return_sequences else field}={wanted} "
                                         f"is more than the server's {self.max_concurrent} "
                                         "concurrent sequences")
        return self._queue(Request(list(prompt_ids), config, self.lm.work(list(prompt_ids), config,
                                                                            self.max_model_len)))

    def submit_score(self, prompt_ids: list[int], top_n: int = 0) -> Request:
        """Queue the scoring of a prompt (its tokens' logprobs); the request's `work.logprobs` holds them."""
        if len(prompt_ids) > self.max_model_len:
            raise ParameterError("prompt", f"at most {self.max_model_len} tokens", len(prompt_ids))
        return self._queue(Request(list(prompt_ids), None, PromptScore(list(prompt_ids), top_n)))

    def _queue(self, request: Request) -> Request:
        with self._cond:
            if self._stopping:
                raise EngineFull("the engine is shutting down")
            if len(self._waiting) + len(self.core.waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting) + len(self.core.waiting)} requests are already waiting")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def call(self, fn, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the engine's thread between steps: forward passes outside the core (the explorer's)
        belong there, since another thread calling the kernels would slow the engine for good (see run())."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise EngineFull("the engine is shutting down")
            self._calls.append((future, fn, args))
            self._cond.notify()
        return future

    def stats(self) -> dict:
        """Counters for /metrics: sequences running and waiting, steps, tokens, prefix cache, latencies."""
        with self._cond:
            running = sum(1 for w in self.core.running for t in w.tracks if t.slot >= 0)
            waiting = sum(len(w.tracks) for w in self.core.waiting) + sum(r.n for r in self._waiting)
            prefix = self.cache.prefix
            return dict(self.core.stats, **self._counts, running=running, waiting=waiting,
                        prefix_queries=prefix.queries, prefix_hits=prefix.hits, prefix_hit_tokens=prefix.hit_tokens,
                        kv_cache_bytes=self.cache.nbytes(), ttft=self._ttft.snapshot(), itl=self._itl.snapshot())

    def stop(self) -> None:
        """Stop the scheduler; running and waiting requests end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        elif self._driven:
            self._exited.wait(timeout=30)
        for future, _, _ in self._calls:
            future.cancel()
        for request in list(self._waiting) + list(self._requests.values()):
            stopped = EngineStopped("engine shutting down")
            request._push([Event(i, None, "", None, None, stopped) for i in range(request.n)], True)

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._calls and not self.core.has_work():
                    self._cond.wait()
                if self._stopping:
                    return
                while self._waiting:
                    request = self._waiting.popleft()
                    self._requests[id(request.work)] = request
                    self.core.add(request.work)
                running = list(self._requests.values())
                calls, self._calls = self._calls, collections.deque()
            for future, fn, args in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except Exception as e:
                        future.set_exception(e)
            for request in running:
                if request.cancelled:
                    self.core.abort(request.work)
                    self._finish(request, "requests_cancelled")
            self._deliver(self.core.step())

    def _deliver(self, events: list[tuple[Work, Event]]) -> None:
        now = time.perf_counter()
        by_request: dict[int, list[Event]] = {}
        for work, event in events:
            by_request.setdefault(id(work), []).append(event)
            request = self._requests.get(id(work))
            if request is not None and event.token_id is not None:
                first = request.last_token_time[event.index] == 0.0
                (self._ttft if first else self._itl).observe(
                    now - (request.submitted if first else request.last_token_time[event.index]))
                request.last_token_time[event.index] = now
        for key, evs in by_request.items():
            request = self._requests.get(key)
            if request is None:
                continue
            request._push(evs)
            if request.work.finished:
                failed = any(e.error is not None for e in evs)
                self._finish(request, "requests_failed" if failed else "requests_finished")

    def _finish(self, request: Request, counter: str) -> None:
        with self._cond:
            self._requests.pop(id(request.work), None)
        self._counts[counter] += 1
        request._push([], done=True)
