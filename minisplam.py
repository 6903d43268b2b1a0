"""minisplam: Sub-Path Linear Approximation Model (SPLAM / SLAM, ECCV 2024) in one file.

SPLAM distils a pre-trained diffusion model into a 1-4 step generator. Like a latent
consistency model (LCM) it trains a student F_theta to map a point x_t of the teacher's
PF-ODE trajectory to the same output as an EMA copy does at the ODE point x_{t-k}, but
the student's input is a point of the *sub-path linear ODE* (SL-ODE) between the two:

    x_{gamma,t} = (1 - gamma) * alpha(t)/alpha(t-k) * x_{t-k} + gamma * x_t      (Eq. 12)

so the hard "dist_Delta" part of the k-step objective is learned progressively over gamma.
The algorithm is SPLAD (Alg. 1). Equation numbers refer to the arXiv version with the
appendix, `shared/papers/slam-arxiv-with-appendix.txt`.

The file reads in paper order:
  1. the VP noise schedule                          (Eq. 1, 20-21)
  2. parameterisation: x0 from eps, c_skip / c_out  (Eq. 5, 14, 16)
  3. the teacher ODE solver Phi with guidance and multiple estimation  (Alg. 1, Eq. 18)
  4. sub-path points: SL-ODE (Eq. 12-15, 24), DL-ODE (Eq. 26-28), LCM (gamma = 1)
  5. the gamma embedding (zero at gamma = 1, Sec. 4.2 end)
  6. the SPLAD loss and EMA (Eq. 17, Alg. 1)
  7. the few-step sampler (Eq. 19 + multistep consistency sampling)

Everything here is a pure function of tensors (randomness only through a passed
torch.Generator), so the 2D toy (`python toy/toy2d.py`), the notebooks and the tests run
exactly the code a Stable Diffusion run uses. Importing this module does no I/O.

A "model" in this file is a callable returning the noise prediction eps:
    teacher(x, t, cond) -> eps            student(x, t, cond, gamma) -> eps
where t is a LongTensor of integer timesteps (one per sample). Wrappers for networks
that predict v (SD 2.x-768) convert to eps before it reaches these functions.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F_nn

# ----------------------------------------------------------------------------------------
# 1. VP noise schedule (Eq. 1; Appendix B, Eq. 20-21)
# ----------------------------------------------------------------------------------------


@dataclass
class VPSchedule:
    """alpha(t) = sqrt(alphas_cumprod[t]), sigma(t) = sqrt(1 - alphas_cumprod[t]), t = 0..T-1."""

    alpha: torch.Tensor
    sigma: torch.Tensor

    @property
    def T(self) -> int:
        return self.alpha.shape[0]

    def to(self, device):
        return VPSchedule(self.alpha.to(device), self.sigma.to(device))


def vp_schedule(alphas_cumprod: torch.Tensor) -> VPSchedule:
    """The VP schedule of Eq. 21 from a diffusers-style `alphas_cumprod` (float64 math)."""
    a = alphas_cumprod.double()
    return VPSchedule(alpha=a.sqrt().float(), sigma=(1 - a).sqrt().float())


def sd_schedule(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> VPSchedule:
    """Stable Diffusion's "scaled_linear" betas, as diffusers' DDPMScheduler builds them."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule="scaled_linear")
    return vp_schedule(sched.alphas_cumprod)


def _bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector so it broadcasts against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def alpha_sigma(sched: VPSchedule, t: torch.Tensor, x: torch.Tensor):
    """alpha(t), sigma(t) for a batch of integer timesteps, shaped to broadcast against x."""
    t = t.to(sched.alpha.device)
    return _bc(sched.alpha[t], x).to(x.device), _bc(sched.sigma[t], x).to(x.device)


# ----------------------------------------------------------------------------------------
# 2. Parameterisation (Eq. 5, 14, 16)
# ----------------------------------------------------------------------------------------


def x0_from_eps(x, eps, alpha, sigma):
    """f_theta = (x - sigma * eps) / alpha                              (Eq. 14, Sec. 4.1)."""
    return (x - sigma * eps) / alpha


