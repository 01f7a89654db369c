"""Command line of the simulator: ``vllm serve``'s (every real flag, see ``vllm_flags``)
plus ``--sim-*`` options that pick timings and failure modes.

Like vLLM, the simulator first "imports" (``--sim-import-delay``, read from argv
before parsing) and only then parses its arguments, so a bad flag fails after the
import delay with argparse's usage on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from aic_vllm_proxy.vllm_flags import FLAGS, normalize_argv

from . import VLLM_VERSION

SUBCOMMANDS = (
    "chat",
    "complete",
    "serve",
    "launch",
    "bench",
    "collect-env",
    "download-kernels",
    "preload",
    "run-batch",
    "snapshot",
)
_SENSITIVE = frozenset({"api_key", "hf_token"})


def human_int(value: str) -> int:
    """vLLM's human-readable integers: ``4096``, ``32k`` (x1000), ``1.5K`` (x1024)."""
    text = value.strip()
    factors = {"k": 1000, "m": 1000**2, "g": 1000**3, "K": 1024, "M": 1024**2, "G": 1024**3}
    try:
        if text and text[-1] in factors:
            return int(float(text[:-1]) * factors[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}") from None


def seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def gib(value: str) -> float:
    """A size in GiB (>= 0)."""
    return seconds(value)


# Options whose --help default ("None") does not tell their type.
_TYPES: dict[str, Callable[[str], Any]] = {
    "max_model_len": human_int,
    "max_num_batched_tokens": human_int,
    "kv_cache_memory_bytes": human_int,
    "max_num_seqs": int,
    "api_server_count": int,
    "block_size": int,
}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    for names, kind, choices, default_text in FLAGS:
        options = names.split()
        default = _literal(default_text)
        kwargs: dict[str, Any] = {"default": default}
        if kind == "flag":
            kwargs["action"] = "store_true"
        elif kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            dest = options[0].lstrip("-").replace("-", "_")
            value_type = _TYPES.get(dest)
            if value_type is None and type(default) in (int, float):
                value_type = type(default)
            if value_type is not None:
                kwargs["type"] = value_type
            if choices:
                kwargs["choices"] = list(choices)
            if kind == "optional":
                kwargs.update(nargs="?", const=True)
            elif kind == "list":
                kwargs["nargs"] = "+"
            elif kind == "list0":
                kwargs["nargs"] = "*"
        parser.add_argument(*options, **kwargs)


def _add_sim_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Simulator", "Options of the simulator only.")
    add = group.add_argument
    add(
        "--sim-import-delay",
        type=seconds,
        default=0.2,
        metavar="S",
        help="Seconds spent 'importing' before the arguments are parsed.",
    )
    add(
        "--sim-load-delay",
        type=seconds,
        default=0.5,
        metavar="S",
        help="Seconds of 'weight loading' in the engine; the port listens only after.",
    )
    add(
        "--sim-fail-during-load",
        action="store_true",
        help="The engine fails (CUDA out of memory) while loading; exit status 1.",
    )
    add(
        "--sim-never-ready",
        action="store_true",
        help="The engine never finishes loading; the port never listens.",
    )
    add("--sim-ignore-sigterm", action="store_true", help="The API server and the engine ignore SIGTERM.")
    add(
        "--sim-crash-on-request",
        type=int,
        default=None,
        metavar="N",
        help="The engine dies while serving the N-th generation request (mid-stream).",
    )
    add(
        "--sim-engine-die-after",
        type=seconds,
        default=None,
        metavar="S",
        help="The engine dies S seconds after it is ready.",
    )
    add("--sim-token-delay", type=seconds, default=0.0, metavar="S", help="Seconds between generated tokens.")
    add(
        "--sim-ttft",
        type=seconds,
        default=0.0,
        metavar="S",
        help="Extra seconds before the first generated token (prefill).",
    )
    add(
        "--sim-exit-code",
        type=int,
        default=0,
        metavar="N",
        help="Exit status after an engine death (vLLM: 0).",
    )
    add(
        "--sim-dead-exit-delay",
        type=seconds,
        default=0.5,
        metavar="S",
        help="Seconds between an engine death (/health answers 503) and the exit.",
    )
    add(
        "--sim-abort-stream",
        choices=["cut", "error"],
        default="error",
        help="How in-flight streams end on engine death or abort-mode shutdown: 'cut' "
        "closes the connection without data: [DONE]; 'error' sends vLLM's error event "
        "then data: [DONE] (what vLLM 0.32 does).",
    )
    add(
        "--sim-startup-bind-fail",
        action="store_true",
        help="Fail at start-up as if the port were in use (OSError, exit status 1).",
    )
    add(
        "--sim-default-max-tokens",
        type=int,
        default=16,
        metavar="N",
        help="max_tokens of a request that gives none (vLLM: the rest of the context).",
    )
    add("--sim-embedding-dim", type=int, default=384, metavar="N", help="Size of /v1/embeddings vectors.")
    # Sleep mode (the routes exist only with VLLM_SERVER_DEV_MODE=1, as in vLLM).
    add(
        "--sim-weights-gib",
        type=gib,
        default=1.12,
        metavar="G",
        help="GiB of weights per GPU: the 'Model loading took G GiB memory' line and the "
        "simulated GPU memory.",
    )
    add(
        "--sim-kv-cache-gib",
        type=gib,
        default=61.37,
        metavar="G",
        help="GiB of KV cache per GPU ('Available KV cache memory'), in the simulated GPU memory.",
    )
    add(
        "--sim-sleep-delay",
        type=seconds,
        default=0.1,
        metavar="S",
        help="Seconds a /sleep of level 1 or 2 takes.",
    )
    add("--sim-wake-delay", type=seconds, default=0.05, metavar="S", help="Seconds a /wake_up takes.")
    add(
        "--sim-reload-delay",
        type=seconds,
        default=0.2,
        metavar="S",
        help="Seconds a /collective_rpc reload_weights takes.",
    )
    add(
        "--sim-sleep-keeps-memory",
        action="store_true",
        help="Sleep releases no simulated GPU memory (the vLLM bug of memory left allocated).",
    )
    add(
        "--sim-wake-fails",
        action="store_true",
        help="/wake_up fails as vLLM does when waking raises (500, the engine stays asleep).",
    )
    add("--sim-wake-hangs", action="store_true", help="/wake_up never answers (nor does any later dev call).")


@lru_cache(maxsize=1)
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm", description="vLLM CLI (simulator)")
    parser.add_argument("-v", "--version", action="version", version=VLLM_VERSION)
    subparsers = parser.add_subparsers(dest="subparser", required=True)
    for name in SUBCOMMANDS:
        if name != "serve":
            subparsers.add_parser(name, add_help=False)
            continue
        serve = subparsers.add_parser(
            "serve",
            usage="vllm serve [model_tag] [options]",
            description="Launch a local OpenAI-compatible API server (simulated).",
        )
        serve.add_argument("model_tag", nargs="?", default=None, help="The model tag to serve.")
        _add_vllm_flags(serve)
        _add_sim_flags(serve)
    return parser


class ServeArgsError(ValueError):
    """vLLM's ``ValueError`` for a serve command line it refuses before argparse."""


def _model_first(args: list[str], warn: Callable[[str], None]) -> list[str]:
    """``vllm serve ... --model M ...`` becomes ``vllm serve M ...`` (with a warning);
    ``--served-model-name`` needs the model as the first argument."""
    if not args or args[0] != "serve":
        return args
    index = next((i for i, a in enumerate(args) if re.match(r"^--model(=.+|$)", a)), None)
    if index is not None:
        warn(
            "With `vllm serve`, you should provide the model as a positional argument or in "
            "a config file instead of via the `--model` option. The `--model` option will be "
            "removed in a future version."
        )
        if args[index] == "--model":
            tag, rest = args[index + 1 : index + 2], args[index + 2 :]
        else:
            tag, rest = [args[index].removeprefix("--model=")], args[index + 1 :]
        args = ["serve", *tag, *args[1:index], *rest]
    if (
        len(args) > 1
        and args[1].startswith("-")
        and not any(re.match(r"^--config(=.+|$)", a) for a in args)
        and any(re.match(r"^--served[-_]model[-_]name(=.+|$)", a) for a in args)
    ):
        raise ServeArgsError(
            "`model` should be provided as the first positional argument when using "
            "`vllm serve`. i.e. `vllm serve <model> --<arg> <value>`."
        )
    return args


def parse_args(argv: Sequence[str], warn: Callable[[str], None] | None = None) -> argparse.Namespace:
    """Parse argv (without the program name) as ``vllm`` does: argparse errors exit
    with status 2, ``ServeArgsError`` is raised for what vLLM rejects before."""
    parser = build_parser()
    args = _model_first(list(argv), warn or (lambda message: None))
    namespace = parser.parse_args(normalize_argv(args))
    if namespace.subparser != "serve":
        parser.exit(2, f"vllm {namespace.subparser}: not available in the simulator\n")
    if namespace.model_tag is not None:
        namespace.model = namespace.model_tag
    return namespace


def non_default_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``non-default args`` dict vLLM logs at start-up (secrets as ``'***'``)."""
    defaults = vars(build_parser().parse_args(["serve"]))
    return {
        key: "***" if key in _SENSITIVE else value
        for key, value in vars(args).items()
        if key != "subparser" and defaults.get(key) != value
    }


def prescan_float(argv: Sequence[str], flag: str, default: float) -> float:
    """Read one float option before argparse runs (for the import delay)."""
    value: str | None = None
    args = normalize_argv(argv)
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    time.sleep(prescan_float(argv, "--sim-import-delay", 0.2))  # "import torch, vllm"
    from .logfmt import PY_SITE, STDERR, STDOUT, traceback_text, vllm_line, write_fd

    try:
        args = parse_args(
            argv, lambda msg: write_fd(STDOUT, vllm_line("WARNING", "argparse_utils.py:296", msg))
        )
    except ServeArgsError as exc:
        frames = [
            ("/usr/local/bin/vllm", 8, "<module>", "sys.exit(main())"),
            (f"{PY_SITE}/vllm/entrypoints/cli/main.py", 112, "main", "args = parser.parse_args()"),
            (f"{PY_SITE}/vllm/utils/argparse_utils.py", 326, "parse_args", "raise ValueError("),
        ]
        write_fd(STDERR, traceback_text(frames, f"ValueError: {exc}") + "\n")
        return 1
    from .runner import run

    return run(args)
