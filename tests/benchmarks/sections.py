"""The five measurements of issue #7. Each takes the run's :class:`Bench` and the targets to
compare, and returns a JSON-able dict; ``run.py`` turns those into the table."""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import load
from .measure import CpuWindow, RssSampler, median, percentile, ratio, rss_bytes
from .profile import Profiler
from .targets import Proxy, call

MB = 1024 * 1024


@dataclass
class Target:
    """One way to reach the upstream: ``direct`` or through something measured."""

    name: str
    port: int
    cpu_pids: Callable[[], list[int]] | None = None  # whose CPU time and memory count
    slow: bool = False  # LiteLLM: fewer rounds, shorter runs


@dataclass
class Sizes:
    latency_warmup: int
    latency_rounds: int
    cpu_block: int  # requests in one back-to-back block (CPU per request)
    stream_rounds: int
    slow_every: int  # the slow target joins one latency round in this many
    throughput_concurrency: tuple[int, ...]
    throughput_duration: float
    unpaced_tokens: int
    streaming_concurrency: tuple[int, ...]
    streaming_duration: float
    paced_tokens: int
    repeats: int
    slow_duration: float
    hard_limit: float
    download_bytes: int
    download_chunk: int
    download_pause: float
    idle_connections: int
    readiness_trials: int
    switch_rounds: int  # switching: rounds of A -> B -> A per way of switching
    switch_load_delay: float  # switching: the simulator's cold start (--sim-load-delay)


FULL = Sizes(
    latency_warmup=200,
    latency_rounds=2000,
    cpu_block=500,
    stream_rounds=1000,
    slow_every=5,
    throughput_concurrency=(64, 256),
    throughput_duration=3.0,
    unpaced_tokens=128,
    streaming_concurrency=(1, 64, 256),
    streaming_duration=6.0,
    paced_tokens=128,
    repeats=3,
    slow_duration=0.5,
    hard_limit=180.0,
    download_bytes=1 << 30,
    download_chunk=16384,
    download_pause=1.0,
    idle_connections=1000,
    readiness_trials=10,
    switch_rounds=5,
    switch_load_delay=20.0,
)
QUICK = Sizes(
    latency_warmup=5,
    latency_rounds=30,
    cpu_block=20,
    stream_rounds=20,
    slow_every=3,
    throughput_concurrency=(4, 16),
    throughput_duration=0.3,
    unpaced_tokens=16,
    streaming_concurrency=(1, 4, 16),
    streaming_duration=0.3,
    paced_tokens=8,
    repeats=1,
    slow_duration=0.2,
    hard_limit=60.0,
    download_bytes=16 * MB,
    download_chunk=16384,
    download_pause=0.1,
    idle_connections=50,
    readiness_trials=2,
    switch_rounds=1,
    switch_load_delay=1.0,
)


@dataclass
class Bench:
    sizes: Sizes
    model: str
    loop: asyncio.AbstractEventLoop
    profiler: Profiler | None = None
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    notes: list[str] = field(default_factory=list)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


def _ms(ns: float) -> float:
    return ns / 1e6


def _loadgen_cpu_ns() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


# ------------------------------------------------------------------------------ latency


