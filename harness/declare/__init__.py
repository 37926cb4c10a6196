"""The study declaration: every setting and its check, YAML -> cells, cell and teacher ids, the
claims and tuning sections. Pure Python (no torch, no Ray); imports ``harness.base`` only."""
