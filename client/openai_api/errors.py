"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP
status of the gRPC status that caused them (docs/openai.md, "Errors")."""

from __future__ import annotations

from starlette.responses import JSONResponse

# gRPC status name -> HTTP status; anything else (ABORTED, DATA_LOSS, INTERNAL, ...) is 500
HTTP_OF_GRPC = {
    "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "FAILED_PRECONDITION": 400,
    "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
# HTTP status -> the error body's `type`
TYPE_OF_HTTP = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error",
}


class APIError(Exception):
    """An error answered as an OpenAI error body with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or TYPE_OF_HTTP.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """A 400 for a request parameter, before any gRPC call."""
    return APIError(400, message, param=param, code=code)


def from_hybrid(err: Exception) -> APIError:
    """An engine.errors.HybridError (client.api maps gRPC statuses to them, keeping the
    status name in `status`) as an APIError; the code is the status name in lower case."""
    status = getattr(err, "status", "INTERNAL")
    return APIError(HTTP_OF_GRPC.get(status, 500), str(err) or status, code=status.lower())
