"""The ASGI middleware in front of every route: API key, body size limit, and request counts for /metrics."""

from __future__ import annotations

import hmac

from .errors import APIError

ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/next_token", "/v1/models", "/health", "/metrics"}


class Gate:
    """Checks the API key on /v1/*, buffers request bodies up to the limit (413 past it), counts statuses."""

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
            if path.startswith("/v1/") and self.state.api_key and not self._authorized(headers):
                given = headers.get(b"authorization")
                message = ("Incorrect API key provided." if given else
                           "No API key provided: send it as 'Authorization: Bearer KEY'.")
                return await _send(counted_send, APIError(401, message, code="invalid_api_key"))
            if scope["method"] not in ("POST", "PUT", "PATCH"):
                return await self.app(scope, receive, counted_send)
            body = await self._read_body(headers, receive)
            if body is None:
                limit = self.state.max_body
                return await _send(counted_send, APIError(
                    413, f"The request body is larger than this server's limit of {limit} bytes.",
                    code="request_too_large"))
            # Clients that send JSON without the header (curl -d) get it parsed as JSON all the same.
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
            await self.app(scope, _replay(body, receive), counted_send)
        finally:
            self.state.metrics.count(label, status[0])

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
