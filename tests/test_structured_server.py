"""Structured output and tool calling over HTTP, driven by the official openai client: parse() into pydantic
models, json_object, regex and choice fields by vLLM's names, tool calls forced, streamed and answered, and every
bad input a 400 naming its field. Native tool templates run on a tiny model carrying a Qwen2.5-style template."""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Literal, Optional

import jsonschema_rs
import pytest
from pydantic import BaseModel

from lmgen import tools

from .conftest import make_tiny_llama
from .test_server import Server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def smol(tmp_path_factory, embedded_path):
    server = Server(tmp_path_factory.mktemp("serve-structured"), "--max-concurrent", "4", "--max-model-len", "1024")
    server.model_id = server.client().models.list().data[0].id
    yield server
    server.stop()


# ------------------------------------------------------------------ parse() into pydantic models

class Address(BaseModel):
    street: str
    city: str
    country: str


class Role(str, Enum):
    admin = "admin"
    user = "user"
    guest = "guest"


class Person(BaseModel):
    name: str
    age: int
    role: Role
    email: Optional[str] = None
    address: Address
    hobbies: list[str]


class Book(BaseModel):
    title: str
    author: str
    year: int
    genres: list[Literal["fiction", "science", "history", "fantasy", "mystery"]]


class Item(BaseModel):
    name: str
    quantity: int
    price: float


class Order(BaseModel):
    customer: str
    items: list[Item]
    paid: bool
    note: Optional[str] = None


class Weather(BaseModel):
    city: str
    temperature_c: float
    condition: Literal["sunny", "cloudy", "rain", "snow"]
    wind_kmh: Optional[int] = None


PROMPTS = [
    (Person, "Describe a fictional person called Ann who lives in Oslo."),
    (Person, "Invent a user account for a man named Tom from Berlin."),
    (Person, "Create a guest profile for Maria, 34, from Madrid."),
    (Person, "Make up an admin named Li who lives in Beijing."),
    (Person, "Describe Sam, a 20-year-old student from Paris."),
    (Book, "Describe the book 'Dune'."),
    (Book, "Give me details of the novel '1984'."),
    (Book, "Describe 'A Brief History of Time'."),
    (Book, "Describe the book 'The Hobbit'."),
    (Book, "Describe a mystery novel by Agatha Christie."),
    (Order, "Alice ordered 2 apples at 0.5 each and 1 bread at 2.0; she paid."),
    (Order, "Bob bought 3 pens for 1.2 each. Not paid yet."),
    (Order, "Create an order for Carol: one laptop costing 999.99, paid."),
    (Order, "Dan ordered 4 coffees at 3.5 each, note: no sugar."),
    (Order, "Eve bought 2 books at 15.0 each and paid."),
    (Weather, "Report the weather in London: 12 degrees and rain."),
    (Weather, "It is sunny and 30 degrees in Rome."),
    (Weather, "Weather in Oslo: -5 degrees, snow, wind 20 km/h."),
    (Weather, "Describe today's weather in Tokyo."),
    (Weather, "It is cloudy in Paris at 18 degrees."),
]


def test_parse_returns_20_of_20_valid_objects(smol):
    client = smol.client()
    for model, prompt in PROMPTS:
        # Greedy, with a frequency penalty as a client sets one: a 135M model repeats itself otherwise.
        r = client.chat.completions.parse(model=smol.model_id, messages=[{"role": "user", "content": prompt}],
                                          response_format=model, max_tokens=256, temperature=0,
                                          frequency_penalty=0.5)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (prompt, choice.message.content)
        assert isinstance(choice.message.parsed, model), (prompt, choice.message.content)


