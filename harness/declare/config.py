"""The resolved-config model every layer shares: defaults, loss and init schemas, labels.

Pure Python (no torch, no Ray) so that a study validates instantly. A *cell config* is a plain
nested dict with exactly the sections of ``DEFAULTS``; ``loss`` and ``init`` are resolved to
canonical form (every parameter explicit), which is what cell ids hash (see ``pin.py``).
"""
from __future__ import annotations

import copy
import math
import re

from harness.declare import schema
from harness.declare.schema import (  # noqa: F401 (re-exported)
    ARCHS,
    DATASETS,
    GROUPS,
    PRECISIONS,
    ConfigError,
    Problem,
    Setting,
    check,
    check_value,
    cut,
)
from harness.declare.schema import short as _short


def param(default=None, kind: str = "num", *, choices: tuple | None = None,
          positive: bool = False, lo: float | None = None, hi: float | None = None,
          required: bool = False, omit_default: bool = False,
          column: str | None = None) -> Setting:
    """One parameter of a loss family, init scheme or the verifier, as a ``Setting`` (the one
    declaration type, checked by the one validator ``schema.check``). ``kind``: num | int | str |
    bool | groups (a list of ``choices``) | counts (whole numbers in [1, hi]) | source (a partial
    teacher section). ``omit_default``: added after ids were stored, so left out of the
    canonical form (and of ids and labels) at its default. ``column``: its typed result column.
    ``positive``: above 0; ``lo``: at least ``lo``; ``hi``: at most ``hi``."""
    return Setting(kind, lo=0.0 if positive else lo, lo_open=positive, hi=hi, choices=choices,
                   nullable=default is None and not required, default=default,
                   identity="unless_default" if omit_default else "yes",
                   required=required, column=column, coerce=True)


# Registered loss names -> (family, fixed parameters). A short name such as ``ratio_kl`` is the
# ``ratio`` family with ``divergence`` fixed; it resolves to the same canonical config.
LOSS_FAMILIES = {
    "di": {"weighting": param("dmd", "str", choices=("dmd", "sigma2"))},
    "sid": {"alpha": param(1.2, lo=0.0, hi=100.0)},  # SiD weighs its two terms with alpha >= 0
    "ratio": {
        "divergence": param("kl", "str", choices=("kl", "js", "rkl")),
        "sigma": param("schedule", "str", choices=("schedule", "fixed"), column="ratio_sigma"),
    },
}
LOSS_NAMES = {
    "di": ("di", {}),
    "sid": ("sid", {}),
    "ratio": ("ratio", {}),
    "ratio_kl": ("ratio", {"divergence": "kl"}),
    "ratio_js": ("ratio", {"divergence": "js"}),
    "ratio_rkl": ("ratio", {"divergence": "rkl"}),
}
TEACHER_SCORE_FAMILIES = ["di", "sid"]  # families that call the teacher's score (declare_loss adds)

REINITS = ("matched", "fresh")
INIT_SCHEMES = {  # how a generator starts; the functions are registered in harness.core.inits
    # source: a partial teacher section naming another teacher whose weights start the generator
    "teacher": {"source": param(None, "source", omit_default=True, column="init_source"),
                # groups that keep the teacher's values and get no updates: which weights the
                # generator needs to change (freezing the features and training the ends asks
                # whether the teacher's features carry the benefit)
                "freeze": param(None, "groups", choices=GROUPS, omit_default=True,
                                 column="freeze_groups")},
    "random": {},
    "reset_layers": {"groups": param(None, "groups", required=True, choices=GROUPS,
                                      column="reset_groups"),
                     "reinit": param("matched", "str", choices=REINITS)},
    "feature_transplant": {"sigma_feat": param(None, required=True, positive=True, hi=1e3),
                           "reset_output": param(False, "bool"),
                           "reinit": param("matched", "str", choices=REINITS)},
    "mapping_match": {"steps": param(2000, "int", positive=True, hi=1e6, column="mapping_steps"),
                      "lr": param(1e-3, positive=True, hi=1.0, column="mapping_lr"),
                      "batch": param(64, "int", positive=True, hi=4096, column="mapping_batch")},
}


BUILT_IN = frozenset((*LOSS_FAMILIES, *INIT_SCHEMES))
"""Families and schemes of the harness itself: their parameters have typed result columns (a
plug-in's parameters live in the cell's label and stored config, so the Parquet schema of every
store stays one)."""


