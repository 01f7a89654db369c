"""What both clients share: settings, request building, response parsing, error mapping and
the base class with the methods that do no I/O."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import uuid
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from aic_vllm_proxy.catalog import CatalogEntry, resolve
from aic_vllm_proxy.client.connection import ConnectionFile, connection_from_environment, read_connection_file
from aic_vllm_proxy.client.errors import (
    AuthenticationError,
    NoRoomError,
    PermissionDeniedError,
    ProxyError,
    ProxyUnreachable,
    SwitchError,
    UnknownModelError,
    WaitTimeout,
)
from aic_vllm_proxy.client.progress import (
    LoadWatch,
    Outcome,
    ProgressArg,
    Sink,
    SwitchWatch,
    Watch,
    changes_status,
    make_sink,
)
from aic_vllm_proxy.client.sse import EVENT_STREAM
from aic_vllm_proxy.client.views import LoadResultDict, StatusDict, SwitchResultDict, UnloadResultDict
from aic_vllm_proxy.schemas import (
    ErrorBody,
    ErrorDetail,
    InstanceStatus,
    LoadResult,
    NodesStatus,
    PluginInfo,
    PluginList,
    ProcessState,
    ProxyEvent,
    Status,
    UnloadResult,
)
from aic_vllm_proxy.spec import SpecError

if TYPE_CHECKING:
    import openai

DEFAULT_URL = "http://127.0.0.1:8224"
URL_ENV = "AIC_VLLM_PROXY_URL"
API_KEY_ENV = "AIC_VLLM_PROXY_KEY"
#: Timeout of one call to the proxy's own API (a switch is many short calls, never one long one).
API_TIMEOUT = 30.0
#: The openai clients' default: a generation may wait for a switch in progress, then run long.
GENERATION_TIMEOUT = httpx.Timeout(1800.0, connect=10.0)
#: Read timeout of ``POST /stop``: the proxy first lets in-flight requests finish (its --drain-timeout).
STOP_TIMEOUT = 900.0
#: Seconds between two ``GET /status`` while a switch goes on (a daemon without ``GET /events``).
POLL_INTERVAL = 0.3
#: Followed through ``GET /events``, ``GET /status`` is read when an event says something
#: changed, and at least this often (in case an event got lost on the way).
EVENTS_SAFETY_INTERVAL = 10.0
#: How long ``GET /events`` may take to send its first message before the client polls instead.
EVENTS_OPEN_TIMEOUT = 10.0
#: After a switch or a load failed, how long to wait for the events that led to it (a plugin's
#: veto comes as an event a moment before ``/status`` shows the refusal); it ends once some came.
FINAL_EVENTS_WAIT = 1.0
#: How much of the new launch's log the progress display starts with (all of it, in practice).
FOLLOW_FROM_LINES = 2000
#: Log lines attached to a :class:`SwitchError`.
TAIL_LINES = 40
#: After a failed start, how long to wait for the last log lines to arrive.
FINAL_LINES_WAIT = 3.0
#: After a successful start, how long to wait for the log lines up to vLLM's "ready" line.
READY_LINES_WAIT = 3.0  # ends as soon as the line is seen; a loaded machine may need more than 1 s

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
C = TypeVar("C", bound="_ClientBase")
ModelSpecs = Mapping[str, str | Sequence[str]]


# ------------------------------------------------------------ shared request logic


def build_spec(model: str, args: str | Sequence[str] | None, model2spec: ModelSpecs) -> str:
    """The ``model_spec`` for ``model``: its ``model2spec`` arguments, or the explicit ``args``.

    ``args`` (a string as on the command line, or a list of words) wins over ``model2spec``;
    ``args=""`` loads the model with vLLM's defaults. A model missing from a non-empty
    ``model2spec`` without ``args`` raises :class:`UnknownModelError`.
    """
    name = model.strip()
    if not name:
        raise UnknownModelError("no model given: switch(MODEL) needs a model name or path")
    if args is None:
        if name in model2spec:
            args = model2spec[name]
        elif model2spec:
            known = ", ".join(repr(m) for m in model2spec)
            raise UnknownModelError(
                f"unknown model {name!r}: model2spec has {known}. Add it to model2spec, or give its "
                f"vLLM arguments: switch({name!r}, args='--tensor-parallel-size 1') (args='' for "
                "vLLM's defaults)."
            )
        else:
            args = ""
    words = args if isinstance(args, str) else shlex.join(args)
    return f"{shlex.quote(name)} {words.strip()}".strip()


def _normalize_url(url: str | None, *, stacklevel: int = 2) -> str:
    """The proxy's base URL: ``http://`` added when left out, no ``/`` at the end, and no ``/v1``
    (the openai habit: the proxy's own API is at its root, ``get_openai_client()`` adds ``/v1``);
    a ``/v1`` is dropped with a warning."""
    url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        base = url[: -len("/v1")]
        warnings.warn(
            f"drop /v1 from the proxy URL: {url} was used as {base} (the proxy's own API is at its "
            "root; get_openai_client() adds /v1)",
            UserWarning,
            stacklevel=stacklevel,
        )
        url = base
    return url


def _error_detail(response: httpx.Response) -> ErrorDetail | None:
    try:
        return ErrorBody.model_validate_json(response.content).error
    except ValidationError:
        return None


def _response_error(response: httpx.Response, *, has_key: bool, key_option: str) -> ProxyError:
    """The exception for an error answer of the proxy's own API (``key_option``: how the caller
    gives the key, named in the 401 message)."""
    url = str(response.request.url)
    status = response.status_code
    detail = _error_detail(response)
    fallback = response.text.strip()[:300] or response.reason_phrase
    text = detail.message if detail is not None else fallback
    where = f"{response.request.method} {url}"
    kind = detail.type if detail else None
    if status == 401:
        hint = (
            f"The API key that was sent was refused: check {key_option} or ${API_KEY_ENV}"
            if has_key
            else f"No API key was sent: give one with {key_option} or ${API_KEY_ENV}"
        )
        return AuthenticationError(
            f"{where} was refused (401): {text.rstrip('.')}. {hint}.",
            url=url,
            status_code=status,
            error_type=kind,
        )
    if status == 403:
        return PermissionDeniedError(f"{text} [403 from {where}]", url=url, status_code=403, error_type=kind)
    if status == 404 and detail is not None and detail.code == "model_not_found":
        # The proxy's message lists the names that would work.
        return UnknownModelError(f"{text} [404 from {where}]", url=url, status_code=404, error_type=kind)
    if status == 503:
        retry_after = _retry_after(response)
        later = f"; retry after {retry_after:g} s" if retry_after is not None else ""
        return NoRoomError(
            f"{text} [503 from {where}{later}]",
            url=url,
            status_code=503,
            error_type=kind,
            retry_after=retry_after,
        )
    if detail is not None and (detail.log_tail is not None or detail.type.startswith("switch")):
        return SwitchError(
            text,
            exit_code=detail.exit_code,
            log_tail=detail.log_tail or (),
            state=detail.state.value if detail.state else None,
            url=url,
            status_code=status,
            error_type=detail.type,
        )
    if detail is None and status == 404:
        text += f" (is {response.request.url.copy_with(path='/', query=None)} an aic-vllm-proxy?)"
    return ProxyError(f"{text} [{status} from {where}]", url=url, status_code=status, error_type=kind)


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds of a ``Retry-After`` header (None: none, or an HTTP date)."""
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _transport_error(exc: httpx.HTTPError, base_url: str, url_option: str) -> ProxyError:
    """The exception for a request that got no answer (``url_option``: how the caller gives the
    URL, named in the message)."""
    try:
        what = f"{exc.request.method} {exc.request.url.path}"
    except (AttributeError, RuntimeError):  # no request attached
        what = "the request"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return ProxyUnreachable(
            f"cannot reach aic-vllm-proxy at {base_url} ({exc or type(exc).__name__}). Is the daemon "
            f"running there (aic-vllm-proxy serve), and is the URL right ({url_option} or ${URL_ENV})?",
            url=base_url,
        )
    if isinstance(exc, httpx.TimeoutException):
        return ProxyUnreachable(
            f"aic-vllm-proxy at {base_url} did not answer {what} in time ({type(exc).__name__})",
            url=base_url,
        )
    return ProxyError(f"talking to aic-vllm-proxy at {base_url} failed during {what}: {exc!r}", url=base_url)


