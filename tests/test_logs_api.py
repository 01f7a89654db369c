"""GET /logs/current, /logs/tail and /logs/stream, and the log file of each launch."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import FAST

QUIET = f"--disable-uvicorn-access-log --disable-log-stats {FAST}"
LOG_NAME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_pid-(\d+)\.log$")


async def loaded(make_proxy: Any, spec: str = f"sim/logs {QUIET}") -> tuple[Any, Path]:
    """A proxy with a model loaded and quiet (no health checks, no access log lines)."""
    proxy = await make_proxy(health_interval=0)
    code, body = await proxy.switch(spec)
    assert code == 200, body
    return proxy, Path(body["status"]["log_path"])


async def get(proxy: Any, path: str) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    async with proxy.session.get(proxy.url + path) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_no_log_yet_is_404(make_proxy: Any) -> None:
    proxy = await make_proxy()
    for path in ("/logs/current", "/logs/tail", "/logs/tail?lines=5", "/logs/stream"):
        async with proxy.session.get(proxy.url + path) as resp:
            assert resp.status == 404, path
            assert resp.content_type == "application/json"
            error = (await resp.json())["error"]
        assert "No vLLM log yet" in error["message"] and "/switch" in error["message"]
        assert error["code"] == 404


@pytest.mark.parametrize("value", ["abc", "0", "-1", "10000000", "1.5", "100001"])
async def test_bad_lines_values_are_400(make_proxy: Any, value: str) -> None:
    proxy = await make_proxy()
    for path in ("/logs/tail", "/logs/stream"):
        async with proxy.session.get(proxy.url + path, params={"lines": value}) as resp:
            assert resp.status == 400, (path, value)
            error = (await resp.json())["error"]
        assert "lines must" in error["message"] and error["param"] == "lines"


async def test_tail_gives_exactly_n_lines(make_proxy: Any) -> None:
    proxy, path = await loaded(make_proxy)
    with open(path, "ab") as handle:
        handle.write(b"".join(b"appended line %04d\n" % i for i in range(1000)))
    lines = path.read_text().splitlines()
    for n in (1, 7, 200, 999, 1000):
        code, _, body = await get(proxy, f"/logs/tail?lines={n}")
        assert code == 200
        text = body.decode()
        assert text.endswith("\n")
        assert text.splitlines() == lines[-n:], n
    code, _, body = await get(proxy, "/logs/tail")  # the default is 200
    assert body.decode().splitlines() == lines[-200:]
    assert body.decode().splitlines()[-1] == "appended line 0999"
    code, _, body = await get(proxy, "/logs/tail?lines=100000")  # more than the file has
    assert body.decode().splitlines() == lines
    assert body.decode().splitlines()[0].startswith("# aic-vllm-proxy ")
    with open(path, "ab") as handle:  # a last line without its newline (yet) counts
        handle.write(b"complete\npartial line")
    code, _, body = await get(proxy, "/logs/tail?lines=2")
    assert code == 200
    assert body.decode().splitlines() == ["complete", "partial line"]


async def test_current_streams_the_whole_file(make_proxy: Any) -> None:
    proxy, path = await loaded(make_proxy)
    block = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % i for i in range(100_000))
    with open(path, "ab") as handle:  # ~5.5 MB of log
        handle.write(block)
    expected = path.read_bytes()
    assert len(expected) > 5_000_000
    async with proxy.session.get(proxy.url + "/logs/current") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert resp.headers.get("Transfer-Encoding") == "chunked"  # streamed, not built in memory
        assert "Content-Length" not in resp.headers
        pieces = [chunk async for chunk in resp.content.iter_chunked(1 << 16)]
    assert b"".join(pieces) == expected
    assert expected.startswith(b"# aic-vllm-proxy ")
    header = expected.split(b"\n", 1)[0] + b"\n"
    assert len(expected) > len(header) + len(block)  # vLLM's own output is in the same file


async def test_each_launch_has_its_own_file(make_proxy: Any) -> None:
    proxy, first = await loaded(make_proxy, f"sim/one {QUIET}")
    first_pid = (await proxy.status())["pid"]
    code, body = await proxy.switch(f"sim/two {QUIET}")
    assert code == 200, body
    second = Path(body["status"]["log_path"])
    second_pid = body["status"]["pid"]
    assert first != second and first.exists() and second.exists()
    assert first.parent == second.parent == Path(proxy.settings.log_dir)
    names = sorted(p.name for p in first.parent.iterdir())
    assert names == sorted([first.name, second.name])
    for path, pid, model in ((first, first_pid, "sim/one"), (second, second_pid, "sim/two")):
        match = LOG_NAME.match(path.name)
        assert match, path.name
        assert int(match.group(1)) == pid
        header = path.read_text().splitlines()[0]
        assert header.startswith("# aic-vllm-proxy ") and "launching: " in header
        assert f" {model} " in header and "--port" in header
    code, _, current = await get(proxy, "/logs/current")
    assert current == second.read_bytes()
    assert b"sim/two" in current and b"sim/one" not in current


async def test_log_of_a_failed_start_stays_readable(make_proxy: Any) -> None:
    proxy = await make_proxy()
    code, body = await proxy.switch(f"sim/bad --bogus {FAST}")
    assert code == 500, body
    code, _, tail = await get(proxy, "/logs/tail?lines=20")
    assert code == 200
    assert b"unrecognized arguments: --bogus" in tail
    status = await proxy.status()
    assert status["log_path"] and LOG_NAME.match(Path(status["log_path"]).name)
    # Following the log of a process that has ended gives its last lines and ends at once.
    async with proxy.session.get(proxy.url + "/logs/stream?lines=5") as resp:
        assert resp.status == 200
        text = await asyncio.wait_for(resp.text(), 5)
    assert len(text.splitlines()) == 5 and "unrecognized arguments: --bogus" in text


async def test_tail_with_the_root_cause(make_proxy: Any) -> None:
    """``cause=1``: the root cause of a failed start comes first when it is further up than
    the last N lines (vLLM prints it 50+ lines before its last line)."""
    proxy = await make_proxy()
    code, body = await proxy.switch(f"sim/oom {FAST} --sim-fail-during-load")
    assert code == 500, body
    _, _, plain = await get(proxy, "/logs/tail?lines=10")
    assert b"CUDA out of memory" not in plain and len(plain.splitlines()) == 10
    code, _, tail = await get(proxy, "/logs/tail?lines=10&cause=1")
    assert code == 200
    lines = tail.decode().splitlines()
    assert "CUDA out of memory" in lines[0] and re.fullmatch(r"\[\.\.\. \d+ more lines \.\.\.\]", lines[1])
    assert lines[-10:] == plain.decode().splitlines()
    assert body["error"]["log_tail"][0] == lines[0]  # the same tail as the switch's answer
    code, _, _ = await get(proxy, "/logs/tail?lines=10&cause=yes")
    assert code == 400


async def test_stream_follows_until_the_process_ends(make_proxy: Any) -> None:
    proxy, path = await loaded(make_proxy)
    with open(path, "ab") as handle:
        handle.write(b"marker-1\nmarker-2\n")
    received = b""
    async with proxy.session.get(proxy.url + "/logs/stream?lines=2") as resp:
        assert resp.status == 200
        deadline = time.monotonic() + 10
        while b"marker-2\n" not in received and time.monotonic() < deadline:
            received += await asyncio.wait_for(resp.content.readany(), 10)
        assert received == b"marker-1\nmarker-2\n"
        with open(path, "ab") as handle:
            handle.write(b"live line\n")
        while b"live line\n" not in received and time.monotonic() < deadline:
            received += await asyncio.wait_for(resp.content.readany(), 10)
        assert received.endswith(b"live line\n")
        stopper = asyncio.ensure_future(proxy.session.post(proxy.url + "/stop"))
        rest = await asyncio.wait_for(resp.content.read(), 15)  # ends when the process ends
        (await stopper).release()
    assert b"Shutting down" in rest or b"shutdown" in rest.lower()
    assert received + rest == path.read_bytes()[-len(received + rest) :]
    # The stopped launch's log stays readable.
    code, _, tail = await get(proxy, "/logs/tail?lines=1")
    assert code == 200 and tail.decode().splitlines() == path.read_text().splitlines()[-1:]


async def test_logs_read_while_launches_get_their_final_name(make_proxy: Any) -> None:
    """A log file gets its final name (``_pid-N``) once vLLM's pid is known. Readers that ask
    for the log around that moment get the log (200) or "no log yet" (404), never a 500 (a
    name read, then gone before it was opened)."""
    proxy = await make_proxy(health_interval=0)
    answers: list[int] = []
    done = asyncio.Event()

    async def read_logs() -> None:
        while not done.is_set():
            for path in ("/logs/tail?lines=3", "/logs/stream?lines=1", "/logs/current"):
                async with proxy.session.get(proxy.url + path) as resp:
                    if path.startswith("/logs/stream"):
                        await asyncio.wait_for(resp.content.readany(), 30)
                    else:
                        await resp.read()
                    answers.append(resp.status)

    readers = [asyncio.ensure_future(read_logs()) for _ in range(3)]
    try:
        for i in range(4):
            code, body = await proxy.switch(f"sim/name{i} {QUIET}")
            assert code == 200, body
    finally:
        done.set()
        await asyncio.gather(*readers)
    assert answers and set(answers) <= {200, 404}, sorted(set(answers))


def test_a_log_opened_before_it_is_renamed_reads_on(tmp_path: Path) -> None:
    from aic_vllm_proxy.engine.logs import link_with_pid, open_launch_log, tail_lines

    path, handle = open_launch_log(tmp_path, ["vllm", "serve", "m"])
    fd = os.open(path, os.O_RDONLY)
    try:
        final = link_with_pid(path, 1234)
        path.unlink()
        handle.write(b"after the rename\n")
        handle.close()
        assert final.name.endswith("_pid-1234.log") and not path.exists()
        assert tail_lines(fd, 1) == ["after the rename"] == tail_lines(final, 1)
    finally:
        os.close(fd)


async def test_the_cause_of_a_death_after_ready_is_looked_for_after_ready_only(tmp_path: Path) -> None:
    from aic_vllm_proxy.engine.logs import cause_since, log_size

    log = tmp_path / "vllm.log"
    before = (
        "(APIServer pid=1) ERROR 12-04 10:00:00 [serving.py:10] a bad request's error\n"
        "(APIServer pid=1) INFO 12-04 10:00:01 [api_server.py:1] Application startup complete.\n"
    )
    log.write_text(before)
    ready = log_size(log)
    assert await cause_since(log, 0) is not None  # the earlier error, from the start
    assert await cause_since(log, ready) is None  # nothing since: no cause, not the old error
    core = "(EngineCore pid=2) ERROR 12-04 10:05:01 [core.py:1512]"
    with log.open("a") as out:
        out.write("(EngineCore pid=2) INFO 12-04 10:05:00 [core.py:1] step\n")
        out.write(f"{core} EngineCore encountered a fatal error.\n")
        out.write(f"{core} Traceback (most recent call last):\n")
        out.write(f'{core}   File "core.py", line 1, in step\n')
        out.write(f"{core} RuntimeError: CUDA error: out of memory\n")
    cause = await cause_since(log, ready)
    assert cause is not None and cause.text == "RuntimeError: CUDA error: out of memory", cause
    assert log_size(tmp_path / "gone.log") == 0
