"""The schema of a study's settings: what each value may be, and how loss/init specs expand.

Pure Python (no torch, no Ray), like ``study``, which uses it. Every scalar setting is declared
once, with its check, in ``harness.declare.schema`` (type, range, default, help, id membership).
``expand_spec`` turns one ``loss`` / ``init`` item into canonical values: a name (``ratio_js``), a one-key mapping (``{sid: {alpha: [1.0, 1.2]}}``) or a mapping with
``name`` (``{name: sid, alpha: 1.0}``). A list-valued parameter expands into one value per item
(cartesian product over parameters), except ``groups``, which is itself a list and expands only
when written as a list of lists.

Problems are raised as ``Problem`` (a yaml path, a problem and a fix); ``study`` adds file and line.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

from harness.declare import config as C
from harness.declare import schema
from harness.declare.schema import FLOAT_RE, Problem, Setting, check, type_name

# ---------------------------------------------------------------------------------------------
# The schema of the scalar settings (sections of config.DEFAULTS, the seed, resources).

PATH_DATASETS = {  # datasets read from files the user provides: what data.path must point at
    "cifar10": "the folder cifar-10-batches-py with data_batch_1..5",
    "mnist": "a folder with train-images-idx3-ubyte and train-labels-idx1-ubyte",
    "npz": "an .npz file holding 'x' (uint8 images) and optionally 'y'",
    "folder": "a folder of same-size PNG/JPEG images",
}
IMAGE_ARCHS = tuple(a for a in C.ARCHS if a != "mlp")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")


def _num(lo=None, lo_open=True, hi=None, hi_open=False):
    return Setting("num", lo, lo_open, hi, hi_open)


def _int(lo=None, hi=None):
    return Setting("int", lo, False, hi)


SCHEMA = schema.SCHEMA  # every scalar setting, declared in harness.declare.schema
RESOURCES = {"cpu": _num(0, hi=1024), "gpu": _num(0, False, 64),
             "workers": _int(1, 1024)}  # per worker: cpu, gpu; workers: Ray Train data parallel
DEFAULT_RESOURCES = {"cpu": 1.0, "gpu": 0.0}
TEACHER_RESOURCES = {k: RESOURCES[k] for k in ("cpu", "gpu")}  # a teacher: one Ray task
MAX_FAILURES = _int(0, 100)
DEFAULT_MAX_FAILURES = 0
SECTIONS = tuple(k for k, v in C.DEFAULTS.items() if isinstance(v, dict) and k not in ("loss", "init"))
TOP_KEYS = ("study", "description", "results", *SECTIONS, "loss", "init", "seed", "grid",
            *C.STUDY_ONLY, "tracking", "tune", "claims", "seeds")
# tracking (tracking_spec.check) is not in cell ids; tune (tune_spec.check_tune): its choice enters
# cell ids as ordinary settings; claims, seeds (claims_spec): seeds on demand add ordinary cells


MAX_EXPANSION = 100_000  # values one grid entry with parameter lists may expand to


# ---------------------------------------------------------------------------------------------
# Loss and init specs: expansion of list-valued parameters, canonicalisation through config.

@dataclass
class AxisValue:
    """One value of an axis (or a fixed setting), with where it came from."""

    value: object  # what goes into the cell config (canonical for loss/init)
    label: object  # what Cell.axes records
    origin: str  # yaml path of the item that produced it


def _rewrap(e: C.ConfigError, expanded: dict) -> Problem:
    """A ConfigError from config.resolve_* as a Problem, with [j] inserted for expanded params."""
    path = e.path
    for param_path, j in expanded.items():
        if path == param_path or path.startswith(param_path + "[") or path.startswith(param_path + "."):
            path = f"{param_path}[{j}]{path[len(param_path):]}"
            break
    return Problem(path, e.problem, e.fix)


def _param_text(spec: Setting) -> str:
    kind = {"num": "a number", "int": "a whole number", "str": "a string", "bool": "true or false",
            "counts": "a list of whole numbers", "source": "a partial teacher section"
            }.get(spec.kind, spec.kind)
    if spec.kind == "str" and spec.choices:
        kind = "one of " + "|".join(spec.choices)
    if spec.kind == "groups":
        kind = "a list of " + "|".join(spec.choices)
    if spec.kind in ("num", "int") and (spec.lo is not None or spec.hi is not None):
        kind += " " + spec.range_text()
    return kind + (", required" if spec.required else f", default {C._short(spec.default)}")


def expand_spec(kind: str, item, path: str, fixed: bool) -> list[AxisValue]:
    """Expand one loss/init item (name, one-key mapping or mapping with ``name``) into values."""
    names = C.LOSS_NAMES if kind == "loss" else C.INIT_SCHEMES
    example = "sid or {sid: {alpha: 1.2}}" if kind == "loss" else \
        "teacher or {reset_layers: {groups: [output]}}"
    if isinstance(item, str):
        name, params, prefix = item, {}, path
    elif isinstance(item, dict) and "name" in item:
        name, prefix = item["name"], path
        params = {k: v for k, v in item.items() if k != "name"}
        if not isinstance(name, str):
            raise Problem(f"{path}.name", f"expected a {kind} name, got {C._short(name)}",
                          f"known: {', '.join(names)}")
    elif isinstance(item, dict) and len(item) == 1:
        (name, params), = item.items()
        prefix = f"{path}.{name}"
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise Problem(prefix, f"expected a mapping of parameters, got {C._short(params)}",
                          f"write e.g. {example}")
    else:
        raise Problem(path, f"expected a {kind} name or a one-key mapping, got {C._short(item)}",
                      f"write e.g. {example}")
    if name not in names:
        raise Problem(prefix if prefix != path or isinstance(item, str) else f"{path}.name",
                      f"unknown {kind} {C._short(name)}",
                      f"known: {', '.join(names)} (a plug-in's {kind} is known once its module "
                      f"is named in HARNESS_PLUGINS)")
    family = C.LOSS_NAMES[name][0] if kind == "loss" else name
    schema = C.LOSS_FAMILIES[family] if kind == "loss" else C.INIT_SCHEMES[name]

    # each parameter: a list of (value, index or None)
    choices = []
    for pname, pvalue in params.items():
        ppath = f"{prefix}.{pname}"
        spec = schema.get(pname)
        if spec is not None and spec.kind == "groups":  # only a list of lists expands
            if not isinstance(pvalue, list) or not pvalue:
                choices.append([(pvalue, None)])  # config reports the error
                continue
            inner = [isinstance(v, list) for v in pvalue]
            if all(inner):
                many = True
            elif any(inner):
                raise Problem(ppath, "mixes group names and lists of groups",
                              "write [output] for one value or [[output], [encoder, middle]] for "
                              "one value per inner list")
            else:
                many = False
        else:
            many = isinstance(pvalue, list)
        if many and fixed:
            raise Problem(ppath, f"a fixed {kind} takes one value, got a list {C._short(pvalue)}",
                          f"to compare several values, move it into grid.{kind}")
        if many and not pvalue:
            raise Problem(ppath, "empty list of values", "give at least one value")
        values = list(pvalue) if many else [pvalue]
        if spec is not None and spec.kind == "num":
            values = [float(v) if isinstance(v, str) and FLOAT_RE.match(v.strip()) else v
                      for v in values]
        choices.append([(v, j if many else None) for j, v in enumerate(values)])

    count = math.prod(len(c) for c in choices)
    if count > MAX_EXPANSION:
        raise Problem(prefix, f"expands to {count:,} values, more than a study may have "
                           f"({MAX_EXPANSION:,})", "give each parameter a few values")
    out = []
    resolve = C.resolve_loss if kind == "loss" else C.resolve_init
    label = C.loss_label if kind == "loss" else C.init_label
    for combo in itertools.product(*choices):
        spec = {"name": name}
        expanded = {}
        for pname, (v, j) in zip(params, combo):
            spec[pname] = v
            if j is not None:
                expanded[f"{prefix}.{pname}"] = j
        try:
            canon = resolve(spec, prefix)
        except C.ConfigError as e:
            bad = _rewrap(e, expanded)
            if bad.fix is None:
                bad.fix = f"{name} takes " + (", ".join(
                    f"{p} ({_param_text(s)})" for p, s in schema.items()) or "no parameters")
            raise bad from None
        out.append(AxisValue(canon, label(canon), path))
    return out


# ---------------------------------------------------------------------------------------------
# Checks across keys

def check_resources(raw: dict, key: str, schema: dict, out: dict) -> dict:
    """``resources`` / ``teacher_resources``: a mapping of ``schema``'s keys over ``out``."""
    if raw.get(key) is None:
        return out
    body = raw[key]
    if not isinstance(body, dict):
        raise Problem(key, f"expected a mapping, got {type_name(body)}",
                      f"write e.g. {key}: {{cpu: 1, gpu: 0.5}}")
    for name, value in body.items():
        if name not in schema:
            raise Problem(f"{key}.{name}", f"unknown key {C._short(name)}",
                          f"known: {', '.join(schema)}")
        out[name] = float(check(schema[name], value, f"{key}.{name}"))
    if out["gpu"] > 1 and not float(out["gpu"]).is_integer():
        raise Problem(f"{key}.gpu", f"a fraction of a GPU must be below 1, got {out['gpu']:g}",
                      "use a fraction (< 1) or a whole number of GPUs")
    return out


