"""Plug-ins: the modules named in ``HARNESS_PLUGINS`` (comma-separated module names, importable
where the harness runs: installed, or on ``PYTHONPATH``) are imported before any study is read,
by the CLI and in every Ray worker that runs a cell (a notebook imports them itself). What they
register (a loss family with ``harness.core.losses.register_loss``, an init scheme with
``harness.core.inits.register_init``, a figure with ``analysis.figures.register_figure``) is then
selectable by name like a built-in one. The same convention as pytest's ``PYTEST_PLUGINS``: the
person running the harness names the code to import; a study file never does (a study file is
data, and reading one runs nothing).
"""
from __future__ import annotations

import importlib
import os
import re

ENV = "HARNESS_PLUGINS"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


class PluginError(ValueError):
    """A module named in HARNESS_PLUGINS that is not a module name or fails to import."""


def names() -> list[str]:
    """The module names in ``HARNESS_PLUGINS``, in order, each once."""
    out = []
    for name in (n.strip() for n in os.environ.get(ENV, "").split(",")):
        if not name:
            continue
        if not _NAME.match(name):
            raise PluginError(f"{ENV}: {name[:80]!r} is not a module name; list dotted module "
                              f"names separated by commas, such as {ENV}=my_losses,lab.inits")
        if name not in out:
            out.append(name)
    return out


def load() -> list[str]:
    """Import every plug-in module (once per process; Python caches them); return their names."""
    loaded = names()
    for name in loaded:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise PluginError(f"{ENV}: cannot import plug-in {name!r} ({e}); install it or put "
                              f"its folder on PYTHONPATH, on every machine that runs cells") from e
    return loaded
