"""The ``tune:`` section of a study file: its syntax, its validation (the study file's own
schema, with file, line and YAML path) and the ``Tune`` it becomes. Pure Python (no torch, no
Ray): ``harness.declare.study`` calls ``check_tune``. What is done with it (trials, selection, the pinned
choice, ``apply``) is ``harness.store.tuning``; the Ray part is ``harness.orchestrate.tune_run``.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field

from harness.declare import config as C
from harness.declare.hashing import canonical_json, sha
from harness.declare.schema import FLOAT_RE, KIMG_MAX, SCHEMA, SEED, Problem, type_name
from harness.declare.schema import choice, num, text, whole
from harness.declare.schema import check as check_setting

TUNE_KEYS = ("space", "trials", "kimg", "seeds", "metric", "scheduler")
REQUIRED = ("space", "trials", "kimg", "seeds")
SCHEDULERS = ("asha", "none")
TRIALS_MAX = 1000
SEEDS_MAX = 64
TUNE = {  # the section's scalar keys, declared and checked as every setting is
    "trials": whole(None, 1, TRIALS_MAX, help="trials per family (random search)"),
    "kimg": num(None, 0, hi=KIMG_MAX, help="each trial's training budget (thousands of images)"),
    "metric": text("auto", help="auto (the study's primary metric) or a metric name"),
    "scheduler": choice("asha", *SCHEDULERS, help="asha (stops weak trials early) or none"),
}
SEARCH_SEED = 0
"""Random search seed of every family (``BasicVariantGenerator(random_state=SEARCH_SEED)``)."""
ASHA_REDUCTION = 2
ASHA_GRACE = 0.25  # of a trial's whole budget (kimg x seeds)
NOT_SEARCHED = {"student": ("kimg",)}
METRIC_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
TRIAL_PROTOCOL = "harness tune trial (the study's eval settings, verifier off)"
SELECTION_RULE = ("among the family's trials that reached the full budget on every selection "
                  "seed, the lowest mean over the selection seeds of the final metric value "
                  "(highest for higher-is-better metrics); ties go to the earlier trial; only "
                  "rows of the selection seeds are read")
DISTRIBUTIONS = {  # name -> (number of arguments, setting kinds it fits, log scale)
    "uniform": (2, ("num",), False), "loguniform": (2, ("num",), True),
    "quniform": (3, ("num",), False), "qloguniform": (3, ("num",), True),
    "randint": (2, ("int",), False), "lograndint": (2, ("int",), True),
}
_DIST_RE = re.compile(r"\s*([a-z]+)\s*\((.*)\)\s*\Z", re.S)


class TuneError(C.ConfigError):
    """A study whose tuned choice is missing or stale, or that cannot be tuned (exit 2)."""

    def __init__(self, message: str):
        super().__init__("", message)


# ---------------------------------------------------------------------------------------------
# The tune section

@dataclass(frozen=True)
class Dist:
    """One search distribution: ``kind`` (a DISTRIBUTIONS name or ``choice``) and its arguments."""

    kind: str
    args: tuple

    @property
    def log(self) -> bool:
        return self.kind in DISTRIBUTIONS and DISTRIBUTIONS[self.kind][2]

    @property
    def text(self) -> str:
        if self.kind == "choice":
            return json.dumps(list(self.args))
        return f"{self.kind}({', '.join(f'{a:g}' for a in self.args)})"

    def ray(self):
        """The Ray Tune search-space object (``tune.loguniform(a, b)``, ``tune.choice``, ...)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


@dataclass
class Family:
    """One loss of the study: its canonical loss config, what is searched and the trial base."""

    label: str
    loss: dict
    space: dict  # setting path -> Dist
    base: dict  # resolved trial config (seed: the first selection seed)
    origin: dict = field(default_factory=dict)  # setting path -> yaml path of its distribution


@dataclass
class Tune:
    space: dict  # scope ("" = every family) -> {setting path: Dist}
    trials: int
    kimg: float
    seeds: list
    metric: str
    scheduler: str
    families: dict  # label -> Family, in the study's order

    def section(self) -> dict:
        """The validated section in canonical form (what ``hash`` hashes)."""
        space = {scope: {k: d.text for k, d in s.items()} for scope, s in self.space.items()}
        return {"space": space,
                "trials": self.trials, "kimg": self.kimg, "seeds": list(self.seeds),
                "metric": self.metric, "scheduler": self.scheduler}

    @property
    def hash(self) -> str:
        return sha(self.section())[:16]

    def protocol(self) -> dict:
        return {"trials": self.trials, "kimg": self.kimg, "seeds": list(self.seeds),
                "metric": self.metric, "scheduler": self.scheduler, "search": "random "
                f"(BasicVariantGenerator, random_state {SEARCH_SEED}, the same for every family)",
                "selection": SELECTION_RULE}


