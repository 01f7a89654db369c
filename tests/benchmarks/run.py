"""``python -m tests.benchmarks``: issue #7's benchmark, direct vs through the proxy (and a
bare Python relay, nginx and LiteLLM's proxy when installed), side by side in one run against
one upstream.

    python -m tests.benchmarks                 # the full run (about 10 minutes)
    python -m tests.benchmarks --quick         # CI smoke: every section at tiny sizes
    python -m tests.benchmarks --only streaming --targets direct,proxy
    python -m tests.benchmarks --only streaming --profile .bench/profile

Sections: latency, throughput, streaming, memory, readiness, routing (in process: what reading
a request's ``model`` costs, also ``python -m tests.benchmarks.model_field``), switching (two
models on one GPU switched back and forth, parked by sleep mode against cold). Prints a table
(rows: metric; columns: direct, proxy, relay, nginx, litellm, the target and whether the proxy
meets it) and writes everything measured to a JSON file. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from . import load, model_field, sections, switching
from .profile import Profiler
from .sections import FULL, QUICK, Bench, Target
from .targets import REPO, LiteLLM, Nginx, Proxy, Relay, upstream_command

SECTIONS = ("latency", "throughput", "streaming", "memory", "readiness", "routing", "switching")
#: "routed": the proxy with a catalogue, so that it reads every request's "model" to route it
#: (issue 13); its catalogue entries serve MODEL too, so the same requests go to both.
TARGETS = ("direct", "proxy", "relay", "nginx", "litellm", "routed")
MODEL = "bench"
SIM_FLAGS = "--sim-import-delay 0 --sim-load-delay 0.1 --disable-uvicorn-access-log --disable-log-stats"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section")
    parser.add_argument("--only", default="", help=f"comma-separated sections ({', '.join(SECTIONS)})")
    parser.add_argument(
        "--targets",
        default="",
        help="comma-separated: direct,proxy,relay,nginx,litellm,routed (default: all; --quick: first four)",
    )
    parser.add_argument("--json", type=Path, default=REPO / ".bench" / "benchmark.json", help="JSON output")
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds between paced tokens")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of each closed-loop run")
    parser.add_argument("--duration", type=float, default=None, help="seconds of each paced run")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the proxy's runs into DIR")
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native (pauses the proxy)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if the proxy misses a target")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = parser.parse_args(argv)
    args.sections = [s for s in (args.only.split(",") if args.only else SECTIONS) if s]
    for name in args.sections:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    default_targets = TARGETS[:4] if args.quick else TARGETS
    args.target_names = [t for t in (args.targets.split(",") if args.targets else default_targets) if t]
    for name in args.target_names:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    for name in ("direct", "proxy"):
        if name not in args.target_names:
            args.target_names.insert(0 if name == "direct" else 1, name)
    return args


def routed_config(workdir: Path, token_delay: float) -> Path:
    """The "routed" target's config: two catalogue entries (the latency and the streaming
    sections' simulators) serving MODEL, so requests naming it are routed by their "model"."""
    path = workdir / "routed.toml"
    paced = f"{SIM_FLAGS} --sim-token-delay {token_delay:g}"
    path.write_text(
        f'[models.{MODEL}-routed]\nmodel = "{MODEL}"\nargs = "{SIM_FLAGS}"\n\n'
        f'[models.{MODEL}-routed-paced]\nmodel = "{MODEL}"\nargs = "{paced}"\n'
    )
    return path


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "aic_vllm_proxy": _version("aic-vllm-proxy"),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        info["mem_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(REPO)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "aic_vllm_proxy"], capture_output=True, text=True
        )
        info["commit"] = head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    nginx = Nginx.binary()
    if nginx:
        with contextlib.suppress(OSError):
            info["nginx"] = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
    litellm = LiteLLM.binary()
    if litellm:
        python = Path(litellm).with_name("python")
        code = "import importlib.metadata as m; print(m.version('litellm'))"
        with contextlib.suppress(OSError):
            out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
            info["litellm"] = out.stdout.strip() or None
    return info


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------- table

