"""OpenAI-compatible request and response bodies, as pydantic models (they also make /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..params import MAX_STOP_LENGTH, MAX_STOP_STRINGS

Stop = str | list[str] | None


class StreamOptions(BaseModel):
    """Options for streamed responses."""

    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = Field(False, description="Send a last chunk with the usage of the whole request.")


class SamplingRequest(BaseModel):
    """Fields both endpoints share: OpenAI's, then lmgen's samplers (extra body fields); unknown ones are ignored."""

    # Strict: "5" is not an integer and true is not a number. Unknown fields are ignored, as OpenAI does.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = Field(None, description="The served model's id (see GET /v1/models); may be left out.")
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature; 0 is greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens "
                                "whose probability reaches top_p.")
    n: int = Field(1, ge=1, description="How many choices to generate for each prompt (at most the server's --max-n).")
    stop: Stop = Field(None, description=f"Up to {MAX_STOP_STRINGS} strings (each at most {MAX_STOP_LENGTH} "
                       "characters) that end generation; the stop string is not returned.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1,
                             description="Makes sampling reproducible: choice i is seeded seed + i.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Penalise tokens that have appeared at all.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Penalise tokens by how often they appeared.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) to a bias in [-100, 100] added to its logit.")
    stream: bool = Field(False, description="Send the result as server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Options for streaming (include_usage).")
    user: str | None = Field(None, description="An end-user id; accepted and ignored.")
    # lmgen's samplers, beyond OpenAI's fields (the openai client sends them with extra_body).
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens (0 or -1: no limit).")
    min_p: float | None = Field(None, ge=0, le=1, description="Drop tokens less likely than min_p times the top one.")
    typical_p: float | None = Field(None, gt=0, le=1, description="Locally typical sampling mass.")
    epsilon_cutoff: float | None = Field(None, ge=0, lt=1, description="Drop tokens with probability below this.")
    eta_cutoff: float | None = Field(None, ge=0, lt=1, description="Eta sampling cutoff.")
    repetition_penalty: float | None = Field(None, gt=0, description="Divide the logits of tokens already seen "
                                             "(1 is none).")
    no_repeat_ngram_size: int | None = Field(None, ge=0, description="Never repeat an n-gram of this size.")
    min_tokens: int = Field(0, ge=0, description="Generate at least this many tokens before EOS or a stop string.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end generation, besides EOS.")
    include_stop_str_in_output: bool = Field(False, description="Keep the matched stop string in the text.")


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: continue one prompt or several."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="The text to continue: a string, a list of strings, a list of token ids or a list of them.")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate for each choice (default 16).")
    logprobs: int | None = Field(None, ge=0, le=5, description="Return the log-probability of each token and of the "
                                 "`logprobs` most likely alternatives (0..5).")
    echo: bool = Field(False, description="Return the prompt before the completion.")
    best_of: int | None = Field(None, ge=1, description="Only n (or unset) is supported.")
    suffix: str | None = Field(None, description="Not supported: must be unset.")


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: str = Field(description='"text".')
    text: str | None = Field(None, description="The text of a text part.")


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Who says it.")
    content: str | list[ContentPart] | None = Field(None, description="The text, or a list of text parts.")
    name: str | None = Field(None, description="An optional name for the participant.")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions: answer a conversation through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far (at least one message).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default: what fits the "
                                   "context).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens.")
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the most likely alternatives "
                                     "per token (0..20).")
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"} is supported.')
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: must be unset or empty.")


# ------------------------------------------------------------------ responses (documentation only)

class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs object."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One completion."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    """A completions response; streamed chunks have the same shape, with text deltas."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class TopLogprob(BaseModel):
    """An alternative token at one step."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobItem(TopLogprob):
    """A generated token with its log-probability and the alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """Chat logprobs: one entry per generated token."""

    content: list[TokenLogprobItem] | None


class AssistantMessage(BaseModel):
    """The model's answer (in chunks: a delta of it)."""

    role: Literal["assistant"] | None = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    """One answer."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    """A chat completion; streamed as chat.completion.chunk objects whose choices carry a `delta`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """A served model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmgen"
    max_model_len: int


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """What went wrong, and which field."""

    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorBody
