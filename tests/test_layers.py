"""The package's planes import only downward (docs/architecture.md):

    cli, __main__  ->  web  ->  agent  ->  relay  ->  engine  ->  hooks  ->  base (config, spec,
                          catalog, schemas, errors, vllm_flags, connection_file, node_protocol, ...)

(``agent``, the process run on the other nodes of a model across nodes, imports the engine's
launch code and the base; nothing imports it but the command line.)

The client imports only the base modules it shares with the server (schemas, spec, catalog, the
flag table spec reads, the connection file's format) and its own; the simulator only its own and
the flag table. The base, the hooks and the engine never import ``aiohttp.web``. Every import
counts: inside functions and under ``TYPE_CHECKING`` too. Read from the source (AST), so a lazy
import cannot hide."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aic_vllm_proxy"
ROOT = "aic_vllm_proxy"

BASE = {
    "config",
    "spec",
    "catalog",
    "schemas",
    "errors",
    "vllm_flags",
    "metrics",
    "events",
    "connection_file",
    "node_protocol",
    "",
}
#: Planes from the top down; a plane may import itself and every plane below it.
ORDER = ["top", "web", "agent", "relay", "engine", "hooks", "base"]
#: What the two apart may import besides themselves.
APART = {
    "client": {
        "base:schemas",
        "base:spec",
        "base:catalog",
        "base:vllm_flags",
        "base:connection_file",
        "base:",
    },
    "simulator": {"base:vllm_flags", "base:"},
}
NO_AIOHTTP_WEB = {"engine", "hooks", "base"}


def plane(module: str) -> str:
    """``aic_vllm_proxy.relay.front`` -> ``relay``; base modules -> ``base:NAME``."""
    parts = module.split(".")[1:]
    head = parts[0] if parts else ""
    if head in ("cli", "__main__"):
        return "top"
    if head in BASE:
        return f"base:{head}"
    return head


def level(name: str) -> str:
    return "base" if name.startswith("base:") else name


def allowed(importer: str, imported: str) -> bool:
    src, dst = plane(importer), plane(imported)
    if level(src) in APART:
        return dst == src or dst in APART[src]
    if level(dst) in APART:
        return src == "top" and dst == "client"  # the CLI runs the client's commands
    return ORDER.index(level(src)) <= ORDER.index(level(dst))


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            # ``from aic_vllm_proxy import engine`` imports a plane: count each name.
            if base == ROOT:
                found += [(node.lineno, f"{ROOT}.{a.name}") for a in node.names if not a.name.startswith("_")]
    return found


def violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        importer = module_name(path)
        for line, imported in imports_of(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if imported == ROOT or imported.startswith(ROOT + "."):
                if not allowed(importer, imported):
                    bad.append(f"{where}: {plane(importer)} imports {imported} ({plane(imported)})")
            elif level(plane(importer)) in NO_AIOHTTP_WEB and (
                imported == "aiohttp.web" or imported.startswith("aiohttp.web_")
            ):
                bad.append(f"{where}: {plane(importer)} imports {imported}")
    for path in files:  # ``from aiohttp import web`` names the submodule as an alias
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if level(plane(module_name(path))) not in NO_AIOHTTP_WEB:
            continue
        for node in ast.walk(tree):
            names = [alias.name for alias in node.names] if isinstance(node, ast.ImportFrom) else []
            if getattr(node, "module", None) == "aiohttp" and any(name.startswith("web") for name in names):
                bad.append(
                    f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}: imports aiohttp.web"
                )
    return bad


def test_planes_import_only_downward() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    assert violations(files) == []


def test_every_module_is_in_a_known_plane() -> None:
    known = set(ORDER) | set(APART)
    for path in PACKAGE.rglob("*.py"):
        assert level(plane(module_name(path))) in known, path


@pytest.mark.parametrize(
    ("where", "source", "complaint"),
    [
        ("engine/up.py", "from aic_vllm_proxy.relay import front\n", "engine imports aic_vllm_proxy.relay"),
        ("relay/upward.py", "def f():\n    from aic_vllm_proxy.web.control import routes\n", "relay imports"),
        ("spec.py", "from aic_vllm_proxy.engine.state import S\n", "base:spec imports"),
        ("engine/webby.py", "from aiohttp import web\n", "imports aiohttp.web"),
        ("client/leak.py", "from aic_vllm_proxy.engine import supervisor\n", "client imports"),
        ("hooks/x.py", "from aic_vllm_proxy import engine\n", "hooks imports aic_vllm_proxy.engine"),
        ("web/sim.py", "from aic_vllm_proxy.simulator import cli\n", "web imports aic_vllm_proxy.simulator"),
    ],
)
def test_the_rule_sees_an_upward_import(tmp_path: Path, where: str, source: str, complaint: str) -> None:
    """The checker itself: each of these breaks the rule and is reported."""
    global PACKAGE
    fake = tmp_path / ROOT / where
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    saved, PACKAGE = PACKAGE, tmp_path / ROOT
    try:
        found = violations([fake])
    finally:
        PACKAGE = saved
    assert len(found) == 1 and complaint in found[0], found
