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
    T,
    _Call,
    _catalog_call,
    _ClientBase,
    _CloseLog,
    _event_stream_request,
    _health_call,
    _instances_call,
    _log_stream_request,
    _logs_call,
    _model_name_call,
    _nodes_call,
    _OpenEvents,
    _OpenLog,
    _Plan,
    _plugins_call,
    _start_load_call,
    _start_switch_call,
    _status_call,
    _Steps,
    _stop_call,
    _unload_call,
    _Wait,
)
from aic_vllm_proxy.client.progress import ProgressArg
from aic_vllm_proxy.client.sse import EVENT_STREAM, EventParser
from aic_vllm_proxy.client.views import LoadResultDict, StatusDict, SwitchResultDict, UnloadResultDict
from aic_vllm_proxy.schemas import InstanceStatus, NodesStatus, PluginInfo, ProxyEvent

# -------------------------------------------------------------------- sync client


class _Reader:
    """Reads one streaming ``GET`` in a thread (the log stream, the event stream): each item it
    makes of the answer goes into ``inbox`` with the reader, then None at the end. So the lines
    are printed by the caller's thread (which is what Jupyter attaches output to)."""

    def __init__(
        self,
        open_client: Callable[[], httpx.Client],
        request: dict[str, Any],
        items: Callable[[httpx.Response], Iterator[object]],
        inbox: queue.Queue[tuple[_Reader, object]],
    ) -> None:
        self._open_client = open_client
        self._request = request
        self._items = items
        self._inbox = inbox
        self._response: httpx.Response | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aic-vllm-proxy-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with (
                self._open_client() as http,
                http.stream(**self._request) as response,
            ):
                self._response = response
                if response.status_code != 200 or self._stopped.is_set():
                    return
                for item in self._items(response):
                    self._inbox.put((self, item))
        except (httpx.HTTPError, OSError, ValueError):
            pass  # stopped from outside, or the proxy went away: /status tells the rest
        finally:
            self._inbox.put((self, None))

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


def _log_lines(response: httpx.Response) -> Iterator[object]:
    return response.iter_lines()


def _events(response: httpx.Response) -> Iterator[object]:
    """The events of a ``GET /events`` answer (nothing when it is not an event stream)."""
    if response.headers.get("content-type", "").split(";")[0].strip() != EVENT_STREAM:
        return
    parser = EventParser()
    for line in response.iter_lines():
        event = parser.feed(line)
        if event is not None:
            yield event


