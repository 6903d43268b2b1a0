"""The 2D toy: its exact teacher against autograd, and a smoke run of the whole script."""

import json
import math

import pytest
import torch

import minisplam as ms
from toy import measure, toy2d
from test_core import draws


def test_gmm_eps_is_minus_sigma_times_autograd_score(sched):
    """eps = -sigma * grad log p_t(x | class), p_t the noised mixture written independently."""
    gmm = toy2d.GMM()
    x = torch.randn(64, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(64) % 3                                       # 0, 1 and the null class
    t = torch.randint(0, 1000, (64,))
    a, s = (v.double() for v in ms.alpha_sigma(sched, t, x))
    var = a**2 * gmm.std**2 + s**2
    mu = gmm.mu.double()
    logp = torch.stack([
        torch.logsumexp(torch.stack([(-((x[i] - a[i] * mu[m]) ** 2).sum() / (2 * var[i, 0]))
                                     for m in range(8) if gmm.mask[labels[i], m]]), 0)
        for i in range(64)]).sum()
    (score,) = torch.autograd.grad(logp, x)
    eps = gmm.eps(x.detach(), a, s, labels)
    assert torch.allclose(eps, -s * score, atol=1e-8)


def test_gmm_samples_have_the_mixture_moments():
    gmm = toy2d.GMM()
    x = gmm.sample(torch.zeros(100_000, dtype=torch.long), torch.Generator().manual_seed(0))
    r = x.norm(dim=1)
    assert abs(r.mean().item() - 1.0) < 0.01                       # modes on the unit circle
    ang = torch.atan2(x[:, 1], x[:, 0]) % (torch.pi / 2)            # class 0: modes at 0, 90, 180, 270 deg
    assert ((ang < 0.4) | (ang > torch.pi / 2 - 0.4)).float().mean() > 0.99


def test_sliced_w2_zero_for_same_set_and_grows_with_shift():
    a = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    assert toy2d.sliced_w2(a, a) == 0
    d1, d2 = toy2d.sliced_w2(a, a + 0.5), toy2d.sliced_w2(a, a + 1.0)
    assert 0 < d1 < d2 and abs(d2 / d1 - 2) < 1e-4                 # SW2 of a pure shift is linear


def test_mode_nll_is_the_mixtures_log_density():
    """mode_nll against torch.distributions' mixture of the class's modes, written independently."""
    gmm = toy2d.GMM()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(50) % 2
    for c in (0, 1):
        mu = gmm.mu[gmm.mask[c]].double()
        mix = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(torch.ones(len(mu), dtype=torch.float64)),
            torch.distributions.Independent(torch.distributions.Normal(mu, gmm.std * torch.ones_like(mu)), 1))
        ref = -mix.log_prob(x[labels == c].double())
        assert torch.allclose(toy2d.mode_nll(x, labels, gmm)[labels == c], ref, atol=1e-9)


@pytest.fixture(scope="module")
def eval800():
    """The evaluation set of notebook 00 (800 noises under CI): the teacher's samples and the metric's floors."""
    sched, gmm = ms.sd_schedule(), toy2d.GMM()
    return toy2d.EvalSet(gmm, toy2d.exact_teacher(gmm, sched), sched, 3.0, 800, seed=0)


def _wrong_shapes(ev):
    """Samples that are visibly wrong, built from the teacher's own set ref_a (same labels)."""
    g = torch.Generator().manual_seed(2)
    n, gmm, x = len(ev.labels), ev.gmm, ev.ref_a.clone()
    ang = torch.rand(n, generator=g) * 2 * math.pi
    ring = torch.stack([ang.cos(), ang.sin()], 1) * (1 + 0.05 * torch.randn(n, 1, generator=g))
    u = torch.rand(n, generator=g) * 4                                   # the square through the class's 4 modes
    corners = torch.stack([gmm.mu[gmm.mask[c]] for c in (0, 1)])          # (2, 4, 2)
    i = u.long().clamp(max=3)
    a, b = corners[ev.labels, i], corners[ev.labels, (i + 1) % 4]
    square = a + (u - i)[:, None] * (b - a)
    blob = 0.7 * torch.randn(n, 2, generator=g)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])                         # 90 degrees: a class's mode to the next
    first = (x - gmm.mu[ev.labels * 1]).norm(dim=1) < 0.4                  # points of mode 0 (class 0) / mode 1 (class 1)
    dropped = torch.where(first[:, None], x @ rot.T, x)                  # that mode emptied into its neighbour
    second = (x - gmm.mu[ev.labels + 2]).norm(dim=1) < 0.4
    heavy = torch.where((second & (torch.rand(n, generator=g) < 0.6))[:, None], x @ rot, x)   # 40/10/25/25 weights
    centres = gmm.mu[((x[:, None] - gmm.mu[None]) ** 2).sum(-1).masked_fill(~gmm.mask[ev.labels], 9).argmin(1)]
    return {"ring": ring, "square": square, "blob": blob}, {"one mode dropped": dropped, "wrong weights": heavy}, centres


