"""Ablation-study harness for one-step diffusion generators (see README.md and SPEC)."""
__version__ = "0.1.0"