def _json_as(model: type[M]) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ProxyError(
                f"unexpected answer to {response.request.method} {response.request.url} "
                f"(is it an aic-vllm-proxy of a compatible version?): {exc}",
                url=str(response.request.url),
                status_code=response.status_code,
            ) from None

    return parse


def _text(response: httpx.Response) -> str:
    return response.text


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One call of the proxy's API: what to send and how to read the answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    #: Read timeout for a call that may take long (None: the client's ``timeout``).
    read_timeout: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _status_answer(response: httpx.Response) -> StatusDict:
    return StatusDict(_json_as(Status)(response))


def _status_call() -> _Call[StatusDict]:
    return _Call("GET", "/status", _status_answer)


def _request_id_header(request_id: str | None) -> dict[str, str]:
    """``X-Request-Id``: the daemon keeps it, and tags the events the request causes with it."""
    return {} if request_id is None else {"X-Request-Id": request_id}


def _start_switch_call(spec: str, force: bool, request_id: str | None = None) -> _Call[StatusDict]:
    body = {"model_spec": spec, "wait": False, "force": force}
    return _Call("POST", "/switch", _status_answer, json=body, headers=_request_id_header(request_id))


def _stop_call(force: bool, model: str | None = None) -> _Call[StatusDict]:
    """``POST /stop``: every instance, or the one ``model`` names."""
    body: dict[str, Any] = {"force": force} if model is None else {"model": model, "force": force}
    return _Call("POST", "/stop", _status_answer, json=body, read_timeout=STOP_TIMEOUT)