def test_mode_metric_sees_modes_and_shape_where_sw2_cannot(eval800):
    """At notebook 00's sample size: a second teacher set scores within the floors; a ring, a square outline and a
    blob score far outside the NLL floor; a dropped mode and wrong weights far outside the split floor; points
    collapsed onto the mode centres score a NEGATIVE excess (sharper than the teacher). SW2 scores the ring at its
    own floor: the reason the toy's metric changed."""
    ev = eval800
    teacher_b = ev.modes(ev.ref_a)
    assert abs(teacher_b["nll"]) < 3 * ev.nll_floor and teacher_b["split"] < 3 * ev.split_floor
    shapes, weights, centres = _wrong_shapes(ev)
    for name, x in shapes.items():
        assert ev.modes(x)["nll"] > 50 * ev.nll_floor, name
    for name, x in weights.items():
        m = ev.modes(x)
        assert m["split"] > 3 * ev.split_floor and m["split"] > 0.1, (name, m)
    assert ev.modes(centres)["nll"] < -10 * ev.nll_floor
    assert ev.sw2(shapes["ring"]) < 1.2 * ev.noise_floor                 # SW2: the ring looks like the teacher


def test_mode_metric_floors_match_monte_carlo(eval800):
    """nll_floor is the spread of the NLL excess of fresh teacher sets, split_floor the mean split of samples drawn
    with the true weights: both checked against independent draws."""
    ev, gmm = eval800, eval800.gmm
    sched = ms.sd_schedule()
    excess = []
    for seed in range(6):
        x_T = torch.randn(len(ev.labels), 2, generator=torch.Generator().manual_seed(100 + seed))
        x = measure.ode_sample(ev.teacher, x_T, ev.labels, ev.uncond, ev.w, sched, 200)
        excess.append(ev.modes(x)["nll"])
    std = torch.tensor(excess).pow(2).mean().sqrt().item()                   # RMS excess around 0
    assert 0.4 * ev.nll_floor < std < 2.0 * ev.nll_floor
    g = torch.Generator().manual_seed(3)
    splits = [toy2d.mode_split(gmm.sample(ev.labels, g), ev.labels, gmm) for _ in range(40)]
    assert abs(sum(splits) / len(splits) - ev.split_floor) < 0.25 * ev.split_floor


def test_gamma_path_vanishes_at_one_in_the_student():
    net = toy2d.MLP()
    torch.nn.init.normal_(net.time_embedding.cond_proj.weight)
    x, t, c = torch.randn(8, 2), torch.randint(0, 1000, (8,)), torch.randint(0, 3, (8,))
    assert torch.equal(net(x, t, c, torch.ones(8)), net(x, t, c))   # teacher architecture at gamma=1
    assert not torch.allclose(net(x, t, c, torch.zeros(8)), net(x, t, c))


def test_smoke_run_writes_json_and_png(tmp_path):
    rep = toy2d.main(["--iters", "20", "--pretrain-iters", "50", "--n-eval", "400",
                      "--methods", "LCM k=20,SPLAM k=20,DL k=20", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "toy2d.json").read_text())
    assert (tmp_path / "toy2d.png").stat().st_size > 10_000
    assert set(data["runs"]) == {"LCM k=20", "SPLAM k=20", "DL k=20"}
    assert {"DDIM", "DPM-Solver++(2M)"} <= set(data["baselines"])
    r = data["runs"]["SPLAM k=20"][0]
    assert all(r[k] > 0 for k in ("sw2_1", "sw2_2", "sw2_4", "err_1step", "split_4")) and "nll_4" in r
    assert data["noise_floor"]["nll"][0] > 0 and data["noise_floor"]["split"][0] > 0
    assert rep["delta_seed0"]["SPLAM k=20"]["t"][0] == 119 and len(rep["verdict"]) == 0   # not every k was run


# --- the convergence study (toy/study.py): plumbing, not its numbers ----------------------------


def test_study_quick_runs_every_method_and_resumes(tmp_path):
    from toy import study

    rep = study.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "study2d_quick.json").read_text())
    methods = {r["method"] for r in data["runs"]}
    assert {"LCM k=20", "SPLAM paper k=100 ME", "SPLAM best k=20", "DL k=100 ME", "u-ablation k=20"} <= methods
    assert {r["teacher"] for r in data["runs"]} == {"exact", "learned"}
    assert data["best_variant"]["method"] in methods and (tmp_path / "study2d_quick.png").stat().st_size > 10_000
    r = data["runs"][0]
    assert r["err_1step"] > 0 and r["noise_floor"] > 0 and len(r["curve"]["err_1"]) == len(r["curve"]["iter"]) == 3
    n = len(data["runs"])
    again = study.main(["--quick", "--out", str(tmp_path)])                # resumable: nothing is run twice
    assert len(again["runs"]) == n and again["table"] == rep["table"]