def latency(bench: Bench, targets: list[Target]) -> dict[str, Any]:
    """1. Added latency per non-streamed request at concurrency 1, and (2.) the first SSE
    chunk of a short stream; paired rounds, after warm-up; CPU per request of each hop."""
    sizes = bench.sizes
    out: dict[str, Any] = {"rounds": sizes.latency_rounds, "stream_rounds": sizes.stream_rounds}
    every = {t.name: sizes.slow_every for t in targets if t.slow}
    for kind, stream, rounds in (
        ("plain", False, sizes.latency_rounds),
        ("stream", True, sizes.stream_rounds),
    ):
        clients = {t.name: load.BlockingClient(t.port) for t in targets}
        requests = {t.name: load.chat_request(t.port, bench.model, 16, stream) for t in targets}
        windows = {t.name: CpuWindow(t.cpu_pids) for t in targets if t.cpu_pids}

        def start(windows: dict[str, CpuWindow] = windows) -> None:
            for window in windows.values():
                window.start()

        bench.log(f"  latency ({kind}): {rounds} rounds x {len(targets)} targets")
        proxy = next((t for t in targets if t.name == "proxy" and t.cpu_pids), None)
        if bench.profiler and proxy and proxy.cpu_pids:
            bench.profiler.start(proxy.cpu_pids()[0], f"latency-{kind}")
        try:
            samples = load.paired_rounds(clients, requests, rounds, sizes.latency_warmup, every, start)
        finally:
            if bench.profiler:
                bench.profiler.stop()
        for window in windows.values():
            window.stop()
        back_to_back = _back_to_back_cpu(bench, targets, clients, requests)
        for client in clients.values():
            client.close()
        direct = {r: s for r, s in samples.get("direct", {}).items() if s.ok}
        for t in targets:
            failed = sum(not s.ok for s in samples[t.name].values())
            mine = {r: s for r, s in samples[t.name].items() if s.ok}
            totals = [s.total_ns for s in mine.values()]
            firsts = [s.first_ns for s in mine.values()]
            row: dict[str, Any] = {
                "n": len(mine),
                "failed": failed,
                "p50_ms": _ms(percentile(totals, 50)),
                "p99_ms": _ms(percentile(totals, 99)),
                "first_p50_ms": _ms(percentile(firsts, 50)),
                "first_p99_ms": _ms(percentile(firsts, 99)),
            }
            if t.name != "direct" and direct:
                pairs = [r for r in mine if r in direct]
                added = [mine[r].total_ns - direct[r].total_ns for r in pairs]
                added_first = [mine[r].first_ns - direct[r].first_ns for r in pairs]
                dtotals = [direct[r].total_ns for r in pairs]
                dfirsts = [direct[r].first_ns for r in pairs]
                row["added_p50_ms"] = _ms(percentile(added, 50))
                row["added_p99_ms"] = _ms(percentile(totals, 99) - percentile(dtotals, 99))
                row["first_added_p50_ms"] = _ms(percentile(added_first, 50))
                row["first_added_p99_ms"] = _ms(percentile(firsts, 99) - percentile(dfirsts, 99))
            if t.name in windows and mine:
                row["cpu_us_per_request"] = windows[t.name].ns / 1e3 / len(mine)
            b2b = back_to_back.get(t.name)
            if b2b:
                row["cpu_us_per_request_b2b"] = median(b2b)
                row["cpu_us_per_request_b2b_runs"] = back_to_back[t.name]
            out.setdefault(kind, {})[t.name] = row
            bench.log(
                f"    {t.name:8s} p50 {row['p50_ms']:.3f} ms  first p50 {row['first_p50_ms']:.3f} ms"
                + (f"  added p50 {row['added_p50_ms']:.3f} ms" if "added_p50_ms" in row else "")
                + (f"  cpu {row['cpu_us_per_request']:.0f} us/req" if "cpu_us_per_request" in row else "")
                + (f" ({median(b2b):.0f} in a row)" if b2b else "")
            )
    return out


