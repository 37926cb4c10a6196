"""Loss families, registered by the names study files use: ``di``
(Diff-Instruct/DMD distribution matching) and ``sid`` (Score identity Distillation) call the
teacher's score; ``ratio`` (a density-ratio network, divergence ``kl``/``js``/``rkl``) never does.

``build(loss_cfg, teacher, aux, t_max)`` takes a canonical loss config (``config.resolve_loss``)
and returns the family object; its parameters are exactly those of ``config.LOSS_FAMILIES``,
which holds their one declaration (type, range, default, result column): the constructors take
them as required keywords, with no second default.
"""
from __future__ import annotations

from harness.base.registry import Registry
from harness.core.losses.base import LossFamily
from harness.core.losses.ratio import DensityRatio
from harness.core.losses.score import DistributionMatching, ScoreIdentity

LOSSES = Registry("loss family", base=LossFamily)
LOSSES.register("di")(DistributionMatching)
LOSSES.register("sid")(ScoreIdentity)
LOSSES.register("ratio")(DensityRatio)


def family_class(loss_cfg: dict) -> type[LossFamily]:
    return LOSSES.get(loss_cfg["name"])


def build(loss_cfg: dict, teacher, aux, t_max: float) -> LossFamily:
    params = {k: v for k, v in loss_cfg.items() if k != "name"}
    return family_class(loss_cfg)(teacher, aux, t_max=t_max, **params)