def test_study_anneal_quick_runs_both_budgets_and_resumes(tmp_path):
    """--anneal: LCM and both SPLAMs, lr cosine-decayed to 0, at two budgets; the doubling table compares them."""
    from toy import study

    rep = study.main(["--quick", "--anneal", "--workers", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "study2d_anneal_quick.json").read_text())
    assert {r["method"] for r in data["runs"]} == {f"{m} k=20 cos{n}" for m in ("LCM", "SPLAM paper", "SPLAM best",
                                                                              "u-ablation", "u-ablation half")
                                                   for n in (20, 40)}
    assert [len(r["curve"]["iter"]) for r in data["runs"]] == [5] * 10 and data["settings"]["anneal"]
    assert rep["doubling"].count("\n| ") == 10 and rep["doubling"].count("% |") == 5
    assert (tmp_path / "study2d_anneal_quick.png").stat().st_size > 10_000 and all("nll_1" in r for r in data["runs"])
    for r in data["runs"]:                       # the lowest point of each (1-seed) curve, and where it was
        i = min(range(5), key=r["curve"]["err_1"].__getitem__)
        row = next(l for l in rep["doubling"].splitlines() if l.startswith(f"| {r['method'].rsplit(' cos', 1)[0]} | "
                                                                            f"{r['curve']['iter'][-1]} |"))
        assert f"| {r['curve']['err_1'][i]:.3f} ({100 * i / 4:.0f}%) |" in row
    again = study.main(["--quick", "--anneal", "--workers", "1", "--out", str(tmp_path)])
    assert len(again["runs"]) == 10 and again["table"] == rep["table"]
    before = (tmp_path / "study2d_anneal_quick.json").read_bytes()
    hot = study.main(["--quick", "--anneal", "--lr", "3e-3", "--workers", "1", "--out", str(tmp_path)])
    assert (tmp_path / "study2d_anneal_quick.json").read_bytes() == before     # another lr: its own JSON
    assert json.loads((tmp_path / "study2d_anneal_lr0.003_quick.json").read_text())["settings"]["lr"] == 3e-3
    assert hot["command"].endswith("--lr 0.003")
    err = lambda r: {(x["method"], x["seed"]): x["err_1step"] for x in r["runs"]}
    assert len(hot["runs"]) == 6 and all(abs(e - err(rep)[m]) > 1e-6 for m, e in err(hot).items())  # lr reached
    # the optimiser; the u ablation runs at the main study's lr only
    with pytest.raises(SystemExit) as e:
        study.main(["--quick", "--lr", "3e-3", "--out", str(tmp_path)])    # the main study's lr is fixed
    assert e.value.code == 2


def test_distill_anneal_ends_at_zero_lr(monkeypatch):
    """anneal=True: the lr follows torch's cosine schedule to 0 at the last iteration (the study's --anneal)."""
    from toy import toy2d as t2

    seen = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]),
                                                                         step(self, *a, **k))[1])
    sched, gmm = ms.sd_schedule(), t2.GMM()
    ev = t2.EvalSet(gmm, t2.exact_teacher(gmm, sched), sched, 3.0, 64, 0)
    pre = t2.MLP(32, gamma_kind="fourier4")
    t2.distill("LCM k=20", pre, gmm, t2.exact_teacher(gmm, sched), sched, ev, 10, 0, 3.0, 1e-3, 16, 10, n_curve=16,
               anneal=True)
    want = [1e-3 * (1 + math.cos(math.pi * i / 10)) / 2 for i in range(10)]
    assert seen == pytest.approx(want, rel=1e-6)


def test_study_convergence_rule():
    from toy import study

    it = list(range(0, 1001, 100))
    assert study.converged({"iter": it, "err_1": [1.0] * 11})[0]                 # flat: converged
    assert not study.converged({"iter": it, "err_1": [1.0 - 0.08 * i for i in range(11)]})[0]   # still falling


