#!/usr/bin/env python3
"""The check behind ``scripts/gpu-check.sh`` (read its header first): parking and waking two models
with vLLM's sleep mode, end to end through ``python -m aic_vllm_proxy serve``.

Run by the shell script with the python of vLLM's environment (where the project is installed);
only the standard library and the project's own modules are used. It writes the catalogue,
starts the proxy in a process group of its own, drives it over HTTP (urllib), measures, prints
the timings table, stops everything it started, and writes the summary line to ``--summary``
(the shell script prints it last). Every process group it learns of (the proxy's, each vLLM
instance's) is appended to ``--groups`` as soon as it is known, so that the shell script can
kill what is left if this process itself is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aic_vllm_proxy.engine import gpumem
from aic_vllm_proxy.engine.procgroup import group_alive, group_members, kill_group

GIB = 1024**3
MIB = 1024**2
NAMES = ("tiny-a", "tiny-b")
#: Tokens asked of the woken model (with ``ignore_eos``: exactly this many come back).
MAX_TOKENS = 8


class CheckFailed(Exception):
    """The check failed; the message is the summary line's reason."""


class Deadline:
    """The global deadline: every wait is bounded by what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def left(self, cap: float | None = None) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise CheckFailed("the global deadline passed (AIC_GPU_CHECK_DEADLINE)")
        return left if cap is None else min(cap, left)


@dataclass
class Row:
    step: str
    wall: float
    load_seconds: float | None = None
    wake_seconds: float | None = None
    total_seconds: float | None = None
    woke: bool | None = None
    note: str = ""

    @classmethod
    def of(cls, step: str, wall: float, answer: dict[str, Any]) -> Row:
        """A row with the figures of a ``/load`` or ``/switch`` answer."""
        return cls(
            step,
            wall,
            load_seconds=answer.get("load_seconds"),
            wake_seconds=answer.get("wake_seconds"),
            total_seconds=answer.get("total_seconds"),
            woke=bool(answer.get("woke")),
        )


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        say(f"{row.step}: {row.wall:.1f} s" + (f" ({row.note})" if row.note else ""))
        return row

    def table(self) -> str:
        def cell(value: float | bool | None) -> str:
            if value is None:
                return "-"
            if isinstance(value, bool):
                return "yes" if value else "no"
            return f"{value:.2f}"

        head = ("step", "wall s", "load_seconds", "wake_seconds", "total_seconds", "woke", "note")
        body = [
            (
                r.step,
                f"{r.wall:.2f}",
                cell(r.load_seconds),
                cell(r.wake_seconds),
                cell(r.total_seconds),
                cell(r.woke),
                r.note,
            )
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
        lines = [
            "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
            for line in [head, *body]
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)


def say(text: str) -> None:
    print(f"[gpu-check] {text}", flush=True)


# ------------------------------------------------------------------------------ GPU memory


class Memory:
    """GPU memory held by a process group: ``nvidia-smi`` (per process, then per GPU when the
    processes are not visible, as in a container with its own pid namespace), or, in tests, the
    simulator's state files (``AIC_VLLM_SIM_GPU_STATE``) through the proxy's own reader."""

    def __init__(self, gpu: str) -> None:
        self.gpu = gpu
        self.sim = bool(os.environ.get(gpumem.SIM_STATE_ENV))
        self.smi = shutil.which("nvidia-smi")
        self.source = "simulator state files" if self.sim else "nvidia-smi" if self.smi else "none"

    def _smi(self, *query: str) -> list[list[str]]:
        assert self.smi is not None
        command = [self.smi, *query, "--format=csv,noheader,nounits"]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise CheckFailed(f"{shlex.join(command)} failed: {exc}") from exc
        return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]

    def group(self, pgid: int) -> int | None:
        """Bytes the group's processes hold on all GPUs (None: cannot tell)."""
        pids = set(group_members(pgid)) | {pgid}
        if self.sim:
            return gpumem.held_by(pids)
        if not self.smi:
            return None
        held = 0
        for row in self._smi("--query-compute-apps=pid,used_memory"):
            with contextlib.suppress(ValueError, IndexError):
                if int(row[0]) in pids:
                    held += int(float(row[1]) * MIB)
        return held

    def gpu_used(self) -> int | None:
        """Bytes used on the check's GPU (all processes; None: cannot tell)."""
        if self.sim or not self.smi:
            return None
        for row in self._smi("--query-gpu=index,uuid,memory.used"):
            if self.gpu in row[:2]:
                with contextlib.suppress(ValueError, IndexError):
                    return int(float(row[2]) * MIB)
        return None

    def describe_gpu(self) -> str:
        if self.sim:
            return f"simulated GPU {self.gpu} ({gpumem.SIM_STATE_ENV})"
        if not self.smi:
            return "no nvidia-smi"
        for row in self._smi("--query-gpu=index,uuid,name,memory.total,memory.used"):
            if self.gpu in row[:2]:
                total, used = float(row[3]) / 1024, float(row[4]) / 1024
                return f"GPU {row[0]} {row[2]}, {total:.1f} GiB, {used:.1f} GiB used"
        return f"GPU {self.gpu} (not listed by nvidia-smi)"


def gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f}"


# ------------------------------------------------------------------------------ the proxy


class Proxy:
    """``python -m aic_vllm_proxy serve`` in a process group of its own, driven over HTTP."""

    def __init__(self, args: argparse.Namespace, catalogue: Path, deadline: Deadline) -> None:
        self.deadline = deadline
        self.groups_file = Path(args.groups)
        self.groups: set[int] = set()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = Path(args.workdir) / "proxy.out"
        command = [
            sys.executable, "-m", "aic_vllm_proxy", "serve",
            "--config", str(catalogue), "--host", "127.0.0.1", "--port", str(self.port),
            "--vllm-port", str(free_port()), "--gpus", args.gpu,
            "--log-dir", str(Path(args.workdir) / "logs"), "--vllm-command", args.vllm_command,
            "--ready-timeout", str(int(args.deadline)), "--stop-timeout", "10",
        ]  # fmt: skip
        say("starting: " + shlex.join(command))
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                command,
                cwd=args.workdir,  # not the repository: the project is imported as installed
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.remember(self.process.pid)

    def remember(self, pgid: int | None) -> None:
        if pgid and pgid not in self.groups:
            self.groups.add(pgid)
            with open(self.groups_file, "a") as handle:
                handle.write(f"{pgid}\n")

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, cap: float = 600
    ) -> tuple[int, Any]:
        """One HTTP call: (status, parsed JSON body or text). Bounded by the deadline."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.deadline.left(cap)) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (OSError, TimeoutError) as exc:
            what = f"{method} {path}" + (f" {json.dumps(body)}" if body else "")
            if self.deadline.expired():
                raise CheckFailed(
                    f"{what}: no answer before the global deadline (AIC_GPU_CHECK_DEADLINE)"
                ) from exc
            raise CheckFailed(f"{what}: {exc}") from exc
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def wait_up(self) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise CheckFailed(f"the proxy exited ({self.process.returncode}):\n{self.tail()}")
            with contextlib.suppress(CheckFailed):
                return self.call("GET", "/proxy/health", cap=5)[0] == 200
            return False

        poll(up, self.deadline, 60, "the proxy to answer /proxy/health")

    def instances(self) -> dict[str, dict[str, Any]]:
        status, body = self.call("GET", "/status", cap=30)
        if status != 200 or not isinstance(body, dict):
            raise CheckFailed(f"GET /status answered {status}: {body}")
        found = {item["name"]: item for item in body.get("instances", [])}
        for item in found.values():
            self.remember(item.get("pid"))
        return found

    def instance(self, name: str, state: str, timeout: float = 60) -> dict[str, Any]:
        """``name``'s entry of /status once it is in ``state``; fails with its error if it
        settles in another state (stopped, failed) or the wait runs out."""
        seen: dict[str, Any] = {}

        def there() -> bool:
            nonlocal seen
            seen = self.instances().get(name, {})
            if seen.get("state") in ("stopped", "failed") and state not in ("stopped", "failed"):
                raise CheckFailed(
                    f"{name} is {seen['state']}, not {state}: {seen.get('error') or 'no error given'}"
                )
            return seen.get("state") == state

        poll(there, self.deadline, timeout, f"{name} to be {state}")
        return seen

    def stop(self) -> None:
        """SIGTERM the proxy (it stops its vLLM instances), then kill every group left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        for pgid in sorted(self.groups):
            if group_alive(pgid):
                say(f"process group {pgid} still alive after the proxy stopped: killing it")
                kill_group(pgid, grace=5)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll(done: Callable[[], bool], deadline: Deadline, timeout: float, what: str) -> None:
    end = time.monotonic() + deadline.left(timeout)
    while not done():
        if deadline.expired():
            raise CheckFailed(f"the global deadline (AIC_GPU_CHECK_DEADLINE) passed waiting for {what}")
        if time.monotonic() >= end:
            raise CheckFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


