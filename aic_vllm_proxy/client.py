"""Python client of aic-vllm-proxy, for notebooks and scripts (needs the ``client`` extra).

.. code-block:: python

    from aic_vllm_proxy.client import VLLMProxyClient

    proxy = VLLMProxyClient(proxy_url="http://gpu-node:8224", model2spec={
        "meta-llama/Llama-2-7b-hf": "--tensor-parallel-size 1 --gpu-memory-utilization 0.9",
    })
    proxy.switch("meta-llama/Llama-2-7b-hf")     # live progress, then a one-line summary
    client = proxy.get_openai_client()            # the official openai client, at the proxy's /v1

:class:`VLLMProxyClient` is synchronous and never touches an event loop, so it works inside
Jupyter (where one is already running). :class:`AsyncVLLMProxyClient` has the same methods for
``await``. Both share the request building, error handling and switch-following logic below and
in :mod:`aic_vllm_proxy.progress`; only the few lines that do I/O differ.

A switch never waits on one long HTTP request: it asks the proxy to start the switch
(``POST /switch`` with ``"wait": false``), then polls ``GET /status`` and follows the new vLLM
log (``GET /logs/stream``) until the model is ready or has failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import shlex
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from aic_vllm_proxy.models import (
    ErrorBody,
    ErrorDetail,
    PluginInfo,
    PluginList,
    ProcessState,
    Status,
    SwitchResult,
)
from aic_vllm_proxy.progress import Outcome, ProgressArg, SwitchWatch, make_sink

if TYPE_CHECKING:
    import openai

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_URL",
    "URL_ENV",
    "AsyncVLLMProxyClient",
    "AuthenticationError",
    "PermissionDeniedError",
    "ProxyError",
    "ProxyUnreachable",
    "Status",
    "SwitchError",
    "SwitchResult",
    "UnknownModelError",
    "VLLMProxyClient",
    "WaitTimeout",
    "build_spec",
    "catalog_spec",
]

DEFAULT_URL = "http://127.0.0.1:8224"
URL_ENV = "AIC_VLLM_PROXY_URL"
API_KEY_ENV = "AIC_VLLM_PROXY_KEY"
#: Timeout of one call to the proxy's own API (a switch is many short calls, never one long one).
API_TIMEOUT = 30.0
#: The openai clients' default: a generation may wait for a switch in progress, then run long.
GENERATION_TIMEOUT = httpx.Timeout(1800.0, connect=10.0)
#: Read timeout of ``POST /stop``: the proxy first lets in-flight requests finish (its --drain-timeout).
STOP_TIMEOUT = 900.0
#: Seconds between two ``GET /status`` while a switch goes on.
POLL_INTERVAL = 0.3
#: How much of the new launch's log the progress display starts with (all of it, in practice).
FOLLOW_FROM_LINES = 2000
#: Log lines attached to a :class:`SwitchError`.
TAIL_LINES = 40
#: After a failed start, how long to wait for the last log lines to arrive.
FINAL_LINES_WAIT = 3.0

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
ModelSpecs = Mapping[str, str | Sequence[str]]


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
    """A model that is not in ``model2spec`` was asked for without explicit arguments."""


class WaitTimeout(ProxyError, TimeoutError):
    """The client stopped waiting; what it waited for goes on in the proxy."""


class SwitchError(ProxyError):
    """A switch failed: vLLM did not start, died, timed out, or the switch was refused.

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


def _normalize_url(url: str | None) -> str:
    url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def _error_detail(response: httpx.Response) -> ErrorDetail | None:
    try:
        return ErrorBody.model_validate_json(response.content).error
    except ValidationError:
        return None


def _response_error(response: httpx.Response, *, has_key: bool) -> ProxyError:
    """The exception for an error answer of the proxy's own API."""
    url = str(response.request.url)
    status = response.status_code
    detail = _error_detail(response)
    fallback = response.text.strip()[:300] or response.reason_phrase
    text = detail.message if detail is not None else fallback
    where = f"{response.request.method} {url}"
    kind = detail.type if detail else None
    if status == 401:
        hint = (
            f"The API key that was sent was refused: check api_key= or ${API_KEY_ENV}"
            if has_key
            else f"No API key was sent: pass api_key=... or set ${API_KEY_ENV}"
        )
        return AuthenticationError(
            f"{where} was refused (401): {text.rstrip('.')}. {hint}.",
            url=url,
            status_code=status,
            error_type=kind,
        )
    if status == 403:
        return PermissionDeniedError(f"{text} [403 from {where}]", url=url, status_code=403, error_type=kind)
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


