"""minisplam's math against independent references: diffusers' schedulers, closed forms, Monte Carlo."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler

import minisplam as ms
from toy import measure

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def draws(x0, cfg, seed=0):
    """t, gamma and noise as splad_step draws them."""
    g = torch.Generator().manual_seed(seed)
    B = x0.shape[0]
    return ms.sample_timesteps(B, cfg, g), ms.sample_gamma(B, cfg, g), torch.randn(x0.shape, generator=g)


def toy_eps(x, t, cond=None):
    """A smooth, t-dependent stand-in for a network (any function will do for solver checks)."""
    tt = ms._bc(t.float() / 1000, x)
    return torch.tanh(x * (1 + tt)) + 0.1 * tt


# --- 1. schedule ------------------------------------------------------------------------


def test_schedule_matches_diffusers(sched):
    ac = DDPMScheduler(**SD).alphas_cumprod
    assert torch.allclose(sched.alpha**2, ac, atol=1e-6)
    assert torch.allclose(sched.alpha**2 + sched.sigma**2, torch.ones(1000), atol=1e-6)
    assert sched.alpha[0] > 0.999 and sched.alpha[999] < 0.07  # SD: alpha(T) is not 0


# --- 2. parameterisation ------------------------------------------------------------------


def test_boundary_scalings_match_lcm_and_hit_boundary():
    c_skip, c_out = ms.boundary_scalings(torch.tensor([0, 19, 259, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0                    # F(x, 0) = x
    ref = LCMScheduler(**SD)
    for i, t in enumerate([0, 19, 259, 999]):
        rs, ro = ref.get_scalings_for_boundary_condition_discrete(t)
        assert abs(c_skip[i].item() - rs) < 1e-7 and abs(c_out[i].item() - ro) < 1e-6


def test_v_prediction_conversion_matches_diffusers_ddim(sched):
    """eps_from_output('v_prediction') + our DDIM step == DDIMScheduler(prediction_type='v_prediction')."""
    ref = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    ref.set_timesteps(50)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, s = torch.full((2,), 519), torch.full((2,), 499)
    a_t, s_t = ms.alpha_sigma(sched, t, x)
    eps = ms.eps_from_output(v, x, a_t, s_t, "v_prediction")
    ours = ms.ddim_step(x, eps, a_t, s_t, *ms.alpha_sigma(sched, s, x))
    assert torch.allclose(ours, ref.step(v, 519, x).prev_sample, atol=1e-5)


def test_unsupported_prediction_type_is_a_clear_error():
    with pytest.raises(ValueError, match="epsilon.*v_prediction"):
        ms.eps_from_output(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "sample")


# --- 3. teacher ODE step, guidance, multiple estimation ----------------------------------


@pytest.mark.parametrize("t", [999, 519, 39, 19])
def test_ddim_step_matches_diffusers(sched, t):
    ref = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False)
    ref.set_timesteps(50)                                        # step size 20 = k_phi
    x = torch.randn(3, 4, 8, 8)
    tb = torch.full((3,), t)
    eps = toy_eps(x, tb)
    s = (tb - 20).clamp(min=0)                                   # t=19 -> boundary t=0
    ours = ms.ddim_step(x, eps, *ms.alpha_sigma(sched, tb, x), *ms.alpha_sigma(sched, s, x))
    assert torch.allclose(ours, ref.step(eps, t, x).prev_sample, atol=1e-5)


def test_multiple_estimation_equals_repeated_diffusers_ddim(sched):
    """k=100, k_phi=20: five DDIM steps of size 20 (Eq. 18), vs DDIMScheduler stepping 5 times."""
    ref = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False)
    ref.set_timesteps(50)
    x = torch.randn(2, 2)
    t = torch.full((2,), 799)
    ours = ms.teacher_solve(toy_eps, x, t, t - 100, 20, None, None, 1.0, sched)
    y = x
    for tt in (799, 779, 759, 739, 719):
        y = ref.step(toy_eps(y, torch.full((2,), tt)), tt, y).prev_sample
    assert torch.allclose(ours, y, atol=1e-5)


def test_multiple_estimation_with_k_equal_k_phi_is_one_ddim_step(sched):
    x = torch.randn(4, 2)
    t = torch.tensor([999, 519, 39, 19])
    s = (t - 20).clamp(min=0)
    one = ms.ddim_step(x, toy_eps(x, t), *ms.alpha_sigma(sched, t, x), *ms.alpha_sigma(sched, s, x))
    assert torch.allclose(ms.teacher_solve(toy_eps, x, t, s, 20, None, None, 1.0, sched), one, atol=1e-6)


def test_teacher_solve_clamps_at_boundary(sched):
    """t < k: the solve stops at t = 0 (extra steps are the identity), e.g. t=59, k=100."""
    x = torch.randn(1, 2)
    t = torch.tensor([59])
    via_me = ms.teacher_solve(toy_eps, x, t, torch.tensor([0]), 20, None, None, 1.0, sched)
    y = x
    for a, b in ((59, 39), (39, 19), (19, 0)):
        ta, tb = torch.tensor([a]), torch.tensor([b])
        y = ms.ddim_step(y, toy_eps(y, ta), *ms.alpha_sigma(sched, ta, y), *ms.alpha_sigma(sched, tb, y))
    assert torch.allclose(via_me, y, atol=1e-6)


def test_guidance_is_one_batched_call_and_matches_alg1_form(sched):
    calls = []

    def teacher(x, t, c):
        calls.append(x.shape[0])
        return toy_eps(x, t) * (1 + c[:, None])

    x, t = torch.randn(5, 2), torch.full((5,), 499)
    c, u, w = torch.ones(5), torch.zeros(5), 8.0
    eps = ms.guided_eps(teacher, x, t, c, u, w)
    assert calls == [10]                                          # cond + uncond stacked
    e_c, e_u = teacher(x, t, c), teacher(x, t, u)
    assert torch.allclose(eps, e_u + w * (e_c - e_u), atol=1e-5)  # = LCM's e_c + (w-1)(e_c - e_u)
    # Alg. 1 / Eq. 18: z + w Phi(z, c) + (1 - w) Phi(z, 0), Phi an increment of a DDIM step
    ab = (*ms.alpha_sigma(sched, t, x), *ms.alpha_sigma(sched, t - 20, x))
    phi = lambda e: ms.ddim_step(x, e, *ab) - x
    assert torch.allclose(x + w * phi(e_c) + (1 - w) * phi(e_u), ms.ddim_step(x, eps, *ab), atol=1e-4)


# --- 4. sub-path points ------------------------------------------------------------------


def _coeffs(sched, t=799, s=699, n=1):
    tb, sb = torch.full((n,), t), torch.full((n,), s)
    like = torch.zeros(n, 1)
    return (*ms.alpha_sigma(sched, tb, like), *ms.alpha_sigma(sched, sb, like))


@pytest.mark.parametrize("point", [ms.sl_point, ms.sl_point_closed])
def test_sl_point_hits_endpoints(sched, point):
    a_t, s_t, a_s, s_s = _coeffs(sched)
    x_t, x_s = torch.randn(1, 2), torch.randn(1, 2)
    x, a, s = point(x_t, x_s, torch.ones(1, 1), a_t, s_t, a_s, s_s)
    assert torch.allclose(x, x_t) and torch.allclose(a, a_t) and torch.allclose(s, s_t, atol=1e-6)
    x, a, s = point(x_t, x_s, torch.zeros(1, 1), a_t, s_t, a_s, s_s)
    r = a_t / a_s
    assert torch.allclose(x, r * x_s) and torch.allclose(a, a_t) and torch.allclose(s, r * s_s, atol=1e-6)


def test_dl_point_hits_endpoints(sched):
    a_t, s_t, a_s, s_s = _coeffs(sched)
    x_t, x_s = torch.randn(1, 2), torch.randn(1, 2)
    x, a, s = ms.dl_point(x_t, x_s, torch.zeros(1, 1), a_t, s_t, a_s, s_s)
    assert torch.allclose(x, x_s) and torch.allclose(a, a_s) and torch.allclose(s, s_s, atol=1e-6)
    x, a, s = ms.dl_point(x_t, x_s, torch.ones(1, 1), a_t, s_t, a_s, s_s)
    assert torch.allclose(x, x_t) and torch.allclose(a, a_t) and torch.allclose(s, s_t, atol=1e-6)


@pytest.mark.parametrize("point", [ms.sl_point_closed, ms.dl_point])
@pytest.mark.parametrize("t,k,gamma", [(799, 100, 0.3), (999, 100, 0.7), (399, 20, 0.5)])
def test_marginal_matches_monte_carlo_of_forward_chain(sched, point, t, k, gamma):
    """Eq. 24 (SL) and Eq. 28 (DL): mean/std of x_{gamma,t} | x0 with x_t from x_{t-k} by Eq. 20."""
    g = torch.Generator().manual_seed(0)
    n = 400_000
    a_t, s_t, a_s, s_s = (c.double() for c in _coeffs(sched, t, t - k))
    x0 = 0.7
    x_s = a_s * x0 + s_s * torch.randn(n, 1, generator=g, dtype=torch.float64)        # Eq. 21
    r = a_t / a_s
    x_t = r * x_s + (1 - r**2).sqrt() * torch.randn(n, 1, generator=g, dtype=torch.float64)  # Eq. 20
    gm = torch.full((1, 1), gamma, dtype=torch.float64)
    x, a, s = point(x_t, x_s, gm, a_t, s_t, a_s, s_s)
    se = x.std() / n**0.5
    assert abs(x.mean() - a.item() * x0) < 5 * se
    assert abs(x.std() / s.item() - 1) < 6 / (2 * n) ** 0.5


def test_empirical_sigma_differs_from_closed_form_by_eq25(sched):
    a_t, s_t, a_s, s_s = _coeffs(sched, 999, 899)
    g = torch.linspace(0, 1, 11)[:, None]
    closed = ms.sigma_sl_closed(g, a_t, s_t, a_s, s_s)
    emp = ms.sigma_sl_empirical(g, a_t, s_t, a_s, s_s)
    e = ms.sigma_sl_error(g, a_t, s_t, a_s, s_s)
    assert torch.allclose(closed**2 - emp**2, e, atol=1e-6)
    assert e[0] == 0 and abs(e[-1]) < 1e-7 and (e[1:-1] < 0).all()  # r sigma_s < sigma_t: sigma' over-estimates


# --- 5. gamma embedding -------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ms.GAMMA_FEATURES))
def test_gamma_features_zero_at_one_and_enter_through_diffusers_cond_proj(kind):
    from diffusers.models.embeddings import TimestepEmbedding

    dim = ms.GAMMA_FEATURES[kind][1]
    c = ms.gamma_features(torch.tensor([0.0, 0.3, 0.99, 1.0]), kind)
    assert c.shape == (4, dim) and torch.count_nonzero(c[3]) == 0            # exactly 0 at gamma = 1
    assert (c[:3].abs().amax(1) > 0).all()
    emb = ms.zero_gamma_path(TimestepEmbedding(16, 32, cond_proj_dim=dim))
    temb = torch.randn(4, 16)
    assert torch.equal(emb(temb, c), emb(temb))                               # zero-initialised: the teacher
    torch.nn.init.normal_(emb.cond_proj.weight)                               # "trained" weights
    out = emb(temb, c)
    assert torch.equal(out[3], emb(temb)[3]) and not torch.allclose(out[:3], emb(temb)[:3])


def test_gamma_features_smoothness_near_one():
    """The Fourier sets are continuous at gamma = 1 (training near 1 teaches 1); the authors' x1000 set is not:
    gamma = 0.999 is already as far from gamma = 1 as gamma = 0 is."""
    g = torch.tensor([0.999, 0.0])
    for kind in ("fourier4", "fourier16"):
        near, far = ms.gamma_features(g, kind).norm(dim=1)
        assert near < 0.1 * far
    near, far = ms.gamma_features(g, "authors").norm(dim=1)
    assert near > 0.5 * far


def test_gamma_draws_share_at_one():
    g = torch.Generator().manual_seed(0)
    gam = ms.sample_gamma(20_000, ms.SPLADConfig(k=20, gamma_one_share=0.5), g)
    assert abs((gam == 1).float().mean().item() - 0.5) < 0.02
    rest = gam[gam < 1]
    assert abs(rest.mean().item() - 0.5) < 0.02 and rest.min() >= 0              # the rest ~ U[0, 1]
    assert (ms.sample_gamma(100, ms.SPLADConfig(k=20, gamma_one_share=0.0), g) < 1).all()   # the paper
    assert (ms.sample_gamma(100, ms.SPLADConfig(k=20, objective="lcm"), g) == 1).all()
    with pytest.raises(ms.UsageError, match="gamma_one_share"):
        ms.SPLADConfig(gamma_one_share=1.5)
    with pytest.raises(ms.UsageError, match="gamma_features"):
        ms.SPLADConfig(gamma_features="nope")


# --- 6. loss and EMA -----------------------------------------------------------------------


def test_ema_mu_zero_copies_and_mu_mixes():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    w_a = a.weight.detach().clone()
    ms.ema_update(a, b, 0.95)
    assert torch.allclose(a.weight, 0.95 * w_a + 0.05 * b.weight)
    ms.ema_update(a, b, 0.0)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_splad_loss_noises_x0_as_diffusers_add_noise(sched):
    """The x_t that the teacher solve starts from is DDPMScheduler.add_noise(x0, noise, t): alpha(t) x0 + sigma(t) eps
    with the drawn t and noise (Alg. 1, "sample z_t ~ N(alpha(t) z, sigma(t)^2 I)")."""
    seen = []

    def teacher(x, t, c):
        seen.append((x.clone(), t.clone()))
        return toy_eps(x, t)

    cfg = ms.SPLADConfig(k=100, w=1.0)
    x0 = torch.randn(16, 2)
    t, gamma, noise = draws(x0, cfg)
    ms.splad_loss(lambda x, tt, c, g: toy_eps(x, tt), lambda x, tt, c, g: toy_eps(x, tt), teacher, x0, None, None,
                  t, gamma, noise, sched, cfg)
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x_t, t_seen = seen[0]
    assert torch.equal(t_seen, t) and torch.allclose(x_t, ddpm.add_noise(x0, noise, t), atol=1e-6)


def test_splad_step_is_two_iterations_of_alg1_written_out(sched):
    """splad_step against Alg. 1 written out by hand: the draws, Eq. 17, the gradient clipped to L2 norm
    max_grad_norm (set small so clipping acts), one AdamW step, then theta^- <- mu theta^- + (1 - mu) theta.
    Two iterations, so a gradient left over from the first (no zero_grad) would show."""
    import copy

    from toy import toy2d

    cfg = ms.SPLADConfig(k=20, w=3.0, loss="l2", ema_mu=0.9)
    torch.manual_seed(0)
    student = toy2d.MLP(16)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight)     # a gamma path that acts
    target = copy.deepcopy(student).requires_grad_(False)
    ref_s, ref_t = copy.deepcopy(student), copy.deepcopy(target)
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (student, ref_s))
    x0, lab = torch.randn(32, 2), torch.arange(32) % 2
    null = torch.full_like(lab, toy2d.NULL)
    for it in range(2):
        loss = ms.splad_step(student, target, toy_eps, x0, lab, null, sched, cfg, opt, (target, student),
                             torch.Generator().manual_seed(it), max_grad_norm=0.05)
        t, gamma, noise = draws(x0, cfg, seed=it)
        ref_loss = ms.splad_loss(ref_s, ref_t, toy_eps, x0, lab, null, t, gamma, noise, sched, cfg)
        grads = torch.autograd.grad(ref_loss, list(ref_s.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        for p, g in zip(ref_s.parameters(), grads):
            p.grad = g * min(1.0, 0.05 / (norm.item() + 1e-6))           # clip (Appendix A)
        ref_opt.step()
        with torch.no_grad():
            for p_t, p in zip(ref_t.parameters(), ref_s.parameters()):
                p_t.copy_(0.9 * p_t + 0.1 * p)                           # EMA, Alg. 1 last line
        assert norm > 0.05 and torch.allclose(loss, ref_loss)
        for a, b in zip([*student.parameters(), *target.parameters()], [*ref_s.parameters(), *ref_t.parameters()]):
            assert torch.allclose(a, b, atol=1e-6), it


def test_splad_step_refuses_a_non_finite_loss_before_any_update(sched):
    import copy

    from toy import toy2d

    cfg = ms.SPLADConfig(k=20, w=3.0, loss="l2")
    student = toy2d.MLP(16)
    target = copy.deepcopy(student).requires_grad_(False)
    before = [p.detach().clone() for p in [*student.parameters(), *target.parameters()]]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    nan_teacher = lambda x, t, c: toy_eps(x, t) * float("nan")
    x0, lab = torch.randn(8, 2), torch.zeros(8, dtype=torch.long)
    with pytest.raises(FloatingPointError, match="not finite"):
        ms.splad_step(student, target, nan_teacher, x0, lab, lab, sched, cfg, opt, (target, student))
    assert all(torch.equal(a, b) for a, b in zip(before, [*student.parameters(), *target.parameters()]))


def test_distance_zero_iff_equal():
    x = torch.randn(4, 3)
    for loss in ("l2", "huber"):
        cfg = ms.SPLADConfig(loss=loss)
        assert ms.distance(x, x, cfg) == 0
        assert ms.distance(x, x + 1, cfg) > 0.9


@pytest.mark.parametrize("objective,k,me", [("splam", 20, True), ("splam", 100, True), ("lcm", 100, True),
                                            ("lcm", 20, True), ("splam", 100, False)])
def test_splad_loss_is_zero_for_an_exactly_consistent_student(sched, objective, k, me):
    """End to end: data = a point mass x0*, so the teacher's eps and PF-ODE are exact and the
    trajectory through x_t is alpha_u x0* + sigma_u eps_bar (one eps_bar). An oracle student
    mapping every point of it (and of its SL-ODE: noise sigma'(gamma,t), main text) to the
    boundary value F(x_0, 0) = alpha_0 x0* + sigma_0 eps_bar must give loss 0."""
    x0_star = torch.tensor([[0.5, -1.0]])
    cfg = ms.SPLADConfig(objective=objective, k=k, k_phi=20, multiple_estimation=me, w=3.0, loss="l2")
    a0, s0 = sched.alpha[0], sched.sigma[0]

    def teacher(x, t, c):                                           # exact eps, any class
        a, s = ms.alpha_sigma(sched, t, x)
        return (x - a * x0_star) / s

    def oracle(x, t, c, gamma):
        s_ = (t - k).clamp(min=0)
        a_t, s_t = ms.alpha_sigma(sched, t, x)
        a_s, s_s = ms.alpha_sigma(sched, s_, x)
        g = ms._bc(gamma, x)
        sig = (1 - g) * a_t / a_s * s_s + g * s_t                   # noise of the point (written out)
        eps_bar = (x - a_t * x0_star) / sig
        want = a0 * x0_star + s0 * eps_bar                          # F at the boundary
        c_skip, c_out = (ms._bc(c, x) for c in ms.boundary_scalings(t))
        x0_hat = (want - c_skip * x) / c_out                        # solve Eq. 16 for f
        return (x - a_t * x0_hat) / sig                             # and Eq. 14 for eps

    def target(x, t, c, gamma):                                     # the same oracle at gamma = 1
        a, s = ms.alpha_sigma(sched, t, x)
        eps_bar = (x - a * x0_star) / s
        want = a0 * x0_star + s0 * eps_bar
        c_skip, c_out = (ms._bc(c, x) for c in ms.boundary_scalings(t))
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        return (x - a * (want - c_skip * x) / safe) / s

    x0 = x0_star.expand(64, 2)
    lab = torch.zeros(64)
    loss = ms.splad_loss(oracle, target, teacher, x0, lab, lab, *draws(x0, cfg), sched, cfg)
    assert loss < 1e-8
    # and the Eq. 24 sigma is NOT what an ODE sub-path carries: with it the same oracle is off
    if objective == "splam":
        bad = ms.SPLADConfig(objective="splam-closed", k=k, k_phi=20, w=3.0, loss="l2")
        loss_bad = ms.splad_loss(oracle, target, teacher, x0, lab, lab, *draws(x0, bad), sched, bad)
        assert loss_bad > 1e3 * max(loss.item(), 1e-12)


def _gaussian_oracle(sched, s=0.7):
    """Data N(0, s^2) in 2D: the exact teacher eps, its exact PF-ODE output from (x, t), and a perfect consistency
    model (eps whose Eq. 16 output is that ODE output). Along the ODE x_t / r_t is constant, r_t^2 = a_t^2 s^2 + s_t^2."""
    r = lambda a, sg: (a**2 * s**2 + sg**2).sqrt()

    def teacher(x, t, c):
        a, sg = ms.alpha_sigma(sched, t, x)
        return sg * x / r(a, sg) ** 2

    def ode_exact(x, t):                          # x_0 = x r_0 / r_t, then x0_hat = (x_0 - s_0 eps(x_0)) / a_0
        a, sg = ms.alpha_sigma(sched, t, x)
        a0, s0 = sched.alpha[0], sched.sigma[0]
        return x * a0 * s**2 / (r(a, sg) * r(a0, s0))

    def model(x, t, c):
        a, sg = ms.alpha_sigma(sched, t, x)
        c_skip, c_out = (ms._bc(v, x) for v in ms.boundary_scalings(t))
        return (x - a * (ode_exact(x, t) - c_skip * x) / c_out) / sg

    return teacher, ode_exact, model


def test_few_step_errors_vanish_for_a_perfect_consistency_model(sched):
    """Closed form (Gaussian data): the perfect consistency model has zero coupled error at every step count when
    each n-step sample is compared with the teacher ODE from the sampler's last state; compared with the ODE from
    x_T instead, the re-noised 4-step sample is far off: fresh noise decouples it from x_T."""
    teacher, ode_exact, model = _gaussian_oracle(sched)
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    c = torch.zeros(512)
    ode = lambda x, t: ode_exact(x, torch.full((x.shape[0],), t))
    ddim = measure.ode_sample(teacher, x_T, c, c, 1.0, sched, 200)                        # the toys' reference
    assert torch.allclose(ddim, ode(x_T, 999), rtol=0.02, atol=1e-3)
    err, x = measure.few_step_errors(model, x_T, c, sched, ode, (1, 2, 4))
    assert max(err.values()) < 5e-3, err
    assert (x[4] - ode(x_T, 999)).norm(dim=1).mean() > 0.3
    broken = lambda x, t, c: model(x, t, c) + 0.1                                      # and it is not blind
    assert min(measure.few_step_errors(broken, x_T, c, sched, ode, (1, 2, 4))[0].values()) > 0.01


def test_consistency_delta_is_zero_on_the_ode_not_on_same_noise_pairs(sched):
    """Fig. 2c: the perfect consistency model has delta(t) = 0 between ODE-adjacent points, but not between the
    paper's same-noise pairs (alpha_s x0 + sigma_s eps), which lie on different trajectories."""
    teacher, _, model = _gaussian_oracle(sched)
    g = torch.Generator().manual_seed(1)
    x0, noise = 0.7 * torch.randn(256, 2, generator=g), torch.randn(256, 2, generator=g)
    c = torch.zeros(256)
    for t in (199, 599, 899):
        d = measure.consistency_delta(model, teacher, x0, noise, c, c, 1.0, sched, t, 20)
        assert d["ode"] < 2e-3 and d["same_noise"] > 10 * d["ode"], (t, d)


def test_sample_timesteps_on_the_k_phi_grid():
    cfg = ms.SPLADConfig(k=100)
    t = ms.sample_timesteps(10_000, cfg, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(range(19, 1000, 20))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(k=30), "multiple of k_phi"), (dict(k=1000), "smaller than"), (dict(w=0.5), ">= 1"),
    (dict(objective="cm"), "objective"), (dict(loss="l1"), "huber"), (dict(k_phi=30), "divisor"),
    (dict(ema_mu=1.0), "ema_mu"),
])
def test_config_errors_are_clear(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ms.SPLADConfig(**kwargs)


def test_splad_loss_backprops_into_the_student_only(sched):
    net = torch.nn.Linear(2, 2)
    tgt = torch.nn.Linear(2, 2)
    student = lambda x, t, c, g: net(x)
    target = lambda x, t, c, g: tgt(x)
    cfg = ms.SPLADConfig(k=20, w=2.0)
    x0 = torch.randn(16, 2)
    loss = ms.splad_loss(student, target, toy_eps, x0, torch.zeros(16), torch.zeros(16), *draws(x0, cfg), sched, cfg)
    loss.backward()
    assert net.weight.grad is not None and tgt.weight.grad is None


# --- 7. sampler ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_timesteps_match_diffusers(n):
    ref = LCMScheduler(**SD)
    ref.set_timesteps(n, original_inference_steps=50)
    assert ms.lcm_timesteps(n) == ref.timesteps.tolist()
    with pytest.raises(ValueError):
        ms.lcm_timesteps(0)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_sampler_matches_lcm_scheduler_step_by_step(sched, n):
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = ms.sample(toy_eps, x_T, None, sched, ms.lcm_timesteps(n), torch.Generator().manual_seed(7))
    ref = LCMScheduler(**SD)
    ref.set_timesteps(n, original_inference_steps=50)
    g, x = torch.Generator().manual_seed(7), x_T
    for t in ref.timesteps:
        x, denoised = ref.step(toy_eps(x, torch.full((2,), int(t))), t, x, generator=g, return_dict=False)
    assert torch.allclose(ours, denoised, atol=1e-5)


def test_scheduler_baseline_uses_exactly_num_steps_evaluations():
    calls = []

    def eps_fn(x, t):
        calls.append(1)
        return toy_eps(x, t)

    for make in (lambda: DDIMScheduler(**SD, timestep_spacing="trailing"),
                 lambda: DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                                     timestep_spacing="trailing")):
        for n in (1, 2, 4):
            calls.clear()
            measure.scheduler_sample(make(), eps_fn, torch.randn(3, 2), n)
            assert len(calls) == n