def _declare(table: dict, kind: str, name: str, params: dict) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"{kind} name {name!r}: use lower-case letters, digits and _")
    if name in table or (kind == "loss" and name in LOSS_NAMES):
        raise ValueError(f"{kind} {name!r} is already declared")
    for pname, spec in params.items():
        if not isinstance(spec, Setting) or pname == "name":
            raise ValueError(f"{kind} {name!r}: parameter {pname!r} must be declared with "
                             f"harness.declare.config.param(...) and must not be called 'name'")
    table[name] = dict(params)


def declare_loss(name: str, params: dict, *, teacher_score: bool) -> None:
    """Make a loss family selectable by ``name`` in study files (its implementation is registered
    in ``harness.core.losses``; ``register_loss`` does both): ``params`` maps each parameter to
    its ``param(...)`` declaration; ``teacher_score``: whether it calls the teacher's score (the
    claims compare score-free with teacher-score families)."""
    _declare(LOSS_FAMILIES, "loss", name, params)
    LOSS_NAMES[name] = (name, {})
    if teacher_score:
        TEACHER_SCORE_FAMILIES.append(name)


def declare_init(name: str, params: dict) -> None:
    """Make an init scheme selectable by ``name`` (``harness.core.inits.register_init`` also
    registers its function)."""
    _declare(INIT_SCHEMES, "init", name, params)


VERIFIER = {  # eval.verifier (harness.core.verifier): best-of-n / resampled one-step samples
    "n": param([1, 2, 4, 8, 16], "counts", hi=1024),  # candidates per kept sample (whole numbers)
    "mode": param("resample", "str", choices=("resample", "best")),
    "sigma": param(0.05, positive=True, hi=80.0),  # noise level the ratio net scores at
    "net": param("auto", "str", choices=("auto", "post_hoc")),  # auto: a ratio cell's own net
    "fit_steps": param(500, "int", positive=True, hi=1e6),  # post-hoc ratio net (di, sid)
    "fit_batch": param(None, "int", positive=True, hi=65536),  # null: student.batch
    "fit_lr": param(None, positive=True, hi=1.0),  # null: student.aux_lr
}


def resolve_verifier(spec, path: str = "eval.verifier") -> dict | None:
    """``eval.verifier``: null (off) or a mapping of ``VERIFIER`` keys -> canonical dict."""
    if spec is None or spec is False:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(path, f"expected a mapping such as {{n: [1, 4], mode: resample}}, got "
                                f"{_short(spec)}")
    out = _resolve_params(path, "the verifier", VERIFIER, {k: v for k, v in spec.items()
                                                           if v is not None or k not in VERIFIER})
    for key in ("fit_batch", "fit_lr"):
        out.setdefault(key, None)
    return out


def param_columns() -> dict[str, type]:
    """Result-row column -> Python kind for every loss and init parameter (one typed column each,
    declared by its ``param``), plus ``loss_family`` and ``init_scheme``."""
    out = {"loss_family": str, "init_scheme": str}
    families = [f for f in (*LOSS_FAMILIES.items(), *INIT_SCHEMES.items()) if f[0] in BUILT_IN]
    for _, params in families:
        for name, p in params.items():
            kind = {"num": float, "int": int, "bool": bool}.get(p.kind, str)
            col = p.column or name
            if out.setdefault(col, kind) is not kind:
                raise TypeError(f"result column {col!r} declared with two types")
    return out


def cell_params(cfg: dict) -> dict:
    """A canonical cell config's loss and init parameters as typed column values (lists
    '+'-joined, a teacher source as its label); parameters of other schemes are absent."""
    out = {"loss_family": cfg["loss"]["name"], "init_scheme": cfg["init"]["name"]}
    for part, families in (("loss", LOSS_FAMILIES), ("init", INIT_SCHEMES)):
        if cfg[part]["name"] not in BUILT_IN:  # a plug-in's parameters: in the label only
            continue
        declared = families[cfg[part]["name"]]
        for name, value in cfg[part].items():
            if name == "name":
                continue
            p = declared[name]
            if p.kind == "groups":
                value = "+".join(value)
            elif p.kind == "source":
                value = _source_label(value)
            out[p.column or name] = value
    return out

_SCALAR = schema.defaults()  # the scalar sections' defaults: declared once, harness.declare.schema
DEFAULTS = {"data": _SCALAR["data"], "teacher": _SCALAR["teacher"], "student": _SCALAR["student"],
            "loss": {"name": "sid"}, "init": {"name": "teacher"}, "eval": _SCALAR["eval"],
            "seed": schema.SEED.default}
STUDY_ONLY = ("resources", "max_failures", "teacher_resources")
"""Study settings that change scheduling, not numbers: never part of a cell or teacher id."""


def steps(kimg: float, batch: int) -> int:
    """Optimiser steps of a budget of ``kimg`` thousand training images at ``batch`` images a step:
    whole steps, rounded up, at least one (the one formula for students, teachers and tuning)."""
    return max(1, math.ceil(kimg * 1000 / batch))


