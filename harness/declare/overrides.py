"""``--set`` on a study file (``harness run`` / ``status``): settings changed on the command line.

The overrides are applied to the YAML mapping before it is validated, so an overridden study is
checked exactly as if its file said so, and its cells get the ids of those settings (a rehearsal
at a reduced scale is a study of its own: give it its own ``--results``). What ``--set`` takes:

- ``SECTION.KEY=VALUE`` for the setting sections (``data``, ``teacher``, ``student``, ``eval``)
  and ``resources`` / ``teacher_resources`` (``cpu``, ``gpu``, ``workers``);
- ``grid.AXIS=[...]``: new values for an axis the study already has (e.g. ``grid.seed=[0]``);
- ``init.SCHEME.PARAM=VALUE``: a parameter of every init value of that scheme, in ``init`` and
  in ``grid.init`` (e.g. ``init.mapping_match.steps=20``).

Pure Python (no torch, no Ray).
"""
from __future__ import annotations

import copy

from harness.declare.config import INIT_SCHEMES, ConfigError
from harness.declare.settings import SECTIONS

MAPPINGS = (*SECTIONS, "resources", "teacher_resources")


def apply(raw, overrides: dict | None):
    """A copy of the study mapping ``raw`` with ``overrides`` ({section: {key: value}}, as
    ``cli._overrides`` parses them) applied; ConfigError names a ``--set`` that fits nothing."""
    if not overrides or not isinstance(raw, dict):
        return raw
    out = copy.deepcopy(raw)
    for section, values in overrides.items():
        for key, value in values.items():
            where = f"--set {section}.{key}"
            if section in MAPPINGS:
                body = out.get(section)
                out[section] = {**(body if isinstance(body, dict) else {}), key: value}
            elif section == "grid":
                grid = out.get("grid")
                if not isinstance(grid, dict) or key not in grid:
                    have = ", ".join(map(str, grid)) if isinstance(grid, dict) and grid else "none"
                    raise ConfigError(where, f"the study has no grid axis {key!r} (its axes: "
                                             f"{have}); --set grid.AXIS gives new values to an "
                                             f"existing axis")
                grid[key] = value
            elif section == "init":
                _init_param(out, key, value, where)
            else:
                raise ConfigError(where, f"{section!r} cannot be set on the command line; known: "
                                         f"{', '.join(MAPPINGS)}, grid.AXIS, init.SCHEME.PARAM")
    return out


def _init_param(raw: dict, key: str, value, where: str):
    scheme, _, param = key.partition(".")
    if scheme not in INIT_SCHEMES or param not in INIT_SCHEMES[scheme]:
        known = ", ".join(f"{s}.{p}" for s, params in INIT_SCHEMES.items() for p in params)
        raise ConfigError(where, f"expected init.SCHEME.PARAM with one of {known}")
    places = []
    if "init" in raw:
        places.append((raw, "init"))
    grid = raw.get("grid")
    if isinstance(grid, dict) and isinstance(grid.get("init"), list):
        places += [(grid["init"], i) for i in range(len(grid["init"]))]
    hits = 0
    for holder, index in places:
        item = holder[index]
        if item == scheme:
            holder[index], hits = {scheme: {param: value}}, hits + 1
        elif isinstance(item, dict) and item.get("name") == scheme:
            item[param], hits = value, hits + 1
        elif isinstance(item, dict) and len(item) == 1 and scheme in item:
            params = item[scheme] if isinstance(item[scheme], dict) else {}
            item[scheme], hits = {**params, param: value}, hits + 1
    if not hits:
        raise ConfigError(where, f"no init of the study is {scheme!r}, so there is nothing to set")
