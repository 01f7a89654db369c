"""Make the plugin's package importable without installing it.

The package is loaded from its folder by file location, not by putting ``plugins/notify``
on ``sys.path``: a build leaves ``*.egg-info`` there, whose entry point would then be found by
every proxy the test session starts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE = "aic_vllm_proxy_notify"


def _load(package: str) -> None:
    if package in sys.modules:
        return
    folder = Path(__file__).resolve().parents[1] / package
    spec = importlib.util.spec_from_file_location(
        package, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)


_load(PACKAGE)
