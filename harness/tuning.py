"""The same hyperparameter-search budget for every loss family (``tune:``, ``harness tune``).

A study's ``tune:`` section names the settings to search and their distributions, for every loss
family or per family::

    tune:
      space:
        student.lr: loguniform(1.0e-5, 1.0e-3)          # every family
        sid: {loss.alpha: [1.0, 1.2]}                   # one family only (a list: a choice)
        ratio: {student.aux_lr: loguniform(1.0e-5, 1.0e-3)}
      trials: 8            # per family, the same for every family
      kimg: 8              # training budget per trial and selection seed
      seeds: [100]         # selection seeds, disjoint from the study's seeds
      metric: auto         # the study's primary metric (the first one a cell reports), or a name
      scheduler: asha      # asha | none

A *family* is one loss of the study (each distinct loss config of its cells, named by its label:
``di``, ``sid``, ``ratio_js``, ...). A scope key of ``space`` is a loss family (``di``, ``sid``,
``ratio``: all its losses) or a loss name (``ratio_js``: that loss only). Distributions are Ray
Tune's: ``uniform(a, b)``, ``loguniform(a, b)``, ``quniform(a, b, q)``, ``qloguniform(a, b, q)``,
``randint(a, b)`` and ``lograndint(a, b)`` (b excluded, as in Ray) and a YAML list (``choice``).
Searchable: ``student.KEY`` (not ``kimg``: the trial budget is ``tune.kimg``) and, under a family,
``loss.PARAM``. Validation is the study file's: both ends of a range and every choice are checked
against the setting's schema (``harness.settings``), and every trial's values again before it
runs (``trial_config``), with the file, line and YAML path of any problem.

``harness tune STUDY`` runs, per family, one Ray Tune experiment (``<results root>/tune/``):
``num_samples = trials`` of random search (``BasicVariantGenerator`` with the fixed seed
``SEARCH_SEED`` for every family, so families with the same space are tried at the same points),
``ASHAScheduler`` (``time_attr = kimg``, the trial's training kimg summed over its seeds;
``max_t`` = the whole trial, grace period a quarter of it, reduction factor 2) or none. A trial is
the study's cell config for the family (teacher init, or the study's fixed init; other grid axes
at their first value; ``eval.verifier`` off) at ``student.kimg = tune.kimg``, trained on each
selection seed in turn with ``harness.cell.run_cell``. Its evaluations are stored as rows of the
results store with status ``tuning`` (cell ``tune-<trial id>-s<seed>``; the ``axes`` column holds
the family, the tune hash, the trial and its values as JSON). A killed ``harness tune`` resumes
with ``Tuner.restore`` (finished trials are not run again, running ones continue from their last
checkpoint; a trial seed whose final evaluation is in the rows is never trained again, whatever
Ray's periodically saved state says). Families whose choice is pinned under the current hash are
skipped. The Ray part lives in ``harness.tune_run``.

Selection (``SELECTION_RULE``): among the family's trials that reached the full budget on every
selection seed, the lowest (for higher-is-better metrics the highest) mean over the selection
seeds of the final metric value (the evaluation at the trial's last step); ties go to the earlier
trial. Only rows of the selection seeds are read (``read_trial_rows`` filters in Parquet).

The choice is pinned in ``pin.json`` under ``tuned``: ``choice`` ({family: {setting: value}}),
``protocol`` (trials, kimg, seeds, metric, scheduler, the rule), ``hash`` (of the ``tune:``
section) and ``families`` (per family: its hash, which also covers its search space and its
trial config, the winning trial and its score). ``apply`` makes the chosen values ordinary
settings of the family's cells (so they enter cell ids); ``harness run`` calls it through
``apply_pinned``, which refuses (exit 2) a study whose choice is missing or stale.

Validation and ``apply`` are pure Python (no torch, no Ray): ``harness.study`` imports this module.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

from . import config as C
from .pin import canonical_json
from .schema import KIMG_MAX, SEED_MAX
from .settings import _FLOAT_RE, _Bad, _check, _setting, _type_name

TUNE_KEYS = ("space", "trials", "kimg", "seeds", "metric", "scheduler")
REQUIRED = ("space", "trials", "kimg", "seeds")
SCHEDULERS = ("asha", "none")
TRIALS_MAX = 1000
SEEDS_MAX = 64
SEARCH_SEED = 0
"""Random search seed of every family (``BasicVariantGenerator(random_state=SEARCH_SEED)``)."""
ASHA_REDUCTION = 2
ASHA_GRACE = 0.25  # of a trial's whole budget (kimg x seeds)
NOT_SEARCHED = {"student": ("kimg",)}
HIGHER_BETTER_PREFIXES = ("modes_", "precision_", "recall_")  # as analysis.data
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
        return _sha(self.section())[:16]

    def protocol(self) -> dict:
        return {"trials": self.trials, "kimg": self.kimg, "seeds": list(self.seeds),
                "metric": self.metric, "scheduler": self.scheduler, "search": "random "
                f"(BasicVariantGenerator, random_state {SEARCH_SEED}, the same for every family)",
                "selection": SELECTION_RULE}


def _sha(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


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
            raise _Bad(path, "empty choice", "give at least two values, e.g. [1.0, 1.2]")
        return Dist("choice", tuple(value))
    known = ", ".join([*DISTRIBUTIONS, "a YAML list (a choice)"])
    if not isinstance(value, str):
        raise _Bad(path, f"expected a distribution, got {C._short(value)} ({_type_name(value)})",
                   f"write e.g. loguniform(1.0e-5, 1.0e-3) or [1.0, 1.2]; known: {known}. A "
                   f"fixed value is not a search: set it in the study's own section")
    m = _DIST_RE.match(value)
    if not m or m.group(1) not in DISTRIBUTIONS:
        name = m.group(1) if m else value
        raise _Bad(path, f"unknown distribution {C._short(name)}", f"known: {known}")
    kind, text = m.group(1), m.group(2)
    n, kinds, _ = DISTRIBUTIONS[kind]
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if len(parts) != n or not all(_FLOAT_RE.match(p) for p in parts):
        what = "lower, upper, q" if n == 3 else "lower, upper"
        raise _Bad(path, f"{kind} takes {n} numbers ({what}), got {C._short(value)}",
                   f"write e.g. {kind}({'1, 10' if 'int' in kind else '1.0e-5, 1.0e-3'}"
                   f"{', 1.0e-5' if n == 3 else ''})")
    args = [float(p) for p in parts]
    if "int" in kind:
        if not all(a.is_integer() for a in args):
            raise _Bad(path, f"{kind} takes whole numbers, got {C._short(value)}",
                       f"write e.g. {kind}(1, 5)")
        args = [int(a) for a in args]
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise _Bad(path, f"the lower end must be below the upper end, got {C._short(value)}",
                   "swap or fix the ends")
    if kind in ("loguniform", "qloguniform", "lograndint") and lo <= 0:
        raise _Bad(path, f"{kind} needs a lower end > 0, got {lo:g}",
                   "use a positive lower end, or uniform for ranges that include 0")
    if n == 3 and not 0 < args[2] <= hi - lo:
        raise _Bad(path, f"q must be in (0, upper - lower], got {args[2]:g}", "fix q")
    if "int" in kind and hi - lo < 2:
        raise _Bad(path, f"{kind}({lo}, {hi}) has one value (the upper end is excluded, as in "
                         f"Ray Tune)", "widen the range or set the value in the study")
    return Dist(kind, tuple(args))


def _check_setting_dist(setting: str, dist: Dist, path: str, losses: list[dict]) -> Dist:
    """Both ends of a range, and every choice, must be values the setting takes (its schema:
    ``harness.settings`` for sections, the loss family's ``Param`` for ``loss.PARAM``)."""
    section, _, key = setting.partition(".")
    if section == "loss":
        param = C.LOSS_FAMILIES[losses[0]["name"]][key]
        kind = {float: "num", int: "int"}.get(param.kind, "other")

        def check(value, where):
            try:
                out = C.resolve_loss({**losses[0], key: value}, "loss")
            except C.ConfigError as e:
                text = str(e)[len(e.path) + 2:] if e.path else str(e)
                problem, _, fix = text.partition("; ")
                raise _Bad(where, problem, fix or None) from None
            return out[key]
    else:
        spec = _setting(section, key)
        kind = spec.kind

        def check(value, where):
            return _check(spec, value, where)
    if dist.kind == "choice":
        values = [check(v, f"{path}[{i}]") for i, v in enumerate(dist.args)]
        if len({canonical_json(v) for v in values}) != len(values):
            raise _Bad(path, f"repeated values in the choice {C._short(list(dist.args))}",
                       "list each value once")
        return Dist("choice", tuple(values))
    if kind not in DISTRIBUTIONS[dist.kind][1]:
        fits = [k for k, v in DISTRIBUTIONS.items() if kind in v[1]]
        what = "whole number" if dist.kind.endswith("randint") else "real"
        raise _Bad(path, f"{setting} is not a {what} setting, so {dist.kind} does not fit it",
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
    """Validate a study's ``tune:`` section (``None`` if it has none); raises ``_Bad`` with the
    YAML path of the problem (``harness.study`` adds file and line)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _Bad("tune", f"expected a mapping, got {_type_name(raw)}",
                   "write e.g. tune: {space: {student.lr: loguniform(1.0e-5, 1.0e-3)}, trials: 8, "
                   "kimg: 8, seeds: [100]}")
    for key in raw:
        if key not in TUNE_KEYS:
            raise _Bad(f"tune.{key}", f"unknown key {C._short(key)} in tune",
                       f"known: {', '.join(TUNE_KEYS)}")
    for key in REQUIRED:
        if key not in raw:
            raise _Bad("tune", f"missing tune.{key}",
                       "tune needs space, trials, kimg and seeds (metric and scheduler are "
                       "optional); see README, Tuning")
    trials = raw["trials"]
    if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= TRIALS_MAX:
        raise _Bad("tune.trials", f"expected a whole number of trials in [1, {TRIALS_MAX}], got "
                                  f"{C._short(trials)}", "write e.g. trials: 8")
    kimg = raw["kimg"]
    if isinstance(kimg, str) and _FLOAT_RE.match(kimg.strip()):
        kimg = float(kimg)
    if isinstance(kimg, bool) or not isinstance(kimg, (int, float)) or not 0 < kimg <= KIMG_MAX:
        raise _Bad("tune.kimg", f"expected a training budget per trial in (0, {KIMG_MAX:g}] kimg, "
                                f"got {C._short(kimg)}", "write e.g. kimg: 8")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise _Bad("tune.seeds", f"expected a non-empty list of seeds, got {C._short(seeds)}",
                   "write e.g. seeds: [100]")
    if len(seeds) > SEEDS_MAX:
        raise _Bad("tune.seeds", f"{len(seeds)} selection seeds; at most {SEEDS_MAX}",
                   "use a few selection seeds")
    study_seeds = sorted({c.config["seed"] for c in cells})
    seen = {}
    for i, s in enumerate(seeds):
        where = f"tune.seeds[{i}]"
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= SEED_MAX:
            raise _Bad(where, f"expected a whole number in [0, {SEED_MAX:,}], got {C._short(s)}",
                       "write e.g. seeds: [100]")
        if s in seen:
            raise _Bad(where, f"seed {s} is listed twice", "list each selection seed once")
        seen[s] = i
        if s in study_seeds:
            shown = ", ".join(map(str, study_seeds[:12])) + (", ..." * (len(study_seeds) > 12))
            raise _Bad(where, f"selection seed {s} is also a seed of the study's cells ({shown})",
                       "selection seeds must be disjoint from the study's seeds, so that no "
                       "cell's result chose its own hyperparameters; use e.g. 100")
    metric = raw.get("metric", "auto")
    if not isinstance(metric, str) or not (metric == "auto" or METRIC_RE.match(metric)):
        raise _Bad("tune.metric", f"expected auto or a metric name, got {C._short(metric)}",
                   "write auto (the study's primary metric) or a name such as fd_digits_1k")
    scheduler = raw.get("scheduler", "asha")
    if scheduler not in SCHEDULERS:
        raise _Bad("tune.scheduler", f"unknown scheduler {C._short(scheduler)}",
                   f"known: {', '.join(SCHEDULERS)}")

    # the families: each distinct loss of the cells, in order
    losses: dict[str, dict] = {}
    first: dict[str, object] = {}
    for cell in cells:
        label = loss_label(cell.config)
        losses.setdefault(label, cell.config["loss"])
        first.setdefault(label, cell)
    space_raw = raw["space"]
    if not isinstance(space_raw, dict) or not space_raw:
        raise _Bad("tune.space", f"expected a non-empty mapping, got {C._short(space_raw)}",
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
                raise _Bad(f"tune.space.{key}", f"unknown setting or loss {C._short(key)}",
                           f"a key of tune.space is a setting (SECTION.KEY, e.g. student.lr) for "
                           f"every family, or a loss family or name ({', '.join(C.LOSS_NAMES)}) "
                           f"with its own settings")
            mine = [lab for lab, loss in losses.items() if _matches(key, loss)]
            if not mine:
                raise _Bad(f"tune.space.{key}", f"no loss of this study is {C._short(key)}",
                           f"the study's losses: {', '.join(losses)}")
            if not isinstance(value, dict) or not value:
                raise _Bad(f"tune.space.{key}", f"expected a mapping of settings to "
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
                    raise _Bad(path, "a loss parameter is searched per family",
                               f"write it under a family, e.g. sid: {{{setting}: [1.0, 1.2]}}")
                fam = losses[targets[0]]["name"]
                if name not in C.LOSS_FAMILIES[fam]:
                    raise _Bad(path, f"loss family {fam!r} has no parameter {C._short(name)}",
                               f"known: {', '.join(C.LOSS_FAMILIES[fam]) or 'none'}")
                fixed_by = C.LOSS_NAMES.get(scope, (None, {}))[1]
                if name in fixed_by:
                    raise _Bad(path, f"{scope} fixes {name}={fixed_by[name]!r}",
                               "search it under the family name, or not at all")
                if len({canonical_json(losses[t].get(name)) for t in targets}) > 1:
                    raise _Bad(path, f"the study compares {scope} losses that differ in {name} "
                                     f"({', '.join(targets)}): searching it would merge them",
                               f"remove {setting} from the search, or compare a single {scope} "
                               f"loss")
            elif section == "student":
                if name not in C.DEFAULTS["student"]:
                    raise _Bad(path, f"unknown setting {C._short(setting)}",
                               f"known student keys: {', '.join(C.DEFAULTS['student'])}")
                if name in NOT_SEARCHED["student"]:
                    raise _Bad(path, f"{setting} is the training budget, not a hyperparameter",
                               "the budget of a trial is tune.kimg; the cells' is student.kimg")
                if setting in grid_axes:
                    raise _Bad(path, f"{setting} is both searched and a grid axis (grid.{setting})",
                               "remove the grid axis or the search")
                if name in fixed.get("student", {}):
                    raise _Bad(path, f"{setting} is both searched and fixed (student.{name})",
                               f"remove {name} from student: (the tuned value replaces it)")
            else:
                raise _Bad(path, f"{C._short(setting)} cannot be searched",
                           "searchable: student.KEY (every family or per family) and, under a "
                           "family, loss.PARAM; the teacher, the data and the evaluation are "
                           "the same for every family")
            if setting in out or any(setting in space.get(other, {})
                                     and any(_in_scope(other, losses[t]) for t in targets)
                                     for other in space if other != scope):
                raise _Bad(path, f"{setting} is searched twice for the same loss",
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
            raise _Bad("tune.space", f"nothing is searched for loss {label}",
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


# ---------------------------------------------------------------------------------------------
# Values -> configs (the one place a tuned value enters a config)

def with_values(cfg: dict, values: dict, where: str = "tuned ") -> dict:
    """``cfg`` with ``{setting path: value}`` set, each value checked by the same schema as study
    files (``settings.check_value`` for ``student.*``, the family's ``Param`` for ``loss.*``) and
    the result resolved (``config.resolve_cell``). Raises ``config.ConfigError``."""
    from .settings import check_value

    out = copy.deepcopy(cfg)
    for setting, value in values.items():
        section, _, key = setting.partition(".")
        if section == "loss":
            out["loss"] = C.resolve_loss({**out["loss"], key: value}, f"{where}loss")
        elif section == "student" and key in C.DEFAULTS["student"] and \
                key not in NOT_SEARCHED["student"]:
            out["student"][key] = check_value("student", key, value, where=where)
        else:
            raise C.ConfigError(where + setting, "not a searchable setting")
    return C.resolve_cell(out)


def trial_config(family: Family, values: dict, seed: int) -> dict:
    """The config one trial trains for one selection seed."""
    return with_values({**family.base, "seed": seed}, values, where=f"tune trial ({family.label}) ")


def final_kimg(cfg: dict) -> float:
    """The kimg of a config's last evaluation (``train.train_student``: whole steps)."""
    st = cfg["student"]
    return max(1, math.ceil(st["kimg"] * 1000 / st["batch"])) * st["batch"] / 1000


def family_hash(tune: Tune, family: Family) -> str:
    """What a family's choice depends on: the protocol, its space and its trial config."""
    from .pin import identity

    ident = identity({**family.base, "seed": 0})
    ident.pop("seed", None)
    doc = {"protocol": {k: v for k, v in tune.section().items() if k != "space"},
           "space": {k: d.text for k, d in family.space.items()}, "trial": ident}
    return _sha(doc)[:16]


def higher_is_better(metric: str) -> bool:
    return metric.startswith(HIGHER_BETTER_PREFIXES)


# ---------------------------------------------------------------------------------------------
# Applying the pinned choice

def apply(study, choice: dict):
    """The study with each cell's family's chosen values (``{family: {setting: value}}``) as
    ordinary settings of its config, and so of its cell id. Axes are unchanged."""
    from .study import Cell

    if study.tune is None:
        return study
    cells, seen = [], {}
    for cell in study.cells:
        label = loss_label(cell.config)
        if label not in choice:
            raise TuneError(f"no tuned values for loss {label} of study {study.name!r}")
        cfg = with_values(cell.config, choice[label], where=f"tuned {label}: ")
        text = canonical_json(cfg)
        if text in seen:
            raise TuneError(f"cells {seen[text]} and {cell.index} of study {study.name!r} are "
                            f"the same config once their tuned values are applied; search a "
                            f"setting that does not merge them")
        seen[text] = cell.index
        cells.append(Cell(config=cfg, axes=dict(cell.axes), index=cell.index))
    out = copy.copy(study)
    out.cells = cells
    return out


def pinned(root: str) -> dict | None:
    """The ``tuned`` entry of a results root's ``pin.json`` (None if none)."""
    from .pin import read_pin

    doc = read_pin(root)
    tuned = doc.get("tuned") if doc else None
    return tuned if isinstance(tuned, dict) else None


def family_states(study, root: str) -> dict[str, tuple[str, dict | None]]:
    """{family: (state, pinned entry)}: state ``tuned`` (pinned under the current hash),
    ``stale`` (pinned under another) or ``untuned``."""
    tuned = pinned(root) or {}
    fams = tuned.get("families") if isinstance(tuned.get("families"), dict) else {}
    out = {}
    for label, fam in study.tune.families.items():
        entry = fams.get(label)
        h = family_hash(study.tune, fam)
        state = "untuned" if not isinstance(entry, dict) else \
            "tuned" if entry.get("hash") == h and isinstance(entry.get("choice"), dict) else "stale"
        out[label] = (state, entry)
    return out


def apply_pinned(study, root: str, strict: bool = True, log=print):
    """``harness run`` / ``status`` / dry run: the study with its pinned tuned values applied.
    Without a ``tune:`` section the study is returned as is. ``strict``: a missing or stale
    choice raises ``TuneError`` (exit 2); otherwise a note is printed and the untuned cells are
    returned (their ids change once tuned)."""
    if getattr(study, "tune", None) is None:
        return study
    states = family_states(study, root)
    missing = [f for f, (s, _) in states.items() if s != "tuned"]
    where = study.path or study.name
    if missing:
        words = {"stale": "tuned under another tune: section or other settings",
                 "untuned": "not tuned"}
        why = ", ".join(f"{f} ({words[s]})" for f, (s, _) in states.items() if s != "tuned")
        text = (f"{where} has a tune: section, but no tuned choice is pinned in {root}/pin.json "
                f"for {why}. Run `harness tune {where}` first (it searches each loss family's "
                f"hyperparameters and pins the choice); ")
        if strict:
            raise TuneError(text + "nothing was run.")
        log("note: " + text + "the cells below use the study's own settings, so their ids "
                              "change once tuned.")
        return study
    choice = {f: e["choice"] for f, (_, e) in states.items()}
    log("tuned (pinned by harness tune): " + "; ".join(
        f"{f} " + " ".join(f"{k}={_fmt(v)}" for k, v in c.items()) for f, c in choice.items()))
    return apply(study, choice)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def record_choice(root: str, study, label: str, entry: dict) -> dict:
    """Pin one family's choice in ``pin.json`` (``tuned``): entries of families that are no
    longer current (another hash, or gone from the study) move to ``tuned.previous``."""
    from . import __version__, results
    from .pin import PIN, dumps, read_pin, utc_now

    doc = read_pin(root) or {"study": study.name, "version": __version__, "updated_at": None,
                             "current": [], "cells": {}, "teachers": {}, "fingerprints": {}}
    tuned = doc.get("tuned") if isinstance(doc.get("tuned"), dict) else {}
    fams = dict(tuned.get("families") or {})
    previous = list(tuned.get("previous") or [])
    fams[label] = entry
    hashes = {f: family_hash(study.tune, fam) for f, fam in study.tune.families.items()}
    for f in list(fams):
        if hashes.get(f) != fams[f].get("hash"):
            previous.append({"family": f, **fams.pop(f)})
    doc["tuned"] = {"hash": study.tune.hash, "section": study.tune.section(),
                    "protocol": study.tune.protocol(),
                    "choice": {f: fams[f]["choice"] for f in study.tune.families if f in fams},
                    "families": {f: fams[f] for f in study.tune.families if f in fams},
                    **({"previous": previous} if previous else {})}
    doc["updated_at"] = utc_now()
    results.write_bytes_atomic(root, PIN, dumps(doc))
    return doc["tuned"]


# ---------------------------------------------------------------------------------------------
# Trial rows and selection (pandas; no torch, no Ray)

def read_trial_rows(root: str, seeds, cell: str | None = None):
    """Rows with status ``tuning`` of the given seeds only (and of one ``cell``, if given):
    filtered while reading the Parquet files, so rows of other seeds are never read. Repeated
    keys resolve to the newest."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from . import results

    fs, base = results.filesystem(root)
    folder = base.rstrip("/") + "/rows"
    info = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    files = sorted(i.path for i in info if i.type == pafs.FileType.File
                   and os.path.basename(i.path).startswith("part-") and i.path.endswith(".parquet"))
    where = [("status", "=", "tuning"), ("seed", "in", [int(s) for s in seeds])]
    if cell is not None:
        where.append(("cell", "=", cell))
    tables = [pq.read_table(f, filesystem=fs, schema=results.ROWS, filters=where) for f in files]
    df = (pa.concat_tables(tables) if tables else results.ROWS.empty_table()).to_pandas()
    if df.empty:
        return df
    df = df.sort_values("written_at", kind="stable")
    return df.drop_duplicates(results.KEY, keep="last").reset_index(drop=True)


def stored_final(root: str, cell: str, seed: int, final: float) -> tuple[str, float] | None:
    """(metric, value) of a trial seed's final evaluation if its rows hold one: the rows are the
    truth about what finished, whatever Ray's experiment state (saved every few seconds) says."""
    rows = read_trial_rows(root, [seed], cell=cell)
    for axes in rows["axes"].dropna().unique() if len(rows) else ():
        metric = json.loads(axes).get("tune.metric")
        hit = rows[(rows["metric"] == metric) & (rows["kimg"] >= final - 1e-9)]
        if len(hit):
            return metric, float(hit["value"].iloc[-1])
    return None


def trial_table(rows, family_hash_: str, seeds, final: float):
    """One row per trial of a family (by its hash): trial, its values (``params`` JSON), the
    metric, seeds that reached ``final`` kimg, ``score`` (mean final value over the selection
    seeds; NaN unless every seed finished), the last kimg and value, and ``state`` (complete,
    stopped, diverged). Only rows of ``seeds`` are used."""
    import numpy as np
    import pandas as pd

    cols = ["trial", "params", "metric", "n_final", "score", "last_kimg", "last_value", "state"]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    rows = rows[rows["seed"].isin([int(s) for s in seeds]).to_numpy()
                & (rows["status"] == "tuning").to_numpy()]
    parsed = {a: json.loads(a) for a in rows["axes"].dropna().unique()}
    axes = rows["axes"].map(parsed)
    mine = axes.map(lambda a: isinstance(a, dict) and a.get("tune.hash") == family_hash_)
    rows, axes = rows[mine.to_numpy()], axes[mine.to_numpy()]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    rows = rows.assign(trial=axes.map(lambda a: a.get("tune.trial")),
                       tmetric=axes.map(lambda a: a.get("tune.metric")),
                       params=axes.map(lambda a: json.dumps(a.get("tune.values", {}),
                                                            sort_keys=True)))
    out = []
    for trial, g in rows.groupby("trial", sort=True):
        metric = g["tmetric"].iloc[0]
        diverged = (g["metric"] == "diverged").any()
        m = g[g["metric"] == metric].sort_values("kimg")
        fin = m[m["kimg"] >= final - 1e-9]
        per_seed = fin.groupby("seed")["value"].last()
        complete = (len(per_seed) == len(seeds) and not diverged
                    and np.isfinite(per_seed.to_numpy(float)).all())
        last = m.iloc[-1] if len(m) else None
        out.append({"trial": trial, "params": g["params"].iloc[0], "metric": metric,
                    "n_final": int(len(per_seed)),
                    "score": float(per_seed.mean()) if complete else math.nan,
                    "last_kimg": float(last["kimg"]) if last is not None else math.nan,
                    "last_value": float(last["value"]) if last is not None else math.nan,
                    "state": "complete" if complete else "diverged" if diverged else "stopped"})
    return pd.DataFrame(out, columns=cols)


def select(table) -> dict | None:
    """The rule (``SELECTION_RULE``) over a ``trial_table``: the winning row as a dict, with
    ``values`` parsed and ``candidates`` counted; None when no trial is complete."""
    ok = table[table["state"] == "complete"]
    if ok.empty:
        return None
    hb = higher_is_better(str(ok["metric"].iloc[0]))
    ok = ok.assign(key=-ok["score"] if hb else ok["score"]).sort_values(["key", "trial"],
                                                                       kind="stable")
    best = ok.iloc[0].to_dict()
    best.pop("key")
    best["values"] = json.loads(best["params"])
    best["candidates"] = int(len(ok))
    return best


# ---------------------------------------------------------------------------------------------
# harness tune (the Ray part is harness.tune_run)

def describe(study, root: str) -> str:
    """``harness tune --dry-run``: per family, what is searched, the budget, its state."""
    t = study.tune
    states = family_states(study, root)
    n_f = len(t.families)
    per_trial = t.kimg * len(t.seeds)
    lines = [f"tune {study.name} ({study.path}): {n_f} loss families x {t.trials} trials x "
             f"{t.kimg:g} kimg x {len(t.seeds)} selection seed(s) {t.seeds} = at most "
             f"{n_f * t.trials * per_trial:g} kimg of training"
             + (" (ASHA stops the weaker trials early)" if t.scheduler == "asha" else ""),
             f"search: random, the same seed ({SEARCH_SEED}) for every family; scheduler: "
             f"{t.scheduler}" + (f" (time_attr kimg, max_t {per_trial:g}, grace "
                                 f"{per_trial * ASHA_GRACE:g}, reduction factor {ASHA_REDUCTION})"
                                 if t.scheduler == "asha" else "")
             + f"; metric: {t.metric}; storage {root}/tune",
             f"selection: {SELECTION_RULE}"]
    for label, fam in t.families.items():
        state, entry = states[label]
        space = ", ".join(f"{k} ~ {d.text}" for k, d in fam.space.items())
        shown = state if state != "tuned" else "tuned: " + " ".join(
            f"{k}={_fmt(v)}" for k, v in entry["choice"].items())
        lines.append(f"  {label}: {space}; init {C.init_label(fam.base['init'])}; {shown}")
    todo = sum(s != "tuned" for s, _ in states.values())
    lines.append(f"{todo} families to tune, {n_f - todo} tuned (dry run: nothing written)")
    return "\n".join(lines)


def scratch_root(root: str) -> str:
    """Where trials' own cell rows, samples and references go (``<root>/tune/trials``); the
    study's store gets their ``tuning`` rows."""
    return root.rstrip("/") + "/tune/trials"


def experiment_name(study, label: str, fam_hash: str) -> str:
    """The family's Ray experiment under ``<root>/tune``: ``<study>-<family>-<hash8>``."""
    return f"{study.name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{fam_hash[:8]}"


def add_parser(sub) -> None:
    """The ``harness tune`` subcommand (``harness.cli``)."""

    def cmd_tune(args) -> int:
        from .tune_run import tune_study

        return tune_study(args.study, results=args.results, address=args.address,
                          dry_run=args.dry_run, device=args.device)

    sp = sub.add_parser("tune", help="search each loss family's hyperparameters (the study's "
                        "tune: section) with Ray Tune and pin the choice for `harness run`")
    sp.add_argument("study", help="study YAML file with a tune: section")
    sp.add_argument("--dry-run", action="store_true", help="print the families, the search and "
                    "what is tuned already; writes nothing")
    sp.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                    help="Ray cluster to join, e.g. 'auto' (default: $RAY_ADDRESS or a local Ray)")
    sp.add_argument("--results", default=None, help="results root (default: the study's)")
    sp.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    sp.set_defaults(func=cmd_tune)
