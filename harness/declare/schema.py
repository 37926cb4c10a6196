"""The one declaration of every scalar setting: type, range, default, help and cell-id membership.

Pure Python (no torch, no Ray). ``config.DEFAULTS`` (the defaults), ``settings.SCHEMA`` (what a
study file may say) and ``pin.NOT_IDENTITY`` / ``pin.ADDED_LATER`` (what cell ids hash) are all
derived from ``SETTINGS`` below, so a new setting is one line here. Loss, init and verifier
parameters are ``Setting`` objects too, declared next to their families (``config.param``), and
every value of either kind is checked by the one validator, :func:`check`.

``identity``: ``"yes"`` (in every cell id), ``"no"`` (execution or location only: memory layout,
torch.compile, file paths whose content is fingerprinted, evaluation choices recorded in each
row's protocol), ``"unless_default"`` (added after ids were stored: left out of ids at its
default, which reproduces what those ids computed, so stored results keep their ids).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

GROUPS = ("input", "encoder", "middle", "decoder", "output", "embedding")
"""Named parameter groups every network exposes: input (first conv), encoder, middle, decoder,
output (last conv) and embedding (noise and class embeddings); init schemes and freezing name them."""
DATASETS = ("toy2d", "digits", "mnist5k", "cifar10", "mnist", "npz", "folder")
ARCHS = ("mlp", "unet-xs", "unet-s", "unet-m", "unet-edm", "ddpmpp")
PRECISIONS = ("fp32", "tf32", "bf16")
TOY_KINDS = ("ring8", "checkerboard")
EVAL_METRICS = ("auto", "fd", "fid", "mmd")
HIGHER_BETTER_PREFIXES = ("modes_", "precision_", "recall_")
"""Stored metric names whose larger values are better; every other quality metric (fd_*, fid_*,
mmd_*, kid_*, swd_*) is a distance, lower is better."""


def higher_is_better(metric: str) -> bool:
    return metric.startswith(HIGHER_BETTER_PREFIXES)

# Upper bounds: far above any real study, low enough that a typo (1e14, 1e300) is refused at
# validation instead of crashing a worker or running forever.
KIMG_MAX = 1e6  # 1 billion images: a long CIFAR-10 run is 200 Mimg
BATCH_MAX = 65536
SEED_MAX = 2 ** 31 - 1
LR_MAX = 10.0
EVAL_N_MAX = 1_000_000  # the FID protocol is 50k


@dataclass(frozen=True)
class Setting:
    """Type, range, default, help and id membership of one scalar setting."""

    kind: str  # num | int | str | bool | groups | counts | source | any (see check)
    lo: float | None = None
    lo_open: bool = True  # True: value > lo; False: value >= lo
    hi: float | None = None
    hi_open: bool = False  # True: value < hi; False: value <= hi
    choices: tuple | None = None
    nullable: bool = False
    default: object = None
    help: str = ""
    identity: str = "yes"  # yes | no | unless_default (see the module docstring)
    # loss, init and verifier parameters (config.param):
    required: bool = False  # no default: a study that selects the family must give it
    column: str | None = None  # its typed column in result rows (default: its name)
    coerce: bool = False  # numbers take their kind's type (1 -> 1.0, 2000.0 -> 2000): the
    # canonical form that parameters' cell ids were computed from

    def range_text(self) -> str:
        fmt = (lambda v: f"{int(v):,}") if self.kind == "int" else (lambda v: f"{v:g}")
        if self.lo is not None and self.hi is not None:
            return (f"in {'(' if self.lo_open else '['}{fmt(self.lo)}, {fmt(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {fmt(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {fmt(self.hi)}"


def num(default, lo=None, lo_open=True, hi=None, hi_open=False, help="", identity="yes"):
    return Setting("num", lo, lo_open, hi, hi_open, default=default, help=help, identity=identity)


def whole(default, lo=None, hi=None, help="", identity="yes"):
    return Setting("int", lo, False, hi, default=default, help=help, identity=identity)


def choice(default, *choices, nullable=False, help="", identity="yes"):
    return Setting("str", choices=choices, nullable=nullable, default=default, help=help,
                   identity=identity)


def flag(default, help="", identity="yes"):
    return Setting("bool", default=default, help=help, identity=identity)


def text(default=None, help="", identity="yes"):
    return Setting("str", nullable=True, default=default, help=help, identity=identity)


def other(default, help="", identity="yes"):  # checked by its own resolver in harness.declare.config
    return Setting("any", nullable=True, default=default, help=help, identity=identity)


SETTINGS = {
    "data": {
        "name": choice("digits", *DATASETS, help="dataset"),
        "path": text(help="local files of cifar10/mnist/npz/folder (their content is "
                          "fingerprinted, so the path is not in ids)", identity="no"),
        "kind": choice(None, *TOY_KINDS, nullable=True, help="toy2d: ring8 | checkerboard"),
        "resolution": Setting("int", 1, False, 4096, nullable=True, default=None,
                              help="images: train and score at this side, an integer divisor "
                                   "of the native size (area-averaged, e.g. mnist5k 32 -> 16); "
                                   "null: native", identity="unless_default"),
    },
    "teacher": {
        "arch": choice("unet-xs", *ARCHS, help="network"),
        "kimg": num(600, 0, hi=KIMG_MAX, help="training images (thousands): 600 kimg at batch "
                                              "128 is ~4.7k steps"),
        "batch": whole(128, 1, BATCH_MAX),
        "lr": num(2e-3, 0, hi=LR_MAX),
        "ema_halflife_kimg": num(50, 0, False, KIMG_MAX),
        "seed": whole(0, 0, SEED_MAX),
        "precision": choice("fp32", *PRECISIONS, help="as student.precision (harness.core.perf)",
                            identity="unless_default"),
        "channels_last": flag(True, help="NHWC (float rounding only)", identity="no"),
        "compile": flag(False, help="torch.compile (float rounding only)", identity="no"),
        "noise": other({"name": "edm"}, help="{name: edm} (ln s ~ N(P_mean, P_std)) or {band: "
                       "[lo, hi]}: a band-limited teacher (config.resolve_noise)",
                       identity="unless_default"),
        "channels": Setting("int", 4, False, 1024, nullable=True, default=None,
                            help="ddpmpp only: base channel count (EDM's model_channels; null: "
                                 "128, the CIFAR-10 network); narrower to rehearse a study on a "
                                 "CPU", identity="unless_default"),
        "import": text(help="a local EDM .pkl (NVIDIA's published teachers; arch ddpmpp): "
                            "loaded, never trained; ids hash its content",
                       identity="unless_default"),
    },
    "student": {
        "sigma_init": num(2.5, 0, hi=1e3, help="G(z) = D(sigma_init z; sigma_init)"),
        "t_max": num(0.8, 0, True, 1, False, help="generator-loss noise levels u ~ U(0, t_max) "
                                                  "(SiD convention)"),
        "kimg": num(100, 0, hi=KIMG_MAX, help="training images (thousands)"),
        "batch": whole(64, 1, BATCH_MAX),
        "lr": num(1e-4, 0, hi=LR_MAX, help="generator Adam learning rate"),
        "aux_lr": num(1e-4, 0, hi=LR_MAX, help="fake score or ratio net learning rate"),
        "aux_steps": whole(1, 1, 100, help="aux updates per generator update"),
        "aux_init": choice("teacher", "teacher", "random"),
        "ratio_net": choice("encoder", "encoder"),
        "ema_halflife_kimg": num(2, 0, False, KIMG_MAX),
        "precision": choice("fp32", *PRECISIONS, help="fp32 | tf32 | bf16: CUDA only, see "
                                                      "harness.core.perf"),
        "channels_last": flag(True, help="NHWC: +11% on CPU (README Performance)",
                              identity="no"),
        "compile": flag(False, help="torch.compile the nets (README Performance)",
                        identity="no"),
    },
    "eval": {
        "metric": choice("auto", *EVAL_METRICS, help="fd for images, mmd for toy2d"),
        "n": whole(1000, 2, EVAL_N_MAX, help="samples per evaluation"),
        "every_kimg": num(20, 0, hi=KIMG_MAX),
        "samples": whole(64, 0, 10_000, help="uint8 samples stored per evaluation"),
        "final_samples": choice("auto", "auto", "all", "none", help="all n final samples kept "
                                "for `harness rescore`: auto = images up to 32x32x3",
                                identity="no"),
        "extractor": choice("auto", "auto", "shipped", "train", help="fd features: shipped "
                            "weights where the package has them, else trained here",
                            identity="no"),
        "inception_weights": text(help="local pt_inception-2015-12-05 file for metric: fid",
                                  identity="no"),
        "verifier": other(None, help="{n: [...], mode: resample | best, ...} "
                                     "(config.VERIFIER)", identity="unless_default"),
    },
}
SEED = whole(0, 0, SEED_MAX, help="the cell's seed")

NOT_IDENTITY = {sec: tuple(k for k, s in keys.items() if s.identity == "no")
                for sec, keys in SETTINGS.items()}
ADDED_LATER = {sec: {k: s.default for k, s in keys.items() if s.identity == "unless_default"}
               for sec, keys in SETTINGS.items()}


def defaults() -> dict:
    """{section: {key: default}} for the scalar sections."""
    return {sec: {k: s.default for k, s in keys.items()} for sec, keys in SETTINGS.items()}


SCHEMA = {**SETTINGS, "seed": SEED}  # every scalar setting by section, and the seed
FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")  # YAML 1.1 reads 1e-4 as a str


# ---------------------------------------------------------------------------------------------
# The one validator: a value against its Setting

def cut(text, limit: int = 80) -> str:
    """At most ``limit`` characters of ``str(text)``."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short(value, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: error messages never echo a huge value in full."""
    return cut(repr(value), limit)


