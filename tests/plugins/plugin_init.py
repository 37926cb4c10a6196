"""A new init scheme in one file (a plug-in; tests/test_plugins.py selects it from a study file).

``shrunk_teacher``: the teacher's weights, every floating-point tensor multiplied by ``factor``
(does a generator need the teacher's weights at their scale, or only their direction?).
"""
from harness.core.inits import GeneratorInit, register_init
from harness.declare.config import param


@register_init("shrunk_teacher", {"factor": param(0.5, positive=True, hi=1.0)})
def shrunk_teacher(ctx, params) -> GeneratorInit:
    return GeneratorInit({k: v.detach() * params["factor"] if v.is_floating_point()
                          else v.detach().clone() for k, v in ctx.teacher_state.items()})
