"""Live progress of a sweep: one compact line per cell evaluation, printed by the driver.

``Progress`` is a ``tune.Callback``; Ray's own output is turned down (``verbose=0``, no worker log
forwarding) and its result logs stay in the experiment's storage folder. A line reads::

    [+1m05s] cell 231c86a3e3d3 sid | teacher | seed 0  kimg 1.5/2  mmd_toy2d_200 0.172  running  (10 s)

The callback is pickled into Ray's experiment state (``tuner.pkl``), so it holds only plain data.
"""
from __future__ import annotations

import time

from ray import tune

from .status import duration

def error_summary(text: str | None, limit: int = 300) -> str:
    """The last meaningful line of an error text (a Ray traceback ends with the exception)."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line.startswith(("^", "File ", "~")):
            return line[:limit]
    return "unknown error"


def _read(path: str | None) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (OSError, TypeError):
        return ""


class Progress(tune.Callback):
    """Print one line per cell report, retry and failure; remember the failures."""

    def __init__(self, labels: dict[str, str], kimg: dict[str, float], n_cells: int):
        self.labels, self.kimg, self.n_cells = labels, kimg, n_cells
        self.t0, self.finished, self.errors = time.time(), set(), {}

    def setup(self, **info):
        self.t0 = time.time()

    def _head(self, trial) -> tuple[str, str]:
        cid = trial.config.get("cell", "?")
        return cid, f"[+{duration(time.time() - self.t0)}] cell {cid} {self.labels.get(cid, '')}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        cid, head = self._head(trial)
        metric = result.get("primary")
        value = f"  {metric} {result[metric]:.4g}" if metric in result else ""
        status = result.get("status", "?")
        if status in ("done", "diverged"):
            self.finished.add(cid)
        print(f"{head}  kimg {result.get('kimg', 0):g}/{self.kimg.get(cid, 0):g}{value}  {status}"
              f"  ({duration(result.get('wall_s', 0))}; {len(self.finished)}/{self.n_cells} "
              f"finished)", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        _, head = self._head(trial)
        print(f"{head}  attempt {trial.num_failures} failed: "
              f"{error_summary(_read(trial.error_file))}; retrying from its last checkpoint",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        cid, head = self._head(trial)
        self.errors[cid] = error_summary(_read(trial.error_file))
        print(f"{head}  FAILED after {trial.num_failures} attempt(s): {self.errors[cid]} "
              f"(Ray's log: {trial.error_file})", flush=True)

    def __getstate__(self):
        return {**self.__dict__, "finished": set(), "errors": {}}