def _start_load_call(name: str, request_id: str | None = None) -> _Call[LoadResultDict]:
    """``POST /load`` with ``"wait": false``: answered at once, the load goes on (see /status)."""
    parse = _json_as(LoadResult)
    return _Call(
        "POST",
        "/load",
        lambda response: LoadResultDict(parse(response)),
        json={"model": name, "wait": False},
        headers=_request_id_header(request_id),
    )


def _unload_call(name: str, force: bool) -> _Call[UnloadResultDict]:
    parse = _json_as(UnloadResult)
    return _Call(
        "POST",
        "/unload",
        lambda response: UnloadResultDict(parse(response)),
        json={"model": name, "force": force},
        read_timeout=STOP_TIMEOUT,
    )


def _instances_call() -> _Call[list[InstanceStatus]]:
    return _Call("GET", "/status", lambda response: _json_as(Status)(response).instances)


def _log_params(model: str | None, rank: int | None = None) -> dict[str, Any]:
    """``?model=NAME&rank=N`` of the log routes (no model: the primary instance's log; no rank:
    rank 0's, the daemon's own; rank N: the daemon's copy of rank N's log of a model across
    nodes)."""
    params: dict[str, Any] = {} if model is None else {"model": model}
    if rank is not None:
        params["rank"] = rank
    return params


def _logs_call(lines: int | None, model: str | None = None, rank: int | None = None) -> _Call[str]:
    if lines is None:
        return _Call("GET", "/logs/current", _text, params=_log_params(model, rank))
    return _Call("GET", "/logs/tail", _text, params={"lines": lines, **_log_params(model, rank)})