def loss_label(cfg: dict) -> str:
    """A cell config's family: the label of its loss (``ratio_js``, ``sid[alpha=1]``)."""
    return C.loss_label(cfg["loss"])


def _matches(scope: str, loss: dict) -> bool:
    if scope in C.LOSS_FAMILIES:
        return loss["name"] == scope
    family, fixed = C.LOSS_NAMES[scope]
    return loss["name"] == family and all(loss.get(k) == v for k, v in fixed.items())


def _parse_dist(value, path: str) -> Dist:
    if isinstance(value, list):
        if not value:
            raise Problem(path, "empty choice", "give at least two values, e.g. [1.0, 1.2]")
        return Dist("choice", tuple(value))
    known = ", ".join([*DISTRIBUTIONS, "a YAML list (a choice)"])
    if not isinstance(value, str):
        raise Problem(path, f"expected a distribution, got {C._short(value)} ({type_name(value)})",
                      f"write e.g. loguniform(1.0e-5, 1.0e-3) or [1.0, 1.2]; known: {known}. A "
                      f"fixed value is not a search: set it in the study's own section")
    m = _DIST_RE.match(value)
    if not m or m.group(1) not in DISTRIBUTIONS:
        name = m.group(1) if m else value
        raise Problem(path, f"unknown distribution {C._short(name)}", f"known: {known}")
    kind, text = m.group(1), m.group(2)
    n, kinds, _ = DISTRIBUTIONS[kind]
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if len(parts) != n or not all(FLOAT_RE.match(p) for p in parts):
        what = "lower, upper, q" if n == 3 else "lower, upper"
        raise Problem(path, f"{kind} takes {n} numbers ({what}), got {C._short(value)}",
                      f"write e.g. {kind}({'1, 10' if 'int' in kind else '1.0e-5, 1.0e-3'}"
                      f"{', 1.0e-5' if n == 3 else ''})")
    args = [float(p) for p in parts]
    if "int" in kind:
        if not all(a.is_integer() for a in args):
            raise Problem(path, f"{kind} takes whole numbers, got {C._short(value)}",
                          f"write e.g. {kind}(1, 5)")
        args = [int(a) for a in args]
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise Problem(path, f"the lower end must be below the upper end, got {C._short(value)}",
                      "swap or fix the ends")
    if kind in ("loguniform", "qloguniform", "lograndint") and lo <= 0:
        raise Problem(path, f"{kind} needs a lower end > 0, got {lo:g}",
                      "use a positive lower end, or uniform for ranges that include 0")
    if n == 3 and not 0 < args[2] <= hi - lo:
        raise Problem(path, f"q must be in (0, upper - lower], got {args[2]:g}", "fix q")
    if "int" in kind and hi - lo < 2:
        raise Problem(path, f"{kind}({lo}, {hi}) has one value (the upper end is excluded, as in "
                         f"Ray Tune)", "widen the range or set the value in the study")
    return Dist(kind, tuple(args))


def _check_setting_dist(setting: str, dist: Dist, path: str, losses: list[dict]) -> Dist:
    """Both ends of a range, and every choice, must be values the setting takes (its schema:
    ``harness.declare.settings`` for sections, the loss family's ``param`` for ``loss.PARAM``)."""
    section, _, key = setting.partition(".")
    if section == "loss":
        param = C.LOSS_FAMILIES[losses[0]["name"]][key]
        kind = param.kind

        def check(value, where):
            try:
                out = C.resolve_loss({**losses[0], key: value}, "loss")
            except C.ConfigError as e:
                raise Problem(where, e.problem, e.fix) from None
            return out[key]
    else:
        spec = SCHEMA[section][key]
        kind = spec.kind

        def check(value, where):
            return check_setting(spec, value, where)
    if dist.kind == "choice":
        values = [check(v, f"{path}[{i}]") for i, v in enumerate(dist.args)]
        if len({canonical_json(v) for v in values}) != len(values):
            raise Problem(path, f"repeated values in the choice {C._short(list(dist.args))}",
                          "list each value once")
        return Dist("choice", tuple(values))
    if kind not in DISTRIBUTIONS[dist.kind][1]:
        fits = [k for k, v in DISTRIBUTIONS.items() if kind in v[1]]
        what = "whole number" if dist.kind.endswith("randint") else "real"
        raise Problem(path, f"{setting} is not a {what} setting, so {dist.kind} does not fit it",
                      f"use {', '.join(fits) + ' or ' if fits else ''}a list of values (a choice)")
    lo, hi = dist.args[0], dist.args[1]
    check(lo, path)
    check(hi - 1 if dist.kind.endswith("randint") else hi, path)
    return dist


