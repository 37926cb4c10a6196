"""What the harness says about a study's tuning (``harness.store.tuning`` holds the protocol and
the choice): the ``harness tune --dry-run`` text, the lines of ``harness status`` while a study
is tuned, and the note when ASHA cannot stop any trial. No torch, no Ray."""
from __future__ import annotations

from harness.declare import config as C
from harness.declare.tune_spec import (
    ASHA_GRACE,
    ASHA_REDUCTION,
    SEARCH_SEED,
    SELECTION_RULE,
    Family,
    Tune,
)
from harness.store.tuning import (
    family_hash,
    family_states,
    final_kimg,
    fmt_value,
    read_trial_rows,
    select,
    trial_table,
)


def report_kimg(cfg: dict) -> list[float]:
    """The kimg of each evaluation of one trial seed, as ``train.train_student`` makes them
    (every ``eval.every_kimg`` in whole steps, and the last step)."""
    batch = cfg["student"]["batch"]
    total = C.steps(cfg["student"]["kimg"], batch)
    every = max(1, round(cfg["eval"]["every_kimg"] * 1000 / batch))
    return [s * batch / 1000 for s in sorted({*range(0, total, every), total})]


def asha_note(tune: Tune, family: Family) -> str | None:
    """Why ASHA cannot stop any trial of this family, or None: it compares trials at its rungs
    (from the grace period to the whole budget), and a trial whose scores all come before the
    grace period or at the end gives it nothing to compare (at the whole budget a trial is
    simply done)."""
    if tune.scheduler != "asha":
        return None
    per_seed = report_kimg(family.base)
    end = per_seed[-1] * len(tune.seeds)
    reports = [j * per_seed[-1] + k for j in range(len(tune.seeds)) for k in per_seed]
    grace = end * ASHA_GRACE
    if any(grace - 1e-9 <= k < end - 1e-9 for k in reports):
        return None
    return (f"scheduler asha cannot stop any {family.label} trial: a trial reports a score at "
            f"kimg {', '.join(f'{k:g}' for k in sorted(set(reports)))} (eval.every_kimg "
            f"{family.base['eval']['every_kimg']:g}), none between ASHA's grace period "
            f"({grace:g}) and the whole budget ({end:g}), so every trial runs its whole budget "
            f"as with `scheduler: none`. For ASHA to act, evaluate at least every {grace:g} kimg.")


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
            f"{k}={fmt_value(v)}" for k, v in entry["choice"].items())
        lines.append(f"  {label}: {space}; init {C.init_label(fam.base['init'])}; {shown}")
    lines += [f"note: {n}" for n in filter(None, (asha_note(t, f) for f in t.families.values()))]
    todo = sum(s != "tuned" for s, _ in states.values())
    lines.append(f"{todo} families to tune, {n_f - todo} tuned (dry run: nothing written)")
    return "\n".join(lines)


def tune_progress(study, root: str) -> list[str]:
    """``harness status`` of a study not fully tuned: per family without a current choice, its
    trials as the ``tuning`` rows show them (reached the whole budget, diverged, the rest stopped
    by ASHA or still running: the rows cannot tell those apart) and the best complete one."""
    t = study.tune
    todo = [label for label, (state, _) in family_states(study, root).items() if state != "tuned"]
    if not todo:
        return []
    rows = read_trial_rows(root, t.seeds)
    out = []
    for label in todo:
        fam = t.families[label]
        table = trial_table(rows, family_hash(t, fam), t.seeds, final_kimg(fam.base))
        if table.empty:
            out.append(f"tuning {label}: no trial has reported yet ({t.trials} to run)")
            continue
        n = table["state"].value_counts()
        best = select(table)
        shown = "" if best is None else "; best so far " + " ".join(
            f"{k}={fmt_value(v)}" for k, v in best["values"].items()) + \
            f": {best['metric']} {best['score']:.4g}"
        out.append(f"tuning {label}: {len(table)} of {t.trials} trials have reported, "
                   f"{n.get('complete', 0)} reached the whole budget, {n.get('diverged', 0)} "
                   f"diverged, {n.get('stopped', 0)} stopped early or still running{shown}")
    return out