def type_name(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "a mapping",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


class ConfigError(ValueError):
    """A bad value at a dotted path: ``problem`` and, where one helps, ``fix``; ``str(e)`` is
    ``"<path>: <problem>; <fix>"``. Code that needs the parts reads the fields, never the text."""

    def __init__(self, path: str, problem: str, fix: str | None = None):
        text = problem + (f"; {fix}" if fix else "")
        super().__init__(f"{path}: {text}" if path else text)
        self.path, self.problem, self.fix = path, problem, fix


class Problem(Exception):
    """A problem at a study file's yaml path (``harness.declare.study`` turns it into a
    ``StudyError`` with file and line)."""

    def __init__(self, path: str, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.path, self.problem, self.fix = path, problem, fix


def check(spec: Setting, value, path: str):
    """Validate and coerce one scalar value against its Setting."""
    if value is None:
        if spec.nullable:
            return None
        raise Problem(path, "a value is required, got null", "give a value or remove the key")
    if spec.kind in ("num", "int"):
        if isinstance(value, str) and spec.kind == "num" and FLOAT_RE.match(value.strip()):
            value = float(value)  # 1e-4: YAML 1.1 reads it as a string
        if spec.coerce and spec.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if spec.coerce and spec.kind == "num" and isinstance(value, int) \
                and not isinstance(value, bool):
            value = float(value)
        if spec.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise Problem(path, f"expected a whole number, got {short(value)} ({type_name(value)})",
                              "write an integer such as 1")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Problem(path, f"expected a number, got {short(value)} ({type_name(value)})",
                          "write a number such as 0.5 or 1.0e-4")
        if isinstance(value, float) and not math.isfinite(value):
            raise Problem(path, f"must be a finite number, got {short(value)}", "write a finite number")
        lo_bad = spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo)
        hi_bad = spec.hi is not None and (value >= spec.hi if spec.hi_open else value > spec.hi)
        if lo_bad or hi_bad:
            raise Problem(path, f"must be {spec.range_text()}, got {short(value)}",
                          f"use a value {spec.range_text()}")
        return value
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise Problem(path, f"expected true or false, got {short(value)} ({type_name(value)})",
                          "write true or false")
        return value
    if spec.kind == "str":
        if not isinstance(value, str) or not value:
            raise Problem(path, f"expected a string, got {short(value)} ({type_name(value)})",
                          "write a name" + (f": one of {', '.join(spec.choices)}" if spec.choices else ""))
        if spec.choices and value not in spec.choices:
            raise Problem(path, f"unknown value {short(value)}", f"known: {', '.join(spec.choices)}")
        return value
    if spec.kind == "groups":  # a non-empty list of distinct names from choices, in their order
        if not isinstance(value, (list, tuple)) or not value:
            raise Problem(path, f"expected a non-empty list, got {short(value)}",
                          f"write e.g. [{spec.choices[0]}]; known: {', '.join(spec.choices)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or item not in spec.choices:
                raise Problem(f"{path}[{i}]", f"unknown group {short(item)}",
                              f"known: {', '.join(spec.choices)}")
        if len(set(value)) != len(value):
            raise Problem(path, f"repeated entries in {list(value)}", "list each group once")
        return sorted(value, key=spec.choices.index)
    if spec.kind == "counts":  # whole numbers in [1, hi], sorted, each once; one number is a list
        value = value if isinstance(value, (list, tuple)) else [value]
        if not value or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= spec.hi
                            for v in value):
            raise Problem(path, f"expected whole numbers in [1, {spec.hi:g}], got {short(value)}",
                          "write e.g. [1, 4, 16]")
        return sorted(set(value))
    return value  # source and any: checked by their own resolver (harness.declare.config)


def check_value(section: str, key: str, value, where: str = ""):
    """Validate and coerce one ``section.key`` value as study files are checked (``--set`` uses
    it); raises ``config.ConfigError`` at ``where + section.key``."""
    try:
        return check(SCHEMA[section][key], value, f"{section}.{key}")
    except Problem as bad:
        raise ConfigError(where + bad.path, bad.problem, bad.fix) from None
