"""The client's exceptions: what failed, and what to do about it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------------------- errors


class ProxyError(Exception):
    """Something the proxy reported, or a failure to talk to it. The message says what failed.

    ``status_code`` and ``error_type`` are the HTTP status and the OpenAI error ``type`` when the
    proxy answered with an error; ``url`` is the address that was called.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status_code: int | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.status_code = status_code
        self.error_type = error_type


class ProxyUnreachable(ProxyError):
    """The proxy could not be reached, or did not answer in time."""


class AuthenticationError(ProxyError):
    """The proxy wants an API key and none, or a wrong one, was sent (401)."""


class PermissionDeniedError(ProxyError):
    """The proxy refused the request (403): the key may not do this (an admin key is needed to
    switch, stop and read logs), or its policy does not allow that model spec."""


class UnknownModelError(ProxyError, ValueError):
    """A model that is not in ``model2spec`` was asked for without explicit arguments, or the
    proxy knows no model of that name (404 ``model_not_found``; its message lists the names
    that would work)."""


class NoRoomError(ProxyError):
    """503: the proxy cannot take this now; for a load, there is no room on the model's GPUs
    and nothing can be unloaded to make it (the message names the models in the way).
    ``retry_after`` is the proxy's ``Retry-After`` in seconds, when it sent one."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status_code: int | None = 503,
        error_type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, url=url, status_code=status_code, error_type=error_type)
        self.retry_after = retry_after


class WaitTimeout(ProxyError, TimeoutError):
    """The client stopped waiting; what it waited for goes on in the proxy."""


class SwitchError(ProxyError):
    """A switch or a load failed: vLLM did not start, died, timed out, or it was refused (a
    plugin's veto: 409).

    ``exit_code`` is vLLM's exit status (if it exited) and ``log_tail`` the last lines of its log;
    ``str()`` of the error ends with that tail.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        log_tail: Sequence[str] = (),
        state: str | None = None,
        url: str | None = None,
        status_code: int | None = None,
        error_type: str | None = "switch_failed",
    ) -> None:
        super().__init__(message, url=url, status_code=status_code, error_type=error_type)
        self.exit_code = exit_code
        self.log_tail = list(log_tail)
        self.state = state

    def __str__(self) -> str:
        if not self.log_tail:
            return self.message
        lines = "\n".join(f"    {line}" for line in self.log_tail[-20:])
        return f"{self.message}\n\nLast lines of the vLLM log:\n{lines}"