def test_json_object_n2_streamed_and_regex_choice_fields(smol):
    client = smol.client()
    r = client.chat.completions.create(model=smol.model_id, messages=[{"role": "user", "content": "A cat as JSON."}],
                                       response_format={"type": "json_object"}, max_tokens=200, temperature=0,
                                       frequency_penalty=0.5)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"]}
    validator = jsonschema_rs.validator_for(schema)
    stream = client.chat.completions.create(
        model=smol.model_id, messages=[{"role": "user", "content": "The weather in Rome, as JSON."}], n=2, seed=4,
        stream=True, max_tokens=100, response_format={"type": "json_schema", "json_schema": {
            "name": "weather", "schema": schema, "strict": True}})
    texts, finishes = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finishes[c.index] = c.finish_reason or finishes.get(c.index)
    assert sorted(texts) == [0, 1] and set(finishes.values()) == {"stop"}
    assert all(validator.is_valid(json.loads(t)) for t in texts.values()), texts
    fields = [({"guided_regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}, r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
              ({"structured_outputs": {"regex": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"}}, r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"),
              ({"guided_choice": ["red", "green"]}, "red|green"),
              ({"structured_outputs": {"choice": ["up", "down"]}}, "up|down"),
              ({"guided_grammar": 'root ::= "x" [0-9] [0-9]'}, "x[0-9][0-9]")]
    r = client.completions.create(model=smol.model_id, prompt="A JSON object about a dog:", max_tokens=120,
                                  temperature=0, frequency_penalty=0.5, extra_body={"response_format": {
                                      "type": "json_object"}})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)
    for body, pattern in fields:
        r = client.completions.create(model=smol.model_id, prompt="Answer:", max_tokens=30, temperature=0,
                                      extra_body=body)
        assert re.fullmatch(pattern, r.choices[0].text) and r.choices[0].finish_reason == "stop", (body, r)


# ------------------------------------------------------------------ tools on the embedded model (generic format)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                         "parameters": {"type": "object", "properties": {}}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_forced_tool_call_validates_then_its_result_is_answered(smol):
    client = smol.client()
    validator = jsonschema_rs.validator_for(WEATHER["function"]["parameters"])
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=smol.model_id, messages=QUESTION, tools=[TIME, WEATHER],
                                           tool_choice=choice, max_tokens=100, temperature=0)
        answer = r.choices[0]
        assert answer.finish_reason == "tool_calls", answer
        call = answer.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if choice != "required":
            assert call.function.name == "get_weather"
        if call.function.name == "get_weather":
            assert validator.is_valid(json.loads(call.function.arguments)), call.function.arguments
    messages = QUESTION + [answer.message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    r = client.chat.completions.create(model=smol.model_id, messages=messages, tools=[WEATHER], max_tokens=60,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "tool_calls", "length") and (
        r.choices[0].message.content or r.choices[0].message.tool_calls)


def test_auto_is_text_or_a_valid_call_and_none_is_text(smol):
    client = smol.client()
    validator = jsonschema_rs.validator_for(WEATHER["function"]["parameters"])
    for question in ("What is the weather in Paris?", "Say hello.", "Tell me about Rome."):
        r = client.chat.completions.create(model=smol.model_id, messages=[{"role": "user", "content": question}],
                                           tools=[WEATHER], max_tokens=80, temperature=0)
        answer = r.choices[0]
        if answer.message.tool_calls:
            assert answer.finish_reason == "tool_calls"
            assert validator.is_valid(json.loads(answer.message.tool_calls[0].function.arguments))
        else:
            assert answer.finish_reason in ("stop", "length") and "<tool_call>" not in answer.message.content
        r = client.chat.completions.create(model=smol.model_id, messages=[{"role": "user", "content": question}],
                                           tools=[WEATHER], tool_choice="none", max_tokens=40, temperature=0)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call_reassembles_from_its_deltas(smol):
    client = smol.client()
    body = dict(model=smol.model_id, messages=QUESTION, tools=[WEATHER], max_tokens=100, temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**body).choices[0].message.tool_calls[0]
    calls, finish = {}, None
    for chunk in client.chat.completions.create(**body, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == whole.function.arguments
    assert jsonschema_rs.validator_for(WEATHER["function"]["parameters"]).is_valid(json.loads(calls[0]["arguments"]))


@pytest.mark.parametrize("path, body, param, text", [
    ("/v1/completions", {"prompt": "x", "guided_regex": "("}, "guided_regex", "guided_regex is invalid"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"grammar": "root ::= nothing"}},
     "structured_outputs.grammar", "is invalid"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "nonsense"}}, "guided_json", "is invalid"),
    ("/v1/completions", {"prompt": "x", "guided_choice": []}, "guided_choice", "non-empty list"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice",
     "cannot be used together"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "wrong"}}}}}},
     "response_format.json_schema.schema", "is invalid"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "needs json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice", "not among the tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}]},
     "tools[0].function.parameters", "is invalid"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name", "pattern"),
    ("/v1/chat/completions", {"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be used together"),
    ("/v1/chat/completions", {"tools": [WEATHER], "use_beam_search": True}, "tools", "not supported"),
])
def test_bad_constraints_and_tools_get_400_naming_the_field(smol, path, body, param, text):
    if path.endswith("chat/completions"):
        body = {"messages": QUESTION, **body}
    r = smol.post(path, json={"model": smol.model_id, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and text in error["message"], error


# ------------------------------------------------------------------ native tool templates (a tiny model)

QWEN_STYLE = open(__file__.replace("test_structured_server.py", "qwen25_tools.jinja")).read()


@pytest.fixture(scope="module")
def qwen_style(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-qwen-style")
    folder = make_tiny_llama(tmp / "model", max_position_embeddings=1024)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_STYLE}))
    server = Server(tmp, "--model", str(folder))
    server.model_id = str(folder)
    server.folder = folder
    yield server
    server.stop()