class _Streams:
    """The log stream and the event stream of one plan, each read by a :class:`_Reader`, and
    what arrives handled in the caller's thread: log lines shown, events kept for the plan."""

    def __init__(self, open_client: Callable[[], httpx.Client]) -> None:
        self._open_client = open_client
        self._inbox: queue.Queue[tuple[_Reader, object]] = queue.Queue()
        self._log: _Reader | None = None
        self._log_ended = False
        self._show: Callable[[str], None] = print
        self._events: _Reader | None = None
        self._received: list[ProxyEvent] = []

    def open_log(self, step: _OpenLog) -> None:
        self.close_log()
        self._show = step.show
        request = _log_stream_request(step.lines, 10.0, step.model)
        self._log = _Reader(self._open_client, request, _log_lines, self._inbox)

    def open_events(self, step: _OpenEvents) -> bool:
        """Follow ``GET /events``; True once its first message came (it is not kept)."""
        self._events = _Reader(self._open_client, _event_stream_request(10.0), _events, self._inbox)
        deadline = time.monotonic() + step.timeout
        while self._events is not None and not self._received:
            if not self._take(deadline - time.monotonic()):
                break
        if not self._received:
            self.close_events()
            return False
        self._received.clear()
        return True

    def wait(self, step: _Wait) -> list[ProxyEvent] | None:
        """Carry out a :class:`_Wait`; its answer."""
        deadline = time.monotonic() + step.seconds
        while not (step.events and (self._received or self._events is None)):
            if step.to_end and (self._log is None or self._log_ended or step.until()):
                break
            if not self._take(deadline - time.monotonic()):
                break
        if not step.events:
            return None
        while self._take(0.0):  # the rest of a burst: one answer for it
            pass
        if self._events is None and not self._received:
            return None
        received, self._received = self._received, []
        return received

    def _take(self, seconds: float) -> bool:
        """Handle what arrives within ``seconds`` (one item); False when nothing did."""
        try:
            who, item = self._inbox.get(timeout=seconds) if seconds > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return False
        if who is self._log:
            if item is None:
                self._log_ended = True
            else:
                self._show(str(item))
        elif who is self._events:
            if item is None:
                self.close_events()
            elif isinstance(item, ProxyEvent):
                self._received.append(item)
        return True  # (an item of a reader already stopped is dropped)

    def close_log(self) -> None:
        if self._log is not None:
            self._log.stop()
        self._log, self._log_ended = None, False

    def close_events(self) -> None:
        if self._events is not None:
            self._events.stop()
        self._events = None

    def close(self) -> None:
        self.close_log()
        self.close_events()


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
            response = self._http.request(**self._request(call))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        return self._answer(call, response)

    def _run(self, plan: _Plan[T]) -> T:
        """Carry out a plan's steps (see ``calls.py``); the streams are read by threads."""
        steps = _Steps(plan)
        streams = _Streams(lambda: httpx.Client(**self._http_options()))
        try:
            while (step := steps.next()) is not None:
                try:
                    if isinstance(step, _Call):
                        steps.done(self._send(step))
                    elif isinstance(step, _OpenEvents):
                        steps.done(streams.open_events(step))
                    elif isinstance(step, _OpenLog):
                        streams.open_log(step)
                    elif isinstance(step, _Wait):
                        steps.done(streams.wait(step))
                    elif isinstance(step, _CloseLog):
                        streams.close_log()
                except BaseException as exc:  # thrown into the plan, which handles it or not
                    steps.done(error=exc)
        finally:
            streams.close()
        return steps.result

    # ----------------------------------------------------------------- the API

    def status(self) -> StatusDict:
        """What the proxy runs: ``state`` (stopped/starting/ready/draining/stopping/failed), ``model``, ...
        as a read-only dict of the JSON ``GET /status`` answer with typed attributes."""
        return self._send(_status_call())

    def health(self) -> dict[str, Any]:
        """``GET /proxy/health``: the proxy process is up (says nothing about vLLM)."""
        return self._send(_health_call())

    def model_name(self) -> str | None:
        """The model name to use in requests, when a model is ready; else None."""
        return self._send(_model_name_call())

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
        return self._run(self._switch_plan(model, args, force, timeout, progress, verbose))

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
        return self._run(self._wait_plan(timeout, progress, verbose))

    def stop(self, model: str | None = None, *, force: bool = False) -> StatusDict:
        """Stop vLLM (the whole process tree of every instance, or of the one ``model`` names);
        a no-op when nothing runs.

        The proxy first lets in-flight requests finish (up to its ``--drain-timeout``); ``force``
        cuts them at once."""
        return self._send(_stop_call(force, model))

    # ----------------------------------------------------------------- the fleet

    def load(
        self,
        name: str,
        wait: bool = True,
        *,
        timeout: float | None = None,
        progress: ProgressArg | None = None,
        verbose: bool | None = None,
    ) -> LoadResultDict:
        """Load the catalogue model ``name`` (an entry, an alias or a name an instance serves)
        beside the others, on its own GPUs, and wait until it is ready, with the same live
        progress as :meth:`switch`. The proxy first unloads idle instances in its way (least
        recently used first); the others keep running.

        :param wait: False: return the proxy's answer at once (the load goes on; see
            :meth:`instances`).
        :param timeout: stop waiting after this many seconds (:class:`WaitTimeout`; the load
            goes on). Default: as long as the proxy allows (its ``--ready-timeout``).
        :returns: a :class:`LoadResultDict`; ``changed`` is False when it was already loaded
            (or loading), ``evicted`` the instances unloaded to make room, ``instance`` its
            :class:`InstanceStatus`.
        :raises UnknownModelError: the proxy knows no such model (the message lists those it does).
        :raises NoRoomError: no room on its GPUs, and nothing can be unloaded to make it (503).
        :raises SwitchError: vLLM failed to start (the message ends with its log tail), or a
            plugin refused the load (409).
        """
        if not wait:
            return self._send(_start_load_call(name))
        return self._run(self._load_plan(name, timeout, progress, verbose))

    def unload(self, name: str, *, force: bool = False) -> UnloadResultDict:
        """Unload the instance ``name``: let its in-flight requests finish (``force``: cut them),
        then stop its process tree. ``changed`` is False when it was not loaded."""
        return self._send(_unload_call(name, force))

    def instances(self) -> list[InstanceStatus]:
        """The fleet's instances (``GET /status``'s ``instances``): name, state, model, GPUs,
        requests in flight and waiting, last use, expiry, ..."""
        return self._send(_instances_call())

    def catalog(self) -> dict[str, Any]:
        """``GET /models/catalog``: the proxy's model policy and its catalogue of named models."""
        return self._send(_catalog_call())

    def logs(self, lines: int | None = None, *, model: str | None = None, rank: int | None = None) -> str:
        """The current vLLM log: the whole file, or its last ``lines`` lines (of the instance
        ``model`` names; default: the primary's). ``rank``: of a model across nodes, the
        daemon's copy of that rank's log (a :class:`ProxyError` 404 when there is no such rank;
        default: rank 0's, the daemon's own)."""
        return self._send(_logs_call(lines, model, rank))

    def follow_logs(
        self, lines: int = 50, *, model: str | None = None, rank: int | None = None
    ) -> Iterator[str]:
        """The last ``lines`` lines, then each new line as vLLM writes it, until vLLM exits
        (``model``, ``rank``: as for :meth:`logs`)."""
        try:
            with self._http.stream(**_log_stream_request(lines, self.timeout, model, rank)) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                yield from response.iter_lines()
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    def plugins(self) -> list[PluginInfo]:
        """The proxy's plugins (name, version, hooks, enabled)."""
        return self._send(_plugins_call())

    def nodes(self) -> NodesStatus:
        """``GET /nodes``: the agents that run the other ranks of models across nodes
        (``--nnodes``): each one's name, host, state (connected, disconnected, lost, left),
        GPUs, GPUs in use and ranks. Needs an admin key when the daemon has keys."""
        return self._send(_nodes_call())
