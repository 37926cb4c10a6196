"""Which Ray this process joins and what it holds, for ``harness run`` and ``harness tune``:
start or join Ray (``connect``), the connected cluster's CPUs and GPUs and whether a study's
``resources`` fit its live nodes, how many data-parallel cells fit at once, and the note for a
teacher cache that the nodes of a cluster cannot all see. Also where a run's results and cache
folders are (``results_root``, ``cache_root``)."""
from __future__ import annotations

import logging
import os

from harness.base import plugins
from harness.base.safefs import NETWORK_FS, filesystem_type
from harness.orchestrate.status import resource_problem
from harness.store.cache import cache_for


def results_root(root: str) -> str:
    return root.rstrip("/") if "://" in root else os.path.abspath(os.path.expanduser(root))


def cache_root(root: str) -> str:
    return cache_for(root)


def cache_note(cache: str, nodes: int) -> str | None:
    """The one note for a teacher cache on a local filesystem when Ray has several nodes."""
    kind = filesystem_type(cache)
    if nodes < 2 or (kind and kind.split(".")[0] in NETWORK_FS):
        return None
    return (f"note: the teacher cache {cache} is a local path ({kind or 'filesystem unknown'}) "
            f"and this Ray cluster has {nodes} nodes: teachers train on any node and every cell "
            f"reads them, so every node must see this folder at the same path (a shared mount). "
            f"Otherwise set HARNESS_CACHE to one (README, Running on a cluster).")


def connect(address: str | None) -> bool:
    """Start or join Ray unless this process already did; True if this call started it."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ctrl-C raises KeyboardInterrupt in the driver (exit 130 and the harness's own resume line)
    # instead of Tune's handler, which stops the sweep and prints its Tuner.restore hint
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    import ray

    if ray.is_initialized():
        return False
    # Ray's notice that a local instance turned token auth on (README, cluster section) is not
    # the user's first line: dropped from its own logger only, nothing else is silenced
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: "Token authentication is enabled" not in record.getMessage())
    # plug-ins reach the workers of every node by name (each node must be able to import them)
    env = {plugins.ENV: os.environ[plugins.ENV]} if os.environ.get(plugins.ENV) else None
    ray.init(address=address or "local", log_to_driver=False, logging_level=logging.WARNING,
             include_dashboard=False, runtime_env={"env_vars": env} if env else None)
    return True


def cluster_totals() -> dict:
    """The CPUs and GPUs of the Ray cluster this process is connected to (for the lock file)."""
    import ray

    totals = ray.cluster_resources()
    return {kind: totals.get(kind, 0) for kind in ("CPU", "GPU")}


def cluster_problem(study) -> str | None:
    """``status.resource_problem`` on the live nodes of the connected Ray cluster."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    problem = resource_problem(study, nodes)
    return problem and f"{problem} Nothing was run."


def concurrency(study) -> int | None:
    """At most how many data-parallel cells fit the cluster at once (None: no limit needed,
    Tune packs one-worker trials by their own resources)."""
    import ray

    if study.workers == 1:
        return None
    total = ray.cluster_resources()
    fits = [total.get(kind, 0) // (study.workers * study.resources[key])
            for kind, key in (("CPU", "cpu"), ("GPU", "gpu")) if study.resources[key] > 0]
    return max(1, int(min(fits, default=1)))
