"""vLLM's tokenizer endpoints at the server root: POST /tokenize, POST /detokenize and GET /tokenizer_info.

lm-evaluation-harness's `local-completions` model looks for them at its base_url less `/v1/completions`; when
/tokenizer_info names an eos_token and /tokenize answers, it tokenizes with the served model's own tokenizer
(tokenizer_backend "remote") instead of downloading one. The routes read the served model from
`request.app.state.lmgen` (app.py's ServerState) and raise APIError; the app turns both into OpenAI-shaped 400s.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import LmgenError
from .errors import APIError
from .protocol import ChatMessage, ErrorResponse, TokenId, template_messages

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413)}

router = APIRouter(tags=["tokenizer"])


class TokenizeRequest(BaseModel):
    """Text, or a conversation rendered by the model's chat template (exactly one of them), to tokenize."""

    # Exactly one of prompt and messages, as the schema says (neither may be null: leave it out instead).
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    model: str | None = Field(None, description="The served model's id (see GET /v1/models); may be left out.")
    prompt: str = Field(None, description="The text to tokenize.", examples=["The quick brown fox"])
    messages: list[ChatMessage] = Field(
        None, description="A conversation to render with the model's chat template and tokenize, instead of "
                          "`prompt`.")
    add_special_tokens: bool | None = Field(
        None, description="Add what the tokenizer adds around a text (e.g. BOS), as /v1/completions does. "
                          "Default: true for `prompt`, false for `messages` (the template has them already).")
    add_generation_prompt: bool = Field(True, description="With `messages`: end with the assistant's turn opening.")
    return_token_strs: bool = Field(False, description="Also return each token's vocabulary piece (e.g. 'Ġthe').")


class TokenizeResponse(BaseModel):
    """The token ids, how many, and the most a sequence can hold on this server."""

    count: int = Field(description="How many tokens.")
    max_model_len: int = Field(description="The most tokens (prompt and generated) one sequence can hold here.")
    tokens: list[int] = Field(description="The token ids.")
    token_strs: list[str] | None = Field(None, description="Each token's vocabulary piece, with "
                                                           "return_token_strs.")


class DetokenizeRequest(BaseModel):
    """Token ids to turn back into text."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = Field(None, description="The served model's id (see GET /v1/models); may be left out.")
    tokens: list[TokenId] = Field(description="Token ids, each in [0, vocabulary size).", examples=[[504, 2365, 6354]])


class DetokenizeResponse(BaseModel):
    """The text the token ids decode to."""

    prompt: str = Field(description="The decoded text, special tokens included.")


class TokenizerInfoResponse(BaseModel):
    """The served tokenizer's special tokens, limits and chat template."""

    tokenizer_class: str = Field(description="Always 'lmgen'.")
    bos_token: str | None = Field(description="The beginning-of-sequence token's text, if the model has one.")
    bos_token_id: int | None = Field(description="Its id.")
    eos_token: str | None = Field(description="The end-of-sequence token's text (the first of eos_token_ids).")
    eos_token_id: int | None = Field(description="Its id.")
    eos_token_ids: list[int] = Field(description="Every token id that ends generation.")
    pad_token: str | None = Field(description="The padding token's text, if any.")
    pad_token_id: int | None = Field(description="Its id.")
    vocab_size: int = Field(description="Token ids are in [0, vocab_size).")
    model_max_length: int = Field(description="The most tokens one sequence can hold on this server.")
    chat_template: str | None = Field(description="The Jinja chat template, if the model has one.")


def _check_one(body: TokenizeRequest) -> None:
    if (body.prompt is None) == (body.messages is None):
        which = "not both" if body.prompt is not None else "one of them is required"
        raise APIError(400, f"Give either prompt (text) or messages, {which}.", param="prompt")


def _chat_text(tokenizer, body: TokenizeRequest) -> str:
    """The conversation rendered by the chat template, as /v1/chat/completions renders it."""
    messages = template_messages(body.messages)
    if not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template: tokenize a prompt instead", param="messages")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
    except LmgenError as e:
        raise APIError(400, str(e), param="messages") from None


def _tokenize(tokenizer, body: TokenizeRequest) -> list[int]:
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        return tokenizer.encode(body.prompt, add_special_tokens=special)
    return tokenizer.encode(_chat_text(tokenizer, body), add_special_tokens=bool(body.add_special_tokens))


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS, summary="Text to token ids (vLLM's)")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """The token ids of a text or of a chat conversation, as the served model's tokenizer makes them."""
    state = request.app.state.lmgen
    state.check_model(body.model)
    _check_one(body)
    tokenizer = state.lm.tokenizer
    ids = await asyncio.to_thread(_tokenize, tokenizer, body)  # a long text takes a while: off the event loop
    strs = [tokenizer.backend.id_to_token(i) or "" for i in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS,
             summary="Token ids to text (vLLM's)")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text that token ids decode to, special tokens included."""
    state = request.app.state.lmgen
    state.check_model(body.model)
    state.check_token_ids(body.tokens, "tokens")
    text = await asyncio.to_thread(state.lm.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)


@router.get("/tokenizer_info", response_model=TokenizerInfoResponse, responses=ERRORS,
            summary="The tokenizer's special tokens and chat template (vLLM's)")
async def tokenizer_info(request: Request) -> TokenizerInfoResponse:
    """Special tokens (text and id), vocabulary size, maximum length and chat template of the served model."""
    state = request.app.state.lmgen
    tokenizer, eos_ids = state.lm.tokenizer, list(state.lm.eos_token_ids)
    eos = eos_ids[0] if eos_ids else None

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.decode([token_id])

    return TokenizerInfoResponse(
        tokenizer_class="lmgen", bos_token=text(tokenizer.bos_token_id), bos_token_id=tokenizer.bos_token_id,
        eos_token=text(eos), eos_token_id=eos, eos_token_ids=eos_ids, pad_token=text(tokenizer.pad_token_id),
        pad_token_id=tokenizer.pad_token_id, vocab_size=state.lm.vocab_size,
        model_max_length=state.engine.max_model_len, chat_template=tokenizer.chat_template)
