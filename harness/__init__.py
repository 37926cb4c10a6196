"""Ablation-study harness for one-step diffusion generators (see README.md).

``harness.open_study(root)`` loads a study's stored results for a notebook (typed pandas frames
and the judged claims; ``analysis.notebook.open_study``). It is imported on first use, so
``import harness`` stays light: no torch, Ray, pandas or matplotlib until a module needs them.
"""
__version__ = "0.1.0"

_LAZY = {"open_study": ("analysis.notebook", "open_study"),
         "StudyResults": ("analysis.notebook", "StudyResults")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