def _transport_error(exc: httpx.HTTPError, base_url: str) -> ProxyError:
    """The exception for a request that got no answer."""
    try:
        what = f"{exc.request.method} {exc.request.url.path}"
    except (AttributeError, RuntimeError):  # no request attached
        what = "the request"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return ProxyUnreachable(
            f"cannot reach aic-vllm-proxy at {base_url} ({exc or type(exc).__name__}). Is the daemon "
            f"running there (aic-vllm-proxy serve), and is the URL right (proxy_url= or {URL_ENV})?",
            url=base_url,
        )
    if isinstance(exc, httpx.TimeoutException):
        return ProxyUnreachable(
            f"aic-vllm-proxy at {base_url} did not answer {what} in time ({type(exc).__name__})",
            url=base_url,
        )
    return ProxyError(f"talking to aic-vllm-proxy at {base_url} failed during {what}: {exc!r}", url=base_url)


def _raise_for_status(response: httpx.Response, has_key: bool) -> None:
    if response.status_code >= 400:
        raise _response_error(response, has_key=has_key)


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


def _status_call() -> _Call[Status]:
    return _Call("GET", "/status", _json_as(Status))


def _start_switch_call(spec: str, force: bool) -> _Call[Status]:
    return _Call(
        "POST", "/switch", _json_as(Status), json={"model_spec": spec, "wait": False, "force": force}
    )


def _stop_call(force: bool) -> _Call[Status]:
    return _Call("POST", "/stop", _json_as(Status), json={"force": force}, read_timeout=STOP_TIMEOUT)


def _logs_call(lines: int | None) -> _Call[str]:
    if lines is None:
        return _Call("GET", "/logs/current", _text)
    return _Call("GET", "/logs/tail", _text, params={"lines": lines})


def _plugins_call() -> _Call[list[PluginInfo]]:
    parse = _json_as(PluginList)
    return _Call("GET", "/plugins", lambda response: parse(response).plugins)


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


def catalog_spec(name: str, catalog: Mapping[str, Any]) -> str | None:
    """The spec the proxy loads for the one-word ``name`` of a catalogue entry (or alias), as
    listed by ``GET /models/catalog``; None when it is not one."""
    entries = catalog.get("models")
    if not isinstance(entries, dict) or len(name.split()) != 1:
        return None
    for key, entry in entries.items():
        if isinstance(entry, dict) and (name == key or name in (entry.get("aliases") or ())):
            return f"{shlex.quote(str(entry.get('model')))} {entry.get('args') or ''}".strip()
    return None


def _switch_error(outcome: Outcome, tail: list[str], base_url: str, *, switching: bool) -> ProxyError:
    """A :class:`SwitchError` for a switch that did not end ready (or a wait that ended failed);
    a plain :class:`ProxyError` when a wait found nothing loaded."""
    status = outcome.status
    if not switching and status.state is not ProcessState.FAILED:
        return ProxyError(outcome.message, url=base_url)
    return SwitchError(
        outcome.message,
        exit_code=status.exit_code,
        log_tail=tail,
        state=status.state.value,
        url=base_url,
    )


class _ClientBase:
    """What the sync and async clients share: settings, specs, headers, openai clients."""

    def __init__(
        self,
        proxy_url: str | None = None,
        model2spec: ModelSpecs | None = None,
        *,
        api_key: str | None = None,
        timeout: float = API_TIMEOUT,
        progress: ProgressArg = True,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.proxy_url = _normalize_url(proxy_url)
        self.model2spec: dict[str, str | Sequence[str]] = dict(model2spec or {})
        self.api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        self.timeout = timeout
        self.progress = progress
        self.poll_interval = poll_interval
        self._open()

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

    def _call_timeout(self, call: _Call[Any]) -> httpx.Timeout:
        read = self.timeout if call.read_timeout is None else max(call.read_timeout, self.timeout)
        return httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0), read=read)

    def _watch(
        self,
        spec: str | None,
        before: Status,
        progress: ProgressArg | None,
        timeout: float | None,
        *,
        loads: str | None = None,
    ) -> SwitchWatch:
        """A watch for a switch to ``spec`` (None: for whatever goes on); ``loads`` is the spec
        the proxy will really load when ``spec`` names a catalogue entry."""
        chosen = self.progress if progress is None else progress
        sink = make_sink(chosen)
        if spec is None:
            return SwitchWatch(None, before, sink=sink, timeout=timeout)
        return SwitchWatch(loads or spec, before, sink=sink, timeout=timeout, label=spec)

    def _timeout_error(self, watch: SwitchWatch) -> WaitTimeout:
        status = watch.last
        doing = f"switching to {status.target_model_spec}" if status.switching else f"{status.state.value}"
        return WaitTimeout(
            f"gave up waiting after {watch.elapsed:.0f} s; the proxy is still {doing}. It goes on: "
            "wait with wait_until_ready() (or watch `aic-vllm-proxy status`), or give up with stop().",
            url=self.proxy_url,
        )

    def _conclude(self, watch: SwitchWatch, outcome: Outcome, tail: list[str]) -> Outcome:
        """Show the summary; return a success, raise a failure (with ``tail``, the log's end)."""
        if not outcome.ok and watch.log_lines_shown == 0:
            for line in tail:  # the stream was never opened (a very quick failure): show the end
                watch.log(line)
        watch.summary(outcome)
        if outcome.ok:
            return outcome
        raise _switch_error(outcome, tail, self.proxy_url, switching=watch.spec is not None)

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


