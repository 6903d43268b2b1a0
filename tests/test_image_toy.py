"""Image toy: AMED / iPNDM against closed forms, NFE accounting, data loaders, and a smoke run."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch

import minisplam as ms
from toy import measure
from toy import image_toy as it

S_D = 0.5                                   # std of Gaussian data: its PF-ODE is closed form


class GaussEps:
    """eps(x~, sigma) for data N(0, S_D^2) in EDM form: sigma x~ / (S_D^2 + sigma^2). Counts calls."""

    def __init__(self, feat=8):
        self.calls, self.h, self.feat = 0, None, feat

    def __call__(self, x, sig):
        self.calls += 1
        s = ms._bc(sig.expand(len(x)) if sig.ndim == 0 else sig, x)
        self.h = x.flatten(1)[:, : self.feat]
        return s * x / (S_D**2 + s**2)


def exact(x_T, s_max, s_min):
    """x~(sigma) = x~(sigma_max) sqrt((S_D^2 + sigma^2) / (S_D^2 + sigma_max^2))."""
    return x_T * s_max * ((S_D**2 + s_min**2) / (S_D**2 + s_max**2)) ** 0.5


def test_amed_step_is_dpm_solver_2_at_r_half_c_one():
    f = GaussEps()
    x = torch.randn(4, 1, 4, 4)
    s_cur, s_next = torch.tensor(5.0), torch.tensor(0.8)
    half, one = torch.full((4, 1), 0.5), torch.ones(4, 1)
    got = it.amed_step(f, x, s_cur, s_next, half, one, f(x, s_cur))
    s_mid = (s_cur * s_next).sqrt()                                   # DPM-Solver-2: geometric midpoint
    x_mid = x + (s_mid - s_cur) * f(x, s_cur)
    want = x + (s_next - s_cur) * f(x_mid, s_mid)
    assert torch.allclose(got, want, atol=1e-6)


def test_predictor_outputs_in_range_and_start_at_dpm_solver_2():
    g = it.AMEDPredictor(8)
    h = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    r, c = g(h, torch.tensor(0.5), torch.tensor(3.0))
    assert torch.allclose(r, torch.full_like(r, 0.5)) and torch.allclose(c, torch.ones_like(c))
    gen = torch.Generator().manual_seed(0)
    for p in g.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 3.0
    r, c = g(100 * h, torch.tensor(0.5), torch.tensor(3.0))             # saturating inputs stay in range
    assert ((r >= 0) & (r <= 1)).all() and ((c >= 0) & (c <= 2)).all()
    for p in g.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    r, c = g(h, torch.tensor(0.5), torch.tensor(3.0))                   # unsaturated: depends on the feature
    assert r.std() > 1e-3 and c.std() > 1e-3
    assert 1000 < sum(p.numel() for p in it.AMEDPredictor(64).parameters()) < 10_000   # ~9k in the paper


@pytest.mark.parametrize("nfe", [2, 3, 4, 5, 8])
def test_every_solver_gets_exactly_its_nfe(nfe):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")
    calls = []
    eps = lambda x, t: calls.append(1) or torch.tanh(x)
    for sch in (DDIMScheduler(**cfg), DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2),
                UniPCMultistepScheduler(**cfg, solver_order=2)):
        calls.clear()
        measure.scheduler_sample(sch, eps, torch.randn(2, 1, 4, 4), nfe)
        assert len(calls) == nfe, type(sch).__name__
    f = GaussEps()
    it.ipndm_sample(f, torch.randn(2, 1, 4, 4), it.poly_sigmas(nfe, 0.03, 14.6))
    assert f.calls == nfe
    steps, afs = it.amed_nfe_plan(nfe)
    f = GaussEps()
    it.amed_sample(f, it.AMEDPredictor(8), torch.randn(2, 1, 4, 4), it.poly_sigmas(steps, 0.03, 14.6), afs)
    assert f.calls == nfe and afs == (nfe % 2 == 1)


def test_ipndm_and_teacher_trajectory_match_the_closed_form_ode():
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    want = exact(x_T, 14.6, 0.03)
    err = lambda x: (x - want).abs().max().item()
    ipndm = [err(it.ipndm_sample(GaussEps(), x_T, it.poly_sigmas(n, 0.03, 14.6))) for n in (1, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(ipndm, ipndm[1:])) and ipndm[-1] < 0.005 and ipndm[0] > 1
    coarse = it.teacher_trajectory(GaussEps(), x_T, it.poly_sigmas(3, 0.03, 14.6), M=1)
    fine = it.teacher_trajectory(GaussEps(), x_T, it.poly_sigmas(3, 0.03, 14.6), M=8)
    assert len(fine) == 4 and err(fine[-1]) < 0.5 * err(coarse[-1]) and err(fine[-1]) < 0.02


def test_amed_training_reduces_error_to_the_teacher():
    x_T = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    sig = it.poly_sigmas(2, 0.03, 14.6)
    want = exact(x_T, 14.6, 0.03)
    before = (it.amed_sample(GaussEps(), it.AMEDPredictor(8), x_T, sig, afs=False) - want).pow(2).mean()
    g_phi, n_par, secs = it.train_amed(GaussEps(), 8, sig, False, (1, 4, 4), 64, 32, 20, 2, seed=0, lr=3e-2)
    after = (it.amed_sample(GaussEps(), g_phi, x_T, sig, afs=False) - want).pow(2).mean()
    assert after < 0.5 * before


def test_edm_view_round_trips_integer_timesteps(sched):
    view = it.EDMView(sched)
    t = torch.tensor([0, 1, 10, 259, 500, 999])
    sig = (sched.sigma / sched.alpha)[t]
    assert torch.allclose(view.t_of(sig), t.float(), atol=1e-3)
    assert abs(view.sigma_min - (sched.sigma / sched.alpha)[0].item()) < 1e-6


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 4, generator=g), torch.randn(4000, 4, generator=g)
    assert abs(it.frechet(a, b)) < 0.02
    assert abs(it.frechet(a, b + torch.tensor([1.0, 0, 0, 0])) - 1.0) < 0.05


def test_digits_loader():
    x, y, n = it.load_digits16()
    assert x.shape == (1797, 1, 16, 16) and n == 10 and set(y.tolist()) == set(range(10))
    assert x.min() >= -1 and x.max() <= 1


def test_cifar_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ms.UsageError, match="cifar-10-python.tar.gz"):
        it.load_cifar10(str(tmp_path / "nope.tar.gz"))
    with pytest.raises(ms.UsageError, match="python"):
        (tmp_path / "empty").mkdir()
        it.load_cifar10(str(tmp_path / "empty"))


def test_cifar_archive_in_the_standard_format_loads(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (6, 3072), dtype=np.uint8)
    blob = pickle.dumps({b"data": arr, b"labels": [0, 1, 2, 3, 4, 5]})
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(blob)
        tf.addfile(info, io.BytesIO(blob))
    x, y, n = it.load_cifar10(str(path))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.allclose(x[0, 0, 0, 0], torch.tensor(arr[0, 0] / 127.5 - 1, dtype=torch.float32))


def test_smoke_run_end_to_end(tmp_path):
    rep = it.main(["--teacher-iters", "20", "--distill-iters", "2", "--n-eval", "40", "--ode-steps", "8",
                   "--amed-train", "8", "--amed-epochs", "1", "--classifier-iters", "10", "--batch", "8",
                   "--nfes", "2,3", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "image_toy.json").read_text())
    for m in ("DDIM", "DPM-Solver++(2M)", "UniPC", "iPNDM", "AMED-Solver", "LCM (k=100)", "SPLAM (k=100)"):
        assert set(data["results"][m]) >= {"2", "3"}, m
    assert set(data["winners_by_nfe"]) == {"2", "3"} and data["amed"]["3"]["afs"] is True
    assert (tmp_path / "image_toy_SPLAM_NFE1.png").exists() and (tmp_path / "image_toy_AMED-Solver_NFE3.png").exists()
    assert rep["timing"]["total_s"] > 0


def test_loaded_diffusers_teacher_and_fid_fallback(tmp_path, sched):
    """--teacher DIR: a saved UNet2DConditionModel + scheduler (here unconditional, so w = 1)."""
    from diffusers import DDPMScheduler

    d = tmp_path / "teacher"
    it.make_unet(1, 16, None, width=8).save_pretrained(d / "unet")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(d / "scheduler")
    rep = it.main(["--teacher", str(d), "--distill-iters", "1", "--n-eval", "20", "--ode-steps", "4",
                   "--amed-train", "4", "--amed-epochs", "1", "--classifier-iters", "5", "--batch", "4",
                   "--nfes", "2", "--out", str(tmp_path / "out")])
    assert rep["settings"]["teacher"] == str(d) and set(rep["results"]["SPLAM (k=100)"]) >= {"2"}
    if not rep["fid_available"]:                                       # offline: the reason is recorded
        assert rep["fid_unavailable_reason"]
    bad = tmp_path / "bad"
    it.make_unet(1, 16, None, width=8).save_pretrained(bad / "unet")
    DDPMScheduler(prediction_type="sample").save_pretrained(bad / "scheduler")
    with pytest.raises(ValueError, match="prediction_type"):
        it.main(["--teacher", str(bad), "--out", str(tmp_path / "o2")])


def test_image_toy_seeds_pairs_lcm_and_splam_by_seed(tmp_path):
    """The seed summary: paired SPLAM - LCM differences per NFE, and a refusal when a seed ran other settings."""
    from toy import image_toy_seeds
    from toy.image_toy import FULL_OUT

    def run(seed, shift, iters="1500"):
        res = {m: {str(n): {"fd_proxy": 50.0 + n + (shift if m.startswith("SPLAM") else 0), "err_to_ode": 0.3}
                   for n in ((1, 2, 3, 4, 5, 8) if "k=100" in m else (2, 3, 4, 5, 8))}
               for m in (image_toy_seeds.LCM, image_toy_seeds.SPLAM, *image_toy_seeds.SOLVERS)}
        d = tmp_path / (FULL_OUT.name + (f"_seed{seed}" if seed else ""))
        d.mkdir(exist_ok=True)
        (d / "image_toy.json").write_text(json.dumps({
            "settings": {"seed": str(seed), "out": str(d), "threads": "1", "distill_iters": iters,
                         "device": "cuda" if seed else "cpu"},                  # a seed may run on a GPU
            "results": res, "timing": {"total_s": 600.0}, "teacher_fd_proxy": 60.0,
            "curves": {n: [{"iter": i, "err_1": 0.5, "err_4": 0.3} for i in (0, 100)] for n in ("LCM", "SPLAM")}}))

    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- imageseeds:begin (python toy/image_toy_seeds.py) -->\nold\n<!-- imageseeds:end -->\nb\n")
    run(0, -4.0), run(1, 2.0), run(2, -10.0)
    rep = image_toy_seeds.main(tmp_path, readme)
    row = {r["nfe"]: r for r in rep["rows"]}
    assert rep["seeds"] == [0, 1, 2] and row[4]["splam_minus_lcm"] == [-4.0, 2.0, -10.0]
    assert "| 4 | 54.0 ± 0.0 | 50.0 ± 6.0 | -4.0 ± 6.0 | 2/3 |" in readme.read_text()
    assert "seed 0: cpu, 10 min; seed 1: cuda" in readme.read_text() and (tmp_path / "image_toy_seeds_curve.png").is_file()
    run(2, -10.0, iters="250")
    with pytest.raises(AssertionError, match="other settings"):
        image_toy_seeds.main(tmp_path, readme)


def test_image_toy_floor_is_real_against_real(tmp_path):
    """The FD-proxy floor: disjoint real sets against the run's reference set, in the seed's classifier's features;
    the same set against itself is at 0, so a positive floor is the sampling noise of n_eval real images."""
    from toy import image_toy_floor
    from toy.image_toy import frechet

    out = tmp_path / "fd_floor.json"
    image_toy_floor.main(["--seed", "2", "--n-eval", "300", "--classifier-iters", "50", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["command"] == "python toy/image_toy_floor.py --seed 2" and len(res["fd_proxy_real_vs_real"]) == 4
    assert all(v > 1.0 for v in res["fd_proxy_real_vs_real"])
    f = torch.randn(300, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(frechet(f, f)) < 1e-8
