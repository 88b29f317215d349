"""Errors in OpenAI's shape, and turning validation failures into them."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..params import ParameterError
from .protocol import API_NAMES

UNION_HINTS = {
    "prompt": "must be a string, or a non-empty list of strings, of token ids (integers >= 0) or of non-empty lists "
              "of token ids",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of content parts",
}


class APIError(Exception):
    """An error to send as {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        # A message may quote the request's text: keep it encodable (a lone surrogate would fail as UTF-8).
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The HTTP response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def shutdown_error() -> APIError:
    """The 503 for a request that arrives while the server shuts down."""
    return APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")


def from_parameter_error(e: ParameterError, names: dict[str, str] | None = None) -> APIError:
    """A 400 for a ParameterError from a request model or GenerationConfig, named as the API (or `names`, the
    request's own spelling of a field) names the field."""
    name = (names or {}).get(e.field) or API_NAMES.get(e.field, e.field)
    return APIError(400, e.describe(name), param=name)


def _loc_text(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _strip_body(loc) -> list:
    loc = list(loc)
    return loc[1:] if loc[:1] == ["body"] else loc


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def from_validation_errors(errors: list[dict]) -> APIError:
    """A 400 for pydantic's (or FastAPI's) validation errors: the first field that failed, by name."""
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"The request body is not valid JSON: {detail} (at character {first['loc'][-1]}).")
    locs = [_strip_body(e.get("loc", ())) for e in errors]
    loc = locs[0]
    if not loc:
        if first.get("type") == "missing":
            return APIError(400, "The request body is missing: send a JSON object.")
        return APIError(400, f"The request body must be a JSON object, got {_short(first.get('input'))}.")
    # A union field fails once per member: report the field, not each member's complaint.
    same = [other for other in locs if other[:1] == loc[:1]]
    prefix = loc
    for other in same[1:]:
        n = 0
        while n < min(len(prefix), len(other)) and prefix[n] == other[n]:
            n += 1
        prefix = prefix[:n]
    field = next((p for p in reversed(prefix) if isinstance(p, str)), None)
    if len(same) > 1 and field in UNION_HINTS:
        param = _loc_text(prefix)
        return APIError(400, f"Invalid value for '{param}': {field} {UNION_HINTS[field]}.", param=param)
    param = _loc_text(loc)
    if first.get("type") == "missing":
        return APIError(400, f"Missing required field '{param}'.", param=param)
    return APIError(400, f"Invalid value for '{param}': {first.get('msg')} (got {_short(first.get('input'))}).",
                    param=param)
