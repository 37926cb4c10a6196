"""The claims a study is judged on, declared once with defaults: each claim's threshold and
direction, C1's declared pair, the error rate, which grid axes may be averaged over, and the
seeds-on-demand plan. A study file overrides them in its ``claims:`` and ``seeds:`` sections,
checked by the same validator as every other setting (``settings._check`` on ``schema``
declarations); ``analysis.claims`` reads the resolved ``ClaimsSpec`` and keeps no constant of
its own.

    claims:
      alpha: 0.05                     # false-decision rate per claim, over all rounds
      pair: [ratio_js, sid]           # C1's declared (score-free, teacher-score) pair
      thresholds: {C1: 0.10, C2: 0.25}
      pool: [student.lr]              # average the claims over these grid axes (default: none)
    seeds: {start: 3, step: 2, max: 40}   # seeds on demand, instead of grid.seed

Pure Python (no torch, no Ray).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from harness.declare import config as C
from harness.declare.schema import SEED_MAX, Problem, check, num, type_name, whole

HOLDS_IF = {"C1": "below", "C1-best": "below", "C2": "above", "C3a": "below", "C3b": "above",
            "C3c": "above", "C3d": "below", "C3e": "above", "C3f": "below",
            "C4": "below"}
"""claim -> 'below' (holds when its interval lies below the threshold) or 'above': part of what
the claim says, so a study cannot turn it around."""
THRESHOLDS = {
    "C1": num(0.10, -10, False, 10, help="C1: the score-free loss is at most this much worse"),
    "C1-best": num(0.10, -10, False, 10, help="C1-best: as C1, best vs best"),
    "C2": num(0.25, -10, False, 10, help="C2: random init is at least this much worse"),
    "C3a": num(0.25, -10, False, 10, help="C3a: reset output costs less than this share of the gap"),
    "C3b": num(0.50, -10, False, 10, help="C3b: reset body costs more than this share of the gap"),
    "C3c": num(0.10, 0, False, 10, help="C3c: spread over sigma_feat above this share of the gap"),
    "C3d": num(0.25, -10, False, 10, help="C3d: mapping_match closes less than this share"),
    "C3e": num(0.25, -10, False, 10, help="C3e: every band costs more than this share of the gap"),
    "C3f": num(0.25, -10, False, 10, help="C3f: frozen features cost less than this share"),
    "C4": num(0.0, -10, False, 10, help="C4: the verifier's worst relative change is below this"),
}
CLAIMS = {
    "alpha": num(0.05, 0, True, 0.5, True, help="false-decision rate per claim over all rounds"),
    "pair": None,  # two loss labels: checked by check_claims
    "thresholds": None,  # claim -> THRESHOLDS[claim]
    "pool": None,  # grid axes (not loss, init, seed): checked by check_claims
}
DEFAULT_PAIR = ("ratio_js", "sid")
SEEDS = {
    "start": whole(3, 2, 100_000, help="seeds per group in the first round (at least 2)"),
    "step": whole(2, 1, 100_000, help="seeds added per round to the groups of open claims"),
    "max": whole(40, 2, 100_000, help="the cap: seeds per group at the last round"),
    "first": whole(0, 0, SEED_MAX, help="the first seed; seeds are first, first + 1, ..."),
}


@dataclass(frozen=True)
class SeedPlan:
    """Seeds on demand: looks at ``start``, ``start + step``, ... seeds per group, up to ``max``."""

    start: int = 3
    step: int = 2
    max: int = 40
    first: int = 0

    def looks(self) -> list[int]:
        ns, n = [], self.start
        while n < self.max:
            ns.append(n)
            n += self.step
        return ns + [self.max]

    def seeds(self, n: int) -> list[int]:
        """The seeds of a group that has ``n`` of them."""
        return list(range(self.first, self.first + n))


@dataclass(frozen=True)
class ClaimsSpec:
    """The resolved claims declaration of one study (defaults where the study says nothing)."""

    thresholds: dict = field(default_factory=lambda: {k: s.default for k, s in THRESHOLDS.items()})
    pair: tuple = DEFAULT_PAIR
    alpha: float = 0.05
    pool: tuple = ()
    seeds: SeedPlan | None = None

    def threshold(self, claim: str) -> tuple[float, str]:
        """(threshold, holds_if) of a claim (``C3e[band]`` -> C3e's)."""
        base = claim.split("[")[0].split(" ")[0]
        return float(self.thresholds[base]), HOLDS_IF[base]


def check_claims(raw, seeds_raw, axes: list[str]) -> ClaimsSpec:
    """The ``claims:`` and ``seeds:`` sections of a study file -> ClaimsSpec (raises ``Problem``
    with the yaml path). ``axes``: the study's grid axis names."""
    spec = {}
    if raw is not None:
        if not isinstance(raw, dict):
            raise Problem("claims", f"expected a mapping, got {type_name(raw)}",
                          "write e.g. claims: {thresholds: {C1: 0.1}, pair: [ratio_js, sid]}")
        for key, value in raw.items():
            if key not in CLAIMS:
                raise Problem(f"claims.{key}", f"unknown key {C._short(key)} in claims",
                              f"known: {', '.join(CLAIMS)}")
        if raw.get("alpha") is not None:
            spec["alpha"] = float(check(CLAIMS["alpha"], raw["alpha"], "claims.alpha"))
        if raw.get("pair") is not None:
            spec["pair"] = _pair(raw["pair"])
        if raw.get("thresholds") is not None:
            spec["thresholds"] = _thresholds(raw["thresholds"])
        if raw.get("pool") is not None:
            spec["pool"] = _pool(raw["pool"], axes)
    if seeds_raw is not None:
        spec["seeds"] = check_seeds(seeds_raw, axes)
    return ClaimsSpec(**spec)


def _pair(value) -> tuple:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(x, str) and x for x in value) or value[0] == value[1]):
        raise Problem("claims.pair", f"expected two different loss labels, got {C._short(value)}",
                      "write the (score-free, teacher-score) pair, e.g. pair: [ratio_js, sid]")
    return tuple(value)


