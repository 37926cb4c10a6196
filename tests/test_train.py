"""The one training loop: exact resume, divergence, every family learns toy2d, score-free cells
never call the teacher."""
import math

import pytest
import torch

from harness.core import metrics
from harness.orchestrate.cell import run_cell
from harness.core.diffusion import Denoiser
from harness.core.nets import group_of
from harness.store.results import load_rows
from harness.core.train import CheckpointError, train_student

from conftest import toy_cfg

NET = "denoiser.net."  # the generator's state-dict prefix of its network's weights


def _train(cfg, toy_teacher, ckpt, max_steps=None, evaluate=None):
    teacher, _, dataset = toy_teacher
    reports = []
    last = train_student(cfg, teacher, torch.from_numpy(dataset.x), dataset.sigma_data,
                         evaluate or (lambda x: {"mean": float(x.mean())}), str(ckpt),
                         reports.append, max_steps=max_steps)
    return last, reports


def _weights(ckpt):
    state = torch.load(ckpt, weights_only=True)
    return state["step"], state["generator"], state["ema"], state["aux"]


@pytest.mark.parametrize("loss", ["sid", "ratio_js"])
def test_resume_is_exact(toy_teacher, tmp_path, loss):
    torch.set_num_threads(1)
    cfg = toy_cfg(loss=loss, student={"kimg": 1.28, "batch": 64},
                  eval={"n": 100, "every_kimg": 0.64, "samples": 4})  # 20 steps, evals every 10
    _train(cfg, toy_teacher, tmp_path / "straight.pt")
    # k = 7 steps (not an eval boundary), checkpoint, then resume for the remaining 13
    _, first = _train(cfg, toy_teacher, tmp_path / "resumed.pt", max_steps=7)
    assert _weights(tmp_path / "resumed.pt")[0] == 7
    last, second = _train(cfg, toy_teacher, tmp_path / "resumed.pt")
    assert last.status == "done" and second[0].step > 7
    a, b = _weights(tmp_path / "straight.pt"), _weights(tmp_path / "resumed.pt")
    assert a[0] == b[0] == 20
    for sa, sb in zip(a[1:], b[1:]):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_non_finite_loss_records_diverged(toy_teacher, tmp_path):
    cfg = toy_cfg(loss="ratio_kl", student={"kimg": 2, "lr": 1e12, "aux_lr": 1e12})
    last, reports = _train(cfg, toy_teacher, tmp_path / "c.pt")
    assert last.status == "diverged" and "non-finite" in last.message
    assert 0 < last.step < 32 and reports[-1] is last


def test_checkpoint_of_another_config_is_refused(toy_teacher, tmp_path):
    _train(toy_cfg(loss="sid"), toy_teacher, tmp_path / "c.pt", max_steps=3)
    with pytest.raises(CheckpointError, match="belongs to another cell config"):
        _train(toy_cfg(loss="di"), toy_teacher, tmp_path / "c.pt")


def test_corrupt_checkpoint_is_a_clear_error(toy_teacher, tmp_path):
    bad = tmp_path / "c.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="move it aside"):
        _train(toy_cfg(), toy_teacher, bad)
    assert bad.read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize("loss", ["di", "sid", "ratio_kl", "ratio_js", "ratio_rkl"])
def test_every_family_reduces_mmd_on_toy2d(toy_teacher, toy_cache, tmp_path, loss):
    """From a teacher init (a one-step generator that is far from the data), a few hundred
    steps of each family bring the MMD to the ring down by a clear margin."""
    torch.set_num_threads(2)
    teacher, _, dataset = toy_teacher
    evaluator = metrics.Evaluator(dataset, n=500, cache_dir=toy_cache)
    cfg = toy_cfg(loss=loss, student={"kimg": 12.8, "batch": 64, "lr": 1e-3, "aux_lr": 1e-3},
                  eval={"n": 500, "every_kimg": 12.8, "samples": 4})  # 200 steps
    last, reports = _train(cfg, toy_teacher, tmp_path / "c.pt", evaluate=evaluator)
    before, after = reports[0].metrics["mmd_toy2d_500"], last.metrics["mmd_toy2d_500"]
    assert last.status == "done" and math.isfinite(after)
    assert after < 0.6 * before, f"{loss}: MMD {before:.4f} -> {after:.4f}"


class ForbiddenTeacher(Denoiser):
    """The teacher's weights, but any forward call fails the test."""

    def forward(self, *args, **kwargs):
        raise AssertionError("a score-free family called the teacher's forward")


