"""Plugins "installed" for a test, the way entry points are found, without touching the venv.

A real ``pip install`` would make every proxy of the test session load the plugin. Instead a
test writes a site folder: a ``NAME-VERSION.dist-info`` (``METADATA`` + ``entry_points.txt``)
per distribution, next to symlinks to the plugin's modules, and puts that folder

- on ``sys.path`` for a proxy app in this process (:func:`on_sys_path`, undone afterwards), or
- on ``PYTHONPATH`` for a daemon subprocess (``spawn_proxy(..., env={"PYTHONPATH": str(site)})``).

``importlib.metadata`` then finds the entry points exactly as it finds an installed wheel's.
The plugin folders themselves never go on the path: a local build leaves ``*.egg-info`` there,
which would register the plugin for everyone.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aic_vllm_proxy.hooks import ENTRY_POINT_GROUP

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
#: The first-party plugins and the example, by plugin (entry-point) name.
PLUGIN_DIRS = {
    "gpu-guard": REPO / "plugins" / "gpu-guard",
    "warmup": REPO / "plugins" / "warmup",
    "notify": REPO / "plugins" / "notify",
    "site-hooks": REPO / "examples" / "site_hooks",
}


@dataclass(frozen=True)
class Dist:
    """One distribution: its name and version, its entry points, and its modules
    ({import name: package folder or module file})."""

    name: str
    version: str
    entry_points: dict[str, str]
    modules: dict[str, Path] = field(default_factory=dict)


def from_pyproject(folder: Path) -> Dist:
    """The distribution a ``pyproject.toml`` (setuptools) describes."""
    data = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))
    project = data["project"]
    setuptools = data.get("tool", {}).get("setuptools", {})
    modules = {name: folder / name for name in setuptools.get("packages", [])}
    modules.update({name: folder / f"{name}.py" for name in setuptools.get("py-modules", [])})
    return Dist(
        name=project["name"],
        version=project["version"],
        entry_points=dict(project["entry-points"][ENTRY_POINT_GROUP]),
        modules=modules,
    )


def plugin(name: str) -> Dist:
    """A first-party plugin or the example, by its entry-point name."""
    return from_pyproject(PLUGIN_DIRS[name])


def write_site(root: Path, *dists: Dist) -> Path:
    """Lay out ``dists`` in ``root`` as an installer would (metadata + importable modules)."""
    root.mkdir(parents=True, exist_ok=True)
    for dist in dists:
        info = root / f"{re.sub(r'[-_.]+', '_', dist.name)}-{dist.version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.name}\nVersion: {dist.version}\n")
        lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in dist.entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for name, source in dist.modules.items():
            (root / source.name).symlink_to(source, target_is_directory=source.is_dir())
            assert source.name.removesuffix(".py") == name
    return root


def top_level_modules(*dists: Dist) -> set[str]:
    return {name for dist in dists for name in dist.modules}


@contextlib.contextmanager
def on_sys_path(root: Path, modules: set[str]) -> Iterator[None]:
    """``root`` first on ``sys.path`` with fresh imports of ``modules``; everything as before
    afterwards (``sys.path``, ``sys.modules``, the import and metadata caches)."""

    def ours(name: str) -> bool:
        return name.split(".")[0] in modules

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()  # also forgets importlib.metadata's view of sys.path
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(root))
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
        importlib.invalidate_caches()
