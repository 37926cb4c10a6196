"""Judged claims as plain objects: the ONE place that reads the claims engine for the forest
figure, the study page and the notebook API.

``judged_claims`` calls ``analysis.claims.claim_results`` with the study's claims declaration, so
every number equals the one in ``claims.md`` / ``claims.data.csv``; it returns ``Claim`` records
with fixed field names, so a new claims engine is re-pointed here and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from analysis.claims import claim_results
from analysis.claims_report import rule_of, statement_of
from analysis.data import Study
from harness.declare.claims_spec import ClaimsSpec


@dataclass(frozen=True)
class Claim:
    """One claim judged on one study.

    ``effect``/``lo``/``hi``/``threshold`` are fractions (0.1 = 10%) for every claim: a relative
    shortfall (C1, C2, C4) or a share of the teacher-random gap (C3a-C3e). ``holds_if``:
    'below' (holds when ``hi`` < threshold) or 'above' (holds when ``lo`` > threshold).
    ``kimg``: None for the final scores. NaN effect: not tested (``verdict`` says why).
    """
    name: str
    statement: str
    comparison: str
    effect_name: str
    rule: str
    method: str
    effect: float
    lo: float
    hi: float
    threshold: float
    holds_if: str
    verdict: str
    n_seeds: int
    seeds_to_decide: int | None
    kimg: float | None
    details: tuple = ()
    level: float = float("nan")  # the interval's confidence level (1 - alpha over comparisons)

    @property
    def tested(self) -> bool:
        return math.isfinite(self.effect) and self.name != "C3"


def judged_claims(study: Study, spec: ClaimsSpec | None = None, rows: pd.DataFrame | None = None,
                  kimg: float | None = None) -> list[Claim]:
    """Every claim of ``study`` under ``spec`` (the study file's ``claims:`` section; None: the
    defaults); ``rows``: the stored rows, for the verifier's C4 when present."""
    out = []
    for v in claim_results(study, spec, rows=rows, kimg=kimg):
        out.append(Claim(
            name=v.name, statement=statement_of(v.claim), comparison=v.comparison,
            effect_name=v.effect_name, rule=rule_of(v.claim), method=v.method,
            effect=float(v.effect), lo=float(v.ci_low), hi=float(v.ci_high),
            threshold=float(v.threshold), holds_if=v.holds_if, verdict=v.verdict,
            n_seeds=int(v.n_seeds or 0), seeds_to_decide=v.seeds_needed, kimg=kimg,
            details=tuple(v.details), level=1 - float(v.alpha) / v.comparisons))
    return out


def claims_frame(claims: list[Claim]) -> pd.DataFrame:
    """One row per claim (the fields of ``Claim``, details and level left out)."""
    cols = [f for f in Claim.__dataclass_fields__ if f not in ("details", "level")]
    return pd.DataFrame([{c: getattr(k, c) for c in cols} for k in claims], columns=cols)
