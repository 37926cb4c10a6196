"""Figures, tables and claims regenerated from a study's stored results.

Entry points: ``analysis.figures.make_all`` (every figure), ``analysis.report.write_report``
(the study page) and ``analysis.open_study`` (frames and claims for a notebook). Reads results
only through ``harness.store.results`` and labels through ``harness.declare.config``; never imports torch or Ray.
"""
from analysis.notebook import StudyResults, open_study

__all__ = ["StudyResults", "open_study"]
