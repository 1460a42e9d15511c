"""Errors as the OpenAI API gives them: an HTTP status and
``{"error": {"message", "type", "param", "code"}}``.

A syscall's errno maps to one status here, the one place: what the kernel
refuses through the gateway is what it refuses over its socket, said in the
client's terms (EDQUOT, a spent token limit, is 429 ``insufficient_quota``,
as OpenAI says it of a spent balance).
"""

from __future__ import annotations

from llmagentos.syscalls.errno import SyscallError

# errno -> (HTTP status, OpenAI error type, code)
_BY_ERRNO: dict[str, tuple[int, str, str | None]] = {
    "EINVAL": (400, "invalid_request_error", None),
    "E2BIG": (400, "invalid_request_error", "context_length_exceeded"),
    "ENOENT": (404, "invalid_request_error", "model_not_found"),
    "EACCES": (403, "permission_error", "insufficient_permissions"),
    "EPERM": (403, "permission_error", "insufficient_permissions"),
    "EDQUOT": (429, "insufficient_quota", "insufficient_quota"),
    "EAGAIN": (429, "rate_limit_error", "rate_limit_exceeded"),
    "ESRCH": (401, "authentication_error", "invalid_api_key"),
    "ENOSYS": (501, "invalid_request_error", "not_supported"),
    "ETIMEDOUT": (504, "server_error", "timeout"),
    "ECANCELED": (503, "server_error", "cancelled"),
    "ESHUTDOWN": (503, "server_error", "shutting_down"),
    "ENOMEM": (503, "server_error", "out_of_memory"),
}


class ApiError(Exception):
    """An answer other than 200, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @classmethod
    def of(cls, e: SyscallError, param: str | None = None) -> ApiError:
        status, type, code = _BY_ERRNO.get(e.name, (500, "server_error", None))
        if e.name == "ENOENT":
            if "model" in e.message:
                param = param or "model"
            else:
                code = "not_found"
        return cls(status, f"{e.name}: {e.message}", type, param, code)


def bad(message: str, param: str | None = None) -> ApiError:
    """400: the request is malformed."""
    return ApiError(400, message, "invalid_request_error", param, None)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "authentication_error", None, "invalid_api_key")
