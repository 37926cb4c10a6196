"""Where results live: Parquet rows and atomic files (local or ``pyarrow.fs`` URIs), ``pin.json``,
the study lock, signed checkpoints, environment records, tuning rows, TensorBoard/MLflow views.
No torch at import; imports ``harness.base`` and ``harness.declare``."""
