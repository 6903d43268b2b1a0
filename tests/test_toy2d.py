"""The 2D toy: its exact teacher against autograd, and a smoke run of the whole script."""

import json

import torch

import minisplam as ms
from toy import toy2d


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
    assert all(r[k] > 0 for k in ("sw2_1", "sw2_2", "sw2_4", "err_1step"))
    assert data["noise_floor"][0] > 0 and rep["delta_seed0"]["SPLAM k=20"]["t"][0] == 119
