"""The ``tracking:`` study setting (TensorBoard on by default, MLflow off): its check, with no
torch, no Ray and no tracker library; ``harness.store.tracking`` writes the views.
"""
from __future__ import annotations

import re

from harness.declare.schema import Problem, Setting, type_name
from harness.declare.schema import check as check_setting

DEFAULT = {"tensorboard": True, "mlflow": None}
MLFLOW_KEYS = ("uri", "experiment")
_URI_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")
_MLFLOW_EXAMPLE = "write e.g. tracking: {mlflow: {uri: http://127.0.0.1:5000, experiment: NAME}}"


# ---------------------------------------------------------------------------------------------
# The study setting

def check(body) -> dict:
    """Validate a study's ``tracking:`` value; the complete settings (defaults filled in).

    Raises ``settings.Problem`` (``harness.declare.study`` adds the file and line)."""
    out = dict(DEFAULT)
    if body is None:
        return out
    if not isinstance(body, dict):
        raise Problem("tracking", f"expected a mapping, got {type_name(body)}",
                      "write e.g. tracking: {tensorboard: true, mlflow: null}")
    for key, value in body.items():
        if key == "tensorboard":
            out["tensorboard"] = check_setting(Setting("bool"), value, "tracking.tensorboard")
        elif key == "mlflow":
            out["mlflow"] = _check_mlflow(value)
        else:
            raise Problem(f"tracking.{key}", f"unknown key {key!r}", "known: tensorboard, mlflow")
    return out


def _check_mlflow(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Problem("tracking.mlflow", f"expected a mapping or null, got {type_name(value)}",
                      _MLFLOW_EXAMPLE)
    for key in value:
        if key not in MLFLOW_KEYS:
            raise Problem(f"tracking.mlflow.{key}", f"unknown key {key!r}",
                          f"known: {', '.join(MLFLOW_KEYS)}")
    if value.get("uri") is None:
        raise Problem("tracking.mlflow.uri", "the MLflow tracking URI is missing", _MLFLOW_EXAMPLE)
    uri = check_setting(Setting("str"), value["uri"], "tracking.mlflow.uri")
    if not (_URI_RE.match(uri) or uri == "databricks"):
        raise Problem("tracking.mlflow.uri", f"expected a URI, got {uri!r} (a relative path would "
                                          f"mean a different folder on every Ray worker)",
                      "write the tracking server's address (http://HOST:5000), databricks, or an "
                      "absolute file:///path")
    experiment = value.get("experiment")
    if experiment is not None:
        experiment = check_setting(Setting("str"), experiment, "tracking.mlflow.experiment")
    return {"uri": uri, "experiment": experiment}
