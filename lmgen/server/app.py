"""The OpenAI-compatible HTTP API: FastAPI routes over the continuous-batching engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import tools
from ..engine import Engine, EngineFull, EngineStopped
from ..errors import LmgenError
from ..params import GenerationConfig, ParameterError
from ..sampling import InvalidScoresError
from .errors import APIError, from_parameter_error, from_validation_errors, shutdown_error
from .explorer import forward_gate
from .explorer import router as explorer_router
from .gate import Gate, check_api_key
from .metrics import Metrics
from .output import Choice, TokenStrings, chat_logprobs, completion_logprobs, echo_logprobs, usage
from .protocol import (
    API_NAMES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
    SamplingRequest,
    template_messages,
)
from .tokenizer_api import router as tokenizer_router

MAX_PROMPTS = 64  # prompts in one completions request
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 429, 500, 503)}


class ServerState:
    """What the routes share: the engine, the served model's names, the limits and the metrics."""

    def __init__(self, engine: Engine, *, model_id: str | None, api_key: str | None, max_n: int, max_body: int,
                 allowed_hosts: set[str] | None = None, frame_ancestors: list[str] | None = None):
        self.engine, self.lm = engine, engine.lm
        self.model_id = model_id or self.lm.name
        self.names = {self.model_id, self.lm.name, Path(self.lm.name).name}
        check_api_key(api_key)
        self.api_key, self.max_n, self.max_body = api_key, max_n, max_body
        self.allowed_hosts = allowed_hosts  # None: any Host header
        self.frame_ancestors = list(frame_ancestors or ())  # the origins that may show the page in a frame
        self.metrics = Metrics()
        self.strings = TokenStrings(self.lm.tokenizer)
        self.id_strings = TokenStrings(self.lm.tokenizer, as_ids=True)
        self.created = int(time.time())
        self.shutting_down = False
        self._stopper: threading.Thread | None = None
        self._lock = threading.Lock()

    def begin_shutdown(self) -> None:
        """Stop the engine (once, off the event loop): running requests end with an error event."""
        with self._lock:
            self.shutting_down = True
            if self._stopper is None:
                self._stopper = threading.Thread(target=self.engine.stop, name="lmgen-stop", daemon=True)
                self._stopper.start()

    def wait_stopped(self, timeout: float = 30) -> None:
        """Wait for begin_shutdown's engine.stop() to return."""
        if self._stopper is not None:
            self._stopper.join(timeout)

    def check_model(self, name: str | None) -> None:
        """404 unless the request names the served model (or none)."""
        if name is not None and name not in self.names:
            raise APIError(404, f"The model '{name}' does not exist: this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")

    def config(self, body: SamplingRequest, max_tokens: int, logprobs: int | None,
               prompt_lengths: list[int]) -> GenerationConfig:
        """The GenerationConfig for a request, after the server's own limits; 400 naming the field otherwise."""
        if body.n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n} on this server, got {body.n}", param="n")
        limit, longest = self.engine.max_model_len, max(prompt_lengths)
        if longest + max_tokens > limit:
            raise APIError(400, f"The prompt has {longest} tokens and max_tokens is {max_tokens}: together "
                                f"{longest + max_tokens}, more than this model's maximum length of {limit} tokens.",
                           param="max_tokens")
        eos = None
        if body.stop_token_ids:
            self.check_token_ids(body.stop_token_ids, "stop_token_ids")
            eos = list(self.lm.eos_token_ids) + body.stop_token_ids
        config = body.to_generation_config(max_tokens, logprobs, eos)
        self.check_token_ids(list(config.logit_bias or ()), "logit_bias")
        return config

    def token_strings(self, body: SamplingRequest) -> TokenStrings:
        """How a request's logprobs name tokens: their text, or vLLM's "token_id:<id>" when it asks."""
        return self.id_strings if body.return_tokens_as_token_ids else self.strings

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """400 naming `param` unless every id is in the served model's vocabulary."""
        bad = [i for i in ids if not 0 <= i < self.lm.vocab_size]
        if bad:
            raise APIError(400, f"{param} must be token ids in [0, {self.lm.vocab_size}), got {bad[:5]}", param=param)

    def check_constraint(self, field: str, value, param: str) -> None:
        """400 naming `param` unless the constraint compiles for the served model."""
        try:
            self.lm.constraints.compile(field, value)
        except ParameterError as e:
            raise from_parameter_error(e, {field: param}) from None

    def submit(self, prompts: list[list[int]], config: GenerationConfig, names: dict[str, str] | None = None) -> list:
        """One engine request per prompt; 429 (Retry-After) when the queue is full, 503 when shutting down.
        `names`: the request's own names of GenerationConfig fields, for a 400 that names one."""
        if self.shutting_down:
            raise shutdown_error()
        requests = []
        try:
            for ids in prompts:
                requests.append(self.engine.submit(ids, config))
        except ParameterError as e:
            cancel(requests)
            raise from_parameter_error(e, names) from None
        except EngineFull as e:
            cancel(requests)
            if self.shutting_down:
                raise shutdown_error()
            raise APIError(429, f"The server is busy ({e}); retry shortly.", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        return requests

    def score(self, ids: list[int], top_n: int) -> list:
        """A prompt's own token logprobs, computed by the engine among the running requests (blocking)."""
        try:
            request = self.engine.submit_score(ids, top_n)
        except EngineFull as e:
            raise APIError(429, f"The server is busy ({e}); retry shortly.", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        for event in request.events():
            if event.error is not None:
                raise self.failure(event.error)
        return request.work.logprobs

    def failure(self, error: Exception) -> APIError:
        """The error for a request the engine ended with an error event."""
        if self.shutting_down or isinstance(error, EngineStopped):
            return APIError(503, f"Generation stopped: {error}.", type="server_error", code="shutting_down")
        if isinstance(error, InvalidScoresError) and error.fields:  # the request's parameters, not the server
            return APIError(400, f"Generation failed: {error}; choose other values.",
                            param=API_NAMES.get(error.fields[0], error.fields[0]), code="invalid_scores")
        return APIError(500, f"Generation failed: {type(error).__name__}: {error}.", type="server_error")


def cancel(requests) -> None:
    """Cancel engine requests (a no-op for finished ones)."""
    for r in requests:
        r.cancel()


async def merged(requests) -> AsyncIterator[tuple[int, object]]:
    """(request index, event) from several engine requests as they come."""
    if len(requests) == 1:
        async for event in requests[0].aevents():
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k, r):
        try:
            async for event in r.aevents():
                queue.put_nowait((k, event))
        finally:
            queue.put_nowait((k, None))

    tasks = [asyncio.create_task(pump(k, r)) for k, r in enumerate(requests)]
    try:
        left = len(tasks)
        while left:
            k, event = await queue.get()
            if event is None:
                left -= 1
            else:
                yield k, event
    finally:
        for t in tasks:
            t.cancel()


class EventStream(StreamingResponse):
    """Server-sent events whose engine requests are cancelled however the response ends (client gone too)."""

    def __init__(self, content, requests):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.requests = requests

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel(self.requests)


def sse(obj) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


async def collect(state: ServerState, requests, choices: list[Choice], n: int, http: Request) -> bool:
    """Feed every event into its choice; False when the client left first (its requests are cancelled)."""
    async def consume():
        async for k, event in merged(requests):
            if event.error:
                raise state.failure(event.error)
            choices[k * n + event.index].add(event)

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            # A non-streaming client that hangs up would otherwise hold its slots until the end.
            if not task.done() and await http.is_disconnected():
                return False
        task.result()
        return True
    finally:
        task.cancel()
        cancel(requests)


def _base(state: ServerState, prefix: str, obj: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": state.model_id}


def create_app(engine: Engine, *, api_key: str | None = None, max_n: int = 8, max_body: int = 1 << 20,
               model_id: str | None = None, allowed_hosts: set[str] | None = None,
               frame_ancestors: list[str] | None = None) -> FastAPI:
    """The FastAPI app serving `engine`'s model; it starts the engine and stops it at shutdown.

    allowed_hosts: the Host header names answered (None: any); serve() sets it for a loopback bind.
    frame_ancestors: the origins whose pages may frame the explorer (CSP; none by default), as lm.explore() needs.
    """
    state = ServerState(engine, model_id=model_id, api_key=api_key, max_n=max_n, max_body=max_body,
                        allowed_hosts=allowed_hosts, frame_ancestors=frame_ancestors)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        state.begin_shutdown()
        await asyncio.to_thread(state.wait_stopped)

    app = FastAPI(title="lmgen", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible API for a local model, with continuous batching.")
    app.state.lmgen = state
    app.add_middleware(Gate, state=state)
    app.include_router(explorer_router)  # the token explorer: the page at / and POST /v1/next_token
    app.include_router(tokenizer_router)  # vLLM's /tokenize, /detokenize, /tokenizer_info (lm-eval uses them)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(ParameterError)
    async def _bad_parameter(request, e: ParameterError):
        return from_parameter_error(e).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return from_validation_errors(list(e.errors())).response()

    @app.exception_handler(ValidationError)
    async def _invalid_model(request, e: ValidationError):
        return from_validation_errors(list(e.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return APIError(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):  # a bug in a route: one 500, the server goes on
        return APIError(500, f"Internal error: {type(e).__name__}: {e}", type="server_error").response()

    @app.get("/health", summary="Liveness: 200 while the server accepts requests, 503 while it shuts down")
    async def health():
        """Whether the server is up."""
        if state.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "model": state.model_id}

    @app.get("/metrics", response_class=PlainTextResponse,
             summary="Prometheus metrics: requests by status, tokens, running/waiting sequences, latencies")
    async def metrics():
        """Prometheus text format."""
        return PlainTextResponse(state.metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, summary="The served model")
    async def models():
        """The one model this server serves."""
        return {"object": "list", "data": [_card(state)]}

    @app.get("/v1/models/{model:path}", responses=ERRORS, summary="One model by id (ids may hold slashes)")
    async def model(model: str):
        """The served model, or 404."""
        state.check_model(model)
        return _card(state)

    @app.post("/v1/completions", summary="Continue a prompt (OpenAI completions)",
              responses={200: {"model": CompletionResponse,
                               "content": {"text/event-stream": {}}}, **ERRORS})
    async def completions(body: CompletionRequest, request: Request):
        """Complete one or several prompts; `stream: true` sends text_completion chunks as server-sent events."""
        state.check_model(body.model)
        body.check()
        prompt = body.prompt
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt  # lists: not empty
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
        try:
            ids = await asyncio.to_thread(lambda: [state.lm.encode(p) for p in prompts])
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        config = state.config(body, max_tokens, body.logprobs, [len(i) for i in ids])
        n, strings = body.n, state.token_strings(body) if body.logprobs is not None else None
        choices = [Choice(k * n + j, finish_reason=None if max_tokens else "length")
                   for k in range(len(ids)) for j in range(n)]
        if body.echo:
            async with forward_gate(request):
                await asyncio.to_thread(_echo, state, prompts, ids, choices, n, body.logprobs)
        prompt_tokens = sum(len(i) for i in ids)
        requests = state.submit(ids, config, body.constraint_names()) if max_tokens else []
        base = _base(state, "cmpl", "text_completion")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(_stream_completion(state, requests, choices, n, base, prompt_tokens, strings,
                                                  include_usage), requests)
        if requests and not await collect(state, requests, choices, n, request):
            return Response(status_code=499)
        return JSONResponse(dict(base, choices=[
            {"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
             "logprobs": completion_logprobs(c.logprobs, strings) if strings else None}
            for c in choices], usage=usage(prompt_tokens, choices)))

    @app.post("/v1/chat/completions", summary="Answer a conversation (OpenAI chat completions)",
              responses={200: {"model": ChatCompletionResponse,
                               "content": {"text/event-stream": {}}}, **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Answer through the model's chat template; `stream: true` sends chat.completion.chunk events."""
        state.check_model(body.model)
        body.check()
        # The prompt shows every tool (none with tool_choice "none"); a reply may call only the callable ones.
        shown = [t.model_dump(exclude_none=True) for t in body.tools or ()] if body.calls_tools() else []
        callable_tools = body.callable_tools() if shown else []
        for i, t in enumerate(body.tools or ()):  # each schema compiles, or the 400 names it
            if t.function.parameters is not None:
                state.check_constraint("json_schema", t.function.parameters, f"tools[{i}].function.parameters")
        native = tools.native(state.lm.tokenizer.chat_template)
        messages = tools.prompt_messages(template_messages(body.messages), shown, native)
        try:
            ids = await asyncio.to_thread(state.lm.chat_ids, messages, shown if native else None)
        except (LmgenError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        limit = engine.max_model_len
        max_tokens = body.max_completion_tokens or body.max_tokens or limit - len(ids)
        if max_tokens < 1:
            raise APIError(400, f"The messages take {len(ids)} tokens, leaving no room to answer in this model's "
                                f"maximum length of {limit} tokens.", param="messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        config = state.config(body, max_tokens, logprobs, [len(ids)])
        if callable_tools:
            config = GenerationConfig.from_params(config, grammar=tools.grammar(
                callable_tools, forced=body.tool_choice not in (None, "auto")))
        n, strings = body.n, state.token_strings(body) if body.logprobs else None
        choices = [Choice(j) for j in range(n)]
        parsers = [tools.ToolCallParser() for _ in choices] if callable_tools else None
        requests = state.submit([ids], config, body.constraint_names())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            base = _base(state, "chatcmpl", "chat.completion.chunk")
            return EventStream(_stream_chat(state, requests, choices, base, len(ids), strings,
                                            include_usage, parsers), requests)
        if not await collect(state, requests, choices, n, request):
            return Response(status_code=499)
        base = _base(state, "chatcmpl", "chat.completion")
        answers = []
        for c in choices:
            message, finish = {"role": "assistant", "content": c.text}, c.finish_reason
            if parsers:
                parser = parsers[c.index]
                parser.feed(c.text, final=True)
                message, finish = _tool_message(parser), _tool_finish(parser, finish)
            answers.append({"index": c.index, "message": message, "finish_reason": finish,
                            "logprobs": chat_logprobs(c.logprobs, strings) if strings else None})
        return JSONResponse(dict(base, choices=answers, usage=usage(len(ids), choices)))

    def openapi():
        # Invalid bodies get 400 in OpenAI's shape, never FastAPI's 422: keep the schema honest.
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            error = {"description": "Refused by the gate", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    responses.setdefault("403", error)  # Gate: a Host the server does not answer
                    if "requestBody" in operation:
                        responses.setdefault("415", error)  # Gate: a body that is not application/json
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
    return app


def _card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "lmgen",
            "max_model_len": state.engine.max_model_len}


def _echo(state: ServerState, prompts: list, ids: list[list[int]], choices: list[Choice], n: int,
          logprobs: int | None) -> None:
    """Start each choice with its prompt: the text, and with logprobs each prompt token's (in a worker thread)."""
    for k, (p, i) in enumerate(zip(prompts, ids)):
        text = p if isinstance(p, str) else state.lm.tokenizer.decode(i)
        entries = echo_logprobs(state.lm, i, state.score(i, logprobs)) if logprobs is not None else []
        for c in choices[k * n:(k + 1) * n]:
            c.text, c.logprobs = text, list(entries)


async def _stream_completion(state, requests, choices, n, base, prompt_tokens, strings, include_usage):
    """text_completion chunks, then (optionally) usage, then [DONE]; an error event ends it with an error chunk.
    `strings` names the tokens in logprobs (None: no logprobs)."""
    extra = {"usage": None} if include_usage else {}
    for c in choices:
        if c.text or c.finish_reason:  # echo: the prompt comes first (alone, with max_tokens 0)
            logprobs = completion_logprobs(c.logprobs, strings) if strings else None
            yield sse(dict(base, choices=[{"index": c.index, "text": c.text, "logprobs": logprobs,
                                           "finish_reason": c.finish_reason}], **extra))
    async for k, event in merged(requests):
        if event.error:
            yield sse(state.failure(event.error).body())
            yield DONE
            return
        c = choices[k * n + event.index]
        added = c.add(event)
        if not event.text and not added and event.generation is None:
            continue  # a token whose text is held back (part of a character or of a stop string)
        logprobs = completion_logprobs(added, strings) if strings else None
        finish = c.finish_reason if event.generation is not None else None
        yield sse(dict(base, choices=[{"index": c.index, "text": event.text, "logprobs": logprobs,
                                       "finish_reason": finish}], **extra))
    if include_usage:
        yield sse(dict(base, choices=[], usage=usage(prompt_tokens, choices)))
    yield DONE


async def _stream_chat(state, requests, choices, base, prompt_tokens, strings, include_usage, parsers=None):
    """chat.completion.chunk events: the role first, then content (or tool call) deltas, then each choice's
    finish_reason."""
    extra = {"usage": None} if include_usage else {}

    def chunk(index, delta, logprobs=None, finish=None):
        return sse(dict(base, choices=[{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish}], **extra))

    for c in choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    async for _, event in merged(requests):
        if event.error:
            yield sse(state.failure(event.error).body())
            yield DONE
            return
        c = choices[event.index]
        added = c.add(event)
        logprobs = chat_logprobs(added, strings) if strings and added else None
        if parsers is None:
            deltas = [{"content": event.text}] if event.text or added else []
        else:
            deltas = parsers[c.index].feed(event.text, final=event.generation is not None)
            if added and not deltas:  # a token whose text a tag holds back still sends its logprobs
                deltas = [{"content": ""}]
        for delta in deltas:
            yield chunk(c.index, delta, logprobs)
            logprobs = None
        if event.generation is not None:
            finish = c.finish_reason if parsers is None else _tool_finish(parsers[c.index], c.finish_reason)
            yield chunk(c.index, {}, finish=finish)
    if include_usage:
        yield sse(dict(base, choices=[], usage=usage(prompt_tokens, choices)))
    yield DONE


def _tool_message(parser: tools.ToolCallParser) -> dict:
    """The assistant message of a reply that may hold tool calls."""
    if not parser.calls:
        return {"role": "assistant", "content": parser.content}
    return {"role": "assistant", "content": parser.content or None, "tool_calls": parser.calls}


def _tool_finish(parser: tools.ToolCallParser, finish: str | None) -> str | None:
    """"tool_calls" for a reply that ended on its finished calls."""
    return "tool_calls" if finish == "stop" and parser.complete else finish