def test_score_free_cell_never_calls_teacher(toy_teacher, toy_cache, tmp_path):
    cfg = toy_cfg(loss="ratio_rkl")

    def guard(teacher):
        return ForbiddenTeacher(teacher.net, teacher.sigma_data)

    last = run_cell(cfg, str(tmp_path / "res"), toy_cache, str(tmp_path / "c.pt"), device="cpu",
                    log=lambda *_: None, teacher_guard=guard)
    assert last.status == "done"
    rows = load_rows(str(tmp_path / "res"))
    assert (rows.status == "done").any() and set(rows.loss) >= {"ratio_rkl"}
    with pytest.raises(AssertionError, match="called the teacher"):
        run_cell(toy_cfg(loss="sid"), str(tmp_path / "res2"), toy_cache, str(tmp_path / "d.pt"),
                 device="cpu", log=lambda *_: None, teacher_guard=guard)


def test_evaluations_report_the_generator_optimiser_per_group(toy_teacher, tmp_path):
    """Every evaluation after step 0 carries the gradient, update and weight norms of the step
    before it, per parameter group; the update norm is the weight change that step made."""
    torch.set_num_threads(1)
    cfg = toy_cfg(loss="sid", student={"kimg": 0.64, "batch": 64},
                  eval={"n": 100, "every_kimg": 0.32, "samples": 4})  # 10 steps, evals every 5
    _, reports = _train(cfg, toy_teacher, tmp_path / "a.pt")
    assert [r.step for r in reports] == [0, 5, 10]
    assert reports[0].optim == {}
    groups = {k.split("/", 1)[1] for k in reports[-1].optim}
    assert len(groups) > 1 and all(f"{kind}/{g}" in reports[-1].optim
                          for kind in ("grad_norm", "update_norm", "param_norm") for g in groups)
    assert all(v > 0 and math.isfinite(v) for v in reports[-1].optim.values())
    # the last step alone, replayed from the checkpoint of step 9: its weight change is the norm
    _train(cfg, toy_teacher, tmp_path / "b.pt", max_steps=9)
    before = _weights(tmp_path / "b.pt")[1]
    _train(cfg, toy_teacher, tmp_path / "b.pt")
    after = _weights(tmp_path / "b.pt")[1]
    g = sorted(groups)[0]
    change = torch.linalg.vector_norm(torch.cat(
        [(after[k] - before[k]).flatten() for k in after
         if k.startswith(NET) and group_of(k[len(NET):]) == g]))
    assert reports[-1].optim[f"update_norm/{g}"] == pytest.approx(float(change), rel=1e-4)
    # no learning rate, no movement
    zero = toy_cfg(loss="sid", student={"kimg": 0.32, "batch": 64, "lr": 0.0},
                   eval={"n": 100, "every_kimg": 0.32, "samples": 4})
    _, still = _train(zero, toy_teacher, tmp_path / "c.pt")
    assert all(v == 0 for k, v in still[-1].optim.items() if k.startswith("update_norm/"))


def test_freeze_keeps_the_teachers_values_in_the_frozen_groups(toy_teacher, tmp_path):
    teacher = toy_teacher[0]
    groups = sorted({group_of(k) for k, _ in teacher.net.named_parameters()})
    assert len(groups) > 1
    keep = groups[:1]
    cfg = toy_cfg(loss="sid", init={"name": "teacher", "freeze": keep},
                  student={"kimg": 0.32, "batch": 64}, eval={"n": 100, "every_kimg": 0.32})
    last, _ = _train(cfg, toy_teacher, tmp_path / "f.pt")
    assert last.optim[f"update_norm/{keep[0]}"] == 0.0
    tstate = teacher.net.state_dict()
    gen = {k[len(NET):]: v for k, v in _weights(tmp_path / "f.pt")[1].items()}
    assert set(gen) == set(tstate)
    for k, v in gen.items():
        same = torch.equal(v, tstate[k])
        assert same if group_of(k) in keep else True
    assert any(not torch.equal(v, tstate[k]) for k, v in gen.items() if group_of(k) not in keep)


def test_freeze_is_validated_and_named():
    from harness.declare.config import ConfigError, init_label, resolve_init
    from harness.declare.schema import GROUPS
    init = resolve_init({"name": "teacher", "freeze": ["middle", "encoder"]})
    assert init == {"name": "teacher", "freeze": ["encoder", "middle"]}
    assert init_label(init) == "teacher[freeze encoder+middle]"
    assert resolve_init("teacher") == {"name": "teacher"}  # unchanged ids without freeze
    with pytest.raises(ConfigError, match=r"init.freeze\[0\].*unknown group 'head'"):
        resolve_init({"name": "teacher", "freeze": ["head"]})
    with pytest.raises(ConfigError, match="nothing would train"):
        resolve_init({"name": "teacher", "freeze": list(GROUPS)})