def test_ode_sample_matches_diffusers_ddim(sched):
    ref = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    x_T = torch.randn(3, 2)
    want = measure.scheduler_sample(ref, lambda x, t: toy_eps(x, t), x_T, 10)
    got = measure.ode_sample(lambda x, t, c: toy_eps(x, t), x_T, None, None, 1.0, sched, 10)
    # same DDIM integrator on slightly different grids (ours ends with an x0 step at t=0)
    assert (got - want).abs().max() < 0.05


def test_import_is_light():
    """Importing minisplam needs no Stable Diffusion stack (diffusers is imported lazily)."""
    import subprocess
    import sys

    code = "import sys, minisplam; assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Eq. 17 written out, and the defaults against the paper (issue 31) -----------------------------


def splad_loss_written_out(student, target, teacher, x0, cond, uncond, t, gamma, noise, cfg):
    """L_SLAD (Eq. 17) written out from the paper with none of minisplam's helpers: the VP coefficients of
    diffusers' DDPMScheduler; the teacher's guided DDIM (Alg. 1's inner loop, multiple estimation of Eq. 18) as
    DDIMScheduler.step, sample by sample, cond and uncond in two calls, stopping at the t = 0 boundary; the SL point
    and sigma'(gamma, t) (Eq. 12 and the line after Eq. 15); F = c_skip x + c_out (x - sigma eps) / alpha (Eq. 14,
    16) with LCM's c_skip, c_out (sigma_data 0.5, timestep scaling 10); F_theta at (x_gamma, t, gamma) and, under
    stop-gradient, F_theta^- at (x_hat_{t-k}, t-k) with gamma = 1; the pseudo-Huber (c = cfg.huber_c) or L2 distance.
    student(x, t, c, gamma), target(x, t, c, gamma) and teacher(x, t, c) return eps; cfg only carries the numbers
    k, k_phi, multiple_estimation, w, loss, huber_c."""
    ac = DDPMScheduler(**SD).alphas_cumprod
    bc = lambda v: v.reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    alpha, sigma = (lambda u: bc(ac[u].sqrt())), (lambda u: bc((1 - ac[u]).sqrt()))
    s = (t - cfg.k).clamp(min=0)                                     # t - k; below 0: the boundary t = 0
    x_t = alpha(t) * x0 + sigma(t) * noise
    step = cfg.k_phi if cfg.multiple_estimation else cfg.k
    ddim = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False)   # a step from 19 lands on t = 0
    ddim.set_timesteps(1000 // step)                                 # steps of size `step`
    rows = []
    with torch.no_grad():
        for b in range(x0.shape[0]):
            x = x_t[b:b + 1]
            for tau in range(int(t[b]), int(t[b]) - cfg.k, -step):  # t, t - k_phi, ..., t - k + k_phi
                if tau < 0:
                    break                                            # already at t = 0
                tt = torch.tensor([tau])
                e_c, e_u = teacher(x, tt, cond[b:b + 1]), teacher(x, tt, uncond[b:b + 1])
                x = ddim.step(e_u + cfg.w * (e_c - e_u), tau, x).prev_sample
            rows.append(x)
    x_s = torch.cat(rows)                                            # x_hat_{t-k}
    g, r = bc(gamma), alpha(t) / alpha(s)
    x_g = (1 - g) * r * x_s + g * x_t                                # Eq. 12
    sigma_g = (1 - g) * r * sigma(s) + g * sigma(t)                  # sigma'(gamma, t); alpha(gamma, t) = alpha(t)

    def F(x, eps, u, a, sg):                                         # Eq. 16 with Eq. 14's x0 = (x - sigma eps) / alpha
        ts = bc(u.double() * 10.0)
        return bc(0.25 / (ts**2 + 0.25)) * x + bc(ts / (ts**2 + 0.25).sqrt()) * (x - sg * eps) / a

    pred = F(x_g, student(x_g, t, cond, gamma), t, alpha(t), sigma_g)
    with torch.no_grad():
        tgt = F(x_s, target(x_s, s, cond, torch.ones_like(gamma)), s, alpha(s), sigma(s))
    d2 = (pred - tgt) ** 2
    return d2.mean() if cfg.loss == "l2" else ((d2 + cfg.huber_c**2).sqrt() - cfg.huber_c).mean()


@pytest.mark.parametrize("k,me,loss,w", [(100, True, "huber", 3.0), (100, False, "l2", 8.0), (20, True, "huber", 8.0)],
                         ids=["k100-ME-huber", "k100-one-step-l2", "k20"])
def test_splad_loss_is_eq17_written_out(sched, k, me, loss, w):
    """splad_loss against splad_loss_written_out, with three different networks: a student whose gamma path acts,
    an EMA target whose weights differ from the student's, a class-conditional teacher; t above and below k (the
    t = 0 boundary), gamma at 0, 1 and between. The same loss and gradient; and with target = the student module
    itself (a LoRA run) the same gradient: none flows through the target. Swapping student and target, t and t-k,
    gamma and 1 for the target, x_gamma and x_hat_{t-k}, sigma' and sigma(t), or dropping the stop-gradient, fails."""
    import copy

    from toy import toy2d

    torch.manual_seed(0)
    student = toy2d.MLP(16)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.1)   # a gamma path that acts
    target = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.1 * torch.randn_like(p))                                  # theta^- != theta
    teacher_net = toy2d.MLP(16).requires_grad_(False)
    teacher = lambda x, t, c: teacher_net(x, t, c)
    cfg = ms.SPLADConfig(k=k, multiple_estimation=me, loss=loss, w=w)
    x0, lab = torch.randn(8, 2), torch.arange(8) % 2
    null = torch.full_like(lab, toy2d.NULL)
    t = torch.tensor([999, 779, 519, 259, 119, 99, 59, 19])
    gamma = torch.tensor([0.3, 1.0, 0.0, 0.7, 0.5, 1.0, 0.9, 0.2])
    noise = torch.randn(8, 2)
    params = list(student.parameters())
    for tgt in (target, student):
        ours = ms.splad_loss(student, tgt, teacher, x0, lab, null, t, gamma, noise, sched, cfg)
        ref = splad_loss_written_out(student, tgt, teacher, x0, lab, null, t, gamma, noise, cfg)
        assert torch.allclose(ours, ref, rtol=1e-5, atol=0), (ours.item(), ref.item())
        g_ours, g_ref = (torch.cat([g.flatten() for g in torch.autograd.grad(v, params)]) for v in (ours, ref))
        # float32: at t = 999, x0 = (x - sigma eps) / alpha divides rounding by alpha = 0.068, and the Huber gradient
        # d / sqrt(d^2 + c^2) passes it on; measured up to 1.8e-4 for one sample (1e-7 with the nets in float64)
        assert (g_ours - g_ref).norm() < 1e-3 * g_ref.norm(), ((g_ours - g_ref).norm() / g_ref.norm()).item()


