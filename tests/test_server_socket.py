"""The daemon owns its listening socket (``server.Listener``, asyncio's ``create_server``) and
uses no private attribute of aiohttp's (issue 12): an upgrade of aiohttp within the bound in
pyproject.toml cannot break it by renaming one.

- ``test_no_aiohttp_private_attribute_is_used``: a scan of the package's syntax trees for an
  attribute of aiohttp's own spelled with a leading underscore (``runner._reg_site``,
  ``site._host``, ...), on any object, or on ``self`` in a subclass of an aiohttp class.
- ``test_listens_on_port_0_and_serves_health``: a real socket on the port the kernel gave, with
  the front door and without it (``--access-log``).
"""

from __future__ import annotations

import ast
import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp.abc import AbstractStreamWriter
from helpers import SIM, free_port

import aic_vllm_proxy

PACKAGE = Path(aic_vllm_proxy.__file__).parent


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_names(tree: ast.AST) -> Iterator[str]:
    """Private names a module defines or reaches for: attributes, methods, slots."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            yield node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name):
            yield node.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _private(node.value):
            yield node.value  # __slots__ entries


def aiohttp_private_names() -> set[str]:
    root = Path(aiohttp.__file__).parent
    names: set[str] = set()
    for path in root.glob("*.py"):
        names.update(_private_names(ast.parse(path.read_text(encoding="utf-8"))))
    return names


def _aiohttp_aliases(tree: ast.Module) -> set[str]:
    """Names a module binds to aiohttp or to something imported from it."""
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(
                (a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("aiohttp")
            )
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
            aliases.update(a.asname or a.name for a in node.names)
    return aliases


def _root(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def aiohttp_private_uses(source: str, private: set[str]) -> list[str]:
    """``line: expression`` for each use in ``source`` of an aiohttp private name: on an object
    other than ``self``/``cls``, or on ``self`` in a class with an aiohttp base."""
    tree = ast.parse(source)
    aliases = _aiohttp_aliases(tree)
    found: list[str] = []

    def visit(node: ast.AST, in_aiohttp_subclass: bool) -> None:
        if isinstance(node, ast.ClassDef):
            in_aiohttp_subclass = any(_root(base) in aliases for base in node.bases)
        if isinstance(node, ast.Attribute) and node.attr in private:
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if in_aiohttp_subclass or not on_self:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, in_aiohttp_subclass)

    visit(tree, False)
    return found


#: The FrontSite this replaced (as it was), to show that the scan sees what it must.
_OLD_SITE = """
from aiohttp import web

class FrontSite(web.TCPSite):
    async def start(self) -> None:
        runner = self._runner
        runner._reg_site(self)
        self._server = await loop.create_server(protocol, self._host, self._port, backlog=self._backlog)
"""


def test_the_scan_sees_aiohttp_private_attributes() -> None:
    uses = aiohttp_private_uses(_OLD_SITE, aiohttp_private_names())
    assert [use.split(": ")[1] for use in uses] == [
        "self._runner",
        "runner._reg_site",
        "self._server",
        "self._host",
        "self._port",
        "self._backlog",
    ]


def test_no_aiohttp_private_attribute_is_used() -> None:
    private = aiohttp_private_names()
    found = {
        str(path.relative_to(PACKAGE)): uses
        for path in sorted(PACKAGE.rglob("*.py"))
        if (uses := aiohttp_private_uses(path.read_text(encoding="utf-8"), private))
    }
    assert found == {}


#: What the relay may ask of the writer ``StreamResponse.prepare()`` returns: aiohttp's abstract
#: interface for it, nothing of its ``StreamWriter`` beyond that (its ``chunked`` flag, say).
WRITER_INTERFACE = frozenset(name for name in dir(AbstractStreamWriter) if not name.startswith("_"))


def writer_uses_beyond_interface(source: str) -> list[str]:
    """``line: expression`` for each use in ``source`` of a writer returned by ``prepare()``
    beyond :data:`WRITER_INTERFACE`, or through ``getattr``/``setattr``/``hasattr``."""
    tree = ast.parse(source)
    writers: set[str] = set()  # how the writer is spelled: ``writer``, ``self.writer``
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Await):
            call = node.value.value
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr == "prepare"
            ):
                writers.update(ast.unparse(target) for target in node.targets)
    found: list[str] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and ast.unparse(node.value) in writers
            and node.attr not in WRITER_INTERFACE
        ) or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and node.args
            and ast.unparse(node.args[0]) in writers
        ):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


#: How the aiohttp path read aiohttp's framing decision before (as it was).
_OLD_RELAY = """
async def relay(request, response):
    writer = await response.prepare(request)
    chunked = bool(getattr(writer, "chunked", False))
    await conn.relay_rest(writer.drain)
    if writer.chunked:
        pass

async def start(self):
    self.writer = await self.response.prepare(self.request)
    await self.writer.drain()
    self.writer.chunked = True
"""


def test_the_scan_sees_a_writer_used_beyond_its_interface() -> None:
    uses = writer_uses_beyond_interface(_OLD_RELAY)
    assert sorted(use.split(": ", 1)[1] for use in uses) == [
        "getattr(writer, 'chunked', False)",
        "self.writer.chunked",
        "writer.chunked",
    ]


def test_the_relay_uses_only_aiohttps_public_interface() -> None:
    """The relay (the aiohttp path) writes its answers through aiohttp's public API: no private
    name of aiohttp's, and of the writer ``prepare()`` returns only its abstract interface."""
    private = aiohttp_private_names()
    found = {
        str(path.relative_to(PACKAGE)): uses
        for path in sorted((PACKAGE / "relay").glob("*.py"))
        if (
            uses := aiohttp_private_uses(text := path.read_text(encoding="utf-8"), private)
            + writer_uses_beyond_interface(text)
        )
    }
    assert found == {}


@pytest.mark.parametrize("access_log", [False, True], ids=["front-door", "aiohttp-only"])
async def test_listens_on_port_0_and_serves_health(make_proxy: Callable[..., Any], access_log: bool) -> None:
    proxy = await make_proxy(port=0, access_log=access_log)
    port = proxy.settings.port
    assert port != 0
    assert (proxy.front is None) == access_log
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
    try:
        writer.write(b"GET /proxy/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_the_daemon_on_port_0_says_which_port_it_got(tmp_path: Path) -> None:
    """``--port 0``: the kernel picks the port, and the daemon's listening line names that port
    (not 0), so that a user can reach it."""
    out = tmp_path / "daemon.out"
    argv = [
        sys.executable, "-m", "aic_vllm_proxy", "serve", "--host", "127.0.0.1", "--port", "0",
        "--vllm-port", str(free_port()), "--vllm-command", SIM, "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    with open(out, "wb") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        found = None
        while found is None and time.monotonic() < deadline and process.poll() is None:
            found = re.search(r" on http://127\.0\.0\.1:(\d+), vLLM at ", out.read_text(errors="replace"))
            time.sleep(0.05)
        assert found is not None, out.read_text(errors="replace")
        port = int(found.group(1))
        assert port != 0
        assert httpx.get(f"http://127.0.0.1:{port}/proxy/health", timeout=30).status_code == 200
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