def eps_from_output(output, x, alpha, sigma, prediction_type: str):
    """Turn a network's raw output into eps (Eq. 14 form) for 'epsilon' or 'v_prediction'.

    For v = alpha * eps - sigma * x0 (Salimans & Ho) on a VP point: eps = sigma * x + alpha * v.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return sigma * x + alpha * output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: SPLAM needs an "
                     "'epsilon' or 'v_prediction' teacher")


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's c_skip(t), c_out(t) with c_skip(0) = 1, c_out(0) = 0            (Eq. 5, 16)."""
    ts = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (ts**2 + sigma_data**2)
    c_out = ts / (ts**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def consistency_fn(x, eps, t, alpha, sigma):
    """F_theta(x, t) = c_skip(t) x + c_out(t) f_theta(x, t)                 (Eq. 16).

    alpha, sigma are the marginal coefficients of the point x: alpha(t), sigma(t) on the
    PF-ODE, or alpha(gamma, t), sigma(gamma, t) on a sub-path (Eq. 14).
    """
    c_skip, c_out = boundary_scalings(t)
    return _bc(c_skip, x).to(x.device) * x + _bc(c_out, x).to(x.device) * x0_from_eps(x, eps, alpha, sigma)


# ----------------------------------------------------------------------------------------
# 3. Teacher ODE solver Phi: DDIM, guidance, multiple estimation (Alg. 1, Eq. 18)
# ----------------------------------------------------------------------------------------


def guided_eps(teacher, x, t, cond, uncond, w: float):
    """eps = eps_uncond + w (eps_cond - eps_uncond), cond and uncond in ONE batched call.

    Alg. 1 / Eq. 18 write the guided step as z + w Phi(z, c) + (1 - w) Phi(z, 0); DDIM is
    affine in eps with weights summing to 1, so that is exactly one DDIM step with the
    eps above. LCM writes eps_c + omega (eps_c - eps_uncond): omega = w - 1.
    With w == 1 (no guidance) the unconditional half is skipped.
    """
    if w == 1.0:
        return teacher(x, t, cond)
    eps_c, eps_u = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
    return eps_u + w * (eps_c - eps_u)


def ddim_step(x, eps, alpha_t, sigma_t, alpha_s, sigma_s):
    """One deterministic DDIM step t -> s (eta = 0): x_s = alpha_s x0_hat + sigma_s eps."""
    x0_hat = x0_from_eps(x, eps, alpha_t, sigma_t)
    return alpha_s * x0_hat + sigma_s * eps


def teacher_solve(teacher, x_t, t, s, step: int, cond, uncond, w: float, sched: VPSchedule):
    """x_hat_s = Phi applied (t - s) / step times with step size `step`     (Eq. 18, Alg. 1).

    With step = k_phi < k this is SPLAM's *multiple estimation*; with step = k it is the
    single DDIM step of LCM. Timesteps below 0 are clamped to the boundary t = 0, where
    a DDIM step 0 -> 0 is the identity.
    """
    n = int(math.ceil(int((t - s).max()) / step))
    x = x_t
    for i in range(n):
        t_i = (t - i * step).clamp(min=0).maximum(s)
        t_next = (t - (i + 1) * step).clamp(min=0).maximum(s)
        eps = guided_eps(teacher, x, t_i, cond, uncond, w)
        x = ddim_step(x, eps, *alpha_sigma(sched, t_i, x), *alpha_sigma(sched, t_next, x))
    return x


def ode_sample(teacher, x_T, cond, uncond, w: float, sched: VPSchedule, num_steps: int):
    """Reference PF-ODE solution: `num_steps` DDIM steps from T-1 to 0, then x0_hat at t=0."""
    B, T = x_T.shape[0], sched.T
    grid = torch.linspace(T - 1, 0, num_steps + 1).round().long()
    x = x_T
    for t_i, t_next in zip(grid[:-1], grid[1:]):
        t_b, s_b = t_i.repeat(B).to(x.device), t_next.repeat(B).to(x.device)
        eps = guided_eps(teacher, x, t_b, cond, uncond, w)
        x = ddim_step(x, eps, *alpha_sigma(sched, t_b, x), *alpha_sigma(sched, s_b, x))
    zero = torch.zeros(B, dtype=torch.long, device=x.device)
    return x0_from_eps(x, guided_eps(teacher, x, zero, cond, uncond, w), *alpha_sigma(sched, zero, x))


# ----------------------------------------------------------------------------------------
# 4. Sub-path points x_{gamma,t} with their marginal alpha, sigma
# ----------------------------------------------------------------------------------------
# Each returns (x_{gamma,t}, alpha(gamma,t), sigma(gamma,t)) so that the loss below is
# one code path for SPLAM, its closed-form variant, the DL-ODE ablation and LCM.


def sigma_sl_empirical(gamma, alpha_t, sigma_t, alpha_s, sigma_s):
    """sigma'(gamma,t) = (1-gamma) alpha_t/alpha_s sigma_s + gamma sigma_t   (Sec. 4.2, after Eq. 15).

    The main text's choice and our default: it is what the paper trained with, it is exact
    at both endpoints (Eq. 25 vanishes at gamma in {0, 1}), and the ODE points the loss
    really sees (x_{t-k} from the teacher, not from the forward chain of Eq. 20) follow
    neither formula exactly. Note: Eq. 25's lead-in misprints the last term as
    gamma * alpha(t); the main text and the derivation have gamma * sigma(t).
    """
    return (1 - gamma) * alpha_t / alpha_s * sigma_s + gamma * sigma_t


def sigma_sl_closed(gamma, alpha_t, sigma_t, alpha_s, sigma_s):
    """sigma(gamma,t) of Eq. 24, exact when x_t = (alpha_t/alpha_s) x_s + noise (Eq. 20)."""
    r2 = (alpha_t / alpha_s) ** 2
    return (r2 * sigma_s**2 + gamma**2 * (1 - r2)).clamp(min=0).sqrt()


def sigma_sl_error(gamma, alpha_t, sigma_t, alpha_s, sigma_s):
    """e_sigma = sigma(gamma,t)^2 - sigma'(gamma,t)^2 = 2 gamma (1-gamma) r sigma_s (r sigma_s - sigma_t),
    r = alpha_t/alpha_s (Eq. 25, third line; VP only). Zero at gamma in {0, 1}."""
    r = alpha_t / alpha_s
    return 2 * gamma * (1 - gamma) * r * sigma_s * (r * sigma_s - sigma_t)


def sl_point(x_t, x_s, gamma, alpha_t, sigma_t, alpha_s, sigma_s, sigma_fn=sigma_sl_empirical):
    """SL-ODE point (Eq. 12): (1-gamma) alpha_t/alpha_s x_s + gamma x_t; alpha(gamma,t)=alpha_t (Eq. 24)."""
    x = (1 - gamma) * (alpha_t / alpha_s) * x_s + gamma * x_t
    return x, alpha_t.expand_as(gamma), sigma_fn(gamma, alpha_t, sigma_t, alpha_s, sigma_s)


def sl_point_closed(x_t, x_s, gamma, alpha_t, sigma_t, alpha_s, sigma_s):
    """SL-ODE point with the closed-form sigma(gamma,t) of Appendix B (Eq. 24)."""
    return sl_point(x_t, x_s, gamma, alpha_t, sigma_t, alpha_s, sigma_s, sigma_sl_closed)


def dl_point(x_t, x_s, gamma, alpha_t, sigma_t, alpha_s, sigma_s):
    """Direct-Linking ODE point (Eq. 26) and its marginal alpha_DL, sigma_DL (Eq. 28)."""
    x = x_s + gamma * (x_t - x_s)
    r = alpha_t / alpha_s
    alpha = gamma * alpha_t + (1 - gamma) * alpha_s
    sigma = ((1 - gamma + r * gamma) ** 2 * sigma_s**2 + gamma**2 * (1 - r**2)).clamp(min=0).sqrt()
    return x, alpha, sigma


# objective name -> (how x_{gamma,t}, alpha, sigma are formed, whether gamma ~ U[0,1]).
# LCM is the SL-ODE at gamma == 1: x_{1,t} = x_t, alpha = alpha_t, sigma = sigma_t (Eq. 7).
OBJECTIVES = {
    "splam": (sl_point, True),
    "splam-closed": (sl_point_closed, True),
    "dl": (dl_point, True),
    "lcm": (sl_point, False),
}


# ----------------------------------------------------------------------------------------
# 5. The gamma embedding (Sec. 4.2, SPLAD paragraph and end of the section)
# ----------------------------------------------------------------------------------------


def fourier_features(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a scalar per sample (as for timesteps / LCM's w embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class GammaEmbedding(nn.Module):
    """gamma -> a vector added to the network's timestep embedding (Sec. 4.2, SPLAD).

    emb(gamma) = W (phi(gamma) - phi(1)) with phi(gamma) = [sin(pi j gamma), cos(pi j gamma)],
    j = 1..num_freqs, and W zero-initialised and bias-free:
      * emb(1) is EXACTLY zero for any trained W, so at gamma = 1 (all of sampling, Eq. 19)
        the student is the teacher's architecture and this module can be discarded;
      * emb is smooth in gamma (frequencies <= pi num_freqs), so the gamma -> 1 training
        points teach the network what it will do at gamma = 1. Timestep-style features of
        1000 gamma (periods down to 2 pi / 1000) would make gamma = 1 an isolated point
        that training never reaches: the 2D toy showed a 10-40x larger loss there.
    """

    def __init__(self, out_dim: int, num_freqs: int = 16):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, num_freqs + 1).float(), persistent=False)
        self.proj = nn.Linear(2 * num_freqs, out_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def features(self, gamma: torch.Tensor) -> torch.Tensor:
        args = gamma.float()[:, None] * self.freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        phi = self.features(gamma) - self.features(torch.ones_like(gamma))
        return self.proj(phi.to(self.proj.weight.dtype))


# ----------------------------------------------------------------------------------------
# 6. SPLAD: the loss of Eq. 17 and Alg. 1, and the EMA target
# ----------------------------------------------------------------------------------------


@dataclass
class SPLADConfig:
    """Hyper-parameters of Alg. 1. Defaults: Appendix A's SD 1.5 setting (k=100 with ME)."""

    objective: str = "splam"          # "splam" | "splam-closed" | "dl" | "lcm"
    k: int = 100                      # skipping step k
    k_phi: int = 20                   # solver step k_phi: t lives on this grid
    multiple_estimation: bool = True  # k/k_phi DDIM steps (Eq. 18); False: one step of size k
    w: float = 8.0                    # guidance scale, eps_u + w (eps_c - eps_u); LCM omega = w - 1
    loss: str = "huber"               # "huber" (c = huber_c) or "l2"
    huber_c: float = 0.001
    ema_mu: float = 0.95
    T: int = 1000

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        if self.loss not in ("huber", "l2"):
            raise ValueError(f"loss must be 'huber' or 'l2', got {self.loss!r}")
        if self.k_phi < 1 or self.T % self.k_phi:
            raise ValueError(f"k_phi={self.k_phi} must be a positive divisor of T={self.T}")
        if self.k < 1 or self.k % self.k_phi:
            raise ValueError(f"k={self.k} must be a positive multiple of k_phi={self.k_phi} "
                             f"(e.g. k=20 or k=100 with k_phi=20)")
        if self.k >= self.T:
            raise ValueError(f"k={self.k} must be smaller than the number of timesteps T={self.T}")
        if self.w < 1:
            raise ValueError(f"guidance scale w={self.w} must be >= 1 (w=1 is no guidance); "
                             "note w = 1 + LCM's omega")
        if not 0 <= self.ema_mu < 1:
            raise ValueError(f"ema_mu={self.ema_mu} must be in [0, 1)")

    @property
    def solver_step(self) -> int:
        return self.k_phi if self.multiple_estimation else self.k


def sample_timesteps(batch: int, cfg: SPLADConfig, generator=None, device="cpu") -> torch.Tensor:
    """t on LCM's k_phi grid {k_phi-1, 2 k_phi-1, ..., T-1}; t - k < 0 is the t = 0 boundary."""
    n = torch.randint(0, cfg.T // cfg.k_phi, (batch,), generator=generator, device=device)
    return (n + 1) * cfg.k_phi - 1


def distance(pred, target, cfg: SPLADConfig):
    """|.| of Eq. 17: mean squared error, or the pseudo-Huber sqrt(d^2 + c^2) - c of [43]."""
    if cfg.loss == "l2":
        return F_nn.mse_loss(pred.float(), target.float())
    return (((pred.float() - target.float()) ** 2 + cfg.huber_c**2).sqrt() - cfg.huber_c).mean()


def splad_loss(student, target, teacher, x0, cond, uncond, sched: VPSchedule, cfg: SPLADConfig,
               generator=None):
    """One evaluation of L_SLAD (Eq. 17) on a batch of clean (latent) data x0, as in Alg. 1.

    student(x, t, cond, gamma) is trained; target is its EMA copy (theta^-);
    teacher(x, t, cond) is the frozen diffusion model. Returns the scalar loss.
    """
    B, dev = x0.shape[0], x0.device
    point_fn, gamma_varies = OBJECTIVES[cfg.objective]
    t = sample_timesteps(B, cfg, generator, dev)                              # t ~ U(grid)
    s = (t - cfg.k).clamp(min=0)                                              # t - k (0 = boundary)
    gamma = (torch.rand(B, generator=generator, device=dev) if gamma_varies   # gamma ~ U[0, 1]
             else torch.ones(B, device=dev))
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    alpha_t, sigma_t = alpha_sigma(sched, t, x0)
    alpha_s, sigma_s = alpha_sigma(sched, s, x0)
    x_t = alpha_t * x0 + sigma_t * noise                                      # z_t ~ N(alpha z, sigma^2)
    with torch.no_grad():
        x_s = teacher_solve(teacher, x_t, t, s, cfg.solver_step, cond, uncond, cfg.w, sched)  # Eq. 18
    g = _bc(gamma, x0)
    x_g, alpha_g, sigma_g = point_fn(x_t, x_s, g, alpha_t, sigma_t, alpha_s, sigma_s)     # Eq. 12
    pred = consistency_fn(x_g, student(x_g, t, cond, gamma), t, alpha_g, sigma_g)       # F_theta
    with torch.no_grad():
        ones = torch.ones(B, device=dev)
        tgt = consistency_fn(x_s, target(x_s, s, cond, ones), s, alpha_s, sigma_s)     # F_theta^-
    return distance(pred, tgt, cfg)                                            # Eq. 17


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, mu: float):
    """theta^- <- stopgrad(mu theta^- + (1 - mu) theta)                   (Alg. 1, last line)."""
    for p_t, p in zip(target.parameters(), online.parameters()):
        p_t.lerp_(p.detach(), 1.0 - mu)
    for b_t, b in zip(target.buffers(), online.buffers()):
        b_t.copy_(b)


# ----------------------------------------------------------------------------------------
# 7. Few-step sampling (Eq. 19 and multistep consistency sampling [44])
# ----------------------------------------------------------------------------------------


def lcm_timesteps(num_steps: int, T: int = 1000, original_steps: int = 50) -> list:
    """LCM's schedule: `num_steps` evenly indexed points of the k_phi grid, 4 -> 999, 759, 499, 259."""
    if not 1 <= num_steps <= original_steps:
        raise ValueError(f"num_steps={num_steps} must be in [1, {original_steps}]")
    grid = [(i + 1) * (T // original_steps) - 1 for i in range(original_steps)][::-1]
    idx = [int(math.floor(i * original_steps / num_steps)) for i in range(num_steps)]
    return [grid[i] for i in idx]


@torch.no_grad()
def sample(model, x_T, cond, sched: VPSchedule, timesteps, generator=None):
    """Multistep consistency sampling at gamma = 1.

    model(x, t, cond) -> eps is the student at gamma = 1 (the teacher architecture).
    x0_hat = F(x_t, t) (Eq. 19); between steps re-noise to the next timestep with fresh
    noise drawn from `generator`. One step = one network evaluation.
    """
    x = x_T
    B = x.shape[0]
    for i, t in enumerate(timesteps):
        t_b = torch.full((B,), int(t), dtype=torch.long, device=x.device)
        alpha_t, sigma_t = alpha_sigma(sched, t_b, x)
        x0_hat = consistency_fn(x, model(x, t_b, cond), t_b, alpha_t, sigma_t)   # Eq. 19
        if i == len(timesteps) - 1:
            return x0_hat
        t_n = torch.full((B,), int(timesteps[i + 1]), dtype=torch.long, device=x.device)
        alpha_n, sigma_n = alpha_sigma(sched, t_n, x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = alpha_n * x0_hat + sigma_n * noise


@torch.no_grad()
def scheduler_sample(scheduler, eps_fn, x_T, num_steps: int):
    """Training-free baseline: run any diffusers scheduler (DDIM, DPM-Solver++, UniPC...)
    for `num_steps` steps with eps_fn(x, t) -> eps; returns its final sample."""
    scheduler.set_timesteps(num_steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        t_b = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        x = scheduler.step(eps_fn(scheduler.scale_model_input(x, t), t_b), t, x).prev_sample
    return x
