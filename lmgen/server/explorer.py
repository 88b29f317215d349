"""The token explorer: the page at `/`, its static files, POST /v1/next_token (the next-token distribution, before and
after sampling parameters) and POST /v1/score (each token of a text: logprob, rank, entropy, alternatives).

The routes read the served model from `request.app.state.lmgen` (app.py's ServerState). Errors are raised as
APIError, and invalid bodies fail pydantic validation; the app turns both into OpenAI-shaped 400s.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .. import batch_sampler
from ..engine import EngineFull
from ..params import MAX_LOGPROBS, GenerationConfig
from .errors import APIError, shutdown_error
from .output import clean, echo_logprobs
from .protocol import ErrorResponse, TokenIds, about, bounded, whole_number

MAX_TOP_N = 100
STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
# The page's files, name -> media type: nothing else is served.
STATIC = {p.name: MEDIA_TYPES[p.suffix] for p in sorted(STATIC_DIR.iterdir()) if p.suffix in MEDIA_TYPES}
# The page loads nothing from elsewhere and talks only to this server; only the origins the server was given (a
# notebook's, for lm.explore()) may show it in a frame.
CSP = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors {}")
HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}

router = APIRouter()


class PromptRequest(BaseModel):
    """A prompt, as text or as token ids (exactly one of them)."""

    # Exactly one of prompt and token_ids, as the schema says (neither may be null: leave it out instead).
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["token_ids"]}]})

    model: str | None = Field(None, description="The served model's id (see GET /v1/models); may be left out.")
    prompt: str = Field(None, min_length=1, examples=["The quick brown fox jumped over"],
                        description="The prompt as text, tokenized as /v1/completions does; not with token_ids.")
    token_ids: TokenIds = Field(
        None, description="The prompt as token ids, each in [0, vocabulary size): instead of `prompt`.",
        examples=[[464, 2068, 7586, 21831, 11687, 625]])


class NextTokenRequest(PromptRequest):
    """The prompt, how many tokens to list, and the sampling parameters whose effect to show (none: the model's own
    distribution)."""

    top_n: Annotated[int, Field(ge=1, le=MAX_TOP_N), BeforeValidator(whole_number)] = Field(
        20, description=f"How many of the most likely next tokens to return, 1 to {MAX_TOP_N}.")
    # The sampling parameters, with /v1/completions' ranges (BOUNDS); left out, a stage does nothing.
    temperature: bounded("temperature") | None = Field(None, description=about("temperature", "Temperature."))
    top_k: bounded("top_k") | None = Field(None, description=about("top_k", "Keep the k most likely tokens."))
    top_p: bounded("top_p") | None = Field(None, description=about("top_p", "Nucleus sampling's mass."))
    min_p: bounded("min_p") | None = Field(None, description=about("min_p", "Drop tokens below min_p times the top."))
    typical_p: bounded("typical_p") | None = Field(None, description=about("typical_p", "Typical sampling's mass."))
    repetition_penalty: bounded("repetition_penalty") | None = Field(None, description=about(
        "repetition_penalty", "Divide the logits of the prompt's tokens."))

    def config(self) -> GenerationConfig:
        """The sampling config these parameters make (sampling implied); ParameterError naming a field otherwise."""
        given = self.model_dump(exclude_none=True, exclude={*PromptRequest.model_fields, "top_n"})
        return GenerationConfig(do_sample=True, max_new_tokens=1, **given)


class ScoreRequest(PromptRequest):
    """A text (or token ids) to score, and how many alternatives to list at each token."""

    top_n: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), BeforeValidator(whole_number)] = Field(
        5, description=f"How many of the most likely tokens to list at each step, 0 to {MAX_LOGPROBS}.")


class NextToken(BaseModel):
    """One candidate for the next token."""

    id: int = Field(description="The token id.")
    text: str = Field(description="The text the token decodes to on its own, e.g. ' the'.")
    probability: float = Field(description="Its probability under the model's next-token distribution (softmax).")
    logprob: float = Field(description="The natural log of the probability.")
    processed_probability: float = Field(description="Its probability after the sampling parameters, as generation "
                                         "draws it (0 when removed).")
    removed_by: str | None = Field(description="The first stage that removed it (top_k, top_p, min_p, typical_p, "
                                   "greedy), or null when it can be drawn.")


class NextTokenResponse(BaseModel):
    """The next-token distribution after a prompt: its top_n most likely tokens, most likely first, and what the
    sampling parameters leave of the whole distribution."""

    model: str = Field(description="The served model's id.")
    prompt_token_ids: list[int] = Field(description="The prompt's token ids, as the model saw them.")
    tokens: list[NextToken] = Field(description="The most likely next tokens (by the model), most likely first.")
    stages: list[str] = Field(description="The processing stages applied, in order.")
    candidates: int = Field(description="How many tokens of the whole vocabulary are left to draw from.")
    kept_mass: float = Field(description="The model's probability mass on the tokens left.")
    entropy: float = Field(description="The entropy (nats) of the model's distribution, whole vocabulary.")
    processed_entropy: float = Field(description="The entropy (nats) of the distribution generation draws from.")
    removed: dict[str, int] = Field(description="Per stage that removes tokens, how many it removed first.")


class Alternative(BaseModel):
    """One of the most likely tokens at a step."""

    id: int = Field(description="The token id.")
    text: str = Field(description="The token's own text.")
    logprob: float = Field(description="Its log-probability at that step.")


class ScoredToken(BaseModel):
    """One token of a scored text, given the tokens before it."""

    id: int = Field(description="The token id.")
    text: str = Field(description="The token's own text.")
    offset: int = Field(description="Where the token's text starts in the decoded text, in code points.")
    logprob: float | None = Field(description="Its log-probability (null for the first token, which nothing "
                                  "predicts).")
    rank: int | None = Field(description="Its rank at its step over the whole vocabulary (1: the most likely).")
    entropy: float | None = Field(description="The entropy (nats) of the model's distribution at its step.")
    top: list[Alternative] = Field(description="The top_n most likely tokens at its step.")


class ScoreResponse(BaseModel):
    """Each token of a text scored by the model, with the total log-probability and the perplexity."""

    model: str = Field(description="The served model's id.")
    token_ids: list[int] = Field(description="The text's token ids.")
    text: str = Field(description="The token ids decoded.")
    tokens: list[ScoredToken] = Field(description="One entry per token, in order.")
    total_logprob: float = Field(description="The sum of the log-probabilities of the tokens after the first.")
    perplexity: float = Field(description="exp(-total_logprob / (tokens - 1)).")


def _admitted(body: PromptRequest, request: Request):
    """The served state, once the request names its model (or none), arrives before shutdown, and gives exactly one
    of prompt and token_ids, ids in the vocabulary; 4xx or 503 otherwise."""
    state = request.app.state.lmgen
    state.check_model(body.model)
    if state.shutting_down:
        raise shutdown_error()
    if (body.prompt is None) == (body.token_ids is None):
        which = "not both" if body.prompt is not None else "one of them is required"
        raise APIError(400, f"Give either prompt (text) or token_ids, {which}.", param="prompt")
    if body.token_ids is not None:
        state.check_token_ids(body.token_ids, "token_ids")
    return state


async def _prompt_ids(state, body: PromptRequest, least: int = 1) -> list[int]:
    """The request's prompt as token ids (tokenized off the event loop); 400 unless it has at least `least` tokens
    and at most the model's length."""
    param = "prompt" if body.prompt is not None else "token_ids"
    ids = list(body.token_ids) if body.token_ids is not None else await asyncio.to_thread(
        state.lm.tokenizer.encode, body.prompt)
    limit = min(state.lm.context_length, state.engine.max_model_len)
    if len(ids) < least:
        raise APIError(400, f"The prompt has {len(ids)} tokens; at least {least} are needed.", param=param)
    if len(ids) > limit:
        raise APIError(400, f"The prompt has {len(ids)} tokens, more than this model's maximum length of {limit} "
                            "tokens.", param=param)
    return ids