def test_effective_time_gives_the_ddim_state():
    """x_{gamma,t} (Eq. 12, one DDIM step) = alpha_t/alpha_u times the teacher's DDIM state at u(gamma, t)."""
    from toy import study

    sched = ms.sd_schedule()
    t = torch.tensor([519, 999, 119, 39, 700])
    s = (t - 100).clamp(min=0)
    gam = torch.tensor([0.3, 0.7, 0.5, 1.0, 0.0])
    u, scale = study.effective_time(gam, t, s, sched)
    assert u[3] == 39 and abs(u[4] - s[4]) < 0.01 and ((u >= s) & (u <= t)).all()
    x0, eps = torch.randn(5, 2), torch.randn(5, 2)
    a_t, s_t = ms.alpha_sigma(sched, t, x0)
    a_s, s_s = ms.alpha_sigma(sched, s, x0)
    x_g, _, _ = ms.sl_point(a_t * x0 + s_t * eps, a_s * x0 + s_s * eps, gam[:, None], a_t, s_t, a_s, s_s)
    a_u = a_t * scale[:, None]
    assert torch.allclose(scale[:, None] * x_g, a_u * x0 + (1 - a_u**2).sqrt() * eps, atol=1e-5)


def test_fixed_point_error_is_the_zero_loss_students_1_step_error(sched):
    """The student whose F is the teacher's DDIM chain to 0 (steps of `step`) makes LCM's loss zero when the
    solver step is `step`, and not otherwise; its 1-step sample's error is EvalSet.fixed_point_error(step)."""
    gmm = toy2d.GMM()
    teacher = toy2d.exact_teacher(gmm, sched)
    ev = toy2d.EvalSet(gmm, teacher, sched, 3.0, 64, 0, ode_steps=50)

    def chain_student(step):
        def student(x, t, c, gamma=None):                              # eps such that F(x, t) = chain(x, t)
            F = ms.teacher_solve(teacher, x, t, torch.zeros_like(t), step, c, torch.full_like(c, toy2d.NULL), 3.0, sched)
            c_skip, c_out = (v[:, None] for v in ms.boundary_scalings(t))
            a, s = ms.alpha_sigma(sched, t, x)
            x0 = torch.where(c_out > 0, (F - c_skip * x) / c_out.clamp(min=1e-12), x)
            return (x - a * x0) / s
        return student

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(128) % 2
    x0 = gmm.sample(labels, g)
    losses = {}
    for name, step, spec in (("k=20", 20, dict(k=20)), ("k=100 ME", 20, dict(k=100)),
                             ("k=100 without ME, step-20 chain", 20, dict(k=100, multiple_estimation=False))):
        cfg = ms.SPLADConfig(objective="lcm", w=3.0, loss="l2", **spec)
        f = chain_student(step)
        losses[name] = ms.splad_loss(f, f, teacher, x0, labels, torch.full_like(labels, toy2d.NULL),
                                     *draws(x0, cfg, seed=1), sched, cfg).item()
    assert losses["k=20"] < 1e-10 and losses["k=100 ME"] < 1e-10, losses
    assert losses["k=100 without ME, step-20 chain"] > 1e-4, losses
    x1 = ms.sample(chain_student(20), ev.x_T, ev.labels, sched, ms.lcm_timesteps(1, sched.T))
    assert abs(ev.one_step_error(x1) - ev.fixed_point_error(20)) < 1e-5
    assert ev.fixed_point_error(20) < ev.fixed_point_error(100)              # a coarser solver, a worse floor


def test_study_ablations_quick_keeps_students_that_reproduce_their_metrics(tmp_path):
    """--ablations --quick: one method of each kind; every final student is kept, and reloading it reproduces the
    metrics the JSON recorded (so a new metric never needs retraining); the baselines and delta(t) tables exist."""
    from toy import study

    rep = study.main(["--quick", "--ablations", "--workers", "1", "--out", str(tmp_path)])
    assert {r["method"] for r in rep["runs"]} == {"LCM k=20", "SPLAM paper k=20", "SPLAM ours k=20", "SPLAM authors k=20",
                                                  "u-ablation half k=20", "DL half k=20", "LCM k=100 noME"}
    assert {"DDIM", "DPM-Solver++(2M)", "pre-trained (no distillation)"} == set(rep["baselines"])
    assert rep["delta_table"].count("\n| ") == 2 * 3 and rep["baseline_table"].count("\n| ") == 3
    r = next(x for x in rep["runs"] if x["method"] == "SPLAM ours k=20")
    net = study.load_student(tmp_path / "cache", rep["settings"], "exact", 128, 0, r["method"], r["spec"])
    _, ev = study.evaluation_set(rep["settings"], "exact", 128, 0, tmp_path / "cache")
    again = toy2d.evaluate(net, ev, ev.sched, 0)
    assert all(abs(again[m] - r[m]) < 1e-6 for m in ("err_1step", "nll_1", "nll_4", "split_2"))
    assert len(study.main(["--quick", "--ablations", "--workers", "1", "--out", str(tmp_path)])["runs"]) == 7   # resumes
