"""Ablation studies for one-step diffusion generators: teacher score vs teacher weights.

  harness run studies/quick.yaml [--dry-run] [--address auto] [--results DIR]
  harness tune studies/tune-digits.yaml [--dry-run]   (a study with a tune: section, before run)
  harness status studies/quick.yaml
  harness plan studies/quick.yaml [--img-per-s N] [--workers N]   (the cost, before running)
  harness figures studies/quick.yaml [--only heatmap]
  harness report studies/quick.yaml          (one HTML page: claims, figures, cells, versions)
  harness rescore studies/quick.yaml [--set eval.extractor=shipped]
  harness teacher --data digits --arch unet-xs
  harness cell --data digits --loss sid --init teacher --kimg 20 --out /tmp/cell
  harness bench [--rows step,init]
  harness env [--write-constraints .ci/constraints.txt]
  harness accept-gpu [--out gpu.md]   (once per GPU machine: gpu tests, bench rows, cifar10 cell)

Every user error prints one paragraph naming the problem and the fix, and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap

from harness.base import plugins

EXIT_USAGE = 2


def _user_errors() -> tuple[type, ...]:
    """Exceptions that mean "bad input": reported in one paragraph with exit code 2."""
    from harness.base.plugins import PluginError
    from harness.base.safefs import UnsafePathError
    from harness.core.data import DataError
    from harness.declare.config import ConfigError
    from harness.declare.hashing import PinError
    from harness.orchestrate.gpu_check import AcceptError
    from harness.orchestrate.plan import PlanError
    from harness.store.environment import EnvError
    from harness.store.lock import LockedError
    from harness.store.results import RootError

    return (ConfigError, DataError, EnvError, FileNotFoundError, PinError, PlanError, LockedError,
            RootError, AcceptError, UnsafePathError, PluginError)


def _torch_errors() -> tuple[type, ...]:
    from harness.core.edm_import import EDMImportError
    from harness.core.inits import InitError
    from harness.core.io import CheckpointError
    from harness.core.metrics import MetricsError
    from harness.core.nets import ArchError

    return (InitError, ArchError, CheckpointError, MetricsError, EDMImportError)


MAX_WORD, MAX_MESSAGE = 300, 3000  # characters of one word (a value, a path) and of a message


def _fail(message: str) -> int:
    message = re.sub(r"\S{%d,}" % (MAX_WORD + 1), lambda m: m.group(0)[:MAX_WORD - 3] + "...",
                     str(message))
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    text = textwrap.fill(message, 100, subsequent_indent="  ", break_on_hyphens=False,
                         break_long_words=False)  # paths stay whole
    print("error: " + text, file=sys.stderr)
    return EXIT_USAGE


def _device(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N (argparse reports anything else, exit 2)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d{1,2})?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")


def _parse_value(text: str, source: str = "a command-line value"):
    """A ``--set``/``--loss``/``--init`` value, read by the study file's own YAML reader (the
    same refusals: anchors and aliases, deep nesting, huge values, control characters)."""
    from harness.declare.study_yaml import read_yaml

    return read_yaml(text, source)[0]


def _overrides(pairs: list[str]) -> dict:
    """``--set student.lr=3e-4`` -> {'student': {'lr': 0.0003}}."""
    from harness.declare.config import ConfigError

    out: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise ConfigError("--set", f"expected SECTION.KEY=VALUE, got {pair!r}")
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = _check_override(section, name,
                                                            _parse_value(value, f"--set {key}"))
    return out


def _check_override(section: str, name: str, value):
    """Type and range of a ``--set`` value, by the schema study files use (unknown keys are
    left to ``resolve_cell``)."""
    from harness.declare.config import DEFAULTS
    from harness.declare.schema import check_value

    if not isinstance(DEFAULTS.get(section), dict) or name not in DEFAULTS[section]:
        return value
    return check_value(section, name, value, where="--set ")


def _one_cell(spec: dict) -> dict:
    """The config of the one cell that ``spec`` (options and --set, as study-file sections)
    names, validated like a study file (``study.study_from_mapping``)."""
    from harness.declare.study import study_from_mapping

    (cell,) = study_from_mapping({"study": "adhoc", **spec}).cells
    return cell.config


def cmd_teacher(args) -> int:
    from harness.orchestrate.cell import prepare

    spec = _overrides(args.set)
    spec["data"] = {"name": args.data, **({"path": args.data_path} if args.data_path else {}),
                    **spec.get("data", {})}
    spec["teacher"] = {**{k: v for k, v in (("arch", args.arch), ("kimg", args.kimg),
                                            ("seed", args.seed)) if v is not None},
                       **spec.get("teacher", {})}
    cfg = _one_cell(spec)
    _, _, meta, _ = prepare(cfg, args.out, args.cache, args.device)
    print(f"teacher {meta['id']}: {meta['arch']}, {meta['parameters']:,} parameters, "
          f"{meta['steps']} steps, {meta['wall_s']:.0f} s of training")
    return 0


def cmd_cell(args) -> int:
    from harness.core.data import from_config
    from harness.declare.hashing import cell_id
    from harness.orchestrate.cell import run_cell

    spec = _overrides(args.set)
    spec["data"] = {"name": args.data, **({"path": args.data_path} if args.data_path else {}),
                    **spec.get("data", {})}
    spec.update(loss=_parse_value(args.loss, "--loss"), init=_parse_value(args.init, "--init"),
                seed=args.seed)
    if args.kimg is not None:
        spec.setdefault("student", {})["kimg"] = args.kimg
    cfg = _one_cell(spec)
    cid = cell_id(cfg, from_config(cfg["data"]).fingerprint)  # one checkpoint per config
    last = run_cell(cfg, args.out, args.cache, os.path.join(args.out, "ckpt", f"{cid}.pt"),
                    device=args.device)
    return 0 if last.status in ("done", "running") else 1


def cmd_run(args) -> int:
    from harness.orchestrate.sweep import run_study

    return run_study(args.study, results=args.results, address=args.address,
                     dry_run=args.dry_run, device=args.device, overrides=_overrides(args.set))


def cmd_tune(args) -> int:
    from harness.orchestrate.tune_run import tune_study

    return tune_study(args.study, results=args.results, address=args.address,
                      dry_run=args.dry_run, device=args.device)


def cmd_rescore(args) -> int:
    from harness.declare.config import ConfigError
    from harness.orchestrate.rescore import rescore_study

    overrides = _overrides(args.set or [])
    unknown = sorted(set(overrides) - {"eval"})
    if unknown:
        raise ConfigError(unknown[0], "rescore changes evaluation settings only; use "
                                      "--set eval.KEY=VALUE")
    return rescore_study(args.study, results=args.results, eval_overrides=overrides.get("eval"),
                         device=args.device)


def cmd_status(args) -> int:
    from harness.orchestrate.sweep import study_status

    print(study_status(args.study, results=args.results, overrides=_overrides(args.set)))
    return 0


def cmd_figures(args) -> int:
    from analysis.figures import make_all
    from harness.declare.study import load_study
    from harness.store.pins import results_to_read

    study = load_study(args.study)
    root = results_to_read(study, args.results)
    for path in make_all(root, only=args.only, metric=args.metric, claims=study.claims):
        print(path)
    return 0


def cmd_report(args) -> int:
    from analysis.report import write_report
    from harness.declare.study import load_study
    from harness.store.pins import results_to_read

    study = load_study(args.study)
    root = results_to_read(study, args.results)
    with open(args.study, encoding="utf-8") as f:
        text = f.read()
    print(write_report(root, study_text=text, study_path=args.study, metric=args.metric,
                       regenerate=not args.no_figures, claims=study.claims))
    return 0


def cmd_compact(args) -> int:
    from harness.declare.study import load_study
    from harness.store.lock import acquire_lock
    from harness.store.results import compact

    root = args.results or load_study(args.study).results_root
    with acquire_lock(root, command="harness compact"):
        before, after = compact(root)
    print(f"{root}: {before} result files merged into {after}")
    return 0


def _check_cache(args):
    """Refuse a cache that is no local folder, and a file as teacher/cell --out, up front."""
    from harness.store import cache, results

    if getattr(args, "cache", None):
        args.cache = cache.cache_folder(args.cache, "--cache (default $HARNESS_CACHE)")
    elif hasattr(args, "cache"):  # teacher, cell: the one resolver, rooted at --out
        if args.out:
            results.check_root(args.out)  # before a teacher trains
        args.cache = cache.cache_for(args.out)
    elif os.environ.get("HARNESS_CACHE"):
        cache.cache_folder(os.environ["HARNESS_CACHE"])


def cmd_bench(args) -> int:
    from harness.orchestrate.bench import main as bench_main

    return bench_main(args)


def add_study_set(sp):
    sp.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="change a setting of the study file (repeatable): SECTION.KEY for "
                    "data, teacher, student, eval, resources, teacher_resources; grid.AXIS=[...]; "
                    "init.SCHEME.PARAM; e.g. --set student.kimg=1 --set grid.seed=[0]. Cells get "
                    "the ids of the settings they run with: give such a run its own --results, "
                    "and pass the same --set to status")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common_data(sp):
        sp.add_argument("--data", default="digits", help="dataset name (default: digits)")
        sp.add_argument("--data-path", default=None, help="local files for cifar10/mnist/npz/folder")
        sp.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
        sp.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override any setting, e.g. --set student.lr=3e-4 (repeatable)")
        sp.add_argument("--cache", default=None, help="teachers and extractors (default: "
                        "$HARNESS_CACHE, else <--out>/cache: where `harness run` of that results "
                        "root keeps them)")
        sp.add_argument("--device", default="auto", type=_device,
                        help="cpu, cuda, cuda:N or auto (default: auto)")

    sp = sub.add_parser("teacher", help="train (or reuse) a teacher and report its quality")
    common_data(sp)
    sp.add_argument("--arch", default=None, help="network size (default: unet-xs; toy2d: mlp)")
    sp.add_argument("--kimg", type=float, default=None, help="training images in thousands")
    sp.add_argument("--out", default="results/adhoc", help="where reference rows go")
    sp.set_defaults(func=cmd_teacher)

    sp = sub.add_parser("cell", help="run one cell end to end without Ray")
    common_data(sp)
    sp.add_argument("--loss", default="sid", help="loss name or YAML mapping (default: sid)")
    sp.add_argument("--init", default="teacher", help="init name or YAML mapping, e.g. "
                    "'{name: reset_layers, groups: [output]}' (default: teacher)")
    sp.add_argument("--kimg", type=float, default=None, help="student training images (thousands)")
    sp.add_argument("--out", required=True, help="results root for this cell's rows")
    sp.set_defaults(func=cmd_cell)

    sp = sub.add_parser("run", help="run (or resume) every unfinished cell of a study with Ray Tune")
    sp.add_argument("study", help="study YAML file")
    sp.add_argument("--dry-run", action="store_true", help="print the cells and what would run")
    sp.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                    help="Ray cluster to join, e.g. 'auto' (default: $RAY_ADDRESS or a local Ray)")
    sp.add_argument("--results", default=None, help="results root (default: the study's)")
    sp.add_argument("--device", default="auto", type=_device,
                        help="cpu, cuda, cuda:N or auto (default: auto)")
    add_study_set(sp)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("tune", help="search each loss family's hyperparameters (the study's "
                        "tune: section) with Ray Tune and pin the choice for `harness run`")
    sp.add_argument("study", help="study YAML file with a tune: section")
    sp.add_argument("--dry-run", action="store_true", help="print the families, the search and "
                    "what is tuned already; writes nothing")
    sp.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                    help="Ray cluster to join, e.g. 'auto' (default: $RAY_ADDRESS or a local Ray)")
    sp.add_argument("--results", default=None, help="results root (default: the study's)")
    sp.add_argument("--device", default="auto", type=_device,
                        help="cpu, cuda, cuda:N or auto (default: auto)")
    sp.set_defaults(func=cmd_tune)

    sp = sub.add_parser("rescore", help="score the stored final samples of done cells again "
                        "(a new protocol: rows are added beside the old ones, nothing retrains)")
    sp.add_argument("study", help="study YAML file")
    sp.add_argument("--results", default=None, help="results root (default: the study's)")
    sp.add_argument("--set", action="append", metavar="eval.KEY=VALUE",
                    help="evaluation setting to score under, e.g. --set eval.extractor=shipped")
    sp.add_argument("--device", default="auto", type=_device,
                        help="cpu, cuda, cuda:N or auto (default: auto)")
    sp.set_defaults(func=cmd_rescore)

    sp = sub.add_parser("status", help="cells done / running / failed / pending, time, ETA")
    sp.add_argument("study", help="study YAML file")
    sp.add_argument("--results", default=None, help="results root (default: the study's)")
    add_study_set(sp)
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("figures", help="every figure and table, from stored results alone")
    sp.add_argument("study", help="study YAML file")
    sp.add_argument("--results", default=None, help="results root (default: the study's)")
    sp.add_argument("--only", default=None, help="one output by name, e.g. heatmap or claims "
                    "(an unknown name is refused with the list of outputs)")
    sp.add_argument("--metric", default=None, help="metric to plot (default: the study's primary)")
    sp.set_defaults(func=cmd_figures)

    sp = sub.add_parser("report", help="one self-contained HTML page of the study (claims, "
                        "figures, cells, protocol, versions) into <results>/report.html")
    sp.add_argument("study", help="study YAML file")
    sp.add_argument("--results", default=None, help="results root (default: the study's)")
    sp.add_argument("--metric", default=None, help="metric to report (default: the study's primary)")
    sp.add_argument("--no-figures", action="store_true", help="inline the figures already in "
                    "<results>/figures instead of drawing them again (default: draw them)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("compact", help="merge a study's result files into one per kind "
                        "(before committing results; takes the study lock)")
    sp.add_argument("study", help="study YAML file")
    sp.add_argument("--results", default=None, help="results root (default: the study's)")
    sp.set_defaults(func=cmd_compact)

    sp = sub.add_parser("bench", help="overhead and speed benchmarks (prints a table)")
    sp.add_argument("--quick", action="store_true", help="fewer repetitions")
    sp.add_argument("--rows", default=None, help="comma-separated subset of: step, eval, sweep, "
                    "perf, packing, init, run in that order (default all; CUDA is used when present)")
    sp.add_argument("--out", default=None, help="also write the table to this markdown file, "
                    "a row as soon as it is measured")
    sp.set_defaults(func=cmd_bench)

    from harness.orchestrate.gpu_check import (
        add_parser as add_gpu_parser,  # harness accept-gpu (harness.orchestrate.gpu_check)
    )
    from harness.orchestrate.plan import (
        add_parser as add_plan_parser,  # harness plan (harness.orchestrate.plan)
    )
    from harness.store.environment import (
        add_parser as add_env_parser,  # harness env (harness.store.environment)
    )

    add_env_parser(sub)
    add_plan_parser(sub)
    add_gpu_parser(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up live in logs and pipes too
    errors = _user_errors()
    if args.command in ("teacher", "cell", "rescore"):
        errors += _torch_errors()
    try:
        plugins.load()  # HARNESS_PLUGINS: losses, inits and figures registered before a study is read
        _check_cache(args)
        return args.func(args)
    except errors as e:
        return _fail(e)
    except KeyboardInterrupt:
        again = " ".join(["harness", *(argv if argv is not None else sys.argv[1:])])
        print(f"\ninterrupted: finished cells and the last checkpoints are kept. Resume with: "
              f"{again}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `harness run --dry-run | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
