"""The resolved-config model every layer shares: defaults, loss and init schemas, labels.

Pure Python (no torch, no Ray) so that a study validates instantly. A *cell config* is a plain
nested dict with exactly the sections of ``DEFAULTS``; ``loss`` and ``init`` are resolved to
canonical form (every parameter explicit), which is what cell ids hash (see ``pin.py``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

GROUPS = ("input", "encoder", "middle", "decoder", "output", "embedding")
"""Named parameter groups every network exposes (SPEC §4)."""

DATASETS = ("toy2d", "digits", "mnist5k", "cifar10", "mnist", "npz", "folder")
ARCHS = ("mlp", "unet-xs", "unet-s", "unet-m", "unet-edm")


@dataclass(frozen=True)
class Param:
    """One parameter of a loss family or init scheme: default, type and allowed values."""

    default: object = None  # None with required=True: the user must give it
    kind: type = float
    choices: tuple | None = None
    positive: bool = False
    required: bool = False
    of: tuple | None = None  # for kind=list: allowed items


# Registered loss names -> (family, fixed parameters). A short name such as ``ratio_kl`` is the
# ``ratio`` family with ``divergence`` fixed; it resolves to the same canonical config.
LOSS_FAMILIES = {
    "di": {"weighting": Param("dmd", str, choices=("dmd", "sigma2"))},
    "sid": {"alpha": Param(1.2, float)},
    "ratio": {
        "divergence": Param("kl", str, choices=("kl", "js", "rkl")),
        "sigma": Param("schedule", str, choices=("schedule", "fixed")),
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
TEACHER_SCORE_FAMILIES = ("di", "sid")

INIT_SCHEMES = {
    "teacher": {},
    "random": {},
    "reset_layers": {"groups": Param(None, list, required=True, of=GROUPS)},
    "feature_transplant": {"sigma_feat": Param(None, float, required=True, positive=True)},
}

DEFAULTS = {
    "data": {"name": "digits", "path": None, "kind": None},  # kind: toy2d ring8|checkerboard
    "teacher": {
        "arch": "unet-xs",
        "kimg": 600,  # images seen: 600 kimg at batch 128 is ~4.7k steps
        "batch": 128,
        "lr": 2e-3,
        "ema_halflife_kimg": 50,
        "seed": 0,
        "precision": "fp32",  # as student.precision, for teacher training (harness.perf)
        "channels_last": True,
        "compile": False,
    },
    "student": {
        "sigma_init": 2.5,  # G(z) = D(sigma_init z; sigma_init)
        "t_max": 0.8,  # generator-loss noise levels u ~ U(0, t_max) (SiD convention)
        "kimg": 100,
        "batch": 64,
        "lr": 1e-4,  # generator
        "aux_lr": 1e-4,  # fake score or ratio net
        "aux_steps": 1,  # aux updates per generator update
        "aux_init": "teacher",
        "ratio_net": "encoder",
        "ema_halflife_kimg": 2,
        "precision": "fp32",  # fp32 | tf32 | bf16: CUDA only, see harness.perf
        "channels_last": True,  # NHWC: +11% on CPU (README Performance); not in the cell id
        "compile": False,  # torch.compile the nets (not in the cell id): README Performance
    },
    "loss": {"name": "sid"},
    "init": {"name": "teacher"},
    "eval": {
        "metric": "auto",  # fd for images, mmd for toy2d
        "n": 1000,
        "every_kimg": 20,
        "samples": 64,  # uint8 samples stored per evaluation
        "inception_weights": None,  # local pt_inception-2015-12-05 file for metric: fid
    },
    "seed": 0,
}

PRECISIONS = ("fp32", "tf32", "bf16")
STUDY_ONLY = ("resources", "max_failures")
"""Study settings that change scheduling, not numbers: never part of a cell id."""


class ConfigError(ValueError):
    """A config problem, with the dotted path of the offending value."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


def defaults() -> dict:
    return copy.deepcopy(DEFAULTS)


def _check_param(path: str, name: str, spec: Param, value):
    where = f"{path}.{name}"
    if spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, f"expected a number, got {value!r}")
        value = float(value)
        if spec.positive and not value > 0:
            raise ConfigError(where, f"must be > 0, got {value}")
    elif spec.kind is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"expected a string, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise ConfigError(where, f"unknown value {value!r}; known: {', '.join(spec.choices)}")
    elif spec.kind is list:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(where, f"expected a non-empty list, got {value!r}")
        for i, item in enumerate(value):
            if item not in spec.of:
                raise ConfigError(f"{where}[{i}]",
                                  f"unknown group {item!r}; known: {', '.join(spec.of)}")
        if len(set(value)) != len(value):
            raise ConfigError(where, f"repeated entries in {list(value)}")
        value = sorted(value, key=spec.of.index)
    return value


def _resolve_params(path: str, what: str, schema: dict, given: dict) -> dict:
    unknown = sorted(set(given) - set(schema))
    if unknown:
        known = ", ".join(schema) or "none"
        raise ConfigError(f"{path}.{unknown[0]}", f"unknown parameter for {what}; known: {known}")
    out = {}
    for name, spec in schema.items():
        if name in given:
            out[name] = _check_param(path, name, spec, given[name])
        elif spec.required:
            raise ConfigError(f"{path}.{name}", f"{what} needs {name!r}")
        else:
            out[name] = spec.default
    return out


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
    return {"name": name, **_resolve_params(path, f"init {name!r}", INIT_SCHEMES[name], spec)}


def loss_label(loss: dict) -> str:
    """Short display name of a canonical loss config: ``ratio_js``, ``sid[alpha=1]``."""
    name = loss["name"]
    if name == "ratio":
        label = f"ratio_{loss['divergence']}"
        return label + ("[fixed]" if loss["sigma"] == "fixed" else "")
    extras = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
              for k, v in loss.items() if k != "name" and v != LOSS_FAMILIES[name][k].default]
    return name + (f"[{','.join(extras)}]" if extras else "")


def init_label(init: dict) -> str:
    """Short display name of a canonical init config: ``reset_layers[output]``."""
    name = init["name"]
    if name == "reset_layers":
        return f"reset_layers[{'+'.join(init['groups'])}]"
    if name == "feature_transplant":
        return f"feature_transplant[{init['sigma_feat']:g}]"
    return name


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
    return out
