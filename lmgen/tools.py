"""Tool calling: the tools in the prompt, the calls constrained by a grammar, and calls parsed back out.

A call is written as Hermes and Qwen2.5 templates write it:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that takes `tools` and writes `<tool_call>` renders the tools and earlier calls itself (native).
Any other template gets the generic format, as llama.cpp does for templates without tool support: the tools and
this format in the system message, earlier calls as that text, and tool results as user turns in
`<tool_response>` tags. With tool_choice "required" or a named function the reply is one call; with "auto" it is
free text until the model writes `<tool_call>`, and a call from there on.
"""

from __future__ import annotations

import json
import re
import uuid

import jinja2
import jinja2.meta

from .constraints import JSON_OPTIONS, closed

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"

GENERIC_PROMPT = """You can call these tools; each one's arguments follow the JSON Schema given:
{tools}

To call a tool, answer with nothing but the call, written exactly like this:
<tool_call>
{{"name": "<the tool's name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
A tool's result comes back in <tool_response> tags. Answer in plain text when no tool is needed."""


def native(template: str | None) -> bool:
    """Whether a chat template renders tools itself, in the <tool_call> format."""
    if not template or "<tool_call>" not in template:
        return False
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:
        return False


def call_prefix(name: str) -> str:
    """A call's text up to its arguments."""
    return "{" + f'"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '


def call_text(name: str, arguments: str) -> str:
    """A whole call, tags included; `arguments` is a JSON object's text."""
    return f"{OPEN}{call_prefix(name)}{arguments}}}{CLOSE}"


def prompt_messages(messages: list[dict], tools: list[dict], use_native: bool) -> list[dict]:
    """The messages as the template takes them. Native: each call's arguments as a dict (templates apply tojson).
    Generic: the tools in the system message, calls as their text, results as user turns."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None) or []
        if use_native:
            if calls:
                m["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
                    for c in calls]
            out.append(m)
            continue
        m.pop("tool_call_id", None)
        if calls:
            texts = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls]
            m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + texts)
        elif m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if not use_native and tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        system = GENERIC_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{system}")
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def grammar(tools: list[dict], forced: bool) -> str:
    """An llguidance Lark grammar for a reply: one call to one of `tools` (forced), or free text that becomes a
    call once it writes the opening tag (the lazy rule ends the text at the tag)."""
    calls = []
    for t in tools:
        schema = closed(t["function"].get("parameters") or {"type": "object", "properties": {}})
        schema = dict(schema, **{"x-guidance": JSON_OPTIONS})  # arguments written as json_schema output is
        calls.append(f'( {json.dumps(call_prefix(t["function"]["name"]))} %json {json.dumps(schema)} "}}" )')
    tag = OPEN.removesuffix("\n")
    rules = ["%llguidance {}", f"after_tag: {json.dumps(OPEN[len(tag):])} ({' | '.join(calls)}) {json.dumps(CLOSE)}"]
    if forced:
        return "\n".join(rules + [f"start: {json.dumps(tag)} after_tag"])
    return "\n".join(rules + ["start: TEXT | text_then_tag after_tag", f"text_then_tag[lazy]: TEXT {json.dumps(tag)}",
                              "TEXT: /(.|\\n)*/"])


class ToolCallParser:
    """Splits a reply's text, as it streams, into content and tool calls; returns OpenAI deltas as it goes."""

    def __init__(self):
        self.content, self.calls = "", []  # calls: {"id", "type", "function": {"name", "arguments"}}
        self._text, self._at = "", 0  # all text so far; how much of it is handed out
        self._call: dict | None = None  # the call being written

    def feed(self, piece: str, final: bool = False) -> list[dict]:
        """Take the next piece of text (final: the last); the deltas it completes, {"content": ...} or
        {"tool_calls": [...]}. Text that could be the start of a tag waits for the next piece."""
        self._text += piece
        out: list[dict] = []
        while True:
            marker = OPEN if self._call is None else "}" + CLOSE  # the arguments' own "}" comes before it
            found = self._text.find(marker, self._at)
            end = found if found >= 0 else len(self._text) - (0 if final else _held(self._text, marker))
            if end > self._at:
                self._emit(self._text[self._at:end], out)
                self._at = end
            if found < 0:
                return out
            if self._call is not None:
                self._at, self._call = found + len(marker), None
            elif not self._open(found, out):
                if final:  # a call cut off before its name: its text stays content
                    self._emit(self._text[self._at:], out)
                    self._at = len(self._text)
                return out

    def finish(self) -> list[dict]:
        """The end of the reply: whatever was held back."""
        return self.feed("", final=True)

    @property
    def complete(self) -> bool:
        """Whether the reply made at least one call and finished every call it began."""
        return bool(self.calls) and self._call is None

    def _open(self, start: int, out: list) -> bool:
        """Start a call once its name is written; False until then."""
        m = _CALL_HEAD.match(self._text, start + len(OPEN))
        if m is None:
            return False
        name = json.loads(m[1])
        self._call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": ""}}
        self.calls.append(self._call)
        self._at = m.end()
        out.append({"tool_calls": [{"index": len(self.calls) - 1, "id": self._call["id"], "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        return True

    def _emit(self, text: str, out: list) -> None:
        if self._call is None:
            self.content += text
            out.append({"content": text})
        else:
            self._call["function"]["arguments"] += text
            out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": text}}]})


_CALL_HEAD = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


def _held(text: str, marker: str) -> int:
    """How much of text's tail could be the start of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