# ------------------------------------------------------------------------------ the check


def write_catalogue(path: Path, models: tuple[str, str], args: argparse.Namespace) -> None:
    entries = []
    for name, model in zip(NAMES, models, strict=True):
        entries.append(
            f"[models.{name}]\n"
            f"model = {json.dumps(model)}\n"
            f"args = {json.dumps(args.vllm_args)}\n"
            f"gpus = [{json.dumps(args.gpu)}]\n"
            f"gpu_memory_utilization = {args.utilization}\n"
            "sleep = 1\n"
        )
    path.write_text("\n".join(entries))


def timed_post(proxy: Proxy, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    status, answer = proxy.call("POST", path, body)
    wall = time.monotonic() - started
    if status != 200 or not isinstance(answer, dict):
        raise CheckFailed(f"POST {path} {json.dumps(body)} answered {status}: {str(answer)[:600]}")
    return wall, answer


def load(proxy: Proxy, report: Report, name: str, step: str, *, woke: bool) -> dict[str, Any]:
    wall, answer = timed_post(proxy, "/load", {"model": name})
    proxy.remember(answer.get("instance", {}).get("pid"))
    if bool(answer.get("woke")) != woke:
        said = f"woke is {answer.get('woke')}, expected {woke}"
        raise CheckFailed(f"POST /load {name}: {said} ({answer.get('message')})")
    report.add(Row.of(step, wall, answer))
    return answer


def switch(proxy: Proxy, report: Report, name: str, other: str) -> None:
    wall, answer = timed_post(proxy, "/switch", {"model_spec": name})
    proxy.remember((answer.get("status") or {}).get("pid"))
    if not answer.get("woke"):
        said = f"woke: {answer.get('woke')}; {answer.get('message')}"
        raise CheckFailed(f"POST /switch {name} did not wake it ({said})")
    report.add(Row.of(f"wake {name} by /switch", wall, answer))
    proxy.instance(name, "ready")
    proxy.instance(other, "sleeping")


def complete(proxy: Proxy, name: str) -> tuple[float, str]:
    """A completion naming ``name`` (it wakes it): wall time and text; checks the answer."""
    body = {"model": name, "prompt": "Hello, my name is", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    started = time.monotonic()
    status, answer = proxy.call("POST", "/v1/completions", body)
    wall = time.monotonic() - started
    if status != 200 or not isinstance(answer, dict):
        raise CheckFailed(f"the completion for {name} answered {status}: {str(answer)[:600]}")
    choices = answer.get("choices") or [{}]
    text, tokens = choices[0].get("text"), (answer.get("usage") or {}).get("completion_tokens")
    if not isinstance(text, str) or tokens != MAX_TOKENS:
        raise CheckFailed(f"the completion for {name} is not {MAX_TOKENS} tokens: {str(answer)[:600]}")
    return wall, text


def released(memory: Memory, name: str, awake: int | None, asleep: int | None) -> str:
    """Compare a sleeper's GPU memory with its awake figure (the proxy's own rule, gpumem)."""
    if not awake:
        return f"{name}: not measured ({memory.source} shows no memory for its processes)"
    if asleep is None or not gpumem.released(awake, asleep):
        raise CheckFailed(
            f"GPU memory not released by the sleep of {name}: {gib(awake)} GiB awake, "
            f"{gib(asleep)} GiB asleep ({memory.source})"
        )
    return f"{name}: {gib(awake)} -> {gib(asleep)} GiB ({memory.source})"


def run(args: argparse.Namespace, report: Report, proxy: Proxy, memory: Memory) -> str:
    a, b = NAMES
    started = time.monotonic()
    proxy.wait_up()
    report.add(Row("proxy start", time.monotonic() - started))

    baseline = memory.gpu_used()
    cold_a = load(proxy, report, a, f"cold load {a}", woke=False)
    pid_a = int(cold_a["instance"]["pid"])
    awake_a, gpu_with_a = memory.group(pid_a), memory.gpu_used()

    cold_b = load(proxy, report, b, f"cold load {b} (parks {a})", woke=False)
    pid_b = int(cold_b["instance"]["pid"])
    slept = proxy.instance(a, "sleeping")
    if slept.get("pid") != pid_a:
        raise CheckFailed(f"{a} sleeps in another process ({slept.get('pid')}, was {pid_a})")
    if cold_b.get("total_seconds") is not None and cold_b.get("load_seconds") is not None:
        parked = cold_b["total_seconds"] - cold_b["load_seconds"]
        report.add(Row(f"park {a} (within the load of {b})", parked, note="total - load"))
    asleep_a, awake_b = memory.group(pid_a), memory.group(pid_b)
    if not awake_a and baseline is not None and gpu_with_a is not None:
        # The processes are not visible (a pid namespace): estimate from the GPU's totals. Now
        # the GPU holds A asleep and B awake, and B (the same model, the same share) holds
        # about what A held awake: A asleep is about what the GPU holds beyond that.
        used = memory.gpu_used()
        if used is not None:
            awake_a, asleep_a = gpu_with_a - baseline, max(0, used - gpu_with_a)
            report.notes.append("memory of tiny-a estimated from the GPU's totals (processes not visible)")
    report.notes.append("memory " + released(memory, a, awake_a, asleep_a))

    wall, text = complete(proxy, a)
    report.add(Row(f"wake {a} by a request", wall, note=f"{MAX_TOKENS} tokens: {text[:40]!r}"))
    woken = proxy.instance(a, "ready")
    if woken.get("pid") != pid_a:
        raise CheckFailed(f"{a} was started again (pid {woken.get('pid')}), not woken (pid {pid_a})")
    proxy.instance(b, "sleeping")
    report.notes.append("memory " + released(memory, b, awake_b, memory.group(pid_b)))

    wake_b = load(proxy, report, b, f"wake {b} by /load", woke=True)
    proxy.instance(a, "sleeping")

    if args.switch:
        switch(proxy, report, a, b)
        switch(proxy, report, b, a)
    else:
        report.notes.append("/switch not checked (AIC_GPU_CHECK_SWITCH=0)")

    # vLLM's own figures where the answers have them: its cold start against its wake.
    cold = cold_a.get("load_seconds") or report.rows[1].wall
    wake = wake_b.get("wake_seconds") or wake_b.get("total_seconds") or report.rows[-1].wall
    memory_text = (
        f"memory released {gib(awake_a)} -> {gib(asleep_a)} GiB" if awake_a else "memory not measured"
    )
    return f"cold {cold:.1f} s, wake {wake:.1f} s, {memory_text}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gpu-check.sh's check (run it through the shell script)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--summary", required=True, help="file for the summary line")
    parser.add_argument("--groups", required=True, help="file the process groups started are appended to")
    parser.add_argument("--deadline", type=float, required=True, help="seconds for the whole check")
    parser.add_argument("--gpu", required=True)
    parser.add_argument("--utilization", type=float, required=True)
    parser.add_argument("--vllm-command", required=True)
    parser.add_argument("--vllm-args", default="")
    parser.add_argument("--model", action="append", default=[], help="model A, then model B")
    parser.add_argument("--no-switch", dest="switch", action="store_false")
    args = parser.parse_args(argv)

    deadline = Deadline(args.deadline)
    signal.signal(signal.SIGTERM, interrupted)
    workdir = Path(args.workdir)
    catalogue = workdir / "catalogue.toml"
    write_catalogue(catalogue, (args.model[0], args.model[1]), args)
    report = Report()
    proxy: Proxy | None = None
    outcome = "FAIL the check did not finish"
    try:
        memory = Memory(args.gpu)
        say(f"{memory.describe_gpu()}; memory read from {memory.source}")
        proxy = Proxy(args, catalogue, deadline)
        outcome = "PASS (" + run(args, report, proxy, memory) + ")"
    except CheckFailed as exc:
        outcome = f"FAIL {exc}"
    except BaseException as exc:
        outcome = f"FAIL {type(exc).__name__}: {exc}"
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup below runs to its end
        if proxy is not None:
            if not outcome.startswith("PASS"):
                say(f"the proxy's output ({proxy.output}), last lines:\n{proxy.tail()}")
            proxy.stop()
        print("\nTimings\n" + report.table(), flush=True)
        for note in report.notes:
            print("  " + note, flush=True)
        Path(args.summary).write_text(f"gpu-check: {outcome}\n")
    return 0 if outcome.startswith("PASS") else 1


def interrupted(signum: int, frame: object) -> None:
    raise CheckFailed("interrupted (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())