Row = tuple[str, dict[str, Any], str, Any]  # metric, values per target, target text, proxy ok


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _per_target(section: Any, *keys: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        return {}
    return {name: _get(row, *keys) for name, row in section.items()}


def _check(value: Any, limit: float, above: bool = False) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value >= limit) if above else bool(value <= limit)


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    sec = results["sections"]
    lat = sec.get("latency")
    if lat:
        plain, stream = lat.get("plain", {}), lat.get("stream", {})
        added = _per_target(plain, "added_p50_ms")
        cpu = _per_target(plain, "cpu_us_per_request_b2b")
        first_added = _per_target(stream, "first_added_p50_ms")
        out += [
            ("1. request latency p50, c=1 (ms)", _per_target(plain, "p50_ms"), "", None),
            ("   added p50, paired (ms)", added, "<= 0.4", _check(added.get("proxy"), 0.4)),
            ("   added p99 (ms)", _per_target(plain, "added_p99_ms"), "", None),
            ("   hop CPU per request, back to back (us)", cpu, "<= 150", _check(cpu.get("proxy"), 150)),
            ("   hop CPU per request, paired (us)", _per_target(plain, "cpu_us_per_request"), "", None),
            ("   failed requests", _per_target(plain, "failed"), "", None),
            ("2. first SSE chunk p50, c=1 (ms)", _per_target(stream, "first_p50_ms"), "", None),
            (
                "   first chunk added p50, paired (ms)",
                first_added,
                "<= 1",
                _check(first_added.get("proxy"), 1),
            ),
            ("   first chunk added p99 (ms)", _per_target(stream, "first_added_p99_ms"), "", None),
        ]
    paced = sec.get("streaming")
    if paced:
        runs = paced["runs"]
        top = max(runs, key=int)
        delay = paced["token_delay_s"] * 1000
        for n, data in sorted(runs.items(), key=lambda kv: int(kv[0])):
            ratio = _per_target(data, "ttft_p50_ratio")
            failed = _per_target(data, "failed")
            cpu = _per_target(data, "cpu_us_per_chunk")
            last = n == top  # the targets on TTFT and failures are for the most streams
            ttft = _per_target(data, "ttft_p50_ms")
            out += [
                (f"2. paced N={n} ({delay:g} ms/token): TTFT p50 (ms)", ttft, "", None),
                ("   first-wave TTFT p50 (ms)", _per_target(data, "burst_ttft_p50_ms"), "", None),
                (
                    "   TTFT p50 vs direct (x)",
                    ratio,
                    "<= 1.1" if last else "",
                    _check(ratio.get("proxy"), 1.1) if last else None,
                ),
                ("   hop CPU per SSE chunk (us)", cpu, "<= 10", _check(cpu.get("proxy"), 10)),
                ("   hop CPU per chunk vs nginx (x)", _per_target(data, "cpu_vs_nginx"), "", None),
                ("   throughput (streams/s)", _per_target(data, "throughput_rps"), "", None),
                (
                    "   failed requests",
                    failed,
                    "0" if last else "",
                    _check(failed.get("proxy"), 0) if last else None,
                ),
            ]
    fast = sec.get("throughput")
    if fast:
        for n, data in sorted(fast["runs"].items(), key=lambda kv: int(kv[0])):
            out += [
                (f"3. unpaced N={n}: throughput (streams/s)", _per_target(data, "throughput_rps"), "", None),
                ("   throughput vs direct (x)", _per_target(data, "throughput_ratio"), "", None),
                ("   TTFT p50 (ms)", _per_target(data, "ttft_p50_ms"), "", None),
                ("   TTFT p50 vs direct (x)", _per_target(data, "ttft_p50_ratio"), "", None),
                ("   hop CPU per SSE event (us)", _per_target(data, "cpu_us_per_chunk"), "", None),
                ("   failed requests", _per_target(data, "failed"), "", None),
            ]
    mem = sec.get("memory")
    if mem:
        gb = mem["bytes"] / (1 << 30)
        growth = _per_target(mem["stream"], "rss_growth_mb")
        idle = mem["idle"]
        count = max((row["connections"] for row in idle.values()), default=0)
        out += [
            ("4. RSS before the stream (MB)", _per_target(mem["stream"], "rss_base_mb"), "", None),
            (f"   RSS growth streaming {gb:.3g} GiB (MB)", growth, "<= 20", _check(growth.get("proxy"), 20)),
            ("   stream rate (MB/s)", _per_target(mem["stream"], "mb_per_s"), "", None),
            ("   hop CPU per GiB streamed (ms)", _per_target(mem["stream"], "cpu_ms_per_gb"), "", None),
            (f"   RSS growth, {count} idle connections (MB)", _per_target(idle, "rss_growth_mb"), "", None),
            ("   per idle connection (KB)", _per_target(idle, "kb_per_connection"), "", None),
        ]
    ready = sec.get("readiness")
    if ready:
        worst = ready["max_ms"]
        out += [
            ("5. readiness noticed, median (ms)", {"proxy": ready["median_ms"]}, "", None),
            ("   readiness noticed, max (ms)", {"proxy": worst}, "<= 100", _check(worst, 100)),
        ]
    routing = sec.get("routing")
    if routing:
        limit = routing["target_us"]
        for i, (name, row) in enumerate(routing["bodies"].items()):
            us = row["ns_per_call"] / 1000
            typical = row["typical"]
            out.append(
                (
                    f"{'6.' if i == 0 else '  '} model of a {name} body (us)",
                    {"proxy": us},
                    f"<= {limit:g}" if typical else "",
                    _check(us, limit) if typical else None,
                )
            )
    switch = sec.get("switching")
    if switch:
        limit, call = switch["target_ms"], switch["call"]
        wake = (switch["sleep_delay_s"] + switch["wake_delay_s"]) * 1000
        straight = switch.get("direct") or {}  # the simulator's own sleep + wake, no proxy
        for i, (via, data) in enumerate(switch["parked"].items()):
            how = "a request" if via == "request" else f"/{via}"
            typical, worst = data["added_median_ms"], data["added_max_ms"]
            out += [
                (
                    f"{'7.' if i == 0 else '  '} switch A<->B parked, by {how} (ms)",
                    {"direct": straight.get("wall_median_ms"), "proxy": data["wall_median_ms"]},
                    "",
                    None,
                ),
                (
                    f"   added to sleep + wake ({wake:g} ms), median",
                    {"direct": straight.get("added_median_ms"), "proxy": typical},
                    "",
                    None,
                ),
                ("   added to sleep + wake, max", {"proxy": worst}, f"<= {limit:g}", _check(worst, limit)),
            ]
        cold = switch["cold"][call]
        load_ms = switch["load_delay_s"] * 1000
        out += [
            (f"   switch A<->B cold, by /{call} (ms)", {"proxy": cold["wall_median_ms"]}, "", None),
            (f"   added to the load ({load_ms:g} ms), median", {"proxy": cold["added_median_ms"]}, "", None),
            ("   added to the load, max", {"proxy": cold["added_max_ms"]}, "", None),
        ]
    return out


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def table(results: dict[str, Any], names: list[str]) -> str:
    body = rows(results)
    width = max((len(r[0]) for r in body), default=20)
    head = f"{'metric':<{width}} " + " ".join(f"{n:>9}" for n in names) + f" {'target':>8}  proxy"
    lines = [head, "-" * len(head)]
    for metric, values, target, ok in body:
        cells = " ".join(f"{fmt(values.get(n)):>9}" for n in names)
        verdict = "" if ok is None else ("ok" if ok else "FAIL")
        lines.append(f"{metric:<{width}} {cells} {target:>8}  {verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats)
    if args.duration:
        sizes = replace(sizes, streaming_duration=args.duration, throughput_duration=args.duration)
    raise_nofile()
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="aic-bench-"))
    loop = load.new_loop()
    asyncio.set_event_loop(loop)
    profiler = Profiler(args.profile, native=args.profile_native) if args.profile else None
    bench = Bench(sizes=sizes, model=MODEL, loop=loop, profiler=profiler)
    log = bench.log
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "loadavg_start": loadavg(),
        "sizes": asdict(sizes),
        "sections": {},
        "notes": bench.notes,
        "workdir": str(workdir),
    }
    wanted = set(args.target_names)
    sim_sections = [s for s in args.sections if s in ("latency", "throughput", "streaming")]
    byte_sections = [s for s in args.sections if s in ("memory", "readiness")]
    if "nginx" in wanted and not Nginx.binary():
        wanted.discard("nginx")
        bench.notes.append("nginx is not installed: skipped (apt-get install nginx)")
    if "litellm" in wanted and not LiteLLM.binary():
        wanted.discard("litellm")
        bench.notes.append(
            "LiteLLM is not installed: skipped (python -m venv .bench/litellm-venv && "
            ".bench/litellm-venv/bin/pip install 'litellm[proxy]', or BENCH_LITELLM=/path/to/litellm)"
        )
    started: list[Any] = []
    log(f"benchmark ({results['mode']}): sections {', '.join(args.sections)}; targets {', '.join(wanted)}")
    log(f"  work directory {workdir} (--keep keeps it); load average {results['loadavg_start']}")
    if "routing" in args.sections:
        log("routing")
        results["sections"]["routing"] = model_field.measure(quick=args.quick)
    if "switching" in args.sections:
        log(f"switching (its own proxies; cold starts of {sizes.switch_load_delay:g} s)")
        results["sections"]["switching"] = switching.switching(bench, workdir)
    try:
        proxy = bytes_proxy = nginx = relay = litellm = routed = None
        if sim_sections:
            proxy = Proxy(workdir, "proxy")
            started.append(proxy)
            proxy.start()
        if sim_sections and "routed" in wanted:
            routed = Proxy(workdir, "proxy-routed", config=routed_config(workdir, args.token_delay))
            started.append(routed)
            routed.start()
        if byte_sections:
            bytes_proxy = Proxy(workdir, "proxy-bytes", vllm_command=upstream_command())
            started.append(bytes_proxy)
            bytes_proxy.start()
        upstreams = {}
        if proxy:
            upstreams["sim"] = proxy.vllm_port
        if bytes_proxy and "memory" in byte_sections:
            upstreams["bytes"] = bytes_proxy.vllm_port
        if "relay" in wanted and upstreams:
            relay = Relay(workdir, upstreams)
            started.append(relay)
            relay.start()
        if "nginx" in wanted and upstreams:
            nginx = Nginx(workdir, upstreams)
            started.append(nginx)
            nginx.start()
        if "litellm" in wanted and proxy:
            litellm = LiteLLM(workdir, proxy.vllm_port, MODEL)
            log("  starting LiteLLM (slow)")
            try:
                litellm.start()
                started.append(litellm)
            except RuntimeError as exc:
                bench.notes.append(f"LiteLLM did not start, skipped: {exc}")
                litellm.stop()
                litellm = None
        if proxy:
            targets = [Target("direct", proxy.vllm_port), Target("proxy", proxy.port, proxy.cpu_pids)]
            if relay:
                targets.append(Target("relay", relay.port("sim"), relay.cpu_pids))
            if nginx:
                targets.append(Target("nginx", nginx.port("sim"), nginx.cpu_pids))
            if litellm:
                targets.append(Target("litellm", litellm.port, litellm.cpu_pids, slow=True))
            if routed:
                targets.append(Target("routed", routed.port, routed.cpu_pids))
            if "latency" in sim_sections or "throughput" in sim_sections:
                proxy.switch(f"{MODEL} {SIM_FLAGS}")
                if routed:
                    routed.switch(f"{MODEL}-routed")
                upstream = proxy.upstream_pids()
                if "latency" in sim_sections:
                    log("latency")
                    results["sections"]["latency"] = sections.latency(bench, targets)
                if "throughput" in sim_sections:
                    log("throughput")
                    results["sections"]["throughput"] = sections.throughput(bench, targets, lambda: upstream)
            if "streaming" in sim_sections:
                proxy.switch(f"{MODEL} {SIM_FLAGS} --sim-token-delay {args.token_delay:g}")
                if routed:
                    routed.switch(f"{MODEL}-routed-paced")
                paced_upstream = proxy.upstream_pids()
                log("streaming")
                results["sections"]["streaming"] = sections.streaming(
                    bench, targets, lambda: paced_upstream, args.token_delay
                )
        if bytes_proxy:
            bytes_proxy.switch("bench-bytes --ready-delay 0.05")
            if "memory" in byte_sections:
                log("memory")
                byte_targets = [
                    Target("direct", bytes_proxy.vllm_port),
                    Target("proxy", bytes_proxy.port, bytes_proxy.cpu_pids),
                ]
                if relay:
                    byte_targets.append(Target("relay", relay.port("bytes"), relay.cpu_pids))
                if nginx:
                    byte_targets.append(Target("nginx", nginx.port("bytes"), nginx.cpu_pids))
                results["sections"]["memory"] = sections.memory(bench, byte_targets)
            if "readiness" in byte_sections:
                log("readiness")
                results["sections"]["readiness"] = sections.readiness(bench, bytes_proxy)
    finally:
        for thing in reversed(started):
            thing.stop()
        loop.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            results["workdir"] = None
    if profiler:
        results["profile"] = profiler.summary()
    results["loadavg_end"] = loadavg()
    results["seconds"] = round(time.monotonic() - began, 1)
    measured = {name for row in rows(results) for name, value in row[1].items() if value is not None}
    names = [n for n in TARGETS if n in measured or n in ("direct", "proxy")]
    text = table(results, names)
    results["table"] = text.splitlines()
    failed = [r[0].strip() for r in rows(results) if r[3] is False]
    results["proxy_missed"] = failed
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))
    m = results["machine"]
    print(
        f"\naic-vllm-proxy benchmark ({results['mode']}, {results['seconds']} s) on {m.get('cpus')} x "
        f"{m.get('cpu', '?')}, Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}; "
        f"load average {results['loadavg_start']} -> {results['loadavg_end']}; proxy at {m.get('commit')}"
    )
    if args.quick:
        print("quick mode: tiny sizes, the figures only show that every section runs")
    print(text)
    for note in bench.notes:
        print(f"note: {note}")
    if profiler and results.get("profile"):
        prof = results["profile"]
        print(f"\nprofile of the proxy ({prof['samples']} samples; files in {args.profile}):")
        for label in ("own", "inclusive"):
            print(f"  top by {label} samples:")
            for pct, frame in prof[label][:15]:
                print(f"    {pct:5.1f}%  {frame}")
    print(f"JSON: {args.json}")
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