def test_native_template_renders_tools_the_call_and_its_result(qwen_style):
    import lmgen

    lm = lmgen.load(qwen_style.folder)
    assert tools.native(lm.tokenizer.chat_template)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "C"}'}}
    messages = tools.prompt_messages(QUESTION + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                                 {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}],
                                     [WEATHER], use_native=True)
    text = lm.tokenizer.apply_chat_template(messages, tools=[WEATHER])
    assert '"name": "get_weather"' in text.split("\n</tools>")[0]  # the tool, in the template's own listing
    assert tools.call_text("get_weather", '{"city": "Paris", "unit": "C"}') in text  # the earlier call
    assert "<tool_response>\n18 C\n</tool_response>" in text  # and its result


def test_generic_format_renders_the_call_and_its_result(smollm_default):
    assert not tools.native(smollm_default.tokenizer.chat_template)  # SmolLM2's template renders role and content
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = tools.prompt_messages(QUESTION + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                                 {"role": "tool", "tool_call_id": "call_1", "content": "-5 C"}],
                                     [WEATHER], use_native=False)
    text = smollm_default.tokenizer.apply_chat_template(messages)
    assert "get_weather" in text.split("What is the weather")[0]  # the tools, in the system message
    assert tools.call_text("get_weather", '{"city": "Oslo"}') in text
    assert "<tool_response>\n-5 C\n</tool_response>" in text


def test_native_template_forced_call_on_a_random_model(qwen_style):
    client = qwen_style.client()
    r = client.chat.completions.create(model=qwen_style.model_id, messages=QUESTION, tools=[WEATHER],
                                       tool_choice="required", max_tokens=200, temperature=0)
    answer = r.choices[0]
    if answer.finish_reason == "length":  # a random model may write a long string; the call is still cut cleanly
        assert answer.message.tool_calls and answer.message.tool_calls[0].function.name == "get_weather"
        return
    assert answer.finish_reason == "tool_calls"
    args = json.loads(answer.message.tool_calls[0].function.arguments)
    assert jsonschema_rs.validator_for(WEATHER["function"]["parameters"]).is_valid(args)


def test_auto_is_free_text_until_the_tag_then_a_call(smollm_default):
    """The "auto" grammar allows any text, but once `<tool_call>` is written only a call to a given tool."""
    from lmgen.constraints import Matcher, allowed_tokens

    lm = smollm_default
    grammar = tools.grammar([WEATHER], forced=False)
    tokenize = lambda s: lm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731

    def allowed_along(text: str) -> list[bool]:
        m = Matcher(lm.constraints.compile("grammar", grammar), "grammar", lm.eos_token_ids, lm.constraints)
        out = []
        for token in tokenize(text):
            out.append(bool(allowed_tokens([m], lm.vocab_size)[0, token]))
            if not out[-1]:
                break
            m.accept(token)
        return out

    assert all(allowed_along("Any text at all, {even} \"quotes\" and <tags>."))
    assert all(allowed_along("Let me look. " + tools.call_text("get_weather", '{"city": "Rome", "unit": "F"}')))
    assert not all(allowed_along('Let me look. <tool_call>\n{"name": "get_time"'))  # not a given tool
    assert not all(allowed_along('<tool_call>\n{"name": "get_weather", "arguments": {"town"'))  # not its schema