def defaults() -> dict:
    return copy.deepcopy(DEFAULTS)


def _resolve_params(path: str, what: str, declared: dict, given: dict) -> dict:
    unknown = sorted(set(given) - set(declared), key=str)
    if unknown:
        known = ", ".join(declared) or "none"
        raise ConfigError(f"{path}.{cut(unknown[0], 40)}",
                          f"unknown parameter for {what}; known: {known}")
    out = {}
    for name, spec in declared.items():
        if name in given:
            try:
                value = check(spec, given[name], f"{path}.{name}")
            except Problem as bad:
                raise ConfigError(bad.path, bad.problem, bad.fix) from None
            if spec.kind == "source" and value is not None:
                value = resolve_teacher_source(value, f"{path}.{name}")
        elif spec.required:
            raise ConfigError(f"{path}.{name}", f"{what} needs {name!r}")
        else:
            value = spec.default
        if not (spec.identity == "unless_default" and value == spec.default):
            out[name] = value
    return out


NOISE_MAX = 1e3  # a band edge beyond sigma_max = 80 trains on pure noise; 1e3 is generous


def resolve_noise(value, path: str = "teacher.noise") -> dict:
    """``{name: edm}`` or ``{band: [lo, hi]}`` (0 < lo < hi) -> canonical form."""
    if value == "edm" or value == {"name": "edm"}:
        return {"name": "edm"}
    if not isinstance(value, dict) or set(value) != {"band"}:
        raise ConfigError(path, f"expected {{name: edm}} or {{band: [lo, hi]}}, got {_short(value)}")
    band = value["band"]
    ok = (isinstance(band, (list, tuple)) and len(band) == 2
          and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in band))
    if not ok or not (0 < band[0] < band[1] <= NOISE_MAX):
        raise ConfigError(f"{path}.band", f"expected [lo, hi] with 0 < lo < hi <= {NOISE_MAX:g}, "
                                          f"got {_short(band)}")
    return {"band": [float(band[0]), float(band[1])]}


def resolve_teacher_source(value, path: str) -> dict:
    """A partial teacher section (``init: {teacher: {source: {...}}}``): known keys, checked."""
    if not isinstance(value, dict) or not value:
        raise ConfigError(path, f"expected a non-empty partial teacher section such as "
                                f"{{noise: {{band: [1.5, 4.0]}}}}, got {_short(value)}")
    out = {}
    for key, v in value.items():
        if key not in DEFAULTS["teacher"]:
            raise ConfigError(f"{path}.{cut(key, 40)}",
                              f"unknown teacher key; known: {', '.join(DEFAULTS['teacher'])}")
        if key == "noise":
            out[key] = resolve_noise(v, f"{path}.noise")
            continue
        try:
            out[key] = check_value("teacher", key, v)
        except ConfigError as e:
            raise ConfigError(f"{path}.{key}", e.problem, e.fix) from None
    return out


def source_teacher(cfg: dict) -> dict | None:
    """The teacher section of the teacher whose weights start the generator, if not the study's
    own (``init: {name: teacher, source: {...}}``)."""
    source = cfg["init"].get("source") if cfg["init"]["name"] == "teacher" else None
    return None if not source else {**cfg["teacher"], **source}


