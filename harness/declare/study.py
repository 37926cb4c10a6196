"""Study files: YAML -> validated ``Study`` -> cells.

Pure Python (pyyaml only; no torch, no Ray), so ``harness run --dry-run`` and every validation
error are instant. Every problem raises ``StudyError`` whose message reads::

    <file>:<line>: <yaml.path>: <problem>; <how to fix>

A study is a set of fixed settings (sections ``data``, ``teacher``, ``student``, ``eval`` as in
``config.DEFAULTS``; ``loss``, ``init``, ``seed``) and a ``grid`` of axes. The cells are the
cartesian product of the axes in the YAML order of ``grid``; each cell's config is resolved through
``config.resolve_cell``, so ``loss`` and ``init`` are canonical and every setting is explicit.

Axis values for ``loss`` / ``init`` expand as ``settings.expand_spec`` describes; every setting
is declared, with its check, in ``schema``.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import re
from dataclasses import dataclass, field

from harness.base.safefs import UnsafePathError, open_regular
from harness.declare import config as C
from harness.declare.claims_spec import ClaimsSpec, check_claims
from harness.declare.hashing import canonical_json
from harness.declare.overrides import apply as apply_overrides
from harness.declare.schema import SCHEMA, Problem, check, type_name
from harness.declare.settings import (
    DEFAULT_MAX_FAILURES, DEFAULT_RESOURCES, MAX_FAILURES, NAME_RE, RESOURCES, SECTIONS,
    TEACHER_RESOURCES, TOP_KEYS, AxisValue, check_resources, cross_check, expand_spec)
from harness.declare.study_yaml import MAX_BYTES, StudyError, read_yaml
from harness.declare.tracking_spec import check as _check_tracking
from harness.declare.tune_spec import check_tune

MAX_CELLS = 100_000  # cells one study may expand to (the cifar10 protocol has 150)

# ---------------------------------------------------------------------------------------------
# The study and its cells.

@dataclass
class Cell:
    """One cell: its complete resolved config and its axis values (labels for loss/init)."""

    config: dict
    axes: dict
    index: int = 0

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_fmt(v)}" for k, v in self.axes.items()) or "(single cell)"


@dataclass
class Study:
    name: str
    path: str | None
    results_root: str
    fixed: dict  # validated fixed settings: partial sections, canonical loss/init, seed
    axes: list  # [(axis path, [config values...])] in grid order
    cells: list
    resources: dict  # {"cpu": float, "gpu": float} per cell (per worker when workers > 1)
    max_failures: int
    raw: dict  # the YAML as loaded
    description: str = ""
    lines: dict = field(default_factory=dict, repr=False)  # yaml path -> line
    tracking: dict = field(default_factory=lambda: _check_tracking(None))  # harness.store.tracking
    tune: object = None  # harness.declare.tune_spec.Tune: the tune: section (never in cell ids itself)
    workers: int = 1  # resources.workers: Ray Train workers per cell (data parallel)
    teacher_resources: dict = field(default_factory=lambda: dict(DEFAULT_RESOURCES))  # per task
    claims: ClaimsSpec = field(default_factory=ClaimsSpec)  # harness.declare.claims_spec
    seed_pool: list = field(default_factory=list)  # seeds on demand: every cell up to the cap

    @property
    def axis_names(self) -> list[str]:
        return [a for a, _ in self.axes]


class _Parser:
    def __init__(self, text: str, source: str):
        self.source, self.text, self.lines = source, text, {}
        self.overridden: tuple = ()  # yaml paths a --set gave: errors there name --set

    # -- errors ----------------------------------------------------------------------------
    def line(self, path: str) -> int | None:
        p = path
        while p:
            if p in self.lines:
                return self.lines[p]
            stripped = re.sub(r"(\[\d+\]|\.[^.\[\]]*|^[^.\[\]]*)$", "", p)
            if stripped == p:
                break
            p = stripped
        return None

    def error(self, bad: Problem) -> StudyError:
        if any(bad.path == p or bad.path.startswith((p + ".", p + "["))
               for p in self.overridden):
            return StudyError(bad.problem, source="--set", line=None, path=bad.path, fix=bad.fix)
        return StudyError(bad.problem, source=self.source, line=self.line(bad.path),
                          path=bad.path, fix=bad.fix)

    def load(self):
        raw, self.lines = read_yaml(self.text, self.source)
        return raw

    # -- validation ------------------------------------------------------------------------
    def parse(self, overrides: dict | None = None) -> Study:
        raw = apply_overrides(self.load(), overrides)
        self.overridden = tuple(f"{section}.{key}" if section != "init" else "grid.init"
                                for section, values in (overrides or {}).items() for key in values)
        try:
            return self._study(raw)
        except Problem as bad:
            raise self.error(bad) from None

    def _study(self, raw) -> Study:
        if raw is None:
            raise Problem("", "the study file is empty",
                          "write at least `study: NAME` (see studies/quick.yaml)")
        if not isinstance(raw, dict):
            raise Problem("top level", f"expected a mapping of settings, got {type_name(raw)}",
                          "write `key: value` lines starting with `study: NAME`")
        for key in raw:
            if key not in TOP_KEYS:
                raise Problem(str(key), f"unknown top-level key {C._short(key)}",
                              f"known: {', '.join(TOP_KEYS)}")

        if "study" not in raw:
            raise Problem("study", "missing study name", "add a line `study: NAME` at the top")
        name = raw["study"]
        if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > 100:
            raise Problem("study", f"invalid study name {C._short(name)}",
                          "use at most 100 lowercase letters, digits and _ . - (starting with a "
                          "letter or digit), e.g. c3-digits")
        description = raw.get("description") or ""
        if not isinstance(description, str):
            raise Problem("description", f"expected a string, got {type_name(description)}",
                          "write one line of text")

        results = raw.get("results", None)
        if results is None:
            results = os.path.abspath(os.path.join("results", name))
        elif not isinstance(results, str) or not results.strip():
            raise Problem("results", f"expected a path or URI, got {C._short(results)}",
                          "write e.g. results/NAME, /shared/results/NAME or s3://bucket/NAME")
        elif "://" in results:
            if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", results):
                raise Problem("results", f"malformed URI {C._short(results)}",
                              "write SCHEME://PATH, e.g. s3://bucket/NAME or file:///abs/path")
        else:
            results = os.path.abspath(os.path.expanduser(results))

        fixed: dict = {}
        for section in SECTIONS:
            if section not in raw:
                continue
            body = raw[section]
            if body is None:
                body = {}
            if not isinstance(body, dict):
                raise Problem(section, f"expected a mapping, got {type_name(body)}",
                              f"write e.g. {section}: {{{next(iter(C.DEFAULTS[section]))}: ...}}")
            out = {}
            for key, value in body.items():
                if key not in C.DEFAULTS[section]:
                    raise Problem(f"{section}.{key}", f"unknown key {C._short(key)} in {section}",
                                  f"known: {', '.join(C.DEFAULTS[section])}")
                out[key] = check(SCHEMA[section][key], value, f"{section}.{key}")
            fixed[section] = out
        for kind in ("loss", "init"):
            if kind in raw:
                values = expand_spec(kind, raw[kind], kind, fixed=True)
                fixed[kind] = values[0].value
        if "seed" in raw:
            fixed["seed"] = check(SCHEMA["seed"], raw["seed"], "seed")

        resources = check_resources(raw, "resources", RESOURCES, dict(DEFAULT_RESOURCES))
        workers = int(resources.pop("workers", 1))
        # a teacher is one Ray task; by default it gets what one cell (worker) gets
        teacher_resources = check_resources(raw, "teacher_resources", TEACHER_RESOURCES,
                                            dict(resources))
        max_failures = DEFAULT_MAX_FAILURES
        if raw.get("max_failures") is not None:
            max_failures = check(MAX_FAILURES, raw["max_failures"], "max_failures")
        tracking = _check_tracking(raw.get("tracking"))

        axes = self._grid(raw.get("grid"), raw, fixed)
        claims = check_claims(raw.get("claims"), raw.get("seeds"), [a for a, _ in axes])
        pool = []
        if claims.seeds is not None:  # seeds on demand: the first round's cells; the rest wait
            if "seed" in raw:
                raise Problem("seeds", "both seeds: (seeds on demand) and a fixed seed are given",
                              "remove the top-level seed")
            plan = claims.seeds
            pool = self._cells(fixed, axes + [("seed", [AxisValue(s, s, "seeds")
                                                        for s in plan.seeds(plan.max)])])
            axes = axes + [("seed", [AxisValue(s, s, "seeds") for s in plan.seeds(plan.start)])]
            cells = [c for c in pool if c.config["seed"] < plan.first + plan.start]
        else:
            cells = self._cells(fixed, axes)
        for cell in cells if workers > 1 else ():
            batch = cell.config["student"]["batch"]
            if batch % workers:
                raise Problem("resources.workers", f"{workers} workers cannot split student.batch "
                              f"{batch} (cell {cell.index}: {cell.label}): each worker trains on "
                              f"batch / workers samples", f"use a number of workers that divides "
                              f"every cell's student.batch, or a batch that is a multiple of "
                              f"{workers}")
        tune = check_tune(raw.get("tune"), fixed, axes, cells)
        return Study(name=name, path=None, results_root=results, fixed=fixed,
                     axes=[(a, [v.value for v in vals]) for a, vals in axes], cells=cells,
                     resources=resources, max_failures=max_failures, raw=raw,
                     description=description, lines=dict(self.lines), tracking=tracking,
                     workers=workers, teacher_resources=teacher_resources, tune=tune,
                     claims=claims, seed_pool=pool)

    def _grid(self, grid, raw, fixed) -> list:
        if grid is None:
            return []
        if not isinstance(grid, dict):
            raise Problem("grid", f"expected a mapping of axes, got {type_name(grid)}",
                          "write e.g. grid: {loss: [di, sid], seed: [0, 1, 2]}")
        axes = []
        for axis, items in grid.items():
            path = f"grid.{axis}"
            axis = str(axis)
            if axis in ("loss", "init", "seed"):
                if axis in raw:
                    raise Problem(path, f"{axis} is both an axis and fixed (top-level {axis}, line "
                                     f"{self.line(axis)})",
                                  f"remove the top-level {axis} or the grid axis")
            else:
                section, _, key = axis.partition(".")
                if section not in SECTIONS:
                    raise Problem(path, f"unknown axis {C._short(axis)}",
                                  f"an axis is loss, init, seed or SECTION.KEY with SECTION one of "
                                  f"{', '.join(SECTIONS)} (e.g. student.lr)")
                if key not in C.DEFAULTS[section]:
                    raise Problem(path, f"unknown axis {C._short(axis)}: {section} has no key "
                                        f"{C._short(key)}",
                                  f"known {section} keys: {', '.join(C.DEFAULTS[section])}")
                if key in fixed.get(section, {}):
                    raise Problem(path, f"{axis} is both an axis and fixed ({axis}, line "
                                     f"{self.line(axis)})",
                                  f"remove {key} from {section} or remove the grid axis")
            if not isinstance(items, list):
                raise Problem(path, f"an axis must be a list of values, got {C._short(items)}",
                              f"write e.g. {axis}: [{C._short(items)}, ...] (a list, even of one value)")
            if not items:
                raise Problem(path, "empty axis (no values)", "give at least one value or remove the axis")
            values: list[AxisValue] = []
            for i, item in enumerate(items):
                ipath = f"{path}[{i}]"
                if axis in ("loss", "init"):
                    values += expand_spec(axis, item, ipath, fixed=False)
                elif axis == "seed":
                    v = check(SCHEMA["seed"], item, ipath)
                    values.append(AxisValue(v, v, ipath))
                else:
                    section, _, key = axis.partition(".")
                    v = check(SCHEMA[section][key], item, ipath)
                    values.append(AxisValue(v, v, ipath))
            seen = {}
            for v in values:
                text = canonical_json(v.value)
                if text in seen:
                    other = seen[text]
                    raise Problem(v.origin, f"duplicate cell: {_fmt(v.label)} here is the same "
                                         f"{axis} value as {_fmt(other.label)} at {other.origin} "
                                         f"(line {self.line(other.origin)})",
                                  "remove one of them")
                seen[text] = v
            axes.append((axis, values))
        return axes

    def _cells(self, fixed: dict, axes: list) -> list[Cell]:
        count = math.prod(len(vals) for _, vals in axes)
        if count > MAX_CELLS:
            sizes = " x ".join(f"{axis} {len(vals)}" for axis, vals in axes)
            raise Problem("grid", f"the grid has {count:,} cells ({sizes}), more than the "
                               f"{MAX_CELLS:,} a study may have",
                          "split it into several studies or drop axis values; even a toy cell "
                          "takes seconds, so this many would not finish")
        cells, seen = [], {}
        for index, combo in enumerate(itertools.product(*(vals for _, vals in axes))):
            partial = copy.deepcopy(fixed)
            origin = {}
            for (axis, _), v in zip(axes, combo):
                origin[axis] = v.origin
                if axis in ("loss", "init", "seed"):
                    partial[axis] = copy.deepcopy(v.value)
                else:
                    section, _, key = axis.partition(".")
                    partial.setdefault(section, {})[key] = copy.deepcopy(v.value)
            try:
                cfg = C.resolve_cell(partial)
            except C.ConfigError as e:
                raise Problem(origin.get(e.path, e.path), e.problem, e.fix) from None
            cross_check(cfg, fixed, origin)
            text = canonical_json(cfg)
            if text in seen:
                raise Problem("grid", f"duplicate cells {seen[text]} and {index} resolve to the same "
                                   f"config", "remove the repeated axis value")
            seen[text] = index
            axes_out = {axis: v.label for (axis, _), v in zip(axes, combo)}
            cells.append(Cell(config=cfg, axes=axes_out, index=index))
        return cells


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def study_from_mapping(raw: dict, source: str = "the command line") -> Study:
    """Validate settings given as a mapping (``harness cell`` / ``teacher`` build one from their
    options) exactly as a study file is validated: the same schema and cross-checks."""
    parser = _Parser("", source)
    try:
        return parser._study(raw)
    except Problem as bad:
        raise parser.error(bad) from None


def parse_study(text: str, source: str = "<string>", overrides: dict | None = None) -> Study:
    """Validate a study given as YAML text; ``source`` names it in error messages; ``overrides``
    ({section: {key: value}}, ``--set``) are applied first (``harness.declare.overrides``)."""
    return _Parser(text, source).parse(overrides)


def load_study(path: str, overrides: dict | None = None) -> Study:
    """Read and validate a study file (with ``--set`` ``overrides``, see ``parse_study``): a
    regular file of at most ``study_yaml.MAX_BYTES`` (a FIFO or ``/dev/zero`` given as the
    study is refused, not read forever)."""
    if not os.path.exists(path):
        raise StudyError("no such study file", source=str(path),
                         fix="check the path (studies live in studies/NAME.yaml)")
    try:
        with open_regular(str(path), MAX_BYTES, "study file") as f:
            text = f.read(MAX_BYTES + 1).decode("utf-8")
    except UnsafePathError as e:
        raise StudyError(f"not a regular text file of at most {MAX_BYTES:,} bytes ({C.cut(str(e), 160)})",
                         source=str(path), fix="give the path of the study YAML itself") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StudyError(f"cannot read the study file ({e})", source=str(path),
                         fix="check that it is a readable UTF-8 text file") from None
    return dataclasses.replace(parse_study(text, source=str(path), overrides=overrides),
                               path=str(path))


def describe(study: Study, ids: list[str] | None = None, notes: list[str] | None = None) -> str:
    """A dry-run table: the study's settings, then one line per cell (index, [id], axes, [note])."""
    n = len(study.cells)
    res = ", ".join(f"{k} {v:g}" for k, v in study.resources.items())
    if study.workers > 1:
        res += f" per worker, {study.workers} workers (data parallel)"
    res += "; per teacher: " + ", ".join(f"{k} {v:g}" for k, v in study.teacher_resources.items())
    grid = " x ".join(f"{len(v)} {a}" for a, v in study.axes)
    if study.axes and math.prod(len(v) for _, v in study.axes) != n:  # seeds on demand
        grid = f" (the grid's {grid} to start, and the seeds its rounds added)"
    elif study.axes:
        grid = " = " + grid
    out = [f"study {study.name}" + (f" ({study.path})" if study.path else "")
           + f": {n} cell{'s' if n != 1 else ''}{grid}",
           f"results: {study.results_root}",
           f"resources per cell: {res}; max_failures: {study.max_failures}"]
    if study.description:
        out.insert(1, study.description)
    fixed = []
    for key, value in study.fixed.items():
        if key == "loss":
            fixed.append(f"loss={C.loss_label(value)}")
        elif key == "init":
            fixed.append(f"init={C.init_label(value)}")
        elif isinstance(value, dict):
            fixed += [f"{key}.{k}={_fmt(v)}" for k, v in value.items()]
        else:
            fixed.append(f"{key}={_fmt(value)}")
    if fixed:
        out.append("fixed: " + " ".join(fixed))
    head = ["#"] + (["id"] if ids is not None else []) + study.axis_names \
        + (["note"] if notes is not None else [])
    rows = []
    for i, cell in enumerate(study.cells):
        row = [str(i)] + ([ids[i]] if ids is not None else []) \
            + [_fmt(cell.axes[a]) for a in study.axis_names] + ([notes[i]] if notes is not None else [])
        rows.append(row)
    widths = [max(len(r[j]) for r in [head] + rows) for j in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out.append(fmt(head))
    out += [fmt(r) for r in rows]
    return "\n".join(out)
