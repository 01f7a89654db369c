#!/usr/bin/env python3
"""Write a LiteLLM proxy config that puts several aic-vllm-proxy daemons behind one URL.

Each daemon (one per node, each started by its own SLURM job) writes a connection file with its
``url`` and admin ``key`` (docs/cluster.md, "The connection file"). Name each file with the models
its daemon serves (catalogue entries or aliases, as a client names them)::

    python make_litellm_config.py --out litellm.yaml --env-file router.env \\
        ~/.aic-vllm-proxy/jobs/123456.json=qwen-7b,llama-8b \\
        ~/.aic-vllm-proxy/jobs/123457.json=qwen-7b

``litellm.yaml`` gets one ``model_list`` entry per (daemon, model): the same model on two
daemons is load-balanced, different models are routed by the request's ``model``. The keys are
not in it: each entry reads its daemon's key from a variable (``os.environ/AIC_VLLM_PROXY_KEY_<n>``,
n = the file's place on the command line), and ``router.env`` (mode 0600) sets those variables
and ``LITELLM_MASTER_KEY``, the key clients give the router (a fresh one, or the one already in
the file). Then::

    set -a; . ./router.env; set +a
    litellm --config litellm.yaml --host 0.0.0.0 --port 4000

Standard library only (the YAML is written by hand: strings as JSON strings, which YAML reads).
docs/router.md has the whole story and the limits.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

#: Seconds the router waits on a daemon (litellm_params timeout and stream_timeout): a request for
#: a model that is not loaded waits on the daemon while it loads (--request-wait-timeout, 600 s by
#: default), then for the answer. Above both, so that the router never cuts a long load.
DEFAULT_TIMEOUT = 1800.0
KEY_VARIABLE = "AIC_VLLM_PROXY_KEY_{}"
MASTER_KEY_VARIABLE = "LITELLM_MASTER_KEY"


def parse_daemon(text: str) -> tuple[Path, list[str]]:
    """``FILE=MODEL[,MODEL...]`` -> (file, models)."""
    path, sep, names = text.rpartition("=")
    models = [name.strip() for name in names.split(",") if name.strip()]
    if not sep or not path or not models:
        raise argparse.ArgumentTypeError(f"expected FILE=MODEL[,MODEL...], got {text!r}")
    return Path(path).expanduser(), models


def read_connection(path: Path) -> tuple[str, str | None]:
    """The daemon's URL and admin key from its connection file."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: cannot read the connection file: {exc}") from None
    url, key = info.get("url") if isinstance(info, dict) else None, None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise SystemExit(f"{path}: no http(s) 'url' in the connection file")
    if isinstance(info.get("key"), str):
        key = info["key"]
    return url.rstrip("/"), key


def _q(text: str) -> str:
    return json.dumps(text)


def render(daemons: list[tuple[Path, list[str], str, str | None]], timeout: float) -> str:
    """The YAML text: one model_list entry per (daemon, model)."""
    lines = [
        "# Written by examples/router/make_litellm_config.py (docs/router.md). One entry per",
        "# (daemon, model): the same model_name twice is load-balanced, different names are routed.",
        "model_list:",
    ]
    for number, (path, models, url, key) in enumerate(daemons, start=1):
        api_key = f"os.environ/{KEY_VARIABLE.format(number)}" if key is not None else "no-key"
        for model in models:
            lines += [
                f"  - model_name: {_q(model)}  # {path.name}",
                "    litellm_params:",
                f"      model: {_q('openai/' + model)}",
                f"      api_base: {_q(url + '/v1')}",
                f"      api_key: {_q(api_key)}",
                f"      timeout: {timeout:g}",
                f"      stream_timeout: {timeout:g}",
            ]
    lines += [
        "router_settings:",
        '  routing_strategy: "simple-shuffle"',
        "  num_retries: 0",
        "litellm_settings:",
        f"  request_timeout: {timeout:g}",
        "general_settings:",
        f"  master_key: {_q('os.environ/' + MASTER_KEY_VARIABLE)}",
        "",
    ]
    return "\n".join(lines)


def _old_master_key(env_file: Path) -> str | None:
    try:
        text = env_file.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == MASTER_KEY_VARIABLE and value.strip():
            return value.strip()
    return None


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600 from the start (it holds keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("daemons", nargs="+", type=parse_daemon, metavar="FILE=MODEL[,MODEL...]")
    parser.add_argument("--out", type=Path, default=Path("litellm.yaml"), help="the config to write")
    parser.add_argument(
        "--env-file", type=Path, default=Path("router.env"), help="the keys' file to write (mode 0600)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds the router waits on a daemon"
    )
    args = parser.parse_args(argv)
    daemons = [(path, models, *read_connection(path)) for path, models in args.daemons]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(daemons, args.timeout))
    master = _old_master_key(args.env_file) or "sk-" + secrets.token_hex(24)
    env = [f"{MASTER_KEY_VARIABLE}={master}"]
    env += [
        f"{KEY_VARIABLE.format(number)}={key}"
        for number, (_, _, _, key) in enumerate(daemons, start=1)
        if key is not None
    ]
    write_private(args.env_file, "\n".join(env) + "\n")
    entries = sum(len(models) for _, models, _, _ in daemons)
    print(
        f"wrote {args.out} ({entries} entries, {len(daemons)} daemons) and {args.env_file}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
