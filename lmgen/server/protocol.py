"""OpenAI-compatible request and response bodies, as pydantic models (they also make /openapi.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ..params import BOUNDS, MAX_STOP_LENGTH, MAX_STOP_STRINGS, GenerationConfig, ParameterError

# GenerationConfig's names for the fields the API calls otherwise.
API_NAMES = {"max_new_tokens": "max_tokens", "num_return_sequences": "n", "min_new_tokens": "min_tokens",
             "eos_token_id": "stop_token_ids", "num_beams": "best_of"}


def whole_number(x):
    """x, or the int a whole-number float stands for."""
    # JSON Schema's "integer" takes 1.0 too: a whole-number float is that integer (a bool or 1.5 still fails).
    return int(x) if isinstance(x, float) and x.is_integer() else x


Int = Annotated[int, BeforeValidator(whole_number)]
Count = Annotated[int, Field(ge=1), BeforeValidator(whole_number)]  # the range inside: see bounded()
TokenId = Annotated[int, Field(ge=0), BeforeValidator(whole_number)]  # and below the vocabulary size, checked later
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Stop = str | list[str] | None


def bounded(name: str):
    """The type of a field whose range is BOUNDS[name], GenerationConfig's own (`name` is its field name)."""
    bound = BOUNDS[name]
    if bound.kind is int:  # the range inside, so the schema shows it (pydantic drops it over a before-validator)
        return Annotated[int, Field(**bound.schema()), BeforeValidator(whole_number)]
    return Annotated[float, Field(**bound.schema())]


def about(name: str, description: str) -> str:
    """A field's description, with BOUNDS[name]'s range in words."""
    return f"{description} ({BOUNDS[name].text().removeprefix('None or ')})"


class StreamOptions(BaseModel):
    """Options for streamed responses."""

    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = Field(False, description="Send a last chunk with the usage of the whole request.")


class JsonSchemaFormat(BaseModel):
    """response_format's json_schema: a named schema the output must validate against."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = Field(description="The schema's name.")
    description: str | None = Field(None, description="What the output is for.")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema.")
    strict: bool | None = Field(None, description="Accepted: the output always follows the schema.")


class ResponseFormat(BaseModel):
    """The output's format: free text, any JSON object, or JSON that validates against a schema."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = Field(description='"text", "json_object" or '
                                                                '"json_schema".')
    json_schema: JsonSchemaFormat | None = Field(None, description='With type "json_schema": the schema.')


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: one constraint on the output."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON Schema (or its text).")
    regex: str | None = Field(None, description="A regular expression the whole output matches.")
    choice: list[str] | None = Field(None, description="The output is one of these strings.")
    grammar: str | None = Field(None, description="A grammar: llama.cpp's GBNF, or llguidance's Lark.")
    json_object: bool | None = Field(None, description="Any JSON object.")