# The defaults of SPLADConfig, `train` and sd_step against their sources (issue 31). "paper": Appendix A of
# shared/papers/slam-arxiv-with-appendix.txt ("A Implementation Details"; Alg. 1 and Sec. 5.1 where the row says).
# "LCM": the argparse defaults of diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py, whose
# w is the Imagen form (w_min/w_max "have 1 added to them" vs the LCM paper), the same as ours. None: not given.
# setting: (ours, paper, LCM, which of them ours follows, the sources' words). "ours": a deliberate departure,
# which DEPARTURES says where it is documented. The AdamW rows are what `train` builds (test_sd.py checks that).
DEFAULTS = {
    "objective": ("splam", "splam", "lcm", "paper", "SLAD, Alg. 1; LCM's objective is gamma = 1 (Eq. 7)"),
    "k": (100, 100, 20, "paper", "SD 1.5: 'when k=100 and k_phi = 20 ... 6k training iterations'; SD 2.1-base: k = 20, "
                                 "as LCM (topk = 1000 // num_ddim_timesteps)"),
    "k_phi": (20, 20, 20, "paper", "'uniformly set the solver skipping step size k_phi to 20'; LCM: "
                                   "num_ddim_timesteps 50 of T = 1000"),
    "multiple_estimation": (True, True, False, "paper", "SD 1.5 'with multiple estimation (ME)', k/k_phi DDIM steps; "
                                                        "LCM: one DDIM step"),
    "w": (8.0, 8.0, "U[5, 15]", "paper", "'all ablation studies are under SDv1.5 with w = 8 by default' (the SD 1.5 "
                                         "FID headline: w = 3; SD 2.1-base: 8); LCM draws w in [w_min, w_max]"),
    "loss": ("huber", "huber", "l2", "paper", "SD 1.5: 'we adopt the huber loss in [43]' (SD 2.1-base: L2 = LCM's "
                                              "loss_type)"),
    "huber_c": (0.001, None, 0.001, "LCM", "the paper gives no c; LCM huber_c 0.001"),
    "ema_mu": (0.95, 0.95, 0.95, "paper", "'EMA with a decay rate of 0.95'; LCM ema_decay 0.95"),
    "gamma_one_share": (0.5, 0.0, None, "ours", "Alg. 1: gamma ~ U[0, 1]; ours sets half the draws to exactly 1 "
                                                "(toy/results/README.md)"),
    "gamma_features": ("authors", None, None, "authors", "the paper: 'Fourier embeddings ... fed into the models as an "
                                                         "input'; ours: the authors' script, through LCM's w "
                                                         "embedding (256 = LCM's unet_time_cond_proj_dim)"),
    "T": (1000, 1000, 1000, "paper", "SD's 1000 training timesteps"),
    "lr": (8e-6, 8e-6, 1e-4, "paper", "'a learning rate configured to 8e-6'; LCM learning_rate 1e-4"),
    "weight_decay": (0.0, 0.0, 1e-2, "paper", "'a weight decay of 0'; LCM adam_weight_decay 1e-2"),
    "adamw_betas": ((0.9, 0.999), None, (0.9, 0.999), "LCM", "the paper: 'AdamW', no betas; LCM adam_beta1 0.9, "
                                                             "adam_beta2 0.999"),
    "adamw_eps": (1e-8, None, 1e-8, "LCM", "LCM adam_epsilon 1e-08"),
    "max_grad_norm": (10.0, 10.0, 1.0, "paper", "'gradient clipping with an L2 norm threshold of 10'; LCM "
                                                "max_grad_norm 1.0"),
    "max_steps": (6000, 6000, None, "paper", "SD 1.5: 'it just costs 6k training iterations'"),
    "resolution": (512, None, 512, "LCM", "LCM resolution 512 (SD 1.5 / 2.1-base)"),
    "batch_size": (8, 1024, 16, "ours", "'a total batch size of 1024 distributed across 16 A100 GPUs'; LCM "
                                        "train_batch_size 16 per device; ours: 8 per process, for one GPU"),
}