def _back_to_back_cpu(
    bench: Bench, targets: list[Target], clients: dict[str, load.BlockingClient], requests: dict[str, bytes]
) -> dict[str, list[float]]:
    """CPU per request of each hop with only its own requests in the window *and around it*:
    blocks of requests back to back, one target at a time, in alternating order. In the paired
    rounds a hop's requests sit between the other targets' (LiteLLM spends ~10 ms of CPU on
    each, which evicts the caches), which inflates every hop's figure."""
    hops = [t for t in targets if t.cpu_pids and not t.slow]
    runs: dict[str, list[float]] = {t.name: [] for t in hops}
    block = bench.sizes.cpu_block
    for repeat in range(bench.sizes.repeats):
        for t in hops if repeat % 2 == 0 else hops[::-1]:
            assert t.cpu_pids is not None
            client, raw = clients[t.name], requests[t.name]
            for _ in range(max(1, block // 10)):  # warm up after the previous target
                client.request(raw)
            window = CpuWindow(t.cpu_pids)
            window.start()
            for _ in range(block):
                client.request(raw)
            runs[t.name].append(window.stop() / 1e3 / block)
    return runs


# ------------------------------------------------------------------- closed-loop runs


def _one_loop(
    bench: Bench,
    target: Target,
    concurrency: int,
    duration: float,
    max_tokens: int,
    upstream_pids: Callable[[], list[int]],
    label: str,
) -> dict[str, Any]:
    # Lengths from half to one and a half times max_tokens (mean max_tokens), as real
    # generations differ: the clients drift apart after the first wave.
    lengths = sorted({max(1, round(max_tokens * (0.5 + i / 8))) for i in range(9)})
    requests = [load.chat_request(target.port, bench.model, n, True) for n in lengths]
    warmup = load.chat_request(target.port, bench.model, 2, True)
    hop = CpuWindow(target.cpu_pids) if target.cpu_pids else None
    upstream = CpuWindow(upstream_pids)
    loadgen = [0, 0]

    def on_start() -> None:
        if hop:
            hop.start()
        upstream.start()
        loadgen[0] = _loadgen_cpu_ns()

    def on_stop() -> None:
        loadgen[1] = _loadgen_cpu_ns() - loadgen[0]
        upstream.stop()
        if hop:
            hop.stop()

    profiling = bench.profiler is not None and target.name == "proxy" and target.cpu_pids is not None
    if profiling and bench.profiler and target.cpu_pids:
        bench.profiler.start(target.cpu_pids()[0], f"{label}-{concurrency}")
    try:
        result = bench.run(
            load.closed_loop(
                target.port,
                concurrency,
                duration,
                requests,
                warmup,
                bench.sizes.hard_limit,
                on_start,
                on_stop,
            )
        )
    finally:
        if profiling and bench.profiler:
            bench.profiler.stop()
    events = max(result.events, 1)
    row: dict[str, Any] = {
        "ok": result.ok,
        "failed": result.failed,
        "errors": result.errors,
        "wall_s": result.wall_s,
        # A slow target runs one short wave: its rate is over the whole run, not the window.
        "throughput_rps": result.ok / result.wall_s if target.slow and result.wall_s else result.throughput,
        "events": result.events,
        "ttft_p50_ms": _ms(percentile(result.ttft_ns, 50)),
        "ttft_p99_ms": _ms(percentile(result.ttft_ns, 99)),
        "burst_ttft_p50_ms": _ms(percentile(result.burst_ttft_ns, 50)),
        "steady_requests": len(result.steady_ttft_ns),
        "upstream_cpu_us_per_chunk": upstream.ns / 1e3 / events,
        "loadgen_cpu_us_per_chunk": loadgen[1] / 1e3 / events,
    }
    if hop:
        row["cpu_us_per_chunk"] = hop.ns / 1e3 / events
        row["cpu_share"] = hop.ns / 1e9 / result.wall_s if result.wall_s else None
    if profiling:
        row["profiled"] = True
    return row


def _summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over repeats; ratios to direct are taken within each repeat, then the median."""
    out: dict[str, Any] = {}
    direct = runs.get("direct", [])
    for name, reps in runs.items():
        row: dict[str, Any] = {"repeats": reps}
        keys = (
            "throughput_rps",
            "ttft_p50_ms",
            "ttft_p99_ms",
            "burst_ttft_p50_ms",
            "cpu_us_per_chunk",
            "cpu_share",
        )
        for key in keys:
            values = [r[key] for r in reps if r.get(key) is not None]
            row[key] = median(values) if values else None
        row["failed"] = sum(r["failed"] for r in reps)
        row["ok"] = sum(r["ok"] for r in reps)
        if name != "direct" and direct:
            pairs = list(zip(reps, direct[: len(reps)], strict=True))
            row["throughput_ratio"] = median(
                [ratio(a["throughput_rps"], d["throughput_rps"]) for a, d in pairs]
            )
            row["ttft_p50_ratio"] = median([ratio(a["ttft_p50_ms"], d["ttft_p50_ms"]) for a, d in pairs])
            row["ttft_p50_added_ms"] = median([a["ttft_p50_ms"] - d["ttft_p50_ms"] for a, d in pairs])
            row["burst_ttft_p50_ratio"] = median(
                [ratio(a["burst_ttft_p50_ms"], d["burst_ttft_p50_ms"]) for a, d in pairs]
            )
        out[name] = row
    nginx = out.get("nginx", {}).get("cpu_us_per_chunk")
    for row in out.values():
        if nginx and row.get("cpu_us_per_chunk") is not None:
            row["cpu_vs_nginx"] = row["cpu_us_per_chunk"] / nginx
    return out


def _loops(
    bench: Bench,
    targets: list[Target],
    concurrencies: tuple[int, ...],
    duration: float,
    max_tokens: int,
    upstream_pids: Callable[[], list[int]],
    label: str,
) -> dict[str, Any]:
    sizes = bench.sizes
    out: dict[str, Any] = {}
    for concurrency in concurrencies:
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for rep in range(sizes.repeats):
            order = targets if rep % 2 == 0 else list(reversed(targets))
            for t in order:
                if t.slow and rep > 0:
                    continue
                span = sizes.slow_duration if t.slow else duration
                row = _one_loop(bench, t, concurrency, span, max_tokens, upstream_pids, label)
                runs[t.name].append(row)
                bench.log(
                    f"    {label} N={concurrency:<4d} {t.name:8s} {row['throughput_rps']:8.1f} req/s  "
                    f"TTFT p50 {row['ttft_p50_ms']:8.2f} ms (burst {row['burst_ttft_p50_ms']:8.2f})"
                    f"  failed {row['failed']}"
                    + (f"  cpu {row['cpu_us_per_chunk']:.1f} us/chunk" if "cpu_us_per_chunk" in row else "")
                )
        out[str(concurrency)] = _summarise(runs)
    return out


def throughput(bench: Bench, targets: list[Target], upstream_pids: Callable[[], list[int]]) -> dict[str, Any]:
    """3. Throughput and TTFT at many concurrent streams, tokens as fast as the upstream makes
    them (a fast GPU): can the hop keep up?"""
    sizes = bench.sizes
    bench.log(f"  throughput (no token delay, {sizes.unpaced_tokens} tokens per stream)")
    runs = _loops(
        bench,
        targets,
        sizes.throughput_concurrency,
        sizes.throughput_duration,
        sizes.unpaced_tokens,
        upstream_pids,
        "unpaced",
    )
    return {"max_tokens": sizes.unpaced_tokens, "duration_s": sizes.throughput_duration, "runs": runs}


def streaming(
    bench: Bench, targets: list[Target], upstream_pids: Callable[[], list[int]], token_delay: float
) -> dict[str, Any]:
    """2. and 3. Paced streams (one write per token, as vLLM): TTFT, CPU per SSE chunk,
    throughput, failures at 1, 64 and 256 concurrent streams."""
    sizes = bench.sizes
    bench.log(f"  streaming ({sizes.paced_tokens} tokens per stream, one every {token_delay * 1000:g} ms)")
    runs = _loops(
        bench,
        targets,
        sizes.streaming_concurrency,
        sizes.streaming_duration,
        sizes.paced_tokens,
        upstream_pids,
        "paced",
    )
    return {
        "max_tokens": sizes.paced_tokens,
        "token_delay_s": token_delay,
        "duration_s": sizes.streaming_duration,
        "runs": runs,
    }


# ------------------------------------------------------------------------------- memory


def memory(bench: Bench, targets: list[Target]) -> dict[str, Any]:
    """4. Resident memory of each hop while one response streams ~1 GB (the reader pauses once
    halfway, so a hop without back-pressure would buffer), and with many idle connections."""
    sizes = bench.sizes
    chunk = sizes.download_chunk
    expected = max(1, sizes.download_bytes // chunk) * chunk
    path = f"/bench/bytes?n={sizes.download_bytes}&chunk={chunk}"
    out: dict[str, Any] = {"bytes": expected, "chunk": chunk, "pause_s": sizes.download_pause}
    for t in targets:  # warm-up: code paths and pools, before the baseline
        for _ in range(3):
            bench.run(load.download(t.port, f"/bench/bytes?n={4 * MB}&chunk={chunk}", 0, 0.0, 60.0))
    stream: dict[str, Any] = {}
    for t in targets:
        pids = t.cpu_pids() if t.cpu_pids else []
        base = rss_bytes(pids)
        sampler = RssSampler(pids)
        sampler.start()
        cpu = CpuWindow(t.cpu_pids) if t.cpu_pids else None
        if cpu:
            cpu.start()
        began = time.perf_counter()
        try:
            resp = bench.run(load.download(t.port, path, expected // 2, sizes.download_pause, 600.0))
            ok = resp.status == 200 and resp.nbytes == expected
            got = resp.nbytes
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            ok, got = False, 0
            bench.notes.append(f"memory: the download through {t.name} failed: {exc!r}")
        seconds = time.perf_counter() - began
        if cpu:
            cpu.stop()
        sampler.finish()
        row: dict[str, Any] = {
            "ok": ok,
            "bytes": got,
            "seconds": seconds,
            "mb_per_s": got / MB / max(seconds - sizes.download_pause, 1e-9),
        }
        if pids:
            row.update(
                rss_base_mb=base / MB,
                rss_peak_mb=sampler.peak / MB,
                rss_growth_mb=(sampler.peak - base) / MB,
                rss_end_mb=rss_bytes(pids) / MB,
            )
        if cpu:
            row["cpu_ms_per_gb"] = cpu.ns / 1e6 / (max(got, 1) / (1 << 30))
        stream[t.name] = row
        bench.log(
            f"    1 GB stream {t.name:8s} {row['mb_per_s']:7.0f} MB/s ok={ok}"
            + (f"  RSS {row['rss_base_mb']:.1f} -> peak {row['rss_peak_mb']:.1f} MB" if pids else "")
        )
    out["stream"] = stream
    idle: dict[str, Any] = {}
    for t in targets:
        if not t.cpu_pids:
            continue
        pids = t.cpu_pids()
        base = rss_bytes(pids)
        conns, failed = bench.run(load.open_idle(t.port, sizes.idle_connections, "/v1/models"))
        bench.run(asyncio.sleep(0.5))
        held = rss_bytes(pids)
        load.close_all(conns)
        bench.run(asyncio.sleep(0.5))
        idle[t.name] = {
            "connections": len(conns),
            "failed": failed,
            "rss_base_mb": base / MB,
            "rss_held_mb": held / MB,
            "rss_growth_mb": (held - base) / MB,
            "kb_per_connection": (held - base) / 1024 / max(len(conns), 1),
            "rss_after_close_mb": rss_bytes(pids) / MB,
        }
        bench.log(
            f"    {len(conns)} idle connections {t.name:8s} RSS {base / MB:.1f} -> {held / MB:.1f} MB"
            f" (failed {failed})"
        )
    out["idle"] = idle
    return out


# ---------------------------------------------------------------------------- readiness


def _wall(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def readiness(bench: Bench, proxy: Proxy) -> dict[str, Any]:
    """5. From the upstream listening (able to answer /health) to the proxy's ``ready_at``.
    The upstream's load time varies from trial to trial so that it falls at a different
    moment of the proxy's probe interval each time."""
    trials = []
    for i in range(bench.sizes.readiness_trials):
        delay = 0.15 + (i * 0.037) % 0.1
        result = proxy.switch(f"bench-ready-{i} --ready-delay {delay:.3f}")
        ready_at = _wall(result["status"]["ready_at"])
        _, info = call("GET", proxy.vllm_port, "/bench/info")
        trial = {
            "ready_delay_s": delay,
            "listen_to_ready_ms": (ready_at - info["listen_at"]) * 1000,
            "first_health_to_ready_ms": (ready_at - info["first_health_at"]) * 1000,
            "switch_total_s": result.get("total_seconds"),
        }
        trials.append(trial)
        bench.log(f"    readiness trial {i}: noticed {trial['listen_to_ready_ms']:.1f} ms after listening")
    values = [t["listen_to_ready_ms"] for t in trials]
    return {
        "trials": trials,
        "median_ms": median(values),
        "max_ms": max(values),
        "first_health_to_ready_median_ms": median([t["first_health_to_ready_ms"] for t in trials]),
    }
