"""The synchronous client: no event loop, so it works inside Jupyter."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import httpx

from aic_vllm_proxy.client.calls import (
    FINAL_LINES_WAIT,
    FOLLOW_FROM_LINES,
    READY_LINES_WAIT,
    T,
    _Call,
    _catalog_call,
    _ClientBase,
    _failure_tail_call,
    _health_call,
    _logs_call,
    _plugins_call,
    _start_switch_call,
    _status_call,
    _stop_call,
    catalog_spec,
)
from aic_vllm_proxy.client.errors import ProxyError, ProxyUnreachable
from aic_vllm_proxy.client.views import StatusDict, SwitchResultDict
from aic_vllm_proxy.models import PluginInfo, ProcessState
from aic_vllm_proxy.progress import Outcome, ProgressArg, SwitchWatch

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

    def pump(
        self, show: Callable[[str], None], seconds: float, until: Callable[[], bool] = lambda: False
    ) -> bool:
        """Show the lines that arrive within ``seconds`` (or until ``until()`` is true after one);
        False once the stream has ended."""
        deadline = time.monotonic() + seconds
        while not until():
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
        return True

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
    :param verbose: default for :meth:`switch`: show every line of the vLLM log, not only those
        that tell progress (weights, memory, compile, graph capture, ready), warnings and errors.

    :meth:`status` and :meth:`switch` return read-only dicts of the JSON answer whose attributes
    are typed (:class:`StatusDict`, :class:`SwitchResultDict`): ``st["state"]``, ``st.state``,
    ``json.dumps(st)`` and ``print(st)`` all work.
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
            raise self._unreachable(exc) from None
        self._check(response)
        return call.parse(response)

    # ----------------------------------------------------------------- the API

    def status(self) -> StatusDict:
        """What the proxy runs: ``state`` (stopped/starting/ready/stopping/failed), ``model``, ...
        as a read-only dict of the JSON ``GET /status`` answer with typed attributes."""
        return self._send(_status_call())

    def health(self) -> dict[str, Any]:
        """``GET /proxy/health``: the proxy process is up (says nothing about vLLM)."""
        return self._send(_health_call())

    def model_name(self) -> str | None:
        """The model name to use in requests, when a model is ready; else None."""
        status = self.status().as_model()
        return status.model if status.state is ProcessState.READY else None

    def switch(
        self,
        model: str,
        args: str | Sequence[str] | None = None,
        *,
        force: bool = False,
        timeout: float | None = None,
        progress: ProgressArg | None = None,
        verbose: bool | None = None,
    ) -> SwitchResultDict:
        """Load ``model`` (stopping the current one) and wait until it is ready.

        :param args: its ``vllm serve`` arguments; default: ``model2spec[model]``.
        :param force: restart even if the same spec is loaded.
        :param timeout: stop waiting after this many seconds (:class:`WaitTimeout`; the switch
            goes on). Default: as long as the proxy allows (its ``--ready-timeout``).
        :param progress: override the client's ``progress`` for this call.
        :param verbose: override the client's ``verbose``: True shows every line of the vLLM
            log, False only progress, warnings and errors.
        :returns: a :class:`SwitchResultDict`; ``changed`` is False when the same spec was already
            loaded (nothing restarted), ``load_seconds`` is how long loading took.
        :raises SwitchError: vLLM failed to start (the message ends with its log tail).
        """
        spec = self.spec_for(model, args)
        before = self.status().as_model()
        loads = self._catalog_lookup(spec)
        watch = self._watch(spec, before, progress, timeout, loads=loads, verbose=verbose)
        watch.begin()
        try:
            self._send(_start_switch_call(spec, force))
        except ProxyError as exc:
            watch.show(f"FAILED: {exc.message}")  # e.g. a spec the proxy's policy refuses
            raise
        return SwitchResultDict(watch.result(self._follow(watch)))

    def start_switch(
        self, model: str, args: str | Sequence[str] | None = None, *, force: bool = False
    ) -> StatusDict:
        """Start a switch and return at once (follow it with :meth:`wait_until_ready`)."""
        return self._send(_start_switch_call(self.spec_for(model, args), force))

    def wait_until_ready(
        self,
        timeout: float | None = 600.0,
        *,
        progress: ProgressArg | None = False,
        verbose: bool | None = None,
    ) -> StatusDict:
        """Wait until the proxy has a model ready and no switch in progress; return the status.

        :raises SwitchError: the model failed. :raises ProxyError: nothing is loaded.
        :raises WaitTimeout: still not ready after ``timeout`` seconds (None: no limit).
        """
        watch = self._watch(None, self.status().as_model(), progress, timeout, verbose=verbose)
        return StatusDict(self._follow(watch).status)

    def stop(self, *, force: bool = False) -> StatusDict:
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
                    self._check(response)
                yield from response.iter_lines()
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    def plugins(self) -> list[PluginInfo]:
        """The proxy's plugins (name, version, hooks, enabled)."""
        return self._send(_plugins_call())

    # --------------------------------------------------------- following a switch

    def _follow(self, watch: SwitchWatch) -> Outcome:
        reader: _LogThread | None = None
        try:
            while True:
                outcome = watch.observe(self.status().as_model())
                if outcome is not None:
                    break
                if watch.timed_out():
                    raise self._timeout_error(watch)
                if reader is None and watch.sink is not None and watch.wants_log(watch.last):
                    reader = _LogThread(lambda: httpx.Client(**self._http_options()), FOLLOW_FROM_LINES)
                if reader is None or not reader.pump(watch.log, self.poll_interval):
                    time.sleep(self.poll_interval)  # no stream (any more): just poll
                watch.tick()
            if reader is not None and not outcome.ok:
                # A failed vLLM has exited: its stream ends once its last lines are sent.
                reader.pump(watch.log, FINAL_LINES_WAIT)
            elif reader is not None:  # ready: its last start-up lines may still be on their way
                reader.pump(watch.log, READY_LINES_WAIT, until=lambda: watch.ready_line_seen)
        except KeyboardInterrupt:
            watch.interrupted()
            raise
        finally:
            if reader is not None:
                reader.stop()
        tail: list[str] = []
        if not outcome.ok and outcome.has_log:
            with contextlib.suppress(ProxyError):
                tail = self._send(_failure_tail_call())
        return self._conclude(watch, outcome, tail)