def cross_check(cfg: dict, fixed: dict, origin: dict):
    """Settings of one resolved cell that must agree across sections (data and architecture,
    data and metric, data and path); ``origin`` maps a setting to the yaml path that set it."""
    data, name = cfg["data"], cfg["data"]["name"]
    given = lambda s: s in origin or s.partition(".")[2] in fixed.get(s.partition(".")[0], {})  # noqa: E731
    where = lambda s: origin.get(s, s)  # noqa: E731
    if name in PATH_DATASETS and not data["path"]:
        raise Problem(where("data.path") if given("data.path") else
                      (origin["data.name"] if "data.name" in origin else "data.path"),
                      f"dataset {C._short(name)} needs data.path: {PATH_DATASETS[name]}",
                      "set data.path in the study file (its existence is checked when the "
                      "data is loaded)")
    if name not in PATH_DATASETS and data["path"]:
        raise Problem(where("data.path"), f"dataset {C._short(name)} is built in and reads no path",
                      "remove data.path")
    if data["kind"] is not None and name != "toy2d":
        raise Problem(where("data.kind"), f"only toy2d takes a kind, not dataset {C._short(name)}",
                      "remove data.kind")
    arch = cfg["teacher"]["arch"]
    if name == "toy2d" and arch != "mlp":
        raise Problem(where("teacher.arch") if given("teacher.arch") else where("data.name"),
                      f"toy2d data needs architecture 'mlp', got {C._short(arch)}",
                      "set teacher.arch: mlp")
    if name != "toy2d" and arch == "mlp":
        raise Problem(where("teacher.arch"), f"architecture 'mlp' is for toy2d, not images "
                                          f"({name})", f"use one of {', '.join(IMAGE_ARCHS)}")
    metric = cfg["eval"]["metric"]
    if name == "toy2d" and metric in ("fd", "fid"):
        raise Problem(where("eval.metric"), f"metric {C._short(metric)} needs images, not toy2d",
                      "use metric: mmd or auto")
    if name != "toy2d" and metric == "mmd":
        raise Problem(where("eval.metric"), f"metric 'mmd' is for toy2d, not images ({name})",
                      "use metric: fd, fid or auto")
    if metric == "fid" and not cfg["eval"]["inception_weights"]:
        raise Problem(where("eval.metric"), "metric 'fid' needs eval.inception_weights, the local "
                      "pt_inception-2015-12-05 file (nothing is downloaded)",
                      "set eval.inception_weights to its path (its existence is checked when "
                      "the metric is built), or use metric: fd")
