"""Seeds on demand: the cells a study with a ``seeds:`` plan runs now, replayed from its rows.

A study with ``seeds: {start, step, max}`` starts with ``start`` seeds per group. After each
round every claim is judged (``analysis.claims.claim_results``, which looks at each claim
round by round and spends part of the error rate at each look); the groups that the claims still
open compare get the next ``step`` seeds, until every claim decides or reaches ``max``. The
plan is recomputed from the stored rows every time (the ``status=done`` rows are the truth), so a
driver killed mid-round reruns into the same round and re-runs nothing: a claim is looked at
only once every cell of that look is final. An added seed is an ordinary cell of the study's
``seed_pool`` (the cells of every seed up to the cap, built like hand-listed seeds), so it gets
the id it would have had in ``grid.seed``.

No torch, no Ray: ``harness run``, ``harness status`` and the dry run share it.
"""
from __future__ import annotations

import dataclasses
import io
from contextlib import redirect_stdout
from dataclasses import dataclass, field

from analysis.claims import claim_results
from analysis.data import load_study as load_results
from harness.declare import hashing
from harness.declare.hashing import canonical_json
from harness.store import results as store


@dataclass
class Round:
    """The cells the study runs now and why."""

    cells: list  # start cells, cells with stored rows, and the cells the open claims need next
    adds: list = field(default_factory=list)  # of those, the ones beyond the first round
    # with no rows yet: what the open claims wait for
    begun: list = field(default_factory=list)  # cells of the open claims' round (its new seeds)
    # that have rows already: the round is under way
    looks: list = field(default_factory=list)  # seeds per group at each round (SeedPlan.looks)
    round: int = 1  # the round the open claims wait for (1-based)
    open: list = field(default_factory=list)  # analysis.claims_base.ClaimResult, still open
    results: list = field(default_factory=list)  # every claim as judged now
    computed: list | None = None  # hashing.compute_ids rows of ``cells`` (None: not computed)


def signature(config: dict) -> str:
    """A group: the cell's config less its seed."""
    return canonical_json({k: v for k, v in config.items() if k != "seed"})


def judge(study, root: str, rows) -> list:
    """Every claim of the study on the stored rows (empty when nothing is scored yet)."""
    # analysis brings matplotlib (~seconds): only studies with a seeds plan pay for it

    if rows is None or rows.empty:
        return []
    with redirect_stdout(io.StringIO()):  # "nothing to plot" notes are for `harness figures`
        found = load_results(root, rows=rows)
    if found is None or found.final.empty:
        return []
    return claim_results(found, study.claims, rows=rows)


def plan(study, root: str, data_fingerprint, rows=None) -> Round:
    """The round ``harness run`` runs now; without a seeds plan, the study's cells."""
    if study.claims.seeds is None:
        return Round(cells=list(study.cells))
    rows = store.load_rows(root) if rows is None else rows
    computed = hashing.compute_ids(dataclasses.replace(study, cells=study.seed_pool),
                                   data_fingerprint)
    ids = {cid: cell for cid, cell, *_ in computed}
    first_round = {c.index for c in study.cells}  # the same cells: seed_pool holds them too
    first = {cid for cid, cell in ids.items() if cell.index in first_round}
    stored = set(rows["cell"]) if not rows.empty else set()
    judged = judge(study, root, rows)
    waiting = [v for v in judged if v.next_seeds]  # analysis.claims.open_claims
    want = set()
    for v in waiting:
        sigs = {signature(ids[c].config) for c in v.cells if c in ids}
        want |= {(s, int(seed)) for s in sigs for seed in v.next_seeds}
    looks = study.claims.seeds.looks()
    n = max((len(v.next_seeds) for v in waiting), default=0)
    k = looks.index(n) + 1 if n in looks else 1
    # the rounds the open claims wait for: claims judged on different groups can be a round
    # apart while a round is under way (one claim's cells all final, another's not yet)
    awaited = {looks.index(len(v.next_seeds)) + 1 for v in waiting if len(v.next_seeds) in looks}
    chosen, adds, begun = [], [], []
    for row in computed:
        cid, cell = row[0], row[1]
        needed = (signature(cell.config), int(cell.config["seed"])) in want
        if cid in first or cid in stored or needed:
            chosen.append(row)
        if needed and cid not in first and cid not in stored:
            adds.append(cell)
        elif needed and cid not in first and seed_round(looks, cell.config["seed"]) in awaited:
            begun.append(cell)
    return Round(cells=[row[1] for row in chosen], adds=adds, begun=begun, open=waiting,
                 results=judged, computed=chosen, looks=looks, round=k)


def with_cells(study, cells: list):
    """A copy of the study whose cells are ``cells`` (the study itself is never changed)."""
    return dataclasses.replace(study, cells=list(cells))


def cap_lines(study) -> list[str]:
    """What a seeds plan can cost at most: every group at the cap."""
    plan_ = study.claims.seeds
    if plan_ is None:
        return []
    pool = study.seed_pool
    kimg = sum(float(c.config["student"]["kimg"]) for c in pool)
    looks = plan_.looks()
    return [f"seeds on demand: {plan_.start} seeds per group, then {plan_.step} more per round "
            f"to the groups of the claims still open, up to {plan_.max} ({len(looks)} rounds at "
            f"most); claims alpha {study.claims.alpha:g}",
            f"at most {len(pool)} cells ({kimg:g} kimg of student training) if every claim "
            f"stays open to the cap; so far, this round included: {len(study.cells)} cells"]


def seed_round(looks: list, seed) -> int:
    """The round (1-based) that first runs ``seed`` (its seeds per group pass ``seed``)."""
    return next((j + 1 for j, n in enumerate(looks) if int(seed) < n), len(looks))


def round_of(r: Round, seeds_per_group: int) -> int:
    """The round (1-based) that runs ``seeds_per_group`` seeds per group."""
    return r.looks.index(seeds_per_group) + 1


def describe_round(r: Round) -> list[str]:
    """Open claims and the cells their round adds, or still has to run when it is under way
    (``harness status``, dry run, run)."""
    if not r.results:
        return ["claims: not judged yet (no scores stored)"]
    if not r.open:
        return [f"claims: none open ({len(r.results)} judged)"]
    out = [f"claims open ({len(r.open)}): " + "; ".join(
        f"{v.name} ({v.verdict}): round {round_of(r, len(v.next_seeds))} runs "
        f"{len(v.next_seeds)} seeds per group ({v.next_seeds[0]}-{v.next_seeds[-1]})"
        for v in r.open)]
    by_round = {}
    for kind, cells in (("adds", r.adds), ("begun", r.begun)):
        for c in cells:
            by_round.setdefault(seed_round(r.looks, c.config["seed"]), {"adds": [], "begun": []})[
                kind].append(c)
    for k, got in sorted(by_round.items()):
        adds, begun = got["adds"], got["begun"]
        shown = ", ".join(c.label for c in adds[:12]) + (" ..." if len(adds) > 12 else "")
        if begun and adds:
            out.append(f"round {k} is under way: {len(adds)} of its {len(adds) + len(begun)} "
                       f"new cells have no result yet: {shown}")
        elif begun:
            out.append(f"round {k} is under way: all {len(begun)} of its new cells have results")
        else:
            out.append(f"round {k} adds {len(adds)} cells: {shown}")
    return out