def _distribution(lm, ids: list[int], config: GenerationConfig, top_n: int) -> dict:
    """Run the model (on the engine's thread) and process its distribution as generation with `config` would."""
    d = batch_sampler.explain(lm.next_token_logits(ids), ids, config)
    tokens = [NextToken(id=i, text=lm.tokenizer.token_text(i), probability=p, logprob=clean(math.log(p)),
                        processed_probability=q, removed_by=why) for i, p, q, why in d.top(top_n)]
    return dict(tokens=tokens, stages=d.stages, candidates=d.candidates, kept_mass=d.kept_mass, entropy=d.entropy,
                processed_entropy=d.processed_entropy, removed=d.removed)


def forward_gate(request: Request) -> asyncio.Semaphore:
    """One explorer forward or echoed prompt's scoring at a time (each runs on the engine's thread), so a fast typist
    or a scoring client cannot crowd out the running requests."""
    gate = getattr(request.app.state, "explorer_gate", None)
    if gate is None:
        gate = request.app.state.explorer_gate = asyncio.Semaphore(1)
    return gate


@router.post("/v1/next_token", response_model=NextTokenResponse, responses=ERRORS, tags=["explorer"],
             summary="The next-token distribution after a prompt")
async def next_token(body: NextTokenRequest, request: Request) -> NextTokenResponse:
    """The `top_n` most likely next tokens after a prompt (text or token ids), with probabilities and logprobs."""
    state = _admitted(body, request)
    config = body.config()  # a ParameterError is the app's 400 naming the field
    ids = await _prompt_ids(state, body)
    async with forward_gate(request):
        # The forward pass runs on the engine's thread, between its steps: the event loop goes on serving.
        try:
            future = state.engine.call(_distribution, state.lm, ids, config, body.top_n)
        except EngineFull:
            raise shutdown_error() from None
        found = await asyncio.wrap_future(future)
    return NextTokenResponse(model=state.model_id, prompt_token_ids=ids, **found)