# -------------------------------------------------------------------- sync client


class _LogThread:
    """Follows ``GET /logs/stream`` in a thread and hands the lines over through a queue, so
    they are printed by the caller's thread (which is what Jupyter attaches output to)."""

    def __init__(self, open_client: Callable[[], httpx.Client], lines: int) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._open_client = open_client
        self._params = {"lines": lines}
        self._response: httpx.Response | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aic-vllm-proxy-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with (
                self._open_client() as http,
                http.stream(
                    "GET", "/logs/stream", params=self._params, timeout=httpx.Timeout(10.0, read=None)
                ) as response,
            ):
                self._response = response
                if response.status_code != 200 or self._stopped.is_set():
                    return
                for line in response.iter_lines():
                    self.lines.put(line)
        except (httpx.HTTPError, OSError, ValueError):
            pass  # stopped from outside, or the proxy went away: /status tells the rest
        finally:
            self.lines.put(None)

    def pump(self, show: Callable[[str], None], seconds: float) -> bool:
        """Show the lines that arrive within ``seconds``; False once the stream has ended."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = (
                    self.lines.get(timeout=max(remaining, 0.0)) if remaining > 0 else self.lines.get_nowait()
                )
            except queue.Empty:
                return True
            if line is None:
                self.lines.put(None)  # keep the end mark for later calls
                return False
            show(line)

    def stop(self) -> None:
        """End the stream now: shut its socket down, which wakes the blocked read."""
        self._stopped.set()
        response = self._response
        stream = response.extensions.get("network_stream") if response is not None else None
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=2.0)  # a daemon thread: if it lingers, it does no harm


class VLLMProxyClient(_ClientBase):
    """Synchronous client of one aic-vllm-proxy. Safe to use where an event loop runs (Jupyter).

    :param proxy_url: the proxy, e.g. ``"http://gpu-node:8224"`` (default: ``$AIC_VLLM_PROXY_URL``,
        else ``http://127.0.0.1:8224``).
    :param model2spec: model name -> its ``vllm serve`` arguments (a string or a list of words).
    :param api_key: sent as ``Authorization: Bearer`` to the proxy and given to the openai
        clients (default: ``$AIC_VLLM_PROXY_KEY``).
    :param timeout: seconds for one call of the proxy's API (a switch is many short calls).
    :param progress: default for :meth:`switch`: True prints live progress, False is silent; a
        stream (``sys.stderr``) or a callable (one line per call) receives the lines instead.
    """

    _http: httpx.Client

    def _open(self) -> None:
        self._http = httpx.Client(**self._http_options())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VLLMProxyClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: _Call[T]) -> T:
        try:
            response = self._http.request(
                call.method, call.path, json=call.json, params=call.params, timeout=self._call_timeout(call)
            )
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.proxy_url) from None
        _raise_for_status(response, bool(self.api_key))
        return call.parse(response)

    # ----------------------------------------------------------------- the API

    def status(self) -> Status:
        """What the proxy runs: ``state`` (stopped/starting/ready/stopping/failed), ``model``, ..."""
        return self._send(_status_call())

    def health(self) -> dict[str, Any]:
        """``GET /proxy/health``: the proxy process is up (says nothing about vLLM)."""
        return self._send(_health_call())

    def model_name(self) -> str | None:
        """The model name to use in requests, when a model is ready; else None."""
        status = self.status()
        return status.model if status.state is ProcessState.READY else None

    def switch(
        self,
        model: str,
        args: str | Sequence[str] | None = None,
        *,
        force: bool = False,
        timeout: float | None = None,
        progress: ProgressArg | None = None,
    ) -> SwitchResult:
        """Load ``model`` (stopping the current one) and wait until it is ready.

        :param args: its ``vllm serve`` arguments; default: ``model2spec[model]``.
        :param force: restart even if the same spec is loaded.
        :param timeout: stop waiting after this many seconds (:class:`WaitTimeout`; the switch
            goes on). Default: as long as the proxy allows (its ``--ready-timeout``).
        :param progress: override the client's ``progress`` for this call.
        :returns: the :class:`SwitchResult`; ``changed`` is False when the same spec was already
            loaded (nothing restarted), ``load_seconds`` is how long loading took.
        :raises SwitchError: vLLM failed to start (the message ends with its log tail).
        """
        spec = self.spec_for(model, args)
        before = self.status()
        watch = self._watch(spec, before, progress, timeout, loads=self._catalog_lookup(spec))
        watch.begin()
        try:
            self._send(_start_switch_call(spec, force))
        except ProxyError as exc:
            watch.show(f"FAILED: {exc.message}")  # e.g. a spec the proxy's policy refuses
            raise
        return watch.result(self._follow(watch))

    def start_switch(
        self, model: str, args: str | Sequence[str] | None = None, *, force: bool = False
    ) -> Status:
        """Start a switch and return at once (follow it with :meth:`wait_until_ready`)."""
        return self._send(_start_switch_call(self.spec_for(model, args), force))

    def wait_until_ready(
        self, timeout: float | None = 600.0, *, progress: ProgressArg | None = False
    ) -> Status:
        """Wait until the proxy has a model ready and no switch in progress; return the status.

        :raises SwitchError: the model failed. :raises ProxyError: nothing is loaded.
        :raises WaitTimeout: still not ready after ``timeout`` seconds (None: no limit).
        """
        watch = self._watch(None, self.status(), progress, timeout)
        return self._follow(watch).status

    def stop(self, *, force: bool = False) -> Status:
        """Stop vLLM (the whole process tree); a no-op when nothing runs.

        The proxy first lets in-flight requests finish (up to its ``--drain-timeout``); ``force``
        cuts them at once."""
        return self._send(_stop_call(force))

    def catalog(self) -> dict[str, Any]:
        """``GET /models/catalog``: the proxy's model policy and its catalogue of named models."""
        return self._send(_catalog_call())

    def _catalog_lookup(self, spec: str) -> str | None:
        if len(spec.split()) != 1:
            return None
        try:
            return catalog_spec(spec, self.catalog())
        except ProxyUnreachable:
            raise
        except ProxyError:  # no catalogue (an older proxy) or not allowed to see it
            return None

    def logs(self, lines: int | None = None) -> str:
        """The current vLLM log: the whole file, or its last ``lines`` lines."""
        return self._send(_logs_call(lines))

    def follow_logs(self, lines: int = 50) -> Iterator[str]:
        """The last ``lines`` lines, then each new line as vLLM writes it, until vLLM exits."""
        try:
            with self._http.stream(
                "GET", "/logs/stream", params={"lines": lines}, timeout=httpx.Timeout(self.timeout, read=None)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_status(response, bool(self.api_key))
                yield from response.iter_lines()
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.proxy_url) from None

    def plugins(self) -> list[PluginInfo]:
        """The proxy's plugins (name, version, hooks, enabled)."""
        return self._send(_plugins_call())

    # --------------------------------------------------------- following a switch

    def _follow(self, watch: SwitchWatch) -> Outcome:
        reader: _LogThread | None = None
        try:
            while True:
                outcome = watch.observe(self.status())
                if outcome is not None:
                    break
                if watch.timed_out():
                    raise self._timeout_error(watch)
                if reader is None and watch.sink is not None and watch.wants_log(watch.last):
                    reader = _LogThread(lambda: httpx.Client(**self._http_options()), FOLLOW_FROM_LINES)
                if reader is None or not reader.pump(watch.log, self.poll_interval):
                    time.sleep(self.poll_interval)  # no stream (any more): just poll
                watch.tick()
            if reader is not None:
                # A failed vLLM has exited: its stream ends once its last lines are sent.
                reader.pump(watch.log, FINAL_LINES_WAIT if not outcome.ok else 0.0)
        except KeyboardInterrupt:
            watch.interrupted()
            raise
        finally:
            if reader is not None:
                reader.stop()
        tail: list[str] = []
        if not outcome.ok and outcome.has_log:
            with contextlib.suppress(ProxyError):
                tail = self.logs(TAIL_LINES).splitlines()
        return self._conclude(watch, outcome, tail)


# ------------------------------------------------------------------- async client


class AsyncVLLMProxyClient(_ClientBase):
    """The same client for ``await``: every method of :class:`VLLMProxyClient` is a coroutine
    here (``follow_logs`` is an async iterator); ``get_*openai_client`` are the same."""

    _http: httpx.AsyncClient

    def _open(self) -> None:
        self._http = httpx.AsyncClient(**self._http_options())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncVLLMProxyClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send(self, call: _Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method, call.path, json=call.json, params=call.params, timeout=self._call_timeout(call)
            )
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.proxy_url) from None
        _raise_for_status(response, bool(self.api_key))
        return call.parse(response)

    async def status(self) -> Status:
        """See :meth:`VLLMProxyClient.status`."""
        return await self._send(_status_call())

    async def health(self) -> dict[str, Any]:
        return await self._send(_health_call())

    async def model_name(self) -> str | None:
        status = await self.status()
        return status.model if status.state is ProcessState.READY else None

    async def switch(
        self,
        model: str,
        args: str | Sequence[str] | None = None,
        *,
        force: bool = False,
        timeout: float | None = None,
        progress: ProgressArg | None = None,
    ) -> SwitchResult:
        """See :meth:`VLLMProxyClient.switch`."""
        spec = self.spec_for(model, args)
        before = await self.status()
        watch = self._watch(spec, before, progress, timeout, loads=await self._catalog_lookup(spec))
        watch.begin()
        try:
            await self._send(_start_switch_call(spec, force))
        except ProxyError as exc:
            watch.show(f"FAILED: {exc.message}")
            raise
        return watch.result(await self._follow(watch))

    async def start_switch(
        self, model: str, args: str | Sequence[str] | None = None, *, force: bool = False
    ) -> Status:
        return await self._send(_start_switch_call(self.spec_for(model, args), force))

    async def wait_until_ready(
        self, timeout: float | None = 600.0, *, progress: ProgressArg | None = False
    ) -> Status:
        watch = self._watch(None, await self.status(), progress, timeout)
        return (await self._follow(watch)).status

    async def stop(self, *, force: bool = False) -> Status:
        return await self._send(_stop_call(force))

    async def catalog(self) -> dict[str, Any]:
        return await self._send(_catalog_call())

    async def _catalog_lookup(self, spec: str) -> str | None:
        if len(spec.split()) != 1:
            return None
        try:
            return catalog_spec(spec, await self.catalog())
        except ProxyUnreachable:
            raise
        except ProxyError:
            return None

    async def logs(self, lines: int | None = None) -> str:
        return await self._send(_logs_call(lines))

    async def follow_logs(self, lines: int = 50) -> AsyncIterator[str]:
        """See :meth:`VLLMProxyClient.follow_logs`."""
        try:
            async with self._http.stream(
                "GET", "/logs/stream", params={"lines": lines}, timeout=httpx.Timeout(self.timeout, read=None)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_status(response, bool(self.api_key))
                async for line in response.aiter_lines():
                    yield line
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.proxy_url) from None

    async def plugins(self) -> list[PluginInfo]:
        return await self._send(_plugins_call())

    async def _pipe_log(self, watch: SwitchWatch) -> None:
        with contextlib.suppress(ProxyError):
            async for line in self.follow_logs(FOLLOW_FROM_LINES):
                watch.log(line)

    async def _follow(self, watch: SwitchWatch) -> Outcome:
        reader: asyncio.Task[None] | None = None
        try:
            while True:
                outcome = watch.observe(await self.status())
                if outcome is not None:
                    break
                if watch.timed_out():
                    raise self._timeout_error(watch)
                if reader is None and watch.sink is not None and watch.wants_log(watch.last):
                    reader = asyncio.create_task(self._pipe_log(watch))
                await asyncio.sleep(self.poll_interval)
                watch.tick()
            if reader is not None and not outcome.ok:
                await asyncio.wait({reader}, timeout=FINAL_LINES_WAIT)
        except (KeyboardInterrupt, asyncio.CancelledError):
            watch.interrupted()
            raise
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        tail: list[str] = []
        if not outcome.ok and outcome.has_log:
            with contextlib.suppress(ProxyError):
                tail = (await self.logs(TAIL_LINES)).splitlines()
        return self._conclude(watch, outcome, tail)
