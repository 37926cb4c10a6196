"""Figures, tables and claims regenerated from a study's stored results (SPEC §8).

Entry point: ``analysis.figures.make_all``. Reads results only through ``harness.results`` and
labels through ``harness.config``; never imports torch or Ray.
"""