class SamplingRequest(BaseModel):
    """Fields both endpoints share: OpenAI's, then lmgen's samplers (extra body fields); unknown ones are ignored."""

    # Strict: "5" is not an integer and true is not a number. Unknown fields are ignored, as OpenAI does.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = Field(None, description="The served model's id (see GET /v1/models); may be left out.")
    temperature: bounded("temperature") | None = Field(None, description=about(
        "temperature", "Sampling temperature; below 1e-5 is greedy. Default 1."))
    top_p: bounded("top_p") | None = Field(None, description=about(
        "top_p", "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."))
    n: bounded("num_return_sequences") = Field(1, description=about(
        "num_return_sequences", "How many choices to generate for each prompt, at most the server's --max-n."))
    stop: Stop = Field(None, description=f"Up to {MAX_STOP_STRINGS} strings (each at most {MAX_STOP_LENGTH} "
                       "characters) that end generation; the stop string is not returned.")
    seed: bounded("seed") | None = Field(None, description=about(
        "seed", "Makes sampling reproducible: choice i is seeded seed + i."))
    presence_penalty: bounded("presence_penalty") = Field(0.0, description=about(
        "presence_penalty", "Penalise tokens that have appeared at all."))
    frequency_penalty: bounded("frequency_penalty") = Field(0.0, description=about(
        "frequency_penalty", "Penalise tokens by how often they appeared."))
    logit_bias: dict[str, bounded("logit_bias")] | None = Field(None, description=about(
        "logit_bias", "Token id (as a string) to a bias added to its logit."))
    stream: bool = Field(False, description="Send the result as server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Options for streaming (include_usage); "
                                                 "only with stream: true.")
    user: str | None = Field(None, description="An end-user id; accepted and ignored.")
    # lmgen's samplers, beyond OpenAI's fields (the openai client sends them with extra_body).
    top_k: bounded("top_k") | None = Field(None, description=about(
        "top_k", "Keep the k most likely tokens; 0 or -1: no limit."))
    min_p: bounded("min_p") | None = Field(None, description=about(
        "min_p", "Drop tokens less likely than min_p times the top one."))
    typical_p: bounded("typical_p") | None = Field(None, description=about(
        "typical_p", "Locally typical sampling mass."))
    epsilon_cutoff: bounded("epsilon_cutoff") | None = Field(None, description=about(
        "epsilon_cutoff", "Drop tokens with probability below this."))
    eta_cutoff: bounded("eta_cutoff") | None = Field(None, description=about("eta_cutoff", "Eta sampling cutoff."))
    repetition_penalty: bounded("repetition_penalty") | None = Field(None, description=about(
        "repetition_penalty", "Divide the logits of tokens already seen; 1 is none."))
    no_repeat_ngram_size: bounded("no_repeat_ngram_size") | None = Field(None, description=about(
        "no_repeat_ngram_size", "Never repeat an n-gram of this size."))
    min_tokens: bounded("min_new_tokens") = Field(0, description=about(
        "min_new_tokens", "Generate at least this many tokens before EOS or a stop string."))
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    stop_token_ids: list[TokenId] | None = Field(None, description="Token ids that end generation, besides EOS.")
    include_stop_str_in_output: bool = Field(False, description="Keep the matched stop string in the text.")
    return_tokens_as_token_ids: bool = Field(False, description='vLLM\'s: name tokens in logprobs "token_id:<id>", '
                                             "so ids survive tokens that are not valid text alone.")
    use_beam_search: bool = Field(False, description="Beam search (vLLM's field): the n best of best_of beams "
                                  "(or of n), scored as transformers does; deterministic, no sampling.")
    length_penalty: bounded("length_penalty") = Field(1.0, description=about(
        "length_penalty", "Beam search: a hypothesis's score is its log-probability over length ** this."))
    early_stopping: bool | Literal["never"] = Field(False, description="Beam search: stop when n hypotheses are "
                                                    "done (true), by transformers' heuristic (false), or never.")
    # Constrained output: one of these (OpenAI's response_format, vLLM's structured_outputs or guided_* fields).
    response_format: ResponseFormat | None = Field(None, description='{"type": "text"}, {"type": "json_object"} '
                                                   'or {"type": "json_schema", "json_schema": {"name", "schema"}}.')
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's constraint object: json, "
                                                         "regex, choice, grammar or json_object.")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's older name: a JSON Schema.")
    guided_regex: str | None = Field(None, description="vLLM's older name: a regex the output matches.")
    guided_choice: list[str] | None = Field(None, description="vLLM's older name: one of these strings.")
    guided_grammar: str | None = Field(None, description="vLLM's older name: a GBNF or Lark grammar.")

    def check(self) -> None:
        """Reject field combinations the schema cannot state (ParameterError naming the field)."""
        if self.stream_options is not None and not self.stream:
            raise ParameterError("stream_options", "unset unless stream is true", self.stream_options,
                                 message="stream_options is only allowed with stream: true")

    def constraint(self) -> tuple[str, object, str] | None:
        """The one constraint asked for, as (GenerationConfig field, value, the request's field), or None."""
        found = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("json_schema", {"type": "object"}, "response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ParameterError("response_format", "", None, message='response_format of type "json_schema" '
                                     "needs json_schema.schema")
            found.append(("json_schema", rf.json_schema.schema_, "response_format.json_schema.schema"))
        so = self.structured_outputs
        if so is not None:
            found += [(field, value, f"structured_outputs.{name}") for field, name, value in (
                ("json_schema", "json", so.json_), ("regex", "regex", so.regex), ("choice", "choice", so.choice),
                ("grammar", "grammar", so.grammar),
                ("json_schema", "json_object", {"type": "object"} if so.json_object else None)) if value is not None]
        found += [(field, getattr(self, f"guided_{name}"), f"guided_{name}") for field, name in (
            ("json_schema", "json"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar"))
            if getattr(self, f"guided_{name}") is not None]
        if len(found) > 1:
            raise ParameterError(found[1][2], "", None, message=f"{found[0][2]} and {found[1][2]} cannot be used "
                                 "together: give one constraint")
        return found[0] if found else None

    def constraint_names(self) -> dict[str, str]:
        """GenerationConfig's constraint field -> the request's name for it, for errors."""
        found = self.constraint()
        return {found[0]: found[2]} if found else {}

    def to_generation_config(self, max_tokens: int, logprobs: int | None = None,
                             eos_token_id: list[int] | None = None) -> GenerationConfig:
        """The GenerationConfig this request asks for; ParameterError (lmgen's or the API's field name) otherwise."""
        self.check()
        found = self.constraint()
        temperature = 1.0 if self.temperature is None else self.temperature  # OpenAI's default
        beams = 1
        if self.use_beam_search:
            if logprobs is not None:
                raise ParameterError("logprobs", "unset with use_beam_search", logprobs,
                                     message="logprobs are not returned with use_beam_search")
            beams = max(getattr(self, "best_of", None) or self.n, self.n, 2)
        try:
            return self._config(found, beams, max_tokens, temperature, logprobs, eos_token_id)
        except ParameterError as e:  # a constraint's check: named as the request names it
            if found and e.field == found[0]:
                raise ParameterError(found[2], e.requirement, e.value, message=e.message) from None
            raise

    def _config(self, found, beams, max_tokens, temperature, logprobs, eos_token_id) -> GenerationConfig:
        return GenerationConfig(
            num_beams=beams, length_penalty=self.length_penalty, early_stopping=self.early_stopping,
            max_new_tokens=max_tokens, do_sample=not self.use_beam_search, temperature=temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, typical_p=self.typical_p,
            epsilon_cutoff=self.epsilon_cutoff, eta_cutoff=self.eta_cutoff, repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size or None, min_new_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            include_stop_str_in_output=self.include_stop_str_in_output, num_return_sequences=self.n,
            seed=self.seed, logprobs=logprobs, logit_bias=self.token_biases(), eos_token_id=eos_token_id,
            **({found[0]: found[1]} if found else {}))

    def token_biases(self) -> dict[int, float] | None:
        """logit_bias with integer keys (OpenAI sends the token ids as JSON object keys, so as strings)."""
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            try:
                out[int(key)] = value
            except ValueError:
                raise ParameterError("logit_bias", "a dict of token ids (integers)", key,
                                     message=f"logit_bias keys must be token ids (integers), got {key!r}") from None
        return out


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: continue one prompt or several."""

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(
        min_length=1)] = Field(
        description="The text to continue: a string, a list of strings, a list of token ids or a list of them.")
    max_tokens: bounded("max_new_tokens") | None = Field(16, description=about(
        "max_new_tokens", "Most tokens to generate for each choice (default 16; 0 with echo scores the prompt)."))
    logprobs: bounded("logprobs") | None = Field(None, description=about(
        "logprobs", "Return each token's log-probability and the `logprobs` most likely alternatives; the chosen "
        "token is always among them."))
    echo: bool = Field(False, description="Return the prompt before the completion (with logprobs: the prompt's "
                       "logprobs too).")
    best_of: Count | None = Field(None, description="With use_beam_search the beam width (at least n); "
                                  "otherwise n or unset.")
    suffix: str | None = Field(None, description="Not supported: must be unset.")

    def check(self) -> None:
        """Also: suffix and best_of other than n are not supported."""
        super().check()
        if self.suffix:
            raise ParameterError("suffix", "unset", self.suffix, message="suffix is not supported")
        if self.use_beam_search and self.best_of is not None and self.best_of < self.n:
            raise ParameterError("best_of", f"at least n ({self.n}) with use_beam_search", self.best_of,
                                 message=f"best_of must be at least n ({self.n}) with use_beam_search, "
                                         f"got {self.best_of}")
        if not self.use_beam_search and self.best_of is not None and self.best_of != self.n:
            raise ParameterError("best_of", f"n ({self.n}) or unset without use_beam_search", self.best_of,
                                 message=f"best_of must equal n (or be left out) without use_beam_search, "
                                         f"got {self.best_of}")


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: str = Field(description='"text".')
    text: str | None = Field(None, description="The text of a text part.")


class FunctionCall(BaseModel):
    """A call the model made: the function's name and its arguments as JSON text."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str = Field(description="The arguments, a JSON object's text.")


class ToolCall(BaseModel):
    """One tool call of an assistant message."""

    model_config = ConfigDict(strict=True, extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Who says it.")
    content: str | list[ContentPart] | None = Field(None, description="The text, or a list of text parts.")
    name: str | None = Field(None, description="An optional name for the participant.")
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant message's tool calls.")
    tool_call_id: str | None = Field(None, description="A tool message's answer to this call id.")


class FunctionDefinition(BaseModel):
    """A function the model may call."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Letters, digits, _ . and -: at most 64.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON Schema (an object).")
    strict: bool | None = Field(None, description="Accepted: calls always follow the schema.")


class Tool(BaseModel):
    """A tool: a function."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    """tool_choice naming one function: the reply is a call to it."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: NamedFunction


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as a chat template takes them: content parts joined, "developer" as "system"."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise ParameterError(f"messages[{i}].content", "text parts only", None,
                                     message="only text content parts are supported")
            content = "".join(part.text for part in content)
        role = "system" if m.role == "developer" else m.role  # chat templates predate "developer"
        message = {"role": role, "content": content or ""}
        if m.name:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions: answer a conversation through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far (at least one message).")
    max_tokens: Count | None = Field(None, description="Most tokens to generate (default: what fits the "
                                   "context).")
    max_completion_tokens: Count | None = Field(None, description="Newer name for max_tokens.")
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: bounded("logprobs") | None = Field(None, description=about(
        "logprobs", "With logprobs: the most likely alternatives per token."))
    tools: list[Tool] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(None, description=(
        '"auto" (the default with tools): text or a call; "required": a call; a named function: a call to it; '
        '"none": text.'))
    parallel_tool_calls: bool | None = Field(None, description="Accepted; a reply makes at most one call.")
    functions: list[dict[str, Any]] | None = Field(None, description="Legacy tools; not supported: must be unset "
                                                   "or empty.")
    function_call: str | dict[str, Any] | None = Field(None, description='Legacy tool choice; only "none" (or '
                                                       "unset) is supported.")

    def check(self) -> None:
        """Also: no legacy functions; tool_choice among the tools, not with another constraint; top_logprobs needs
        logprobs."""
        super().check()
        if self.functions:
            raise ParameterError("functions", "unset or empty", None,
                                 message="functions (the legacy field) are not supported: use tools")
        if self.function_call not in (None, "none"):
            raise ParameterError("function_call", "unset or 'none'", None,
                                 message="function_call (the legacy field) is not supported: use tool_choice")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ParameterError("tool_choice", "unset without tools", None,
                                 message="tool_choice needs tools: none were given")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in [t.function.name for t in self.tools]:
            raise ParameterError("tool_choice", "a given tool", None, message=(
                f"tool_choice names the function {choice.function.name!r}, which is not among the tools"))
        if self.calls_tools() and self.use_beam_search:
            raise ParameterError("tools", "unset with use_beam_search", None,
                                 message="tools are not supported with use_beam_search")
        if self.calls_tools() and self.constraint() is not None:
            raise ParameterError("tool_choice", '"none" with a constraint', None, message=(
                f"{self.constraint()[2]} and tools cannot be used together: give one, or tool_choice \"none\""))
        if self.top_logprobs is not None and not self.logprobs:
            raise ParameterError("top_logprobs", "unset unless logprobs is true", self.top_logprobs,
                                 message="top_logprobs needs logprobs: true")

    def calls_tools(self) -> bool:
        """Whether the reply may be a tool call (tools given, tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def callable_tools(self) -> list[dict]:
        """The tools a reply may call (the named one alone when tool_choice names one), as dicts."""
        choice = self.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        return [t.model_dump(exclude_none=True) for t in self.tools or () if named in (None, t.function.name)]


# ------------------------------------------------------------------ responses (documentation only)

class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs object."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for an echoed prompt's first token.")
    top_logprobs: list[dict[str, float] | None] = Field(description="Up to logprobs + 1 entries: the chosen token "
                                                        "is always there; null for an echoed prompt's first token.")
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
    tool_calls: list[ToolCall] | None = Field(None, description="The calls the reply makes (in chunks: each call's "
                                              "index, then its id and name, then pieces of its arguments).")


class ChatChoice(BaseModel):
    """One answer."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


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