def _named(spec, path: str, kind: str, known) -> tuple[str, dict]:
    """``'name'`` or ``{'name': name, **params}`` -> (name, params); an unknown name raises."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in known:
        raise ConfigError(f"{path}.name" if name is not None else path,
                          f"unknown {kind} {name!r}; known: {', '.join(known)}")
    return name, spec


def resolve_loss(spec, path: str = "loss") -> dict:
    """``'ratio_js'`` or ``{'name': 'sid', 'alpha': 1}`` -> ``{'name': family, **all params}``."""
    name, spec = _named(spec, path, "loss", LOSS_NAMES)
    family, fixed = LOSS_NAMES[name]
    for key, value in fixed.items():
        if key in spec and spec[key] != value:
            raise ConfigError(f"{path}.{key}", f"{name} fixes {key}={value!r}")
        spec[key] = value
    return {"name": family, **_resolve_params(path, f"loss {name!r}", LOSS_FAMILIES[family], spec)}


def resolve_init(spec, path: str = "init") -> dict:
    """``'teacher'`` or ``{'name': 'reset_layers', 'groups': [...]}`` -> canonical dict."""
    name, spec = _named(spec, path, "init", INIT_SCHEMES)
    out = {"name": name, **_resolve_params(path, f"init {name!r}", INIT_SCHEMES[name], spec)}
    if len(out.get("freeze") or ()) == len(GROUPS):
        raise ConfigError(f"{path}.freeze", "freezes every group, so nothing would train; "
                                            "leave at least one group out")
    return out


def loss_label(loss: dict) -> str:
    """Short display name of a canonical loss config: ``ratio_js``, ``sid[alpha=1]``."""
    name = loss["name"]
    if name == "ratio":
        label = f"ratio_{loss['divergence']}"
        return label + ("[fixed]" if loss["sigma"] == "fixed" else "")
    extras = [f"{k}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}={v}"
              for k, v in loss.items() if k != "name" and v != LOSS_FAMILIES[name][k].default]
    return name + (f"[{','.join(extras)}]" if extras else "")


def _source_label(src: dict) -> str:
    return ", ".join(f"band {v['band'][0]:g}-{v['band'][1]:g}" if k == "noise" and "band" in v
                     else f"{k}={v}" for k, v in src.items())


def init_label(init: dict) -> str:
    """Short display name of a canonical init config: ``reset_layers[output]``,
    ``reset_layers[output,fresh]``, ``teacher[band 1.5-4]``."""
    name = init["name"]
    fresh = ",fresh" if init.get("reinit") == "fresh" else ""
    if name == "reset_layers":
        return f"reset_layers[{'+'.join(init['groups'])}{fresh}]"
    if name == "feature_transplant":
        reset = f",reset_output{fresh}" if init["reset_output"] else ""
        return f"feature_transplant[{init['sigma_feat']:g}{reset}]"
    if name == "teacher" and (init.get("source") or init.get("freeze")):
        parts = [_source_label(init["source"])] if init.get("source") else []
        parts += [f"freeze {'+'.join(init['freeze'])}"] if init.get("freeze") else []
        return f"teacher[{', '.join(parts)}]"
    # mapping_match and plug-in schemes: the parameters that differ from their defaults
    extras = [f"{k}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else
              f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}"
              for k, v in init.items() if k != "name" and v != INIT_SCHEMES[name][k].default]
    return name + (f"[{','.join(extras)}]" if extras else "")


def resolve_cell(cfg: dict) -> dict:
    """Fill defaults into a (possibly partial) cell config and canonicalise loss and init."""
    out = defaults()
    for section, value in cfg.items():
        if section not in out:
            raise ConfigError(section, f"unknown section; known: {', '.join(out)}")
        if isinstance(out[section], dict) and section not in ("loss", "init"):
            if not isinstance(value, dict):
                raise ConfigError(section, f"expected a mapping, got {value!r}")
            unknown = sorted(set(value) - set(out[section]))
            if unknown:
                raise ConfigError(f"{section}.{unknown[0]}",
                                  f"unknown key; known: {', '.join(out[section])}")
            out[section].update(value)
        else:
            out[section] = value
    if out["data"]["name"] == "toy2d" and "arch" not in (cfg.get("teacher") or {}):
        out["teacher"]["arch"] = "mlp"  # the only architecture for 2-D points
    out["loss"] = resolve_loss(out["loss"])
    out["init"] = resolve_init(out["init"])
    if out["data"]["name"] not in DATASETS:
        raise ConfigError("data.name", f"unknown dataset {out['data']['name']!r}; "
                                       f"known: {', '.join(DATASETS)}")
    for path in ("teacher.arch",):
        section, key = path.split(".")
        if out[section][key] not in ARCHS:
            raise ConfigError(path, f"unknown architecture {out[section][key]!r}; "
                                    f"known: {', '.join(ARCHS)}")
    if out["student"]["aux_init"] not in ("teacher", "random"):
        raise ConfigError("student.aux_init", "must be 'teacher' or 'random'")
    out["teacher"]["noise"] = resolve_noise(out["teacher"]["noise"])
    if out["teacher"]["import"] is not None and out["teacher"]["arch"] != "ddpmpp":
        raise ConfigError("teacher.import", f"an imported EDM teacher is a DDPM++ network: set "
                                            f"teacher.arch: ddpmpp (got {out['teacher']['arch']!r})")
    channels = out["teacher"]["channels"]
    if channels is not None and out["teacher"]["arch"] != "ddpmpp":
        raise ConfigError("teacher.channels", f"only the ddpmpp architecture takes a channel "
                                              f"count (got arch {out['teacher']['arch']!r}); "
                                              f"remove teacher.channels")
    if channels is not None and channels % 4:
        raise ConfigError("teacher.channels", f"must be a multiple of 4 (GroupNorm groups), got "
                                              f"{channels}")
    out["eval"]["verifier"] = resolve_verifier(out["eval"]["verifier"])
    return out
