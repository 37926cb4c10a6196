"""The software a study's numbers are computed with, and the tested dependency set.

Recorded versions. Every process that stores result rows records, once per results root, the
versions it runs with (``results.write_rows`` calls ``record``): one small JSON file per distinct
set, ``<root>/versions/<hash of the set>.json``, so cells on many nodes never race for one
document, the same set is one file however many processes write it, and the Parquet schema is
unchanged. ``harness status`` compares what this machine runs with what the study's rows were
computed with (``drift``) and warns in one line when it can change numbers: the major.minor of
torch, numpy or torch-fidelity, and for rows computed on a GPU those of CUDA and cuDNN.

Everything is read from the installed distributions' metadata (``importlib.metadata``) and the
CUDA version torch was built for from ``torch/version.py``, without importing torch, so
``harness status`` stays quick. The device comes from torch only when the process has already
imported it and initialised CUDA (a process that trained on a GPU).

The tested set. ``harness env --write-constraints .ci/constraints.txt`` writes every
distribution that installing ``harness[test,s3,mlflow]`` pulls in (the closure of its
requirements, markers evaluated on this machine) at the installed version, for
``pip install -e ".[test]" -c .ci/constraints.txt``.
"""
from __future__ import annotations

import ast
import datetime as _dt
import functools
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import socket
import sys

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from harness import __version__
from harness.base.digest import json_sha256

PACKAGES = ("torch", "torchvision", "numpy", "torch-fidelity", "ray", "pandas", "pyarrow",
            "scikit-learn", "pyyaml")
"""Distributions whose versions are recorded beside ``python``, ``harness``, ``cuda``, ``cudnn``."""
NUMERIC = ("torch", "numpy", "torch-fidelity")
"""Whose major.minor can change a stored number (kernels, RNG streams, the metric's code);
``cuda`` and ``cudnn`` join them for rows computed on a GPU."""
EXTRAS = ("test", "s3", "mlflow")
"""The extras whose closure the constraints file pins (everything the README installs)."""
FOLDER = "versions"


class EnvError(ValueError):
    """The constraints file cannot be written (user error: exit 2)."""


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _torch_cuda() -> str | None:
    """The CUDA version torch was built for, read from ``torch/version.py`` (no torch import)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].version.cuda
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return None
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if getattr(target, "id", None) == "cuda" and isinstance(node.value, ast.Constant):
            return node.value.value
    return None


def _cudnn() -> str | None:
    """cuDNN as pip installs it beside a CUDA torch (``nvidia-cudnn-cu12``, ``-cu13``, ...)."""
    for dist in md.distributions():
        if canonicalize_name(dist.metadata["Name"] or "").startswith("nvidia-cudnn"):
            return dist.version
    return None


def _device() -> str:
    """The GPU this process computed on, if it has initialised CUDA; else ``cpu``."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.get_device_name()
    return "cpu"


def current() -> dict:
    """The versions this process runs with (None: not installed or not known)."""
    return dict(_current())


@functools.lru_cache(maxsize=1)
def _current() -> dict:  # a scan of the installed distributions: once per process
    cuda = _torch_cuda()
    return {"python": platform.python_version(), "harness": __version__,
           **{name: _version(name) for name in PACKAGES},
           "cuda": cuda, "cudnn": _cudnn() if cuda else None,
           "platform": f"{sys.platform}-{platform.machine()}"}


