"""The ASGI middleware in front of every route: Host, API key, Content-Type, body size and text checks, and request
counts for /metrics."""

from __future__ import annotations

import hmac
import ipaddress
import json
import re

from ..lm import lone_surrogate
from ..params import ParameterError
from .errors import APIError

ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/next_token", "/v1/models", "/health", "/metrics",
             "/tokenize", "/detokenize", "/tokenizer_info"}
PUBLIC = {"/", "/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # no key needed
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]"}
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def check_api_key(key: str | None) -> None:
    """Refuse a key no client could send: HTTP headers carry printable ASCII only."""
    if key is not None and not (key.isascii() and key.isprintable() and key.strip() == key and key):
        raise ParameterError("api_key", "printable ASCII without surrounding spaces", "(hidden)",
                             message="the API key must be printable ASCII characters without surrounding spaces "
                                     "(an HTTP header cannot carry others, so no request could match it)")


def allowed_hosts(bind: str, extra: list[str] | None = None) -> set[str] | None:
    """The Host names a server bound to `bind` answers: on a loopback bind only the loopback's (DNS rebinding),
    plus `extra`; None (any) for another bind without `extra`, or when `extra` holds '*'."""
    extra = {h.lower() for h in extra or ()}
    if "*" in extra:
        return None
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not extra:
        return None
    host = f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind
    return LOOPBACK_HOSTS | {host.lower()} | extra if loopback else extra | {host.lower()}


def host_name(header: str) -> str:
    """The name in a Host header, without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '[::1]'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.rsplit(":", 1)[0]


class Gate:
    """Refuses foreign Hosts, checks the API key, takes JSON bodies only (buffered, 413 past the limit) and counts
    statuses."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in ENDPOINTS else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            refusal = self._refusal(path, scope["method"], headers)
            if refusal is not None:
                return await _send(counted_send, refusal)
            if scope["method"] not in ("POST", "PUT", "PATCH"):
                return await self.app(scope, receive, counted_send)
            body = await self._read_body(headers, receive)
            if body is None:
                limit = self.state.max_body
                return await _send(counted_send, APIError(
                    413, f"The request body is larger than this server's limit of {limit} bytes.",
                    code="request_too_large"))
            bad_text = _lone_surrogate(body)
            if bad_text is not None:
                return await _send(counted_send, bad_text)
            await self.app(scope, _replay(body, receive), counted_send)
        finally:
            self.state.metrics.count(label, status[0])

    def _refusal(self, path: str, method: str, headers: dict[bytes, bytes]) -> APIError | None:
        """Why the request is refused before its body is read, or None."""
        hosts = self.state.allowed_hosts
        host = headers.get(b"host", b"").decode("latin-1")
        if hosts is not None and host_name(host) not in hosts:
            return APIError(403, f"The Host header {host!r} is not one this server answers ({', '.join(sorted(hosts))}"
                                 "): start it with --allowed-hosts to add one.", param="Host", code="host_not_allowed",
                            type="permission_error")
        if self.state.api_key and path not in PUBLIC and not path.startswith("/static/") \
                and not self._authorized(headers):
            message = ("Incorrect API key provided." if headers.get(b"authorization") else
                       "No API key provided: send it as 'Authorization: Bearer KEY'.")
            return APIError(401, message, code="invalid_api_key")
        if method in ("POST", "PUT", "PATCH"):
            given = headers.get(b"content-type", b"").decode("latin-1")
            if given.split(";", 1)[0].strip().lower() != "application/json":
                # A page on another site can POST text/plain without asking (no CORS preflight): never run it.
                shown = repr(given) if given else "missing"
                return APIError(415, f"The Content-Type header must be application/json, got {shown}.",
                                param="Content-Type", code="unsupported_media_type")
        return None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.state.api_key.encode())

    async def _read_body(self, headers: dict[bytes, bytes], receive) -> bytes | None:
        """The whole body, or None when it is over the limit (then it is not read on)."""
        limit = self.state.max_body
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left: the route will see the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            if not message.get("more_body"):
                break
        return b"".join(chunks)


def _lone_surrogate(body: bytes) -> APIError | None:
    """A 400 naming the first string of a JSON body holding a lone UTF-16 surrogate (no tokenizer takes one)."""
    if not _ESCAPED_SURROGATE.search(body):  # JSON can only carry one as a \\udXXX escape
        return None
    try:
        path = _surrogate_path(json.loads(body), "")
    except ValueError:
        return None  # not JSON: the route says so
    if path is None:
        return None
    return APIError(400, f"Invalid value for '{path or 'body'}': the text holds a lone UTF-16 surrogate, which is "
                         "not valid Unicode.", param=path or None, code="invalid_text")


def _surrogate_path(value, path: str) -> str | None:
    if isinstance(value, str):
        return path if lone_surrogate(value) is not None else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and lone_surrogate(key) is not None:
            return f"{path}.{key!r}" if path else repr(key)
        where = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
        found = _surrogate_path(item, where)
        if found is not None:
            return found
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replayed


async def _send(send, error: APIError) -> None:
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