def _failure_tail_call(model: str | None = None) -> _Call[list[str]]:
    """The last lines of a failed launch's log, its root cause first when it is further up."""
    params = {"lines": TAIL_LINES, "cause": 1, **_log_params(model)}
    return _Call("GET", "/logs/tail", lambda r: _text(r).splitlines(), params=params)


def _plugins_call() -> _Call[list[PluginInfo]]:
    parse = _json_as(PluginList)
    return _Call("GET", "/plugins", lambda response: parse(response).plugins)


def _nodes_call() -> _Call[NodesStatus]:
    """``GET /nodes``: the agents known to the daemon (an admin route when keys are set)."""
    return _Call("GET", "/nodes", _json_as(NodesStatus))


def _json_dict(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ProxyError(
            f"unexpected answer to {response.request.method} {response.request.url}: not a JSON object"
        )
    return body


def _health_call() -> _Call[dict[str, Any]]:
    return _Call("GET", "/proxy/health", _json_dict)


def _catalog_call() -> _Call[dict[str, Any]]:
    return _Call("GET", "/models/catalog", _json_dict)


def _model_name_call() -> _Call[str | None]:
    def ready_model(response: httpx.Response) -> str | None:
        status = _status_answer(response).as_model()
        return status.model if status.state is ProcessState.READY else None

    return _Call("GET", "/status", ready_model)


def _event_stream_request(timeout: float) -> dict[str, Any]:
    """The request of ``GET /events`` (no read timeout: the daemon may have nothing to tell for
    long; it sends a keep-alive comment now and then)."""
    return {
        "method": "GET",
        "url": "/events",
        "headers": {"Accept": EVENT_STREAM},
        "timeout": httpx.Timeout(timeout, read=None),
    }


def _log_stream_request(
    lines: int, timeout: float, model: str | None = None, rank: int | None = None
) -> dict[str, Any]:
    """The request of ``GET /logs/stream`` (no read timeout: a line may take long to come)."""
    return {
        "method": "GET",
        "url": "/logs/stream",
        "params": {"lines": lines, **_log_params(model, rank)},
        "timeout": httpx.Timeout(timeout, read=None),
    }


# ------------------------------------------------------------------ plans of steps
#
# What a longer method does (switch, wait_until_ready) is written once, as a generator that
# yields steps and gets each step's answer back: a _Call (answer: its parsed result), or one of
# the steps below about the log stream, the event stream and waiting. A step that fails is
# thrown into the plan at its yield, so the plan handles errors as if it had done the I/O itself.
# The sync and async clients each have one driver (``_run``) that carries the steps out, and
# closes the streams a plan left open when it ends.


@dataclass(frozen=True)
class _OpenLog:
    """Follow ``GET /logs/stream`` (of the instance ``model``; None: the primary) from its
    last ``lines`` lines, each line handed to ``show``."""

    show: Callable[[str], None]
    lines: int = FOLLOW_FROM_LINES
    model: str | None = None


def _never() -> bool:
    return False


@dataclass(frozen=True)
class _OpenEvents:
    """Follow ``GET /events``. Answer: True once its first message came (from then on, every
    event is kept for the next :class:`_Wait` with ``events``); False when the daemon has no
    such route (an older one answers 404), or it failed or stayed silent for ``timeout``."""

    timeout: float = EVENTS_OPEN_TIMEOUT


@dataclass(frozen=True)
class _Wait:
    """Let ``seconds`` pass while the log's lines are shown; with ``to_end``, stop earlier once
    the log stream has ended or ``until()`` is true (checked after each line).

    With ``events``, stop as soon as events have come from ``GET /events``. Answer: the events
    that came (all those there were, possibly none), or None when no event stream is open (any
    more). Without ``events``, the answer is None (events coming meanwhile are kept)."""

    seconds: float
    to_end: bool = False
    until: Callable[[], bool] = _never
    events: bool = False


@dataclass(frozen=True)
class _CloseLog:
    """Stop following the log stream (the driver also does this when the plan ends)."""


_Step = _Call[Any] | _OpenLog | _OpenEvents | _Wait | _CloseLog
#: A plan that returns a ``T``.
_Plan = Generator[_Step, Any, T]


def _ask(call: _Call[T]) -> _Plan[T]:
    """One call, as a step of a plan: ``answer = yield from _ask(call)``."""
    answer: T = yield call
    return answer


class _Steps(Generic[T]):
    """A plan carried out one step at a time: the driver does :meth:`next`'s step and hands its
    answer (or its exception) back with :meth:`done`; :attr:`result` once ``next()`` is None."""

    def __init__(self, plan: _Plan[T]) -> None:
        self._plan = plan
        self._answer: Any = None
        self._error: BaseException | None = None
        self.result: T

    def next(self) -> _Step | None:
        answer, error = self._answer, self._error
        self._answer = self._error = None
        try:
            return self._plan.send(answer) if error is None else self._plan.throw(error)
        except StopIteration as end:
            self.result = end.value
            return None

    def done(self, answer: Any = None, error: BaseException | None = None) -> None:
        self._answer, self._error = answer, error


def _catalog_lookup(spec: str) -> _Plan[str | None]:
    """The spec the proxy loads for ``spec`` when it names a catalogue entry (else None)."""
    if len(spec.split()) != 1:
        return None
    try:
        catalog = yield from _ask(_catalog_call())
    except ProxyUnreachable:
        raise
    except ProxyError:  # no catalogue (an older proxy) or not allowed to see it
        return None
    return catalog_spec(spec, catalog)


def catalog_spec(name: str, catalog: Mapping[str, Any]) -> str | None:
    """The spec the proxy loads for the one-word ``name`` of a catalogue entry (or alias), as
    listed by ``GET /models/catalog``; None when it is not one. The lookup is the proxy's own
    (:func:`aic_vllm_proxy.catalog.resolve`); entries this client cannot read are passed over."""
    listed = catalog.get("models")
    if not isinstance(listed, dict):
        return None
    entries: dict[str, CatalogEntry] = {}
    for key, entry in listed.items():
        with contextlib.suppress(ValidationError):
            entries[str(key)] = CatalogEntry.model_validate(entry)
    try:
        spec, entry_name = resolve(name, entries, policy="open", denied_flags=())
    except SpecError:
        return None
    return spec.raw if entry_name is not None else None


def _new_request_id() -> str:
    """An ``X-Request-Id`` for a switch or a load, to know the events it causes."""
    return f"client-{uuid.uuid4().hex}"


def _await_change(watch: Watch) -> _Plan[bool]:
    """Wait for events until one says ``/status`` may have changed (:func:`changes_status`), or
    :data:`EVENTS_SAFETY_INTERVAL` has passed (in case one was lost), or ``watch``'s timeout;
    each event is shown by ``watch`` (hook reports). False when the event stream has ended:
    poll from then on."""
    until = watch.elapsed + EVENTS_SAFETY_INTERVAL
    if watch.timeout is not None:
        until = min(until, watch.timeout + 0.01)  # just past it: the next status tells it is over
    while (left := until - watch.elapsed) > 0:
        received: list[ProxyEvent] | None = yield _Wait(left, events=True)
        if received is None:
            return False
        for event in received:
            watch.event(event)
        if any(changes_status(event) for event in received):
            break
    return True


def _switch_error(outcome: Outcome, tail: list[str], base_url: str, *, switching: bool) -> ProxyError:
    """A :class:`SwitchError` for a switch or a load that did not end ready (or a wait that
    ended failed); a plain :class:`ProxyError` when a wait found nothing loaded."""
    if not switching and outcome.state is not ProcessState.FAILED:
        return ProxyError(outcome.message, url=base_url)
    return SwitchError(
        outcome.message,
        exit_code=outcome.exit_code,
        log_tail=tail,
        state=outcome.state.value,
        url=base_url,
    )


def _key(api_key: str | None, published: str | None) -> str | None:
    """The key a client sends: ``api_key=``, else ``$AIC_VLLM_PROXY_KEY``, else the daemon's
    connection file's (``published``), else none."""
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or published or None)