def record() -> tuple[str, bytes]:
    """(file name under ``versions/``, its bytes) for this process: versions and device."""
    versions = {**current(), "device": _device()}
    digest = json_sha256(versions)[:12]
    doc = {"versions": versions, "recorded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(
        timespec="seconds"), "host": socket.gethostname()}
    return f"{digest}.json", (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()


def minor(version: str | None) -> str | None:
    """``2.14.1+cu130`` -> ``2.14``; ``13.0`` -> ``13.0``; None stays None."""
    if not version:
        return None
    return ".".join(version.split("+")[0].split(".")[:2])


def drift(recorded: list[dict], running: dict) -> list[str]:
    """Warning lines (at most two) when ``running`` versions differ from those the study's rows
    were computed with in a way that can change numbers (major.minor of ``NUMERIC``, and of CUDA
    and cuDNN for rows computed on a GPU). ``recorded``: the ``versions/*.json`` documents of a
    results root; the newest is the one compared with."""
    if not recorded:
        return []
    sets = [d["versions"] for d in sorted(recorded, key=lambda d: d.get("recorded_at", ""))]
    gpu = [v for v in sets if v.get("device", "cpu") != "cpu"]
    out, varying = [], []
    for k in NUMERIC + ("cuda", "cudnn"):
        values = list(dict.fromkeys(minor(v.get(k)) for v in (sets if k in NUMERIC else gpu)))
        if len(values) > 1:
            varying.append(f"{k} {' / '.join(str(x) for x in values)}")
    if varying:
        out.append(f"warning: this study's rows were computed with different versions "
                   f"({'; '.join(varying)}): rows from different versions may differ by more "
                   f"than rounding (versions/*.json in the results root lists them)")
    expected = {k: minor(sets[-1].get(k)) for k in NUMERIC}
    if gpu:
        expected.update(cuda=minor(gpu[-1].get("cuda")), cudnn=minor(gpu[-1].get("cudnn")))
    changed = [k for k in expected if minor(running.get(k)) != expected[k]]
    if changed:
        fix = " ".join(f'"{k}=={expected[k]}.*"' for k in changed
                       if k in NUMERIC and expected[k] is not None)
        out.append("warning: this machine runs " + ", ".join(
            f"{k} {minor(running.get(k)) or 'none'} (the study's rows: {expected[k] or 'none'})"
            for k in changed)
            + ": cells computed here can give other numbers than the stored ones"
            + (f"; to match, pip install {fix}" if fix else ""))
    return out


# ---------------------------------------------------------------------------------------------
# the constraints file

def closure(root: str = "harness", extras=EXTRAS) -> dict[str, str]:
    """{distribution name: installed version} of ``root`` and everything its requirements (with
    ``extras``) pull in on this machine, ``root`` itself left out."""
    try:
        md.distribution(root)
    except md.PackageNotFoundError:
        raise EnvError(f"{root} is not installed in this Python ({sys.executable}), so its "
                       f"requirements cannot be listed: run `pip install -e \".[test]\"` in the "
                       f"checkout first.") from None
    seen: dict[str, set] = {}
    out: dict[str, str] = {}
    todo = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key in seen and wanted <= seen[key]:
            continue
        seen[key] = seen.get(key, set()) | wanted
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # required by a marker this machine satisfies, but not installed
        if key != canonicalize_name(root):
            out[dist.metadata["Name"]] = dist.version
        for text in dist.requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is not None and not any(req.marker.evaluate({"extra": e})
                                                  for e in (wanted or {""})):
                continue
            todo.append((req.name, set(req.extras)))
    return dict(sorted(out.items(), key=lambda kv: canonicalize_name(kv[0])))


def constraints_text(pins: dict[str, str]) -> str:
    """The constraints file: a header saying how it is used and regenerated, one pin a line
    (local version labels such as ``+cu130`` dropped: ``torch==2.14.1`` matches every build)."""
    head = [
        "# The tested dependency set of harness: every distribution that",
        f'# `pip install -e ".[{",".join(EXTRAS)}]"` installs, at the version a fresh install',
        "# resolved on the machine where the tests run.",
        "# Install exactly this set:",
        '#   pip install -e ".[test]" -c .ci/constraints.txt',
        "# Regenerate after a fresh install that passes the tests (README, Installing):",
        "#   harness env --write-constraints .ci/constraints.txt",
        f"# Generated with Python {platform.python_version()} on {sys.platform}-"
        f"{platform.machine()}; markers were evaluated there.",
    ]
    return "\n".join(head + [f"{n}=={v.split('+')[0]}" for n, v in pins.items()]) + "\n"


def write_constraints(path: str) -> int:
    """Write the constraints file; returns how many pins it holds."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise EnvError(f"--write-constraints {path}: "
                       + ("that is a folder" if os.path.isdir(path) else
                          f"its folder {folder} does not exist")
                       + "; give a file path such as .ci/constraints.txt (run from the checkout).")
    pins = closure()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(constraints_text(pins))
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise EnvError(f"--write-constraints {path}: cannot write it ({e.strerror}); give a "
                       f"writable file path.") from None
    return len(pins)


def describe(versions: dict) -> str:
    """One line: ``python 3.11.9, harness 0.1.0, torch 2.14.1 (CUDA 13.0, cuDNN ...), ...``."""
    parts = []
    for k, v in versions.items():
        if k in ("cuda", "cudnn", "platform", "device"):
            continue
        if k == "torch" and versions.get("cuda"):
            v = f"{v} (CUDA {versions['cuda']}" + (f", cuDNN {versions['cudnn']})"
                                                  if versions.get("cudnn") else ")")
        parts.append(f"{k} {v if v is not None else 'not installed'}")
    return ", ".join(parts) + f" on {versions.get('platform')}"


def add_parser(sub) -> None:
    sp = sub.add_parser("env", help="the versions this machine runs; --write-constraints writes "
                        "the tested dependency set")
    sp.add_argument("--write-constraints", metavar="PATH", default=None,
                    help="write every installed dependency of harness[test,s3,mlflow] pinned to "
                         "its version (the repository keeps .ci/constraints.txt)")
    sp.set_defaults(func=cmd_env)


def cmd_env(args) -> int:
    versions = current()
    print(describe(versions))
    if args.write_constraints:
        n = write_constraints(args.write_constraints)
        print(f"{args.write_constraints}: {n} pinned distributions (install with "
              f"pip install -e \".[test]\" -c {args.write_constraints})")
    return 0