def _rejoin(mapping: dict) -> dict:
    """A YAML flow mapping splits ``{student.lr: loguniform(1.0e-5, 1.0e-3)}`` at the comma into
    ``{'student.lr': 'loguniform(1.0e-5', '1.0e-3)': None}``: the pieces are joined again, so
    the flow style reads as the block style does (quoting the distribution also works)."""
    out, items, i = {}, list(mapping.items()), 0
    while i < len(items):
        key, value = items[i]
        i += 1
        if isinstance(value, str) and "(" in value and ")" not in value:
            parts, j = [value], i
            while j < len(items) and items[j][1] is None and ")" not in parts[-1]:
                parts.append(str(items[j][0]))
                j += 1
            if ")" in parts[-1]:
                value, i = ", ".join(parts), j
        out[key] = value
    return out


def check_tune(raw, fixed: dict, axes: list, cells: list) -> Tune | None:
    """Validate a study's ``tune:`` section (``None`` if it has none); raises ``Problem`` with the
    YAML path of the problem (``harness.declare.study`` adds file and line)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise Problem("tune", f"expected a mapping, got {type_name(raw)}",
                      "write e.g. tune: {space: {student.lr: loguniform(1.0e-5, 1.0e-3)}, trials: 8, "
                      "kimg: 8, seeds: [100]}")
    for key in raw:
        if key not in TUNE_KEYS:
            raise Problem(f"tune.{key}", f"unknown key {C._short(key)} in tune",
                          f"known: {', '.join(TUNE_KEYS)}")
    for key in REQUIRED:
        if key not in raw:
            raise Problem("tune", f"missing tune.{key}",
                          "tune needs space, trials, kimg and seeds (metric and scheduler are "
                          "optional); see README, Tuning")
    trials = check_setting(TUNE["trials"], raw["trials"], "tune.trials")
    kimg = check_setting(TUNE["kimg"], raw["kimg"], "tune.kimg")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise Problem("tune.seeds", f"expected a non-empty list of seeds, got {C._short(seeds)}",
                      "write e.g. seeds: [100]")
    if len(seeds) > SEEDS_MAX:
        raise Problem("tune.seeds", f"{len(seeds)} selection seeds; at most {SEEDS_MAX}",
                      "use a few selection seeds")
    study_seeds = sorted({c.config["seed"] for c in cells})
    seen = {}
    for i, s in enumerate(seeds):
        where = f"tune.seeds[{i}]"
        check_setting(SEED, s, where)
        if s in seen:
            raise Problem(where, f"seed {s} is listed twice", "list each selection seed once")
        seen[s] = i
        if s in study_seeds:
            shown = ", ".join(map(str, study_seeds[:12])) + (", ..." * (len(study_seeds) > 12))
            raise Problem(where, f"selection seed {s} is also a seed of the study's cells ({shown})",
                          "selection seeds must be disjoint from the study's seeds, so that no "
                          "cell's result chose its own hyperparameters; use e.g. 100")
    metric = check_setting(TUNE["metric"], raw.get("metric", "auto"), "tune.metric")
    if metric is None or not (metric == "auto" or METRIC_RE.match(metric)):
        raise Problem("tune.metric", f"expected auto or a metric name, got {C._short(metric)}",
                      "write auto (the study's primary metric) or a name such as fd_digits_1k")
    scheduler = check_setting(TUNE["scheduler"], raw.get("scheduler", "asha"), "tune.scheduler")

    # the families: each distinct loss of the cells, in order
    losses: dict[str, dict] = {}
    first: dict[str, object] = {}
    for cell in cells:
        label = loss_label(cell.config)
        losses.setdefault(label, cell.config["loss"])
        first.setdefault(label, cell)
    space_raw = raw["space"]
    if not isinstance(space_raw, dict) or not space_raw:
        raise Problem("tune.space", f"expected a non-empty mapping, got {C._short(space_raw)}",
                      "write e.g. space: {student.lr: loguniform(1.0e-5, 1.0e-3)}")
    space_raw = _rejoin(space_raw)
    grid_axes = {a for a, _ in axes}
    space: dict[str, dict] = {}
    origin: dict[tuple, str] = {}
    for key, value in space_raw.items():
        key = str(key)
        if "." in key:
            scope, entries, prefix = "", {key: value}, "tune.space"
        else:
            if key not in C.LOSS_NAMES:
                raise Problem(f"tune.space.{key}", f"unknown setting or loss {C._short(key)}",
                              f"a key of tune.space is a setting (SECTION.KEY, e.g. student.lr) for "
                              f"every family, or a loss family or name ({', '.join(C.LOSS_NAMES)}) "
                              f"with its own settings")
            mine = [lab for lab, loss in losses.items() if _matches(key, loss)]
            if not mine:
                raise Problem(f"tune.space.{key}", f"no loss of this study is {C._short(key)}",
                              f"the study's losses: {', '.join(losses)}")
            if not isinstance(value, dict) or not value:
                raise Problem(f"tune.space.{key}", f"expected a mapping of settings to "
                                                f"distributions, got {C._short(value)}",
                              f"write e.g. {key}: {{student.aux_lr: loguniform(1.0e-5, 1.0e-3)}}")
            scope, entries, prefix = key, _rejoin(value), f"tune.space.{key}"
        out = space.setdefault(scope, {})
        for setting, dist_raw in entries.items():
            setting = str(setting)
            path = f"{prefix}.{setting}"
            section, _, name = setting.partition(".")
            targets = [lab for lab, loss in losses.items() if scope == "" or _matches(scope, loss)]
            if section == "loss":
                if scope == "":
                    raise Problem(path, "a loss parameter is searched per family",
                                  f"write it under a family, e.g. sid: {{{setting}: [1.0, 1.2]}}")
                fam = losses[targets[0]]["name"]
                if name not in C.LOSS_FAMILIES[fam]:
                    raise Problem(path, f"loss family {fam!r} has no parameter {C._short(name)}",
                                  f"known: {', '.join(C.LOSS_FAMILIES[fam]) or 'none'}")
                fixed_by = C.LOSS_NAMES.get(scope, (None, {}))[1]
                if name in fixed_by:
                    raise Problem(path, f"{scope} fixes {name}={fixed_by[name]!r}",
                                  "search it under the family name, or not at all")
                if len({canonical_json(losses[t].get(name)) for t in targets}) > 1:
                    raise Problem(path, f"the study compares {scope} losses that differ in {name} "
                                     f"({', '.join(targets)}): searching it would merge them",
                                  f"remove {setting} from the search, or compare a single {scope} "
                                  f"loss")
            elif section == "student":
                if name not in C.DEFAULTS["student"]:
                    raise Problem(path, f"unknown setting {C._short(setting)}",
                                  f"known student keys: {', '.join(C.DEFAULTS['student'])}")
                if name in NOT_SEARCHED["student"]:
                    raise Problem(path, f"{setting} is the training budget, not a hyperparameter",
                                  "the budget of a trial is tune.kimg; the cells' is student.kimg")
                if setting in grid_axes:
                    raise Problem(path, f"{setting} is both searched and a grid axis (grid.{setting})",
                                  "remove the grid axis or the search")
                if name in fixed.get("student", {}):
                    raise Problem(path, f"{setting} is both searched and fixed (student.{name})",
                                  f"remove {name} from student: (the tuned value replaces it)")
            else:
                raise Problem(path, f"{C._short(setting)} cannot be searched",
                              "searchable: student.KEY (every family or per family) and, under a "
                              "family, loss.PARAM; the teacher, the data and the evaluation are "
                              "the same for every family")
            if setting in out or any(setting in space.get(other, {})
                                     and any(_in_scope(other, losses[t]) for t in targets)
                                     for other in space if other != scope):
                raise Problem(path, f"{setting} is searched twice for the same loss",
                              "give each setting one distribution per loss")
            dist = _check_setting_dist(setting, _parse_dist(dist_raw, path), path,
                                       [losses[t] for t in targets])
            out[setting] = dist
            origin[(scope, setting)] = path
    space = {k: v for k, v in space.items() if v}

    families = {}
    for label, loss in losses.items():
        mine = {}
        where = {}
        for scope, entries in space.items():
            if scope == "" or _matches(scope, loss):
                for setting, dist in entries.items():
                    mine[setting] = dist
                    where[setting] = origin[(scope, setting)]
        if not mine:
            raise Problem("tune.space", f"nothing is searched for loss {label}",
                          "every loss of the study gets the same search budget: add a setting for "
                          f"every family (e.g. student.lr: ...) or one under {loss['name']}")
        base = copy.deepcopy(first[label].config)
        if "init" not in fixed:
            base["init"] = C.resolve_init("teacher")
        base["student"]["kimg"] = kimg
        base["eval"]["verifier"] = None
        base["seed"] = seeds[0]
        families[label] = Family(label, loss, dict(sorted(mine.items())), C.resolve_cell(base),
                                 where)
    return Tune(space=space, trials=trials, kimg=kimg, seeds=list(seeds), metric=metric,
                scheduler=scheduler, families=families)


def _in_scope(scope: str, loss: dict) -> bool:
    return scope == "" or _matches(scope, loss)
