"""Training throughput: what ``harness plan`` expected and what the cells and teachers measure.

No torch: ``harness status`` compares the plan saved in ``<results root>/plan.json`` with the
``img_per_s`` rows the cells write (training images per second of training compute, all resumes
together) and with each teacher's ``status.json`` (steps x batch over training seconds).

Cells that train at the same speed share a key: the data, the network, the loss family, the
batch and the execution settings (``aux_steps``, precision, memory layout, compilation). Seeds,
init schemes and loss parameters do not change the cost of a step.
"""
from __future__ import annotations

import json
import statistics

from harness.declare.hashing import canonical_json

PLAN = "plan.json"


def cell_key(cfg: dict) -> str:
    st = cfg["student"]
    return canonical_json({"data": cfg["data"], "arch": cfg["teacher"]["arch"],
                           "loss": cfg["loss"]["name"],
                           **{k: st.get(k) for k in ("batch", "aux_steps", "precision",
                                                      "channels_last", "compile")}})


def teacher_key(data: dict, teacher: dict) -> str:
    return canonical_json({"data": data, **{k: teacher.get(k) for k in (
        "arch", "batch", "precision", "channels_last", "compile")}})


def _settings(section: dict) -> str:
    extra = [k for k in ("channels_last", "compile") if section.get(k)]
    return f"{section.get('precision', 'fp32')}" + "".join(f" + {k}" for k in extra)


def describe_cell(cfg: dict) -> str:
    """``sid, unet-xs, batch 64, fp32 + channels_last`` (data name first when it matters)."""
    st = cfg["student"]
    return (f"{cfg['loss']['name']}, {cfg['teacher']['arch']} on {cfg['data']['name']}, batch "
            f"{st['batch']}, {_settings(st)}")


def describe_teacher(data: dict, teacher: dict) -> str:
    return f"teacher {teacher['arch']} on {data['name']}, batch {teacher['batch']}, " \
           f"{_settings(teacher)}"


def read_plan(data: bytes | None) -> dict | None:
    """A plan.json document, or None if there is none or it is not one (status never fails
    on it)."""
    if data is None:
        return None
    try:
        doc = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(doc, dict) and all(isinstance(doc.get(k), dict) for k in ("cells", "teachers"))
    return doc if ok else None


def _rate(entry) -> float | None:
    value = entry.get("img_per_s") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def compare(plan: dict, cells: list[tuple[dict, float]], teachers: list[tuple[dict, dict, float]]
            ) -> list[str]:
    """One line per planned key that something has measured: the plan's images/second against
    the median the cells measure (``cells``: (config, latest img_per_s) of each cell with one)
    and the teachers' (``teachers``: (data, teacher section, img/s)). Keys nobody has measured
    yet are left out."""
    lines = []
    groups: dict[str, list] = {}
    for cfg, ips in cells:
        groups.setdefault(("cells", cell_key(cfg)), []).append((describe_cell(cfg), ips))
    for data, teacher, ips in teachers:
        groups.setdefault(("teachers", teacher_key(data, teacher)), []).append(
            (describe_teacher(data, teacher), ips))
    for (kind, key), measured in groups.items():
        planned = _rate(plan[kind].get(key))
        if planned is None:
            continue
        median = statistics.median(ips for _, ips in measured)
        n = len(measured)
        who = f"{n} {kind if n > 1 else kind[:-1]} measure{'' if n > 1 else 's'}"
        lines.append(f"throughput of {measured[0][0]}: planned {planned:.4g} img/s "
                     f"({plan[kind][key].get('source', '?')}); {who} {median:.4g} img/s "
                     f"(median), {median / planned:.2f}x the plan")
    return lines