def _thresholds(value) -> dict:
    if not isinstance(value, dict):
        raise Problem("claims.thresholds", f"expected a mapping, got {type_name(value)}",
                      "write e.g. thresholds: {C1: 0.1, C3a: 0.25}")
    out = {k: s.default for k, s in THRESHOLDS.items()}
    for name, t in value.items():
        if name not in THRESHOLDS:
            raise Problem(f"claims.thresholds.{name}", f"unknown claim {C._short(name)}",
                          f"known: {', '.join(THRESHOLDS)}")
        out[name] = float(check(THRESHOLDS[name], t, f"claims.thresholds.{name}"))
    return out


def _pool(value, axes: list[str]) -> tuple:
    others = [a for a in axes if a not in ("loss", "init", "seed")]
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise Problem("claims.pool", f"expected a list of grid axes, got {C._short(value)}",
                      f"write e.g. pool: [{others[0] if others else 'student.lr'}]")
    for i, axis in enumerate(value):
        if axis not in others:
            known = ", ".join(others) or "none (no grid axis besides loss, init and seed)"
            raise Problem(f"claims.pool[{i}]", f"{C._short(axis)} is not a grid axis the claims "
                          f"could average over", f"use one of: {known}")
    return tuple(value)


def check_seeds(raw, axes: list[str]) -> SeedPlan:
    if not isinstance(raw, dict):
        raise Problem("seeds", f"expected a mapping, got {type_name(raw)}",
                      "write e.g. seeds: {start: 3, step: 2, max: 40}")
    if "seed" in axes:
        raise Problem("seeds", "both seeds: (seeds on demand) and grid.seed are given",
                      "remove grid.seed: seeds: draws the seeds first, first + 1, ...")
    out = {}
    for key, value in raw.items():
        if key not in SEEDS:
            raise Problem(f"seeds.{key}", f"unknown key {C._short(key)} in seeds",
                          f"known: {', '.join(SEEDS)}")
        out[key] = check(SEEDS[key], value, f"seeds.{key}")
    plan = SeedPlan(**out)
    if plan.max < plan.start:
        raise Problem("seeds.max", f"the cap {plan.max} is below start {plan.start}",
                      f"use max >= {plan.start}")
    if plan.first + plan.max - 1 > SEED_MAX:
        raise Problem("seeds.first", f"seeds would run past {SEED_MAX}", "use a smaller first")
    return plan
