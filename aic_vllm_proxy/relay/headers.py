"""The header policy of both HTTP paths, written once: what of a client's request head goes to
vLLM, and what of vLLM's response head goes to the client.

- Request: hop-by-hop headers (and those named in ``Connection``), ``Host`` (vLLM's is set) and
  ``Content-Length`` (set for the body sent) are never copied; the proxy's own
  ``Authorization`` is dropped when proxy keys are on or vLLM has a key of its own (which is
  then supplied). Both paths send the head :func:`request_head` builds from the
  ``request.RelayRequest`` each adapter makes of its input (the header lines as sent).
- Response: vLLM's header lines pass byte for byte, except hop-by-hop ones (and those named in
  its ``Connection``) and ``Content-Length``/``Transfer-Encoding``, which each path sets for
  the framing it writes (:func:`response_lines`).
- ``X-Request-Id``: the request's id (``request.request_id``) replaces the client's on the way to
  vLLM and vLLM's on the way back, after the other header lines.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

from aic_vllm_proxy.relay.request import REQUEST_ID, RelayRequest
from aic_vllm_proxy.relay.upstream import ResponseHead

#: Headers that describe one connection, not the message: never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",
    }
)
#: Request headers never copied as they are (Content-Length is set for the body sent upstream).
NOT_COPIED = frozenset(name.encode() for name in HOP_BY_HOP) | {b"content-length", b"x-request-id"}
_NOT_COPIED_OR_AUTH = NOT_COPIED | {b"authorization"}
#: Response headers never copied as they are (each path sets the framing it writes, and the
#: request's id).
_NOT_RELAYED = HOP_BY_HOP | {"content-length", "x-request-id"}


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in (every) ``Connection`` header: hop-by-hop too."""
    return {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    }


def filtered(headers: CIMultiDict[str], extra_drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """``headers`` without hop-by-hop ones (and those named in their ``Connection``)."""
    drop = HOP_BY_HOP | connection_tokens(headers) | set(extra_drop)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def drops_authorization(strip_authorization: bool, supplied: dict[str, str]) -> bool:
    """Whether the client's ``Authorization`` stays here: it is the proxy's own key (keys on),
    or vLLM's own key replaces it."""
    return strip_authorization or bool(supplied)


def request_head(
    request: RelayRequest, host_header: str, supplied: dict[str, str], *, drop_authorization: bool
) -> bytes:
    """vLLM's request head for ``request``, on both paths: the client's header lines as it sent
    them, except hop-by-hop ones (and those its ``Connection`` names), ``Host`` and
    ``Content-Length``, and ``Authorization`` when it stays here (``drop_authorization``);
    then the request's id, vLLM's own ``supplied`` headers and the body's framing
    (:func:`upstream_head`)."""
    drop = _NOT_COPIED_OR_AUTH if drop_authorization else NOT_COPIED
    if request.connection:
        drop = drop | frozenset(request.connection)
    lines = [line for line, name in zip(request.lines, request.names, strict=True) if name not in drop]
    if request.request_id:
        lines.append(b"X-Request-Id: %s\r\n" % request.request_id.encode())
    return upstream_head(
        request.method,
        request.target,
        host_header,
        lines,
        supplied,
        length=request.length,
        chunked=request.chunked,
    )


def upstream_head(
    method: bytes,
    target: bytes,
    host_header: str,
    lines: Iterable[bytes],
    supplied: dict[str, str],
    *,
    length: int | None,
    chunked: bool = False,
) -> bytes:
    """A request head for vLLM: the request line, ``Host``, the client's header ``lines`` (each
    with its CRLF, hop-by-hop ones already left out), vLLM's own ``supplied`` headers, and the
    body's framing."""
    parts = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, host_header.encode()), *lines]
    if supplied:
        parts += [f"{name}: {value}\r\n".encode() for name, value in supplied.items()]
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif length is not None:
        parts.append(b"Content-Length: %d\r\n" % length)
    parts.append(b"\r\n")
    return b"".join(parts)


def response_lines(answer: ResponseHead, request_id: str = "") -> list[str]:
    """vLLM's header lines that go to the client (as received, without CRLF), then the request's
    id (if any)."""
    drop = _NOT_RELAYED
    if "Connection" in answer.headers:
        drop = drop | connection_tokens(answer.headers)
    lines = [line for line in answer.lines if line and line.partition(":")[0].lower() not in drop]
    if request_id:
        lines.append(f"{REQUEST_ID}: {request_id}")
    return lines


def response_head(answer: ResponseHead, *, close: bool, chunked: bool, request_id: str = "") -> bytes:
    """The client's response head, as bytes (the front door writes it itself): vLLM's status and
    :func:`response_lines`, ``Connection: close`` when the connection ends after it, and the
    framing of the body as the client gets it."""
    parts = [f"HTTP/1.1 {answer.status} {answer.reason}\r\n"]
    parts += [line + "\r\n" for line in response_lines(answer, request_id)]
    if close:
        parts.append("Connection: close\r\n")
    if chunked:
        parts.append("Transfer-Encoding: chunked\r\n")
    elif answer.length is not None:
        parts.append(f"Content-Length: {answer.length}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


def response_headers(answer: ResponseHead, request_id: str = "") -> CIMultiDict[str]:
    """:func:`response_lines` as headers for an aiohttp response (the same fields)."""
    headers: CIMultiDict[str] = CIMultiDict()
    for line in response_lines(answer, request_id):
        name, _, value = line.partition(":")
        headers.add(name, value.strip())
    return headers
