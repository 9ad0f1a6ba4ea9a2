"""The router's one error type, the same for every transport: a code, a message, and when to retry.

The gRPC service aborts the call with the status of the same name (`cluster.router.grpc_service`); the OpenAI HTTP
app maps the code to an HTTP status and OpenAI's error JSON (`cluster.router.openai_render.http_status`).
"""

from __future__ import annotations

from gptoss_cluster.cluster.contract import ErrorCode

__all__ = ["ErrorCode", "RouterError", "invalid"]


class RouterError(Exception):
    """Why a call failed: `code` (named as the gRPC status), a message a client can act on, and for
    RESOURCE_EXHAUSTED how long to wait before retrying (`retry_after_ms`)."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


def invalid(message: str) -> RouterError:
    """A request the router refuses as it stands (INVALID_ARGUMENT); the message names the field."""
    return RouterError(ErrorCode.INVALID_ARGUMENT, message)