class _ClientBase:
    """What the sync and async clients share: settings, specs, headers, openai clients."""

    #: How the URL and the key are given, as error messages name them (the command line sets
    #: its options here).
    url_option = "proxy_url="
    key_option = "api_key="
    #: The daemon's connection file the URL came from (``from_connection_file``, or
    #: ``$AIC_VLLM_PROXY_CONNECTION_FILE`` when no URL was given); None: it did not.
    connection_file: Path | None = None
    _published_url: str | None = None
    _published_key: str | None = None

    def __init__(
        self,
        proxy_url: str | None = None,
        model2spec: ModelSpecs | None = None,
        *,
        api_key: str | None = None,
        timeout: float = API_TIMEOUT,
        progress: ProgressArg = True,
        verbose: bool = False,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        if proxy_url is None and not os.environ.get(URL_ENV):
            self._published(connection_from_environment(stacklevel=3))
        self.proxy_url = _normalize_url(proxy_url or self._published_url, stacklevel=3)
        self.model2spec: dict[str, str | Sequence[str]] = dict(model2spec or {})
        self.api_key = _key(api_key, self._published_key)
        self.timeout = timeout
        self.progress = progress
        self.verbose = verbose
        self.poll_interval = poll_interval
        self._open()

    def _published(self, found: ConnectionFile | None) -> None:
        """Take the URL and key of a daemon's connection file (a key given wins)."""
        if found is not None:
            self.connection_file = found.path
            self.url_option = f"connection file {found.path}"
            self._published_url, self._published_key = found.info.url, found.info.key

    @classmethod
    def from_connection_file(
        cls: type[C],
        path: str | os.PathLike[str],
        model2spec: ModelSpecs | None = None,
        *,
        api_key: str | None = None,
        timeout: float = API_TIMEOUT,
        progress: ProgressArg = True,
        verbose: bool = False,
        poll_interval: float = POLL_INTERVAL,
    ) -> C:
        """The client of the daemon whose connection file is ``path`` (``aic-vllm-proxy serve
        --connection-file PATH``; ``~`` expanded): its URL, and its admin key unless ``api_key=``
        or ``$AIC_VLLM_PROXY_KEY`` gives one. A missing or broken file raises
        :class:`~aic_vllm_proxy.client.connection.ConnectionFileError` naming it; a file others
        may read, or a daemon no longer running on this host, warns."""
        found = read_connection_file(path, stacklevel=3)
        client = cls(
            found.info.url,
            model2spec,
            api_key=_key(api_key, found.info.key),
            timeout=timeout,
            progress=progress,
            verbose=verbose,
            poll_interval=poll_interval,
        )
        client._published(found)
        return client

    def _open(self) -> None:
        """Create the HTTP client (sync or async)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(proxy_url={self.proxy_url!r}, models={list(self.model2spec)!r})"

    @property
    def models(self) -> list[str]:
        """The model names of ``model2spec``."""
        return list(self.model2spec)

    def spec_for(self, model: str, args: str | Sequence[str] | None = None) -> str:
        """The model spec :meth:`switch` would send (see :func:`build_spec`)."""
        return build_spec(model, args, self.model2spec)

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": "aic-vllm-proxy-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _http_options(self) -> dict[str, Any]:
        return {
            "base_url": self.proxy_url,
            "headers": self._headers(),
            "timeout": self._call_timeout(_status_call()),
        }

    def _request(self, call: _Call[Any]) -> dict[str, Any]:
        """The arguments of ``httpx`` ``request()`` for ``call``."""
        return {
            "method": call.method,
            "url": call.path,
            "json": call.json,
            "params": call.params,
            "headers": call.headers,
            "timeout": self._call_timeout(call),
        }

    def _answer(self, call: _Call[T], response: httpx.Response) -> T:
        """The parsed answer to ``call``, or its :class:`ProxyError`."""
        self._check(response)
        return call.parse(response)

    def _check(self, response: httpx.Response) -> None:
        """Raise the :class:`ProxyError` for an error answer."""
        if response.status_code >= 400:
            raise _response_error(response, has_key=bool(self.api_key), key_option=self.key_option)

    def _unreachable(self, exc: httpx.HTTPError) -> ProxyError:
        return _transport_error(exc, self.proxy_url, self.url_option)

    def _call_timeout(self, call: _Call[Any]) -> httpx.Timeout:
        read = self.timeout if call.read_timeout is None else max(call.read_timeout, self.timeout)
        return httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0), read=read)

    def _sink(self, progress: ProgressArg | None) -> Sink | None:
        """Where the progress of a call goes (its ``progress=``, else the client's)."""
        return make_sink(self.progress if progress is None else progress)

    def _every_line(self, verbose: bool | None) -> bool:
        return self.verbose if verbose is None else verbose

    def _watch(
        self,
        spec: str | None,
        before: Status,
        progress: ProgressArg | None,
        timeout: float | None,
        *,
        loads: str | None = None,
        verbose: bool | None = None,
    ) -> SwitchWatch:
        """A watch for a switch to ``spec`` (None: for whatever goes on); ``loads`` is the spec
        the proxy will really load when ``spec`` names a catalogue entry."""
        sink = self._sink(progress)
        every_line = self._every_line(verbose)
        if spec is None:
            return SwitchWatch(None, before, sink=sink, timeout=timeout, verbose=every_line)
        return SwitchWatch(loads or spec, before, sink=sink, timeout=timeout, label=spec, verbose=every_line)

    def _switch_plan(
        self,
        model: str,
        args: str | Sequence[str] | None,
        force: bool,
        timeout: float | None,
        progress: ProgressArg | None,
        verbose: bool | None,
    ) -> _Plan[SwitchResultDict]:
        spec = self.spec_for(model, args)
        live = yield _OpenEvents()
        before = (yield from _ask(_status_call())).as_model()
        loads = yield from _catalog_lookup(spec)
        watch = self._watch(spec, before, progress, timeout, loads=loads, verbose=verbose)
        watch.request_id = _new_request_id() if live else None
        watch.begin()
        try:
            accepted = (yield from _ask(_start_switch_call(spec, force, watch.request_id))).as_model()
        except ProxyError as exc:
            watch.show(f"FAILED: {exc.message}")  # e.g. a spec the proxy's policy refuses
            raise
        if accepted.accepted_model_spec:  # what the proxy launches (older proxies: the spec sent)
            watch.spec = accepted.accepted_model_spec
        return SwitchResultDict(watch.result((yield from self._follow_plan(watch, live))))

    def _wait_plan(
        self, timeout: float | None, progress: ProgressArg | None, verbose: bool | None
    ) -> _Plan[StatusDict]:
        live = yield _OpenEvents()
        before = (yield from _ask(_status_call())).as_model()
        watch = self._watch(None, before, progress, timeout, verbose=verbose)
        return StatusDict((yield from self._follow_plan(watch, live)).status)

    def _load_plan(
        self, name: str, timeout: float | None, progress: ProgressArg | None, verbose: bool | None
    ) -> _Plan[LoadResultDict]:
        live = yield _OpenEvents()
        before = (yield from _ask(_status_call())).as_model()
        watch = LoadWatch(
            name, before, sink=self._sink(progress), timeout=timeout, verbose=self._every_line(verbose)
        )
        watch.request_id = _new_request_id() if live else None
        watch.begin()
        try:
            watch.accepted((yield from _ask(_start_load_call(name, watch.request_id))).as_model())
        except ProxyError as exc:
            watch.show(f"FAILED: {exc.message}")  # unknown name, no room, refused, ...
            raise
        return LoadResultDict(watch.result((yield from self._follow_plan(watch, live))))

    def _follow_plan(self, watch: Watch, live: bool) -> _Plan[Outcome]:
        """Read ``/status`` until the switch, the load (or the wait) is over, following the new
        launch's log while progress is shown; raise the failure with the log's tail.

        ``live``: ``GET /events`` is open (since before ``watch.before`` was read), and
        ``/status`` is read again when an event says something changed (:func:`_await_change`);
        else (an older daemon, or the stream ended) every :attr:`poll_interval` seconds."""
        following = False
        try:
            while True:
                outcome = watch.observe((yield from _ask(_status_call())).as_model())
                if outcome is not None:
                    break
                if watch.timed_out():
                    raise self._timeout_error(watch)
                if not following and watch.sink is not None and watch.wants_log(watch.last):
                    following = True
                    yield _OpenLog(watch.log, model=watch.log_model)
                if live and not (watch.sink is not None and watch.launching(watch.last)):
                    live = yield from _await_change(watch)
                else:  # polling; or the log's name is due in a moment, with no event to tell
                    yield _Wait(self.poll_interval)
                watch.tick()
            if following and not outcome.ok:
                # A failed vLLM has exited: its stream ends once its last lines are sent.
                yield _Wait(FINAL_LINES_WAIT, to_end=True)
            elif following:  # ready: its last start-up lines may still be on their way
                yield _Wait(READY_LINES_WAIT, to_end=True, until=lambda: watch.ready_line_seen)
            if live:  # the events not seen yet: the hook reports among them are shown
                failed_start = watch.starting and not outcome.ok
                for event in (yield _Wait(FINAL_EVENTS_WAIT if failed_start else 0.0, events=True)) or ():
                    watch.event(event)
        except (KeyboardInterrupt, asyncio.CancelledError):
            watch.interrupted()
            raise
        if following:
            yield _CloseLog()
        tail: list[str] = []
        if not outcome.ok and outcome.has_log:
            with contextlib.suppress(ProxyError):
                tail = yield from _ask(_failure_tail_call(watch.log_model))
        return self._conclude(watch, outcome, tail)

    def _timeout_error(self, watch: Watch) -> WaitTimeout:
        return WaitTimeout(
            f"gave up waiting after {watch.elapsed:.0f} s; {watch.still_going()}", url=self.proxy_url
        )

    def _conclude(self, watch: Watch, outcome: Outcome, tail: list[str]) -> Outcome:
        """Show the summary; return a success, raise a failure (with ``tail``, the log's end)."""
        if not outcome.ok and watch.log_lines_seen == 0:
            for line in tail:  # the stream was never opened (a very quick failure): show the end
                watch.log(line)
        watch.summary(outcome)
        if outcome.ok:
            return outcome
        raise _switch_error(outcome, tail, self.proxy_url, switching=watch.starting)

    def _openai_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {
            "base_url": f"{self.proxy_url}/v1",
            "api_key": self.api_key or "EMPTY",
            "timeout": GENERATION_TIMEOUT,
        }
        options.update(kwargs)
        return options

    def get_openai_client(self, **kwargs: Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` client for the proxy's ``/v1`` (keyword arguments override ours:
        ``base_url``, ``api_key`` (the proxy's key, else ``"EMPTY"``), ``timeout`` (30 min))."""
        import openai

        return openai.OpenAI(**self._openai_options(kwargs))

    def get_async_openai_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` client for the proxy's ``/v1`` (see :meth:`get_openai_client`)."""
        import openai

        return openai.AsyncOpenAI(**self._openai_options(kwargs))
