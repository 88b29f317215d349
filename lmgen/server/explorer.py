"""The token explorer: the page at `/`, its static files, and POST /v1/next_token (the next-token distribution).

The routes read the served model from `request.app.state.lmgen` (app.py's ServerState). Errors are raised as
APIError, and invalid bodies fail pydantic validation; the app turns both into OpenAI-shaped 400s.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Annotated

import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ..engine import EngineFull
from .errors import APIError
from .output import clean
from .protocol import ErrorResponse, TokenIds, whole_number

MAX_TOP_N = 100
STATIC_DIR = Path(__file__).parent / "static"
STATIC = {  # the page's files, name -> media type; nothing else is served
    "index.html": "text/html; charset=utf-8",
    "explorer.js": "text/javascript; charset=utf-8",
    "explorer.css": "text/css; charset=utf-8",
}
# The page loads nothing from elsewhere and talks only to this server.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}

router = APIRouter()


class NextTokenRequest(BaseModel):
    """The prompt, as text or as token ids (exactly one of them), and how many tokens to list."""

    # Exactly one of prompt and token_ids, as the schema says (neither may be null: leave it out instead).
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["token_ids"]}]})

    model: str | None = Field(None, description="The served model's id (see GET /v1/models); may be left out.")
    prompt: str = Field(None, min_length=1, examples=["The quick brown fox jumped over"],
                        description="The prompt as text, tokenized as /v1/completions does; not with token_ids.")
    token_ids: TokenIds = Field(
        None, description="The prompt as token ids, each in [0, vocabulary size): instead of `prompt`.",
        examples=[[464, 2068, 7586, 21831, 11687, 625]])
    top_n: Annotated[int, Field(ge=1, le=MAX_TOP_N), BeforeValidator(whole_number)] = Field(
        20, description=f"How many of the most likely next tokens to return, 1 to {MAX_TOP_N}.")


class NextToken(BaseModel):
    """One candidate for the next token."""

    id: int = Field(description="The token id.")
    text: str = Field(description="The text the token decodes to on its own, e.g. ' the'.")
    probability: float = Field(description="Its probability under the model's next-token distribution (softmax).")
    logprob: float = Field(description="The natural log of the probability.")


class NextTokenResponse(BaseModel):
    """The next-token distribution after a prompt: its top_n most likely tokens, most likely first."""

    model: str = Field(description="The served model's id.")
    prompt_token_ids: list[int] = Field(description="The prompt's token ids, as the model saw them.")
    tokens: list[NextToken] = Field(description="The most likely next tokens, most likely first.")


def _check(body: NextTokenRequest, state) -> None:
    if (body.prompt is None) == (body.token_ids is None):
        which = "not both" if body.prompt is not None else "one of them is required"
        raise APIError(400, f"Give either prompt (text) or token_ids, {which}.", param="prompt")
    if body.token_ids is not None:
        state.check_token_ids(body.token_ids, "token_ids")


def _distribution(lm, body: NextTokenRequest, limit: int) -> tuple[list[int], list[NextToken]]:
    """Tokenize and run the model (in a worker thread): the prompt's ids and its top_n next tokens."""
    param = "prompt" if body.prompt is not None else "token_ids"
    ids = list(body.token_ids) if body.token_ids is not None else lm.tokenizer.encode(body.prompt)
    if not ids:
        raise APIError(400, "the prompt has no tokens", param=param)
    if len(ids) > limit:
        raise APIError(400, f"The prompt has {len(ids)} tokens, more than this model's maximum length of {limit} "
                            "tokens.", param=param)
    logprobs = torch.log_softmax(lm.next_token_logits(ids), dim=-1)
    values, top = torch.topk(logprobs, min(body.top_n, logprobs.numel()))
    tokens = [NextToken(id=i, text=lm.tokenizer.token_text(i), probability=math.exp(lp),
                        logprob=clean(lp)) for lp, i in zip(values.tolist(), top.tolist())]
    return ids, tokens


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
    state = request.app.state.lmgen
    state.check_model(body.model)
    if state.shutting_down:
        raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
    _check(body, state)
    limit = min(state.lm.context_length, state.engine.max_model_len)
    async with forward_gate(request):
        # The forward pass runs on the engine's thread, between its steps: the event loop goes on serving.
        try:
            future = state.engine.call(_distribution, state.lm, body, limit)
        except EngineFull:
            raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down") from None
        ids, tokens = await asyncio.wrap_future(future)
    return NextTokenResponse(model=state.model_id, prompt_token_ids=ids, tokens=tokens)


def _static(name: str) -> Response:
    return Response((STATIC_DIR / name).read_bytes(), media_type=STATIC[name], headers=HEADERS)


@router.get("/", include_in_schema=False)
async def page() -> Response:
    """The token explorer page."""
    return _static("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    """The page's script and style sheet."""
    if name not in STATIC:
        raise APIError(404, f"No such file: {name}", code="not_found")
    return _static(name)
