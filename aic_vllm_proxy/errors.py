"""What can go wrong in the engine, as plain exceptions that say why in words and in fields.

Pure: no HTTP here. The web layer maps each of these to a status, an OpenAI error ``type`` and
headers in one table (:mod:`aic_vllm_proxy.web.errors`)."""

from __future__ import annotations

from enum import Enum

from aic_vllm_proxy.schemas import ProcessState


def sentences(*parts: str | None) -> str:
    """Join message parts as sentences: each ends with one full stop (none added after ``.``,
    ``!`` or ``?``), empty parts are left out. ``sentences("X failed.", "Retry")`` is
    ``"X failed. Retry."``, never ``"X failed.. Retry."``."""
    done = []
    for part in parts:
        text = (part or "").strip()
        if text:
            done.append(text if text.endswith((".", "!", "?")) else text + ".")
    return " ".join(done)


class EngineError(Exception):
    """Base of the engine's errors; ``message`` says what happened and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unavailable(str, Enum):
    """Why no model can take a request."""

    TOO_MANY_WAITING = "too_many_waiting"  # --max-waiting requests already wait
    LOAD_TIMEOUT = "load_timeout"  # waited --wait-timeout for a load to finish
    FAILED = "failed"  # the last model failed
    NOTHING_LOADED = "nothing_loaded"  # nothing was ever loaded, or it was stopped
    NO_ROOM = "no_room"  # its GPUs are taken by models that cannot be evicted now


class ModelUnavailable(EngineError):
    """No model can serve the request now."""

    def __init__(
        self, message: str, *, why: Unavailable, state: ProcessState, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.why = why
        self.state = state
        self.retry_after = retry_after  # seconds, when the engine knows better than the table


class ModelNotFound(EngineError):
    """A request or a control call names a model that no instance serves and the catalogue does
    not have (or that may not be loaded on demand); ``known`` lists the names that work."""

    def __init__(self, name: str, known: list[str]) -> None:
        names = ", ".join(known) if known else "none"
        super().__init__(
            f"The model {name!r} does not exist on this proxy. Models that can be used: {names} "
            "(see GET /v1/models)."
        )
        self.name = name
        self.known = known


class SwitchCancelled(EngineError):
    """A switch was cancelled while it ran (a stop, or the daemon shutting down)."""


class SwitchVetoed(EngineError):
    """A ``pre_switch`` hook refused the switch; the running model keeps running."""


class SwitchHookFailed(EngineError):
    """A ``pre_switch`` hook failed (raised or timed out); nothing was changed."""


class StartFailure(str, Enum):
    """How a start went wrong."""

    EXITED = "start_failed"  # vLLM exited before it was ready
    CANNOT_RUN = "cannot_run"  # the vLLM command could not be executed
    TIMEOUT = "start_timeout"  # not ready within --ready-timeout
    PORT_TAKEN = "port_taken"  # another process listens on vLLM's port
    NO_NODES = "no_nodes"  # a model across nodes found too few agents with room (--node-wait)


class SwitchFailed(EngineError):
    """vLLM did not become ready; carries its exit code and the last lines of its log."""

    def __init__(
        self,
        message: str,
        *,
        failure: StartFailure,
        exit_code: int | None = None,
        log_tail: list[str] | None = None,
        state: ProcessState = ProcessState.FAILED,
    ) -> None:
        super().__init__(message)
        self.failure = failure
        self.exit_code = exit_code
        self.log_tail = log_tail or []
        self.state = state
