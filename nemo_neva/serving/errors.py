"""Errors a client gets back, in the OpenAI error shape; never a stack trace."""
from __future__ import annotations

from typing import Optional


class RequestError(Exception):
    """A request the server refuses; `message` is safe to show the client (no file contents, no trace)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 code: Optional[str] = None, kind: str = "invalid_request_error", close: bool = False):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind
        self.close = close  # the body was not read: the connection must close after the reply

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def internal_error() -> RequestError:
    return RequestError("internal server error (the server log has the cause)", status=500, kind="server_error")
