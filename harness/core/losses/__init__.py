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
from harness.declare.config import declare_loss
from harness.core.losses.base import LossFamily
from harness.core.losses.ratio import DensityRatio
from harness.core.losses.score import DistributionMatching, ScoreIdentity

LOSSES = Registry("loss family", base=LossFamily)
LOSSES.register("di")(DistributionMatching)
LOSSES.register("sid")(ScoreIdentity)
LOSSES.register("ratio")(DensityRatio)


def register_loss(name: str, params: dict | None = None):
    """Class decorator for a new loss family (a ``LossFamily`` subclass whose constructor takes
    ``(teacher, aux, *, t_max, **params)``): declares ``name`` and its parameters
    (``{name: harness.declare.config.param(...)}``) for study files and registers the class.
    Whether it calls the teacher's score is the class's ``uses_teacher_score``."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, LossFamily)):
            raise TypeError(f"loss family {name!r}: {cls!r} is not a LossFamily subclass")
        declare_loss(name, params or {}, teacher_score=bool(cls.uses_teacher_score))
        return LOSSES.register(name)(cls)
    return deco


def family_class(loss_cfg: dict) -> type[LossFamily]:
    return LOSSES.get(loss_cfg["name"])


def build(loss_cfg: dict, teacher, aux, t_max: float) -> LossFamily:
    params = {k: v for k, v in loss_cfg.items() if k != "name"}
    return family_class(loss_cfg)(teacher, aux, t_max=t_max, **params)
