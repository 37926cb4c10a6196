"""The density-ratio network as a verifier (issue 16): harness.core.verifier and analysis.verifier.

Default tier: each test takes seconds on one CPU thread.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from harness.core import data as datasets, metrics, nets, verifier
from harness.core.diffusion import Denoiser
from harness.core.train import build_student, load_checkpoint, train_student

from conftest import toy_cfg

MU_Q, S_Q, MU_P, S_P = 0.0, 1.0, 0.5, 1.5  # data N(0, 1), generator N(0.5, 1.5^2)
NS = (1, 2, 4, 16, 64)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _log_normal(x, m, s):
    return -0.5 * ((x - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)


def _exact_ratio(x, sigma):
    """l(x) = log p(x) - log q(x), exact, in float64 (sigma = 0: the clean densities)."""
    assert float(torch.as_tensor(sigma).max()) == 0.0
    x = x.double().reshape(-1)
    return _log_normal(x, MU_P, S_P) - _log_normal(x, MU_Q, S_Q)


def gaussian_errors(k=100_000, seed=0, ns=NS):
    """{n: (mean, var, |mean - mu_q| + |var - s_q^2|)} of the kept samples."""
    out = {}
    for n in ns:
        x = verifier.verified_samples(lambda z: MU_P + S_P * z.double(), _exact_ratio, k, n,
                                      "resample", 0.0, seed, shape=(1,), chunk=8192).double()
        m, v = float(x.mean()), float(x.var())
        out[n] = (m, v, abs(m - MU_Q) + abs(v - S_Q ** 2))
    return out


def test_gaussian_resampling_approaches_data():
    errs = gaussian_errors()
    e = [errs[n][2] for n in NS]
    # n = 1 is the generator itself: |0.5| + |2.25 - 1| up to sampling error
    assert errs[1][0] == pytest.approx(MU_P, abs=0.02)
    assert errs[1][1] == pytest.approx(S_P ** 2, abs=0.05)
    assert all(a > b for a, b in zip(e, e[1:])), e  # decreasing in n
    m64, v64, e64 = errs[64]
    assert abs(m64 - MU_Q) < 0.02 and abs(v64 - S_Q ** 2) < 0.04 and e64 < 0.05, errs[64]
    assert e64 < 0.05 * e[0]


def test_best_picks_argmin_and_resample_frequencies():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g, dtype=torch.float64)
    cand = torch.arange(50 * 7, dtype=torch.float64).reshape(50, 7, 1) + 0.5
    best = verifier.select(cand, logits, "best", torch.Generator().manual_seed(1))
    assert torch.equal(best, cand[torch.arange(50), logits.argmin(1)])
    # resampling: P(j) proportional to exp(-l_j)
    row = torch.tensor([0.0, math.log(2), math.log(4), float("nan")], dtype=torch.float64)
    k = 70_000
    idx = verifier.choose(row.expand(k, 4), "resample", torch.Generator().manual_seed(3))
    freq = torch.bincount(idx, minlength=4).double() / k
    assert torch.allclose(freq, torch.tensor([4 / 7, 2 / 7, 1 / 7, 0.0], dtype=torch.float64),
                          atol=0.008), freq  # NaN logit: never kept
    # deterministic given the generator
    a = verifier.select(cand, logits, "resample", torch.Generator().manual_seed(5))
    b = verifier.select(cand, logits, "resample", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_n1_select_returns_candidates_without_drawing():
    cand = torch.randn(9, 1, 3, 4, 4)
    g = torch.Generator().manual_seed(2)
    state = g.get_state().clone()
    out = verifier.select(cand, torch.full((9, 1), float("nan")), "resample", g)
    assert torch.equal(out, cand[:, 0]) and torch.equal(g.get_state(), state)


def _tiny_cell(tmp_path, loss="ratio_kl"):
    """Train a toy2d cell for 2 steps from a random-weights MLP teacher; return what the final
    evaluation saw, the EMA generator, the ratio net and the evaluator."""
    cfg = toy_cfg(loss=loss, student={"kimg": 0.128, "batch": 64},
                  eval={"n": 300, "every_kimg": 1, "samples": 8})
    ds = datasets.load("toy2d")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = Denoiser(nets.build("mlp", (2,)), ds.sigma_data)
    ev = metrics.Evaluator(ds, cfg["eval"]["n"], str(tmp_path))
    seen = []

    def evaluate(x):
        seen.append(x.clone())
        return ev(x)

    ckpt = str(tmp_path / "cell.pt")
    last = train_student(cfg, teacher, torch.from_numpy(ds.x), ds.sigma_data, evaluate, ckpt,
                         lambda e: None)
    assert last.status == "done"
    state = load_checkpoint(ckpt)
    teacher_state = {k: v.detach().cpu() for k, v in teacher.net.state_dict().items()}
    ema, aux = build_student(cfg, teacher_state, (2,), ds.sigma_data)
    ema.load_state_dict(state["ema"])
    aux.load_state_dict(state["aux"])
    return cfg, ds, ev, seen[-1], last, ema.eval(), aux.eval(), teacher_state


def test_n1_reproduces_plain_evaluation(tmp_path):
    cfg, ds, ev, plain_x, last, ema, aux, teacher_state = _tiny_cell(tmp_path)
    x1 = verifier.verified_samples(ema, aux, ev.n, 1, "resample", 0.05, cfg["seed"], shape=(2,))
    assert torch.equal(x1, plain_x)  # bit for bit: the plain evaluation's draw
    assert ev(x1) == last.metrics
    rows = verifier.evaluate(ev, ema, aux, [1, 2], "resample", 0.05, cfg["seed"], shape=(2,))
    by = {r["metric"]: r for r in rows}
    for m in ev.metric_names:
        assert by[f"{m}@resample1"]["value"] == last.metrics[m]
        assert math.isfinite(by[f"{m}@resample2"]["value"])
        assert by[f"{m}@resample2"]["protocol"].startswith(ev.protocol)
    assert by["nfe_per_sample@resample1"]["value"] == 1.0
    assert by["nfe_per_sample@resample2"]["value"] == 4.0
    assert by["verifier_s_per_sample@resample2"]["value"] > 0
    assert "verifier_fit_s" not in by
    # n > 1 keeps the plain draw among its candidates, and is deterministic
    x2 = verifier.verified_samples(ema, aux, ev.n, 2, "best", 0.05, cfg["seed"], shape=(2,))
    again = verifier.verified_samples(ema, aux, ev.n, 2, "best", 0.05, cfg["seed"], shape=(2,))
    assert torch.equal(x2, again)
    kept_plain = (x2 == plain_x).all(1).float().mean()
    assert 0.2 < kept_plain < 0.8  # about half the rows keep their plain candidate
    # the wiring entry point: a ratio cell scores with its own ratio net (nothing fitted)
    cfg["eval"]["verifier"] = {"n": [1, 4]}
    rows = verifier.cell_rows(cfg, ev, ema, aux, teacher_state, torch.from_numpy(ds.x),
                              ds.sigma_data, plain=last.metrics)
    by = {r["metric"]: r for r in rows}
    assert "verifier_fit_s" not in by and by["nfe_per_sample@resample4"]["value"] == 8.0
    assert "own ratio net" in by[f"{ev.metric_name}@resample4"]["protocol"]
    assert by[f"{ev.metric_name}@resample1"]["value"] == last.metrics[ev.metric_name]


def test_cell_rows_post_hoc_for_teacher_score_family(tmp_path):
    cfg, ds, ev, _, last, ema, _, teacher_state = _tiny_cell(tmp_path, loss="sid")
    cfg["eval"]["verifier"] = {"n": [1, 2], "mode": "best", "sigma": 0.05, "fit_steps": 5}
    rows = verifier.cell_rows(cfg, ev, ema, None, teacher_state, torch.from_numpy(ds.x),
                              ds.sigma_data, plain=last.metrics)
    by = {r["metric"]: r["value"] for r in rows}
    assert by[f"{ev.metric_name}@best1"] == last.metrics[ev.metric_name]
    assert by["verifier_fit_s"] > 0 and f"{ev.metric_name}@best2" in by
    cfg["eval"]["verifier"] = None
    assert verifier.cell_rows(cfg, ev, ema, None, teacher_state, torch.from_numpy(ds.x),
                              ds.sigma_data) == []


def test_resolve_verifier():
    assert verifier.resolve_verifier(None) is None
    v = verifier.resolve_verifier({"n": [4, 1, 4], "mode": "best"})
    assert v["n"] == [1, 4] and v["mode"] == "best" and v["sigma"] == verifier.DEFAULTS["sigma"]
    for bad in ({"n": [0]}, {"mode": "top"}, {"sigma": 0}, {"nn": 1}, {"fit_steps": 0}, [1, 2]):
        with pytest.raises(ValueError):  # config.ConfigError is a ValueError
            verifier.resolve_verifier(bad)


def test_fit_post_hoc_ratio_separates_shifted_generator():
    ds = datasets.load("toy2d")
    x = torch.from_numpy(ds.x)
    gen = nn.Linear(2, 2).double()
    with torch.no_grad():  # G(z) = 0.5 z + (1.5, 0): shifted, no ring structure
        gen.weight.copy_(0.5 * torch.eye(2))
        gen.bias.copy_(torch.tensor([1.5, 0.0]))
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    sample_fn = lambda z: gen(z.double())  # noqa: E731
    teacher_state = nets.build("mlp", (2,)).state_dict()
    net, secs = verifier.fit_post_hoc_ratio(
        sample_fn, x, lambda: nets.build_ratio("mlp", (2,)), teacher_state, ds.sigma_data,
        "teacher", steps=300, batch=128, lr=2e-3, t_max=0.8, seed=0)
    assert secs > 0 and isinstance(net, nets.RatioNet) and not net.training
    assert all(torch.equal(before[k], v) for k, v in gen.state_dict().items())
    assert not any(p.grad is not None for p in gen.parameters())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        fake = sample_fn(torch.randn(2000, 2, generator=g)).float()
        real = x[torch.randint(len(x), (2000,), generator=g)]
        s = torch.full((2000,), 0.05)
        lf, lr = net(fake, s), net(real, s)
    assert lf.mean() > lr.mean() + 1.0, (lf.mean(), lr.mean())
    assert ((lf > 0).float().mean() + (lr < 0).float().mean()) / 2 > 0.8


# ------------------------------------------------------------------------------- analysis
def _rows(effects: dict, seeds=(0, 1, 2, 3, 4), metric="fd_digits_1k"):
    """Synthetic rows: per loss, n=1 score 10 + seed noise, n=n score scaled by effects[loss](n)."""
    rng = np.random.default_rng(0)
    out = []
    for loss, f in effects.items():
        for s in seeds:
            base = 10 + rng.normal(0, 0.3)
            cell = f"c-{loss}-{s}"
            for n in (1, 2, 4, 8):
                for init in ("teacher", "random"):
                    out.append({"cell": cell + init, "loss": loss, "init": init, "seed": s,
                                "kimg": 1.0, "status": "done",
                                "metric": f"{metric}@resample{n}",
                                "value": base * f(n) * (1 + rng.normal(0, 0.002)),
                                "axes": '{"loss": "%s", "seed": %d}' % (loss, s)})
                    for name, v in (("verifier_s_per_sample", 1e-3 * n * (1 + s)),
                                    ("nfe_per_sample", 2 * n if n > 1 else 1)):
                        out.append({"cell": cell + init, "loss": loss, "init": init, "seed": s,
                                    "kimg": 1.0, "status": "done", "metric": f"{name}@resample{n}",
                                    "value": v, "axes": None})
            if loss == "sid":  # di/sid: a post-hoc ratio net was fitted (its cost)
                out.append({"cell": cell + "teacher", "loss": loss, "init": "teacher", "seed": s,
                            "kimg": 1.0, "status": "done", "metric": "verifier_fit_s",
                            "value": 2.0 + s, "axes": None})
            out.append({"cell": cell + "teacher", "loss": loss, "init": "teacher", "seed": s,
                        "kimg": 1.0, "status": "done", "metric": metric, "value": base,
                        "axes": None})
    out.append({"cell": "ref-x-teacher_heun35", "loss": "reference", "init": "teacher_heun35",
                "seed": 0, "kimg": 1.0, "status": "reference", "metric": metric, "value": 6.0,
                "axes": None})
    return pd.DataFrame(out)


def test_verifier_figure_and_claim_c4(tmp_path):
    from analysis.verifier import claim_c4, parse, verifier_figure

    assert parse("fd_digits_1k@resample4") == ("fd_digits_1k", "resample", 4)
    assert parse("fd_digits_1k") is None
    better = {"ratio_js": lambda n: 1 - 0.05 * math.log2(n),
              "sid": lambda n: 1 - 0.02 * math.log2(n)}
    df = _rows(better)
    paths = verifier_figure(df, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["verifier.data.csv", "verifier.md",
                                                          "verifier.pdf", "verifier.png"]
    csv = pd.read_csv(tmp_path / "verifier.data.csv")
    # cost per kept sample: the mean over the seeds' cells (1e-3 n (1 + seed), seeds 0-4)
    c = csv[csv["loss"] == "sid"].set_index("n")
    assert c.loc[4, "s_per_kept"] == pytest.approx(1e-3 * 4 * 3)
    assert c.loc[8, "nfe_per_kept"] == 16 and c.loc[1, "nfe_per_kept"] == 1
    assert (c["fit_s"] == 4.0).all()  # mean of 2 + seed over seeds 0-4
    assert csv.loc[csv["loss"] == "ratio_js", "fit_s"].isna().all()  # its own net: no fit
    md = (tmp_path / "verifier.md").read_text()
    assert "| sid | resample |" in md and "24.0 ms, 16 NFE" in md and "| 4.00 |" in md
    ratio = csv[(csv["loss"] == "ratio_js")].sort_values("n")
    assert list(ratio["n"]) == [1, 2, 4, 8] and (ratio["seeds"] == 5).all()
    assert (np.diff(ratio["mean"]) < 0).all() and (ratio["ci_low"] <= ratio["mean"]).all()
    assert list(csv["loss"].drop_duplicates()) == ["sid", "ratio_js", "reference"]
    assert verifier_figure(df[df["init"] != "teacher"], str(tmp_path / "none")) == []

    v = claim_c4(df)
    assert v.claim == "C4" and v.verdict == "holds" and v.n_seeds == 5
    assert v.effect == pytest.approx(-0.04, abs=0.01) and "worst: sid" in v.comparison
    assert v.ci_high < 0 and v.ci_low < v.effect < v.ci_high
    assert claim_c4(df).ci_low == v.ci_low  # analytic: no resampling
    worse = dict(better, sid=lambda n: 1 + 0.03 * math.log2(n))
    assert claim_c4(_rows(worse)).verdict == "does not hold"
    flat = dict(better, sid=lambda n: 1.0)
    undecided = claim_c4(_rows(flat))
    assert undecided.verdict.startswith("inconclusive")
    assert undecided.seeds_needed > 5 and "would decide it" in undecided.seeds_note
    assert claim_c4(df[df["init"] == "random"]).verdict == "not tested by this study"
