"""Errors that reach the client, each with its HTTP status and OpenAI error type, and the
one that stops balancer at start (:class:`StartupError`)."""

from __future__ import annotations

from typing import ClassVar

from balancer.jsondoc import json_object


class BalancerError(Exception):
    """Base class: an error answered to the client as an OpenAI-style error body."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    reason: ClassVar[str] = "internal"
    """Short label for the rejections metric."""
    retry_after: int | None = None
    """Seconds for a ``Retry-After`` header on the answer (None: no header)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequestError(BalancerError):
    status = 400
    type = "invalid_request_error"
    reason = "bad_request"


class InvalidJSONError(BadRequestError):
    reason = "invalid_json"


class BadTargetError(BadRequestError):
    """A request target a model server could read differently from balancer (dot segments,
    encoded slashes, absolute-form, CONNECT, ``*``)."""

    reason = "bad_target"


class UnsupportedMediaTypeError(BalancerError):
    status = 415
    type = "invalid_request_error"
    reason = "unsupported_media_type"


class BodyTooLargeError(BalancerError):
    status = 413
    type = "invalid_request_error"
    reason = "body_too_large"


class ModelNotFoundError(BalancerError):
    status = 404
    type = "invalid_request_error"
    reason = "model_not_found"


class NotFoundError(BalancerError):
    status = 404
    type = "invalid_request_error"
    reason = "not_found"


class PathNotAllowedError(NotFoundError):
    """A /v1 path that ``server.forward_paths`` does not list."""

    reason = "path_not_allowed"


class MethodNotAllowedError(BalancerError):
    status = 405
    type = "invalid_request_error"
    reason = "method_not_allowed"


class NoEndpointsError(BalancerError):
    """The pool has no routable endpoint (none discovered, or all draining)."""

    status = 503
    type = "service_unavailable"
    reason = "no_endpoints"


class BadGatewayError(BalancerError):
    """The model server could not be reached, or failed before its response began."""

    status = 502
    type = "upstream_error"
    reason = "upstream_connect"


class GatewayTimeoutError(BalancerError):
    """The model server sent nothing within the first-byte timeout (or the total ran out)."""

    status = 504
    type = "upstream_timeout"
    reason = "upstream_timeout"


class RateLimitedError(BalancerError):
    """Every endpoint that could take the request asked for a pause (429 Retry-After)."""

    status = 429
    type = "rate_limit_error"
    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OverloadedError(BalancerError):
    """Every endpoint is at its in-flight limit and the wait queue is full or timed out."""

    status = 503
    type = "service_unavailable"
    reason = "overloaded"
    retry_after = 1


class ConcurrencyLimitError(BalancerError):
    """The proxy port already reads or answers ``limits.max_concurrent_requests`` requests."""

    status = 503
    type = "service_unavailable"
    reason = "concurrency_limit"
    retry_after = 1


class RequestTimeoutError(BalancerError):
    """The client took longer than ``limits.client_body_timeout`` to send its body (or
    ``client_header_timeout`` for its head)."""

    status = 408
    type = "invalid_request_error"
    reason = "client_timeout"


class DebugForbiddenError(BalancerError):
    """A ``/debug`` request from a peer that is not loopback while
    ``server.debug_from_anywhere`` is off."""

    status = 403
    type = "permission_error"
    reason = "debug_forbidden"


class ParseUnavailableError(BalancerError):
    """The worker process reading a large request body died, or none could be started
    (``limits.offload_parse_bytes``). The pool of workers is replaced; the request may be
    sent again."""

    status = 503
    type = "service_unavailable"
    reason = "parse_worker_failed"
    retry_after = 1


class ShuttingDownError(BalancerError):
    status = 503
    type = "service_unavailable"
    reason = "shutting_down"


def error_body(message: str, type_: str, code: int | str | None, param: str | None = None
               ) -> dict[str, object]:
    """The OpenAI error envelope, which OpenAI clients parse into their exceptions."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StartupError(Exception):
    """balancer cannot start: a port in use, a Kubernetes configuration that cannot be
    loaded. The message names the problem and the setting; the command line prints it as one
    line and exits with status 2, as for an invalid configuration."""


def upstream_error_message(payload: bytes, limit: int) -> str | None:
    """The ``message`` of a model server's JSON error answer, or None (not JSON, not an
    error object, longer than ``limit`` bytes). vLLM nests it under ``"error"`` in newer
    versions and puts it at the top level in older ones; both are read."""
    if len(payload) > limit:
        return None
    body = json_object(payload)
    if body is None:
        return None
    error = body.get("error")
    if isinstance(error, dict):
        body = error
    message = body.get("message")
    return message if isinstance(message, str) else None