# where each departure is documented: (what, text that must say so)
DEPARTURES = {
    "gamma_one_share": [("SPLADConfig's docstring", "gamma_one_share = 0.5 (the paper: 0"),
                        ("train --help", "share of gamma draws at exactly 1; the paper's U[0, 1] is 0"),
                        ("README.md", "the paper's gamma distribution, U[0, 1]: add --gamma-one-share 0")],
    "batch_size": [("train --help", "--batch-size BATCH_SIZE images per step and process (default: 8)"),
                   ("README.md", "`--batch-size` is per GPU")],
}


def train_parser():
    return ms.build_parser()._subparsers._group_actions[0].choices["train"]


def test_defaults_follow_appendix_a_lcm_or_a_documented_departure():
    """SPLADConfig's fields, `train`'s option defaults and sd_step's / splad_step's clipping default are the table's
    `ours`; each row's `ours` is the value of the source it names, or, where it names "ours", a departure from the
    paper that DEPARTURES finds documented. A default changed in the code, or a table row changed to match a wrong
    default, fails here."""
    import inspect
    from dataclasses import asdict
    from pathlib import Path

    for name, (ours, paper, lcm, follows, _) in DEFAULTS.items():
        want = {"paper": paper, "LCM": lcm}.get(follows, ours)
        assert ours == want, f"{name}: ours {ours!r} but {follows} says {want!r}"
        assert (follows == "ours") == (name in DEPARTURES), name
        if follows == "ours":
            assert ours != paper, name
    cfg = asdict(ms.SPLADConfig())
    assert cfg == {k: DEFAULTS[k][0] for k in cfg}                         # every field has a row
    args = vars(train_parser().parse_args(["--teacher", "t", "--data", "d", "--output-dir", "o"]))
    cli = {k: v for k, v in args.items() if k in DEFAULTS}
    assert cli == {k: DEFAULTS[k][0] for k in cli}
    assert set(DEFAULTS) - set(cli) == {"T", "multiple_estimation", "adamw_betas", "adamw_eps"}   # no option for these
    assert args["no_multiple_estimation"] is not DEFAULTS["multiple_estimation"][0]
    assert ms.splad_config(args) == ms.SPLADConfig()                        # the CLI's defaults are the library's
    for fn in (ms.splad_step, ms.sd_step):
        assert inspect.signature(fn).parameters["max_grad_norm"].default == DEFAULTS["max_grad_norm"][0], fn
    docs = {"SPLADConfig's docstring": " ".join(ms.SPLADConfig.__doc__.split()),
            "train --help": " ".join(train_parser().format_help().split()),
            "README.md": (Path(ms.__file__).parent / "README.md").read_text()}
    for name, places in DEPARTURES.items():
        for where, text in places:
            assert text in docs[where], f"{name}: {where} does not say {text!r}"