@router.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, tags=["explorer"],
             summary="Each token of a text scored: logprob, rank, entropy and alternatives")
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """Score a text (or token ids) with the model, as prompt logprobs are scored: each token's log-probability given
    those before it, its rank and the entropy over the whole vocabulary, and the top_n alternatives."""
    state = _admitted(body, request)
    ids = await _prompt_ids(state, body, least=2)
    async with forward_gate(request):
        entries = await asyncio.to_thread(state.score, ids, body.top_n)
    return await asyncio.to_thread(_scored, state, ids, entries)


def _scored(state, ids: list[int], entries: list) -> ScoreResponse:
    """The /v1/score response from the engine's prompt logprobs (off the event loop: it decodes every token)."""
    name = state.lm.tokenizer.token_text
    tokens = [ScoredToken(id=e.token_id, text=name(e.token_id), offset=offset, logprob=clean_or_none(e.logprob),
                          rank=e.rank, entropy=e.entropy,
                          top=[Alternative(id=t, text=name(t), logprob=clean(v)) for t, v in e.top])
              for e, offset in echo_logprobs(state.lm, ids, entries)]
    total = math.fsum(e.logprob for e in entries[1:])
    return ScoreResponse(model=state.model_id, token_ids=ids, text=state.lm.tokenizer.decode(ids), tokens=tokens,
                         total_logprob=total, perplexity=math.exp(-total / (len(ids) - 1)))


def clean_or_none(logprob: float | None) -> float | None:
    return None if logprob is None else clean(logprob)




def _static(name: str, frame_ancestors: list[str]) -> Response:
    csp = CSP.format(" ".join(frame_ancestors) or "'none'")
    return Response((STATIC_DIR / name).read_bytes(), media_type=STATIC[name],
                    headers={"Content-Security-Policy": csp, **HEADERS})


@router.get("/", include_in_schema=False)
async def page(request: Request) -> Response:
    """The token explorer page."""
    return _static("index.html", request.app.state.lmgen.frame_ancestors)


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str, request: Request) -> Response:
    """The page's scripts and style sheet."""
    if name not in STATIC:
        raise APIError(404, f"No such file: {name}", code="not_found")
    return _static(name, request.app.state.lmgen.frame_ancestors)
