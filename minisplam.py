"""minisplam: Sub-Path Linear Approximation Model (SPLAM / SLAM, ECCV 2024) in one file.

SPLAM distils a pre-trained diffusion model into a 1-4 step generator. Like a latent consistency model (LCM) it
trains a student F_theta to map a point x_t of the teacher's PF-ODE to the same output as an EMA copy gives at the
ODE point x_{t-k}, but the student's input is a point of the *sub-path linear ODE* (SL-ODE) between the two:

    x_{gamma,t} = (1 - gamma) * alpha(t)/alpha(t-k) * x_{t-k} + gamma * x_t      (Eq. 12)

so the hard "dist_Delta" part of the k-step objective is learned a fraction gamma at a time. The training
algorithm is SPLAD (Alg. 1). Equation numbers follow the arXiv version with the appendix (method named SLAM there):
"Accelerating Image Generation with Sub-path Linear Approximation Model", https://arxiv.org/abs/2404.13903.

Sections 1-7 are the method, in paper order, and end in `splad_step`, one iteration of Alg. 1:
  1. the VP noise schedule                                   (Eq. 1, 20-21)
  2. parameterisation: x0 from eps, c_skip / c_out           (Eq. 5, 14, 16)
  3. the teacher ODE solver Phi: guidance, multiple estimation (Alg. 1, Eq. 18)
  4. the sub-path point x_{gamma,t}                          (Eq. 12-15); LCM is gamma = 1 (Eq. 7)
  5. the gamma path: zero at gamma = 1                       (Sec. 4.2)
  6. the SPLAD loss and one training step                    (Eq. 17, Alg. 1)
  7. the few-step sampler                                    (Eq. 19 + multistep consistency sampling)
The ablations that toy/study.py compares (closed-form sigma, the DL-ODE, other gamma features, a share of gamma at 1)
come after them. Everything there is a pure function of tensors (randomness only through a passed
torch.Generator), so the 2D toy (`python toy/toy2d.py`), the notebooks and the tests run exactly the code a Stable
Diffusion run uses. Importing this module does no I/O. Sections 8-13 wire the method to Stable Diffusion:

    python minisplam.py train --teacher stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --data DIR_WITH_metadata.jsonl --output-dir runs/sd15 --k 100 --w 3 --mixed-precision bf16
    python minisplam.py sample --model runs/sd15 --prompt "a photo of a cat" --steps 4
    python minisplam.py export --run runs/sd15 --out sd15-splam   # a plain diffusers pipeline

A "model" here is a callable returning the noise prediction eps:
    teacher(x, t, cond) -> eps            student(x, t, cond, gamma) -> eps
with t a LongTensor of integer timesteps (one per sample).
"""

import functools
import io
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

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
    """f_theta = D_theta / alpha = (x - sigma * eps) / alpha                 (Eq. 14)."""
    return (x - sigma * eps) / alpha


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's c_skip(t), c_out(t), with c_skip(0) = 1 and c_out(0) = 0          (Eq. 5)."""
    ts = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (ts**2 + sigma_data**2)
    c_out = ts / (ts**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def consistency_fn(x, eps, t, alpha, sigma):
    """F_theta(x, t) = c_skip(t) x + c_out(t) f_theta(x, t)                 (Eq. 16).

    alpha, sigma are the marginal coefficients of the point x: alpha(t), sigma(t) on the PF-ODE, or
    alpha(gamma, t), sigma(gamma, t) on a sub-path (Eq. 14)."""
    c_skip, c_out = boundary_scalings(t)
    return _bc(c_skip, x).to(x.device) * x + _bc(c_out, x).to(x.device) * x0_from_eps(x, eps, alpha, sigma)


# ----------------------------------------------------------------------------------------
# 3. Teacher ODE solver Phi: DDIM, guidance, multiple estimation (Alg. 1, Eq. 18)
# ----------------------------------------------------------------------------------------


def guided_eps(teacher, x, t, cond, uncond, w: float):
    """eps = eps_uncond + w (eps_cond - eps_uncond), cond and uncond in ONE batched call.

    Alg. 1 / Eq. 18 write the guided step as z + w Phi(z, c) + (1 - w) Phi(z, 0); DDIM is affine in eps with
    weights summing to 1, so that is exactly one DDIM step with the eps above. LCM writes
    eps_c + omega (eps_c - eps_uncond): omega = w - 1. With w == 1 (no guidance) the null half is skipped."""
    if w == 1.0:
        return teacher(x, t, cond)
    eps_c, eps_u = teacher(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(cond, uncond)).chunk(2)
    return eps_u + w * (eps_c - eps_u)


def ddim_step(x, eps, alpha_t, sigma_t, alpha_s, sigma_s):
    """One deterministic DDIM step t -> s (eta = 0): x_s = alpha_s x0_hat + sigma_s eps, the solver Phi."""
    x0_hat = x0_from_eps(x, eps, alpha_t, sigma_t)
    return alpha_s * x0_hat + sigma_s * eps


def teacher_solve(teacher, x_t, t, s, step: int, cond, uncond, w: float, sched: VPSchedule):
    """x_hat_s = Phi applied (t - s) / step times, with step size `step`     (Eq. 18, Alg. 1 inner loop).

    With step = k_phi < k this is SPLAM's *multiple estimation*; with step = k it is the single DDIM step of LCM.
    Timesteps below 0 are clamped to the boundary t = 0, where a DDIM step 0 -> 0 is the identity."""
    n = int(math.ceil(int((t - s).max()) / step))
    x = x_t
    for i in range(n):
        t_i = (t - i * step).clamp(min=0).maximum(s)                          # t_{phi,i} = t - i k_phi
        t_next = (t - (i + 1) * step).clamp(min=0).maximum(s)
        eps = guided_eps(teacher, x, t_i, cond, uncond, w)
        x = ddim_step(x, eps, *alpha_sigma(sched, t_i, x), *alpha_sigma(sched, t_next, x))
    return x


# ----------------------------------------------------------------------------------------
# 4. The sub-path point x_{gamma,t} and its marginal alpha, sigma (Eq. 12-15)
# ----------------------------------------------------------------------------------------
# A point function returns (x_{gamma,t}, alpha(gamma,t), sigma(gamma,t)); the loss is one code path for every
# objective. LCM is the SL-ODE at gamma = 1: x_{1,t} = x_t, alpha = alpha(t), sigma = sigma(t) (Eq. 7).


def sigma_sl_empirical(gamma, alpha_t, sigma_t, alpha_s, sigma_s):
    """sigma'(gamma,t) = (1-gamma) alpha_t/alpha_s sigma_s + gamma sigma_t   (Sec. 4.2, after Eq. 15).

    The main text's choice and ours: exact at both endpoints, and exact in between when x_{t-k} is ONE DDIM step of
    the teacher from x_t (then both share its eps: x_{t-k} = alpha_s x0_hat + sigma_s eps). Not exact with multiple
    estimation or on a real ODE, where eps changes along the way (notebook 2 measures by how much). Eq. 25's
    lead-in misprints the last term as gamma * alpha(t)."""
    return (1 - gamma) * alpha_t / alpha_s * sigma_s + gamma * sigma_t


def sl_point(x_t, x_s, gamma, alpha_t, sigma_t, alpha_s, sigma_s, sigma_fn=sigma_sl_empirical):
    """SL-ODE point (Eq. 12): (1-gamma) alpha_t/alpha_s x_s + gamma x_t, with alpha(gamma,t) = alpha_t (Eq. 24)."""
    x = (1 - gamma) * (alpha_t / alpha_s) * x_s + gamma * x_t
    return x, alpha_t.expand_as(gamma), sigma_fn(gamma, alpha_t, sigma_t, alpha_s, sigma_s)


OBJECTIVES = {"splam": sl_point, "lcm": sl_point}     # objective -> point function (LCM: gamma = 1); ablations below


# ----------------------------------------------------------------------------------------
# 5. The gamma path (Sec. 4.2, SPLAD paragraph and end of the section)
# ----------------------------------------------------------------------------------------
# The paper feeds a Fourier embedding of gamma "into the models as an input". As in the authors' script (and LCM's
# w embedding) it enters at the *input* of the time MLP: diffusers' TimestepEmbedding computes
# linear_2(act(linear_1(phi_t + cond_proj(c)))), and c = phi(gamma) - phi(1) goes in through its bias-free
# `cond_proj` (the UNet's `timestep_cond`). cond_proj starts at zero and c = 0 at gamma = 1, so at gamma = 1 (all of
# sampling, Eq. 19) the student is EXACTLY the teacher's architecture, for any trained weights.


def _authors(g):  # the authors' script: index 10 - 10 gamma through LCM's x1000 w embedding (256 dims)
    from diffusers.models.embeddings import get_timestep_embedding
    return get_timestep_embedding(1000 * (10 - 10 * g), 256, flip_sin_to_cos=False, downscale_freq_shift=1)


GAMMA_FEATURES = {"authors": (_authors, 256)}          # name -> (phi, feature dim); more in the ablations below


def gamma_features(gamma: torch.Tensor, kind: str = "authors") -> torch.Tensor:
    """c(gamma) = phi(gamma) - phi(1): the UNet's `timestep_cond`, exactly 0 at gamma = 1."""
    phi, _ = GAMMA_FEATURES[kind]
    g = gamma.float()
    return phi(g) - phi(torch.ones_like(g))


def zero_gamma_path(time_embedding: nn.Module) -> nn.Module:
    """Zero-initialise the bias-free cond_proj of a diffusers TimestepEmbedding: the student starts as the teacher."""
    nn.init.zeros_(time_embedding.cond_proj.weight)
    return time_embedding


# ----------------------------------------------------------------------------------------
# 6. SPLAD: the loss (Eq. 17) and one iteration of Alg. 1
# ----------------------------------------------------------------------------------------


@dataclass
class SPLADConfig:
    """Hyper-parameters of Alg. 1. Paper (Appendix A, SD 1.5): k = 100 with multiple estimation, k_phi = 20,
    pseudo-Huber loss, EMA 0.95; w = 8 is the paper's ablation setting (its SD 1.5 headline uses w = 3, its SD 2.1
    runs w = 8 with k = 20 and L2). Ours, not the paper's: gamma_one_share = 0.5 (the paper: 0, gamma ~ U[0, 1];
    toy/results/README.md says why) and huber_c = 0.001 (LCM's script; the paper does not give c)."""

    objective: str = "splam"          # a key of OBJECTIVES: "splam", "lcm"; ablations "splam-closed", "dl"
    k: int = 100                      # skipping step k
    k_phi: int = 20                   # solver step k_phi: t lives on this grid
    multiple_estimation: bool = True  # k/k_phi DDIM steps (Eq. 18); False: one step of size k
    w: float = 8.0                    # guidance scale, eps_u + w (eps_c - eps_u); LCM omega = w - 1
    loss: str = "huber"               # "huber" (c = huber_c) or "l2"
    huber_c: float = 0.001
    ema_mu: float = 0.95
    gamma_one_share: float = 0.5      # share of draws at exactly gamma = 1 (an ablation, ours); the paper: 0
    gamma_features: str = "authors"   # phi(gamma) fed as timestep_cond: a key of GAMMA_FEATURES
    T: int = 1000

    def __post_init__(self):
        check_config(self)            # input checks, after the ablations

    @property
    def solver_step(self) -> int:
        return self.k_phi if self.multiple_estimation else self.k


def sample_timesteps(batch: int, cfg: SPLADConfig, generator=None, device="cpu") -> torch.Tensor:
    """t on the k_phi grid {k_phi-1, 2 k_phi-1, ..., T-1}. Alg. 1 says t ~ U[k, T]; like LCM's script we also draw
    t < k, whose target is the t = 0 boundary F(x, 0) = x (s = t - k is clamped to 0 in splad_loss)."""
    n = torch.randint(0, cfg.T // cfg.k_phi, (batch,), generator=generator, device=device)
    return (n + 1) * cfg.k_phi - 1


def sample_gamma(batch: int, cfg: SPLADConfig, generator=None, device="cpu") -> torch.Tensor:
    """gamma ~ U[0, 1] (Alg. 1) with cfg.gamma_one_share of the draws set to exactly 1 (ours: 0.5; the paper: 0);
    all ones for LCM (Eq. 7)."""
    if cfg.objective == "lcm":
        return torch.ones(batch, device=device)
    gamma = torch.rand(batch, generator=generator, device=device)
    return with_gamma_one_share(gamma, cfg.gamma_one_share, generator)


def distance(pred, target, cfg: SPLADConfig):
    """|.| of Eq. 17: mean squared error, or pseudo-Huber sqrt(d^2 + c^2) - c per element, as LCM's script has it
    (the paper's [43] applies it to the norm of the whole difference)."""
    if cfg.loss == "l2":
        return F_nn.mse_loss(pred.float(), target.float())
    return (((pred.float() - target.float()) ** 2 + cfg.huber_c**2).sqrt() - cfg.huber_c).mean()


def splad_loss(student, target, teacher, x0, cond, uncond, t, gamma, noise, sched: VPSchedule, cfg: SPLADConfig):
    """L_SLAD (Eq. 17) on clean (latent) data x0 at drawn timesteps t, gamma's and noise, as in Alg. 1.

    student(x, t, cond, gamma) is trained; target is its EMA copy theta^-; teacher(x, t, cond) is the frozen
    diffusion model. Returns the scalar loss."""
    s = (t - cfg.k).clamp(min=0)                                               # t - k (0: the boundary)
    alpha_t, sigma_t = alpha_sigma(sched, t, x0)
    alpha_s, sigma_s = alpha_sigma(sched, s, x0)
    x_t = alpha_t * x0 + sigma_t * noise                                       # z_t ~ N(alpha(t) z, sigma(t)^2 I)
    with torch.no_grad():
        x_s = teacher_solve(teacher, x_t, t, s, cfg.solver_step, cond, uncond, cfg.w, sched)   # Eq. 18
    x_g, alpha_g, sigma_g = OBJECTIVES[cfg.objective](x_t, x_s, _bc(gamma, x0), alpha_t, sigma_t, alpha_s,
                                                      sigma_s)                 # Eq. 12: the SL-ODE point
    pred = consistency_fn(x_g, student(x_g, t, cond, gamma), t, alpha_g, sigma_g)           # F_theta, Eq. 16
    with torch.no_grad():
        ones = torch.ones_like(gamma)
        tgt = consistency_fn(x_s, target(x_s, s, cond, ones), s, alpha_s, sigma_s)          # F_theta^-, gamma = 1
    return distance(pred, tgt, cfg)                                            # Eq. 17


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, mu: float):
    """theta^- <- stopgrad(mu theta^- + (1 - mu) theta)                   (Alg. 1, last line)."""
    for p_t, p in zip(target.parameters(), online.parameters()):
        p_t.lerp_(p.detach(), 1.0 - mu)
    for b_t, b in zip(target.buffers(), online.buffers()):
        b_t.copy_(b)


def splad_step(student, target, teacher, x0, cond, uncond, sched: VPSchedule, cfg: SPLADConfig, opt,
               ema=None, generator=None, max_grad_norm: float = 10.0) -> torch.Tensor:
    """One iteration of Alg. 1 on a batch x0 with conditions cond (and the null condition uncond).

    student, target, teacher are the model callables of splad_loss; opt optimises the student's weights theta;
    ema = (target module, student module) for the EMA update, or None when the target IS the online student
    under stop-gradient (a LoRA run, as LCM-LoRA). Returns the loss (detached). A non-finite loss or gradient
    raises FloatingPointError before the weights change (under DDP on every rank: gradients are averaged)."""
    B, dev = x0.shape[0], x0.device
    t = sample_timesteps(B, cfg, generator, dev)                              # t on the k_phi grid (Alg. 1: U[k, T])
    gamma = sample_gamma(B, cfg, generator, dev)                              # gamma ~ U[0, 1], a share set to 1
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)   # z_t's noise
    loss = splad_loss(student, target, teacher, x0, cond, uncond, t, gamma, noise, sched, cfg)   # L(theta, theta^-)
    opt.zero_grad(set_to_none=True)
    loss.backward()                                                           # grad_theta L
    params = [p for group in opt.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)             # clipped at L2 norm 10 (App. A)
    if not torch.isfinite(norm):
        raise FloatingPointError(f"the loss ({loss.item():.4g}) or its gradient (norm {norm.item():.4g}) is not finite")
    opt.step()                                                                # theta <- theta - eta grad (AdamW)
    if ema is not None:
        ema_update(*ema, cfg.ema_mu)                                          # theta^- <- mu theta^- + (1-mu) theta
    return loss.detach()


# ----------------------------------------------------------------------------------------
# 7. Few-step sampling (Eq. 19 and multistep consistency sampling [44])
# ----------------------------------------------------------------------------------------


def lcm_timesteps(num_steps: int, T: int = 1000, original_steps: int = 50) -> list:
    """LCM's schedule: `num_steps` evenly indexed points of the `original_steps` grid {19, 39, ..., 999} (LCM's 50
    DDIM timesteps), 4 -> 999, 759, 499, 259."""
    if not 1 <= num_steps <= original_steps:
        raise ValueError(f"num_steps={num_steps} must be in [1, {original_steps}]")
    grid = [(i + 1) * (T // original_steps) - 1 for i in range(original_steps)][::-1]
    idx = [int(math.floor(i * original_steps / num_steps)) for i in range(num_steps)]
    return [grid[i] for i in idx]


@torch.no_grad()
def sample(model, x_T, cond, sched: VPSchedule, timesteps, generator=None, return_last_input=False):
    """Multistep consistency sampling at gamma = 1. model(x, t, cond) -> eps is the student at gamma = 1 (the
    teacher's architecture). x0_hat = F(x_t, t) (Eq. 19); between steps re-noise to the next timestep with fresh
    noise from `generator`. One step = one network evaluation. With return_last_input: (x0_hat, the x_t its last
    step saw)."""
    x = x_T
    B = x.shape[0]
    for i, t in enumerate(timesteps):
        t_b = torch.full((B,), int(t), dtype=torch.long, device=x.device)
        alpha_t, sigma_t = alpha_sigma(sched, t_b, x)
        x0_hat = consistency_fn(x, model(x, t_b, cond), t_b, alpha_t, sigma_t)   # Eq. 19
        if i == len(timesteps) - 1:
            return (x0_hat, x) if return_last_input else x0_hat
        t_n = torch.full((B,), int(timesteps[i + 1]), dtype=torch.long, device=x.device)
        alpha_n, sigma_n = alpha_sigma(sched, t_n, x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = alpha_n * x0_hat + sigma_n * noise                               # x_{t_n} ~ N(alpha x0_hat, sigma^2 I)


# ----------------------------------------------------------------------------------------
# Ablations: variants of sections 4-6 that toy/study.py compares (none is needed to read the method)
# ----------------------------------------------------------------------------------------


def sigma_sl_closed(gamma, alpha_t, sigma_t, alpha_s, sigma_s):
    """Ablation of §4: sigma(gamma,t) of Eq. 24, exact when x_t = (alpha_t/alpha_s) x_s + noise (Eq. 20)."""
    r2 = (alpha_t / alpha_s) ** 2
    return (r2 * sigma_s**2 + gamma**2 * (1 - r2)).clamp(min=0).sqrt()


def sigma_sl_error(gamma, alpha_t, sigma_t, alpha_s, sigma_s):
    """e_sigma = sigma(gamma,t)^2 - sigma'(gamma,t)^2 = 2 gamma (1-gamma) r sigma_s (r sigma_s - sigma_t),
    r = alpha_t/alpha_s (Eq. 25, third line; VP only). Zero at gamma in {0, 1}."""
    r = alpha_t / alpha_s
    return 2 * gamma * (1 - gamma) * r * sigma_s * (r * sigma_s - sigma_t)


def sl_point_closed(x_t, x_s, gamma, alpha_t, sigma_t, alpha_s, sigma_s):
    """Ablation of §4: the SL-ODE point with the closed-form sigma(gamma,t) of Appendix B (Eq. 24)."""
    return sl_point(x_t, x_s, gamma, alpha_t, sigma_t, alpha_s, sigma_s, sigma_sl_closed)


def dl_point(x_t, x_s, gamma, alpha_t, sigma_t, alpha_s, sigma_s):
    """Ablation of §4: the Direct-Linking ODE point (Eq. 26) and its marginal alpha_DL, sigma_DL (Eq. 28)."""
    x = x_s + gamma * (x_t - x_s)
    r = alpha_t / alpha_s
    alpha = gamma * alpha_t + (1 - gamma) * alpha_s
    sigma = ((1 - gamma + r * gamma) ** 2 * sigma_s**2 + gamma**2 * (1 - r**2)).clamp(min=0).sqrt()
    return x, alpha, sigma


OBJECTIVES.update({"splam-closed": sl_point_closed, "dl": dl_point})


def _smooth(n):  # Ablation of §5: [sin(pi j gamma), cos(pi j gamma)], j = 1..n: periods >= 2/n in gamma
    return lambda g: torch.cat([torch.sin(math.pi * g[:, None] * torch.arange(1, n + 1, device=g.device)),
                                torch.cos(math.pi * g[:, None] * torch.arange(1, n + 1, device=g.device))], -1)


# 'fourier16' was this project's first choice, 'fourier4' the low-frequency set. The authors' features have periods
# from 2 pi / 10^4 to 2 pi in gamma: 65 of their 128 frequencies have periods >= 0.06, the rest down to 6e-4.
GAMMA_FEATURES.update({"fourier16": (_smooth(16), 32), "fourier4": (_smooth(4), 8)})


def with_gamma_one_share(gamma, share: float, generator=None):
    """A share of the gamma draws set to exactly 1 (ours, the default 0.5), so that the gamma = 1 network that
    sampling uses is trained directly; the paper's share is 0 (toy/results/README.md)."""
    if share == 0:
        return gamma
    ones = torch.rand(gamma.shape, generator=generator, device=gamma.device) < share
    return torch.where(ones, torch.ones_like(gamma), gamma)


# ----------------------------------------------------------------------------------------
# Input checks of the method's settings (the CLI refuses bad values before any model loads)
# ----------------------------------------------------------------------------------------


class UsageError(ValueError):
    """Bad input from the user (a config value, a path, a dataset): the CLI prints it without a traceback."""


def check_config(cfg: SPLADConfig):
    """Every SPLADConfig value a user can set, refused with one line that says what to do."""
    finite = {f.name: getattr(cfg, f.name) for f in fields(cfg) if isinstance(getattr(cfg, f.name), float)}
    bad = [f"{k}={v}" for k, v in finite.items() if not math.isfinite(v)]
    if bad:
        raise UsageError(f"{', '.join(bad)}: must be a finite number")
    if cfg.objective not in OBJECTIVES:
        raise UsageError(f"objective must be one of {sorted(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.loss not in ("huber", "l2"):
        raise UsageError(f"loss must be 'huber' or 'l2', got {cfg.loss!r}")
    if cfg.k_phi < 1 or cfg.T % cfg.k_phi:
        raise UsageError(f"k_phi={cfg.k_phi} must be a positive divisor of T={cfg.T}")
    if cfg.k < 1 or cfg.k % cfg.k_phi:
        raise UsageError(f"k={cfg.k} must be a positive multiple of k_phi={cfg.k_phi} (e.g. k=20 or k=100 with k_phi=20)")
    if cfg.k >= cfg.T:
        raise UsageError(f"k={cfg.k} must be smaller than the number of timesteps T={cfg.T}")
    if cfg.w < 1:
        raise UsageError(f"guidance scale w={cfg.w} must be >= 1 (w=1 is no guidance); note w = 1 + LCM's omega")
    if cfg.huber_c <= 0:
        raise UsageError(f"huber_c={cfg.huber_c} must be > 0")
    if not 0 <= cfg.ema_mu < 1:
        raise UsageError(f"ema_mu={cfg.ema_mu} must be in [0, 1)")
    if cfg.gamma_features not in GAMMA_FEATURES:
        raise UsageError(f"gamma_features must be one of {sorted(GAMMA_FEATURES)}, got {cfg.gamma_features!r}")
    if not 0 <= cfg.gamma_one_share <= 1:
        raise UsageError(f"gamma_one_share={cfg.gamma_one_share} must be in [0, 1]")


# ========================================================================================
# Stable Diffusion at full scale:  python minisplam.py train | sample | export
# ========================================================================================
# Everything below wires the functions above to diffusers/transformers models, data on
# disk and checkpoints. Nothing here changes the method. Heavy imports stay inside the
# functions, so `import minisplam` needs no Stable Diffusion stack.

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# LoRA layers of diffusers' LCM-LoRA scripts: attention, feed-forward, resnet convs, resamplers, time projections
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


# ----------------------------------------------------------------------------------------
# 8. Teacher and student models (SD 1.x/2.x and SDXL, full or LoRA)
# ----------------------------------------------------------------------------------------


def check_prediction_type(prediction_type: str) -> str:
    """SPLAM distils eps- and v-prediction teachers; anything else is refused here, once."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UsageError(f"unsupported prediction_type {prediction_type!r}: SPLAM needs an "
                         "'epsilon' or 'v_prediction' teacher")
    return prediction_type


def eps_from_output(output, x, alpha, sigma, prediction_type: str):
    """A network's raw output as eps (Eq. 14 form), for 'epsilon' or 'v_prediction' (SD 2.x-768).

    For v = alpha * eps - sigma * x0 (Salimans & Ho) on a VP point: eps = sigma * x + alpha * v."""
    if check_prediction_type(prediction_type) == "epsilon":
        return output
    return sigma * x + alpha * output


def cat_conditions(a, b):
    """Two conditions as one batch (guided_eps): tensors, or dicts of tensors (SDXL's embeddings and time ids)."""
    return {k: torch.cat([a[k], b[k]]) for k in a} if isinstance(a, dict) else torch.cat([a, b])


def resolve_teacher(path_or_id: str, what: str = "teacher", parts=("model_index.json",) + SD_PARTS) -> str:
    """A local diffusers directory with `parts` (default: a Stable Diffusion or SDXL pipeline's, with the kind's
    name in its errors), or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'."""
    p, kind = Path(path_or_id).expanduser(), "Stable Diffusion" if what == "teacher" else "model"
    if p.exists():
        missing = [s for s in parts if not (p / s).exists()]
        if missing:
            raise UsageError(f"{what} {p} is not a diffusers {kind} directory: it lacks {missing}. Save one with "
                             "save_pretrained(dir) or give a hub id.")
        return str(p.resolve())
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise UsageError(f"{what} {path_or_id!r} not found: give a local diffusers directory (with "
                         f"{', '.join(parts)}) or a hub id like 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    return resolve_hub_id(path_or_id, what)


def resolve_hub_id(repo: str, what: str) -> str:
    """A hub id: its cached snapshot if there is one (then nothing touches the network), else the id itself once
    the Hub can be reached. An unreachable Hub is refused at once, not after the libraries' 30 s of retries."""
    import contextlib
    import socket
    import urllib.parse

    from huggingface_hub import constants, snapshot_download

    with contextlib.suppress(Exception):                       # not cached (or not a valid id): ask the Hub
        return snapshot_download(repo, local_files_only=True)
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UsageError(f"{what} {repo!r} is not in the Hugging Face cache and {host} cannot be reached: download "
                         "it where there is internet and pass the local folder") from None
    return repo


def teacher_fingerprint(src: str):
    """A hash of a local teacher (None for a hub id): model_index.json and its parts' files by name, size and content,
    of a file over 2 MiB (the weights) its first and last MiB: GBs read whole would add a minute to every command."""
    import hashlib

    root, h, mib = Path(src), hashlib.sha256(), 1 << 20
    for f in sorted(p for p in [root / "model_index.json", *root.glob("*/*")] if p.is_file()):
        with f.open("rb") as fh:
            h.update(f"{f.relative_to(root)} {f.stat().st_size}\n".encode() + fh.read(mib))
            fh.seek(max(mib, f.stat().st_size - mib))
            h.update(fh.read())
    return h.hexdigest()[:16] if root.is_dir() else None


@dataclass
class StableDiffusion:
    """A teacher: its diffusers pipeline (text encoders, tokenizers, VAE, scheduler), the UNet, its noise schedule."""

    pipe: object
    unet: nn.Module
    sched: VPSchedule
    prediction_type: str

    @property
    def xl(self) -> bool:        # SDXL: two text encoders, pooled embeddings and size/crop micro-conditioning
        return hasattr(self.pipe, "text_encoder_2")


def load_sd(path_or_id: str, device="cpu", dtype=torch.float32, vae: str = None) -> StableDiffusion:
    """The teacher's pipeline, StableDiffusionPipeline or StableDiffusionXLPipeline as its model_index.json says;
    `vae`: another AutoencoderKL (e.g. an fp16-safe SDXL VAE). Unsupported teachers are refused."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    src = resolve_teacher(path_or_id)
    try:
        xl = "text_encoder_2" in DiffusionPipeline.load_config(src)
        scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
        pred = check_prediction_type(scheduler.config.prediction_type)
        extra = {"vae": AutoencoderKL.from_pretrained(vae, dtype=dtype)} if vae else {}
        if not xl:
            extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(src, dtype=dtype, **extra)
    except OSError as e:
        raise UsageError(f"could not load the teacher {src!r} ({e}). Without internet access, download it "
                         "elsewhere and pass the local directory.") from e
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():
        if isinstance(m, nn.Module):
            m.requires_grad_(False).eval().to(device)
    return StableDiffusion(pipe, pipe.unet, vp_schedule(scheduler.alphas_cumprod).to(device), pred)


def add_gamma_path(unet: nn.Module, kind: str = "authors") -> nn.Module:
    """The student: a copy of the teacher UNet built with diffusers' `time_cond_proj_dim` (Sec. 4.2), so that
    gamma_features(gamma) enters as `timestep_cond` through the zero-initialised, bias-free cond_proj."""
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}     # "_use_default_values" would
    student = type(unet).from_config({**config, "time_cond_proj_dim": GAMMA_FEATURES[kind][1]})   # undo the override
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise ValueError(f"cannot add the gamma path to this UNet (missing {missing}, unexpected {unexpected})")
    zero_gamma_path(student.time_embedding)
    return student.to(unet.device) if unet.dtype == torch.float32 else student.to(unet.device, unet.dtype)


def drop_gamma_path(student: nn.Module) -> nn.Module:
    """The teacher's architecture with the student's weights: its output equals the student's at gamma = 1."""
    config = {k: v for k, v in student.config.items() if not k.startswith("_")}
    unet = type(student).from_config({**config, "time_cond_proj_dim": None})
    unet.load_state_dict({k: v for k, v in student.state_dict().items() if "cond_proj" not in k}, strict=True)
    return unet.to(student.device) if student.dtype == torch.float32 else unet.to(student.device, student.dtype)


def add_lora(student: nn.Module, rank: int, alpha: float = None, seed: int = 0) -> nn.Module:
    """A LoRA student (peft, LCM-LoRA's layers, Gaussian init so it starts as the teacher): only the adapters and
    the gamma path train, in fp32; the frozen base weights may stay in low precision. With the adapters disabled
    and no timestep_cond the same module IS the teacher, so a LoRA run holds one copy of the UNet. The adapters'
    init is drawn from `seed`, not the global generator, so a run is reproducible."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    student.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    student.time_embedding.cond_proj.requires_grad_(True)
    cast_training_params(student, torch.float32)
    return student


def unet_eps(net, sched: VPSchedule, prediction_type: str, dtype=None, cond_arg: str = "encoder_hidden_states",
             gamma_kind: str = None, adapters: bool = True, amp=None):
    """Wrap a diffusers UNet as minisplam's eps callable eps(x, t, cond, gamma=None); v-prediction is converted
    (Eq. 14 form). With gamma_kind, gamma enters as `timestep_cond` (the student, see add_gamma_path). A dict cond
    is SDXL's (embeddings, pooled text_embeds, time_ids). adapters=False: a LoRA student's teacher (LoRA off).
    amp: run the network under torch.autocast in this dtype (mixed precision; the output is fp32)."""
    cast = (lambda v: v) if dtype is None else (lambda v: v.to(dtype) if torch.is_floating_point(v) else v)

    def eps(x, t, cond, gamma=None):
        if isinstance(cond, dict):
            kw = {"encoder_hidden_states": cast(cond["encoder_hidden_states"]),
                  "added_cond_kwargs": {k: cast(cond[k]) for k in ("text_embeds", "time_ids")}}
        else:
            kw = {cond_arg: cast(cond)} if cond_arg == "encoder_hidden_states" else {cond_arg: cond,
                                                                                   "encoder_hidden_states": None}
        if gamma_kind is not None and gamma is not None:
            kw["timestep_cond"] = gamma_features(gamma, gamma_kind).to(x.device, x.dtype if dtype is None else dtype)
        if not adapters:
            net.disable_adapters()
        try:
            with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = net(cast(x), t, **kw).sample
        finally:
            if not adapters:
                net.enable_adapters()
        alpha, sigma = alpha_sigma(sched, t, x)
        return eps_from_output(out.float(), x, alpha, sigma, prediction_type)

    return eps


@torch.no_grad()
def encode_prompts(sd: StableDiffusion, prompts, device, time_ids=None, null: bool = False, resolution=None):
    """Text conditions as the teacher's own pipeline computes them (`encode_prompt`), in fp32. SD: the CLIP
    embeddings. SDXL: a dict of both encoders' embeddings, the pooled `text_embeds` and the `time_ids`
    (original size, crop top-left, target size: rows of 6; default no crop at `resolution`). null: the
    unconditional input, "" or zeros as the model's `force_zeros_for_empty_prompt` says."""
    out = sd.pipe.encode_prompt([""] * len(prompts) if null else list(prompts), device=device,
                                num_images_per_prompt=1, do_classifier_free_guidance=null)
    if not sd.xl:
        return out[int(null)].float()
    if time_ids is None:
        r = resolution or sd.unet.config.sample_size * sd.pipe.vae_scale_factor
        time_ids = torch.tensor([[r, r, 0, 0, r, r]] * len(prompts))
    return {"encoder_hidden_states": out[int(null)].float(), "text_embeds": out[2 + int(null)].float(),
            "time_ids": time_ids.float().to(device)}


@torch.no_grad()
def decode_latents(sd: StableDiffusion, z):
    """Latents -> images in [0, 1], as the pipeline's VAE decode + postprocess."""
    img = sd.pipe.vae.decode(z.to(sd.pipe.vae.dtype) / sd.pipe.vae.config.scaling_factor).sample
    return (img.float() / 2 + 0.5).clamp(0, 1)


def check_resolution(src: str, resolution):
    """Refuse, before any model loads, a resolution that is not a multiple of a local teacher's VAE factor
    (2^(levels - 1): 8 for SD); a hub id is checked when its VAE is loaded (latent_shape)."""
    cfg = Path(src) / "vae" / "config.json"
    f = 2 ** (len(json.loads(cfg.read_text())["block_out_channels"]) - 1) if cfg.is_file() else 8
    if resolution is not None and resolution % f:
        raise UsageError(f"--resolution {resolution} must be a multiple of the VAE factor {f} (e.g. {resolution // f * f or f})")


def latent_shape(sd: StableDiffusion, batch: int, resolution: int):
    f = sd.pipe.vae_scale_factor                             # checked by check_resolution (a hub id: 8 is assumed)
    return (batch, sd.unet.config.in_channels, resolution // f, resolution // f)


# ----------------------------------------------------------------------------------------
# 9. Data: an imagefolder with metadata.jsonl, or webdataset shards
# ----------------------------------------------------------------------------------------


def load_image(path_or_file, resolution: int, crop_seed=None):
    """PIL image -> ((3, R, R) tensor in [-1, 1], SDXL's time_ids [orig h, orig w, crop top, crop left, R, R]):
    EXIF-rotate, 16-bit grey to its top 8 bits, resize the short side, centre (or seeded random) crop. Returns
    (None, None) for a corrupt or unreadable image, or a decompression bomb."""
    import numpy as np                                       # (not VaeImageProcessor: same tensor, 5x slower here)
    from PIL import Image, ImageOps

    try:
        with Image.open(path_or_file) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):
                im = Image.fromarray((np.asarray(im).clip(0, 65535) >> 8).astype(np.uint8))
            im = im.convert("RGB")
            w, h = size = im.size
            s = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, None
    w, h = im.size
    if crop_seed is None:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        g = torch.Generator().manual_seed(int(crop_seed) % 2**63)
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=g))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=g))
    px = torch.from_numpy(np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.float32))
    return px.permute(2, 0, 1) / 127.5 - 1, torch.tensor([size[1], size[0], top, left, resolution, resolution])


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Hugging Face `imagefolder` layout: images + metadata.jsonl lines {"file_name": ..., "text": ...}."""

    def __init__(self, root, resolution: int, random_crop: bool = False):
        self.root, self.resolution, self.random_crop = Path(root), resolution, random_crop
        meta = self.root / "metadata.jsonl"
        if not self.root.is_dir():
            raise UsageError(f"dataset folder {self.root} {'is a file' if self.root.exists() else 'does not exist'}: "
                             "give the folder that holds metadata.jsonl and the images")
        if not meta.is_file():
            raise UsageError(f"{self.root} has no metadata.jsonl. Expected the imagefolder layout: one JSON "
                             'object per line, e.g. {"file_name": "0001.jpg", "text": "a photo of a cat"}')
        rows = []
        for n, line in enumerate(meta.read_bytes().splitlines(), 1):     # json decodes UTF-8 (a BOM too) or says no
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise UsageError(f"{meta}:{n} is not valid JSON ({e})") from e
                if not isinstance(rows[-1], dict) or not isinstance(rows[-1].get("file_name", ""), str):
                    raise UsageError(f'{meta}:{n} is not like {{"file_name": "0001.jpg", "text": "a photo of a '
                                     'cat"}: each line must be a JSON object whose file_name is a string')
        if not rows:
            raise UsageError(f"{meta} is empty: the dataset needs at least one image-caption pair")
        self.items = [(r["file_name"], r["text"]) for r in rows
                      if r.get("file_name") and isinstance(r.get("text"), str) and r["text"].strip()]
        if not self.items:
            raise UsageError(f"{meta} has no captions: every line needs a non-empty 'text' field")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        i, crop_seed = key
        name, text = self.items[i]
        px, ids = load_image(self.root / name, self.resolution, crop_seed if self.random_crop else None)
        return {"pixels": px, "time_ids": ids, "text": text, "name": str(self.root / name),
                "why": "an unreadable image"}                                           # pixels None: skipped


def step_batches(n, batch, seed, start_step, rank=0, world=1):
    """Batch indices (each with its crop seed) as a pure function of (seed, step): a resumed run sees the same
    batches. Each rank takes its slice of the global batch."""
    @functools.lru_cache(maxsize=2)                          # one permutation per epoch, not per sample
    def perm(epoch):
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()

    for step in itertools.count(start_step):
        base = (step * world + rank) * batch
        yield [(perm((base + j) // n)[(base + j) % n], seed * 1_000_003 + base + j) for j in range(batch)]


def collate_skip_corrupt(items):
    """Drop corrupt images (pixels None) and report which were skipped, and why."""
    good = [it for it in items if it["pixels"] is not None]
    out = {"skipped": len(items) - len(good),
           "skipped_files": [f"{it['name']} ({it['why']})" for it in items if it["pixels"] is None],
           "pixels": None, "time_ids": None, "text": [it["text"] for it in good]}
    if good:
        out["pixels"], out["time_ids"] = (torch.stack([it[k] for it in good]) for k in ("pixels", "time_ids"))
    return out


class ShardStream(torch.utils.data.IterableDataset):
    """LAION / CC12M style tar shards (image + .txt caption), read with the optional `webdataset` package, as an
    endless stream of batches (one pass over the shards per epoch, in shard order).

    The shards are dealt to world x W streams (W = max(1, loader workers)). The DataLoader takes batches from its
    workers in turn, so global batch p of a rank comes from stream p % W. A run resumed at batch `start` therefore
    lets its worker j play stream (start + j) % W and skip that stream's first (start + j) // W batches (read, not
    decoded): the resumed run sees exactly the batches the uninterrupted one would have seen."""

    def __init__(self, urls: str, resolution: int, batch: int, seed: int, random_crop: bool = False,
                 start: int = 0, rank: int = 0, world: int = 1, workers: int = 0):
        wds = optional("webdataset", "reading webdataset shards")
        self.shards = list(wds.shardlists.expand_urls(urls))
        self.W = max(1, workers)
        if len(self.shards) < world * self.W:
            raise UsageError(f"{len(self.shards)} shard(s) in {urls!r} cannot feed {world} rank(s) x {self.W} loader "
                             f"worker(s): pass at least {world * self.W} shards, or fewer --num-workers")
        self.resolution, self.batch, self.seed, self.random_crop = resolution, batch, seed, random_crop
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self):
        try:
            yield from self._batches()
        except UsageError as e:                   # in a loader worker: handed to the main process as one line
            yield {"error": str(e)}

    def _batches(self):
        wds = optional("webdataset", "reading webdataset shards")
        info = torch.utils.data.get_worker_info()
        j = info.id if info else 0
        stream = ((self.start + j) % self.W) * self.world + self.rank
        shards = self.shards[stream::self.world * self.W]

        read = wds.tarfile_to_samples(handler=wds.warn_and_continue)
        epoch_len = None                                            # samples per pass, known after the first

        def samples():                                              # endless: one pass over `shards` per epoch
            nonlocal epoch_len
            while True:
                n = 0
                for n, sample in enumerate(read({"url": u} for u in shards), 1):
                    yield sample
                if n == 0:
                    raise UsageError(f"the shards {shards} hold no samples")
                epoch_len = n

        skip = (self.start + j) // self.W * self.batch              # resume: what this stream already gave
        raw = itertools.islice(enumerate(samples()), skip, None)
        since_good, why = 0, set()                                  # samples in a row without a usable pair
        while True:
            items = []
            for k, sample in itertools.islice(raw, self.batch):
                key = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
                text = sample["txt"].decode("utf-8", "replace").strip() if "txt" in sample else ""
                seed = (self.seed * 1_000_003 + stream) * 1_000_000_007 + k if self.random_crop else None
                px, ids = load_image(io.BytesIO(sample[key]), self.resolution, seed) if key and text else (None, None)
                items.append({"pixels": px, "time_ids": ids, "text": text, "why": "an unreadable image" if key and text
                              else "a caption without its image" if text else "an image without a caption",
                              "name": f"{sample.get('__url__', '')}:{sample.get('__key__', '')}"})
            for item in items:
                since_good = 0 if item["pixels"] is not None else since_good + 1
                why = set() if item["pixels"] is not None else why | {item["why"]}
            if epoch_len and since_good > epoch_len:
                unpaired = {"a caption without its image", "an image without a caption"} <= why
                raise UsageError(f"no readable image with a caption in the shards {shards}: " + (
                    "they hold images and captions, but webdataset pairs files of the same name only when they are "
                    "adjacent in the tar (write each image right before its .txt, e.g. tar --sort=name)" if unpaired
                    else f"every sample was {' or '.join(sorted(why))}"))
            yield collate_skip_corrupt(items)


def optional(package: str, what: str):
    """An optional package, or a UsageError saying how to install it."""
    try:
        return __import__(package)
    except ImportError as e:
        raise UsageError(f"{what} needs the optional package {package}: pip install {package}") from e


def is_webdataset(spec: str) -> bool:
    return spec.endswith(".tar") or "{" in spec or spec.startswith(("pipe:", "http://", "https://"))


# ----------------------------------------------------------------------------------------
# 10. Checkpoints: safetensors weights, written atomically, resumable
# ----------------------------------------------------------------------------------------

# settings that may differ between a run and its resumption
RESUMABLE_KEYS = {"lr", "max_steps", "checkpoint_every", "validate_every", "num_workers", "resume", "output_dir", "verbose",
                  "validation_prompts", "world_size"}


TMP_MARK = ".minisplam-tmp"             # written into every temporary folder this program makes, and checked


def own_tmpdir(prefix: str, parent: Path) -> Path:
    """A temporary folder beside its final place, marked as ours so that a later clean-up can recognise it."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (tmp / TMP_MARK).touch()
    return tmp


def finish_tmpdir(tmp: Path, final: Path, old: Path = None):
    """Give it the umask's permissions (mkdtemp makes 0700, safetensors 0600), drop the mark and rename it into place
    (atomic). `old`: where an existing `final` goes first (export --overwrite), once only that rename is left."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [tmp, *tmp.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
    (tmp / TMP_MARK).unlink()
    if old is not None and final.exists():
        os.replace(final, old / "x")
    os.replace(tmp, final)


def remove_own_tmpdirs(parent: Path, pattern: str):
    """Remove what a killed run left: only folders matching `pattern` that carry our mark, never a user's lookalike."""
    for old in parent.glob(pattern):
        if (old / TMP_MARK).is_file():
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run: Path, step: int, student, target, opt, extra: dict, keep: int = 2) -> Path:
    """Write run/checkpoint-<step> via a temporary folder + rename, then point `latest` at it.
    A kill at any moment leaves the previous checkpoint and `latest` intact. A LoRA run (target is student)
    saves only what trains: the adapters and the gamma path."""
    from safetensors.torch import save_file, save_model

    tmp, final = own_tmpdir(".tmp-checkpoint-", run), run / f"checkpoint-{step:07d}"
    try:
        if target is student:
            save_file({n: p.detach().contiguous() for n, p in student.named_parameters() if p.requires_grad},
                      str(tmp / "student.safetensors"))
        else:
            save_model(student, str(tmp / "student.safetensors"))
            save_model(target, str(tmp / "target.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
        if (final / "state.json").is_file():                 # our own checkpoint of this step, from before a resume
            shutil.rmtree(final)
        finish_tmpdir(tmp, final)
        _write_atomic(run / "latest", final.name)
    except BaseException as e:                               # a full disk, Ctrl-C: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):                         # (torch.save's and safetensors' are not OSErrors)
            raise OSError(f"could not write {final.name} ({(str(e) or repr(e)).splitlines()[-1]}); the last checkpoint, "
                          f"{latest_checkpoint(run) or 'none yet'}, is intact: free some disk space and --resume") from e
        raise
    for old in sorted(p for p in run.glob("checkpoint-*") if (p / "state.json").is_file())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path):
    p = run / "latest"
    return run / p.read_text().strip() if p.is_file() else None


def load_weights(module: nn.Module, path: Path, trainable_only: bool = False):
    """All weights (strict), or exactly the trainable ones (a LoRA checkpoint)."""
    from safetensors.torch import load_file, load_model

    if not trainable_only:
        return load_model(module, str(path), strict=True)
    saved, want = load_file(str(path)), {n for n, p in module.named_parameters() if p.requires_grad}
    if set(saved) != want:
        raise ValueError(f"{path} does not hold this LoRA student's trainable weights")
    module.load_state_dict(saved, strict=False)


# ----------------------------------------------------------------------------------------
# 11. Training (Alg. 1 on Stable Diffusion)
# ----------------------------------------------------------------------------------------


def save_validation_grid(sd, model_eps, prompts, resolution, path: Path, seed=0):
    """A PNG grid: row i is prompt i (the run's validation_prompts), columns 1, 2, 4 steps (gamma = 1, fixed seed)."""
    from diffusers.utils import make_image_grid, numpy_to_pil

    x = torch.stack([generate_images(sd, model_eps, prompts, n, seed, resolution) for n in (1, 2, 4)], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, make_image_grid(numpy_to_pil(x.flatten(0, 1).permute(0, 2, 3, 1).cpu().numpy()), len(prompts), 3))


def read_json(path: Path, what: str):
    """A JSON file this program wrote; anything else (damaged, a user's) is a UsageError saying `what`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} ({path}: {type(e).__name__})") from None


def _write_atomic(path: Path, data):
    """Text, or a PIL image, written beside `path` and renamed into place: a kill leaves the old file or the new,
    and a failure (a full disk, Ctrl-C) no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        tmp.write_text(data) if isinstance(data, str) else data.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sd_step(sd: StableDiffusion, online, student, target, opt, cfg: SPLADConfig, batch: dict, uncond1, generator,
            low_dtype=torch.float32, max_grad_norm: float = 10.0) -> torch.Tensor:
    """splad_step (Alg. 1) on a batch of SD or SDXL images. `online` is the student, or its DDP wrapper; batch has
    "pixels", "text" (and SDXL's "time_ids"); uncond1 is the null condition of one sample. A LoRA run passes
    target=student: the target is then the online student under stop-gradient (no EMA) and the teacher is the same
    module with its adapters off. Returns the loss, averaged over DDP ranks."""
    from accelerate.utils import reduce

    dev, lora, kind = generator.device, target is student, cfg.gamma_features
    with torch.no_grad():
        px = batch["pixels"].to(dev, low_dtype)
        z0 = sd.pipe.vae.encode(px).latent_dist.sample(generator).float() * sd.pipe.vae.config.scaling_factor  # z = E(x)
        cond = encode_prompts(sd, batch["text"], dev, batch.get("time_ids"))
    uncond = ({**{k: uncond1[k].expand_as(cond[k]) for k in ("encoder_hidden_states", "text_embeds")},
               "time_ids": cond["time_ids"]} if sd.xl else uncond1.expand_as(cond))
    amp = None if low_dtype == torch.float32 else low_dtype
    loss = splad_step(unet_eps(online, sd.sched, sd.prediction_type, gamma_kind=kind, amp=amp),
                      unet_eps(target, sd.sched, sd.prediction_type, gamma_kind=kind, amp=amp),
                      unet_eps(sd.unet, sd.sched, sd.prediction_type, dtype=low_dtype, adapters=not lora, amp=amp),
                      z0, cond, uncond, sd.sched, cfg, opt, None if lora else (target, student), generator,
                      max_grad_norm)
    return reduce(loss, "mean")                                # the logged loss


def make_student(sd: StableDiffusion, device, gamma_kind: str, gradient_checkpointing: bool = False,
                 lora_rank: int = 0, lora_alpha: float = None, seed: int = 0, fp32_unet: nn.Module = None):
    """Full: student = the teacher's fp32 weights (`fp32_unet`, default read again from the teacher's folder) + the
    gamma path; target = its EMA copy (theta^- <- theta). LoRA: the teacher's own UNet + the gamma path + adapters,
    and target = student (see sd_step); sd.unet becomes that one module, so the teacher is not held twice."""
    import copy as _copy

    from diffusers import UNet2DConditionModel

    if lora_rank:
        student = add_lora(add_gamma_path(sd.unet, gamma_kind), lora_rank, lora_alpha, seed).to(device)
        sd.unet = sd.pipe.unet = student
    else:
        unet = fp32_unet if fp32_unet is not None else UNet2DConditionModel.from_pretrained(sd.pipe.config._name_or_path, subfolder="unet")
        with torch.device(device):                          # build the copy where it will live (fast on a GPU)
            student = add_gamma_path(unet, gamma_kind).to(device)
    if gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    return student, student if lora_rank else _copy.deepcopy(student).requires_grad_(False).eval()


def splad_config(a: dict) -> SPLADConfig:
    """The SPLADConfig of `train`'s settings (its parsed arguments, or a run's config.json)."""
    names = {f.name for f in fields(SPLADConfig)} - {"multiple_estimation", "T"}
    return SPLADConfig(multiple_estimation=not a["no_multiple_estimation"], **{k: a[k] for k in names})


def train(args) -> dict:
    """SPLAD (Alg. 1) on a Stable Diffusion teacher. Returns {'step': ..., 'losses': [...]}."""
    from accelerate import PartialState
    from accelerate.utils import reduce
    from tqdm.auto import tqdm

    cfg = splad_config(vars(args))
    args.teacher = resolve_teacher(args.teacher)               # fail early on a bad path; absolute if local
    check_resolution(args.teacher, args.resolution)
    if args.pretrained_vae:                                    # a VAE folder (AutoencoderKL) or hub id
        args.pretrained_vae = resolve_teacher(args.pretrained_vae, "--pretrained-vae", ["config.json"])
    if not is_webdataset(args.data) or not args.data.startswith(("pipe:", "http://", "https://")):
        args.data = str(Path(args.data).expanduser().resolve())             # a run does not depend on the cwd
    opt_cls = optional("bitsandbytes", "--use-8bit-adam").optim.AdamW8bit if args.use_8bit_adam else torch.optim.AdamW
    proc = PartialState(cpu=not torch.cuda.is_available())     # torchrun: a process group (NCCL, or gloo on CPUs)
    rank, world, device = proc.process_index, proc.num_processes, proc.device
    run = Path(args.output_dir).expanduser().resolve()
    settings = {**{k: v for k, v in vars(args).items() if k != "func"}, "output_dir": str(run), "world_size": world,
                "teacher_fingerprint": teacher_fingerprint(args.teacher)}
    shards = is_webdataset(args.data)

    # --- resume check before any heavy work -------------------------------------------
    ckpt, changed = None, {}
    if run.is_file():
        raise UsageError(f"--output-dir {run} is a file: choose a folder for the run")
    check_output(run, "--output-dir", overwrite=True, protect=local_paths(settings),    # not in the teacher or data
                 ours=("config.json", "is not a minisplam run"), lock=rank == 0)
    if args.resume:
        saved = run / "config.json"
        if not saved.is_file():
            raise UsageError(f"--resume: {run} is not a training run (no config.json)")
        old = read_json(saved, f"--resume: {run} is not a readable training run")
        free = RESUMABLE_KEYS | ({"teacher"} if old.get("teacher_fingerprint") else {"teacher_fingerprint"} - set(old))
        diff = sorted(k for k in set(old) | set(settings) if k not in free and old.get(k) != settings.get(k))
        if diff:
            raise UsageError(f"--resume: {run} was trained with different settings: " +
                             ", ".join(f"{k}={old.get(k)!r} (now {settings.get(k)!r})" for k in diff) +
                             f". Only {', '.join(sorted(RESUMABLE_KEYS - {'resume', 'world_size'}))} may change")
        changed = {k: [old.get(k), settings[k]] for k in sorted(RESUMABLE_KEYS - {"resume"} | {"teacher"})
                   if old.get(k) != settings[k]}
        layout = ["world_size"] + (["num_workers"] if shards else [])                     # these deal out the data
        moved = [f"{k}={old.get(k)!r} (now {settings[k]!r})" for k in layout if old.get(k) != settings[k]]
        if moved and rank == 0:
            print(f"warning: resuming with {', '.join(moved)}: the run goes on, but its batches differ from an "
                  "uninterrupted run's", file=sys.stderr)
        ckpt = latest_checkpoint(run)                  # None: killed before its first checkpoint, starts at step 0
        done = read_json(ckpt / "state.json", f"--resume: {ckpt} is not a readable checkpoint") if ckpt else {}
        if done.get("step", 0) > args.max_steps:
            raise UsageError(f"--max-steps {args.max_steps} is below the run's completed step {done['step']}: nothing "
                             "would run. Pass a larger --max-steps to train on")
        if done.get("step", 0) == args.max_steps:
            print(f"the run is already at step {args.max_steps} (--max-steps): nothing to train", file=sys.stderr)
            return {"rank": rank, "step": done["step"], "losses": done["losses"], "skipped": done["skipped"],
                    "checkpoint": str(ckpt)}
    elif (run / "config.json").exists():
        raise UsageError(f"{run} already holds a run: pass --resume to continue it, or choose a new --output-dir")

    # --- data ----------------------------------------------------------------------------
    start = done["data_pos"] if ckpt else 0                                         # batches consumed so far
    if shards:
        loader = torch.utils.data.DataLoader(
            ShardStream(args.data, args.resolution, args.batch_size, args.seed, args.random_crop, start, rank, world,
                        args.num_workers), batch_size=None, num_workers=args.num_workers)
        n_images = math.inf                                       # a ShardStream checks its own shards are readable
    else:
        ds = ImageCaptionFolder(args.data, args.resolution, args.random_crop)
        n_images = len(ds)
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=step_batches(len(ds), args.batch_size, args.seed, start, rank, world),
            collate_fn=collate_skip_corrupt, num_workers=args.num_workers)

    # --- models: frozen teacher parts in low precision, trainable student in fp32 ---------
    low = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    amp = None if low == torch.float32 else low                                 # autocast dtype of every UNet call
    sd = load_sd(args.teacher, device, low, args.pretrained_vae)
    student, target = make_student(sd, device, cfg.gamma_features, args.gradient_checkpointing,
                                   args.lora_rank, args.lora_alpha, args.seed)
    opt = opt_cls([p for p in student.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    step, losses, data_pos, skipped = 0, [], 0, 0
    if ckpt is not None:
        load_weights(student, ckpt / "student.safetensors", trainable_only=bool(args.lora_rank))
        if target is not student:
            load_weights(target, ckpt / "target.safetensors")
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        for group in opt.param_groups:                                       # --lr may change on resume
            group["lr"] = args.lr
        state = json.loads((ckpt / "state.json").read_text())
        step, losses, data_pos, skipped = state["step"], state["losses"], state["data_pos"], state["skipped"]
    online = student if world == 1 else torch.nn.parallel.DistributedDataParallel(
        student, device_ids=[device] if device.type == "cuda" else None)

    uncond1 = encode_prompts(sd, [""], device, null=True)                      # the null condition, once
    prompts = args.validation_prompts or ["a photo of a cat", "a painting of a lighthouse at dusk"]
    log, last, empty_streak, t_start = run / "metrics.jsonl", None, 0, time.time()
    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, desc="SPLAD", unit="it")
    it = iter(loader)
    try:
        if rank == 0:                                       # (the folder: made by check_output's lock)
            remove_own_tmpdirs(run, ".tmp-checkpoint-*")                    # left by a kill mid-checkpoint
            _write_atomic(run / "config.json", json.dumps(settings, indent=1))
            if log.is_file():       # steps after the checkpoint run again; a torn last line (no newline) goes too
                _write_atomic(log, "".join(l + "\n" for l in log.read_text().rpartition("\n")[0].splitlines()
                                           if json.loads(l).get("step", 0) <= step))
            if args.resume:
                with log.open("a") as f:                    # metrics.jsonl: one JSON object per step or event
                    f.write(json.dumps({"event": "resume", "step": step, "changed": changed}) + "\n")
        while step < args.max_steps:
            batch = next(it)
            if "error" in batch:                                                 # a loader worker's UsageError
                raise UsageError(batch["error"])
            data_pos += 1
            counts = torch.tensor([batch["skipped"], batch["pixels"] is None], dtype=torch.float32, device=device)
            n_skipped, n_empty = reduce(counts, "sum").round().long().tolist()               # summed over ranks
            skipped += n_skipped
            for name in batch["skipped_files"] if args.verbose else ():        # all of them are in metrics.jsonl
                print(f"skipped {name}", file=sys.stderr)
            if n_empty:                            # every image of a batch was corrupt: all ranks skip it together
                empty_streak += 1
                if empty_streak * args.batch_size * world > 2 * n_images:          # two epochs' worth, nothing readable
                    raise UsageError(f"none of the images in {args.data} can be read ({skipped} tries): check the files")
                continue
            empty_streak = 0
            g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * world + rank)
            try:
                loss = sd_step(sd, online, student, target, opt, cfg, batch, uncond1, g, low, args.max_grad_norm)
            except FloatingPointError as e:
                raise FloatingPointError(
                    f"{e} at step {step}; stopping. The last good checkpoint is "
                    f"{latest_checkpoint(run) or 'none (no checkpoint yet)'}. Try a lower --lr or --mixed-precision bf16/no.")
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", skipped=skipped)
            if rank == 0:
                row = {"step": step, "loss": losses[-1], "lr": opt.param_groups[0]["lr"], "skipped": skipped,
                       "time": round(time.time() - t_start, 3), "skipped_files": batch["skipped_files"] or None}
                with log.open("a") as f:
                    f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
            if rank == 0 and (step % args.checkpoint_every == 0 or step == args.max_steps):
                last = save_checkpoint(run, step, student, target, opt, {"losses": losses, "skipped": skipped, "data_pos": data_pos})
            if rank == 0 and args.validate_every and (step % args.validate_every == 0 or step == args.max_steps):
                save_validation_grid(sd, unet_eps(target, sd.sched, sd.prediction_type, amp=amp), prompts, args.resolution,
                                     run / "validation" / f"step-{step:07d}.png")
            proc.wait_for_everyone()
    except BaseException:
        del it                                                 # stop the loader's workers now, not when the traceback goes
        bar.leave = False                                      # clear the bar's line: the error is the last word
        bar.close()
        if rank == 0 and not args.resume and step == 0:       # nothing trained: leave the folder as it was found, so
            for f in (run / "config.json", log):               # that the same command can simply be run again (a
                f.unlink(missing_ok=True)                      # new folder goes with the lock: release_outputs)
        raise
    bar.close()
    if skipped and rank == 0:
        print(f"skipped {skipped} images that were unreadable or had no caption (named in {log})", file=sys.stderr)
    proc.destroy_process_group()
    last = last or latest_checkpoint(run)
    return {"rank": rank, "step": step, "losses": losses, "skipped": skipped, "checkpoint": str(last) if last else None}


# ----------------------------------------------------------------------------------------
# 12. Sampling and export
# ----------------------------------------------------------------------------------------


def run_checkpoint(run: Path, base: str = None):
    """(config, latest checkpoint) of a training run; a UsageError for anything else. Its teacher must be the model
    it was trained with (by fingerprint): where it was, or at `base`, where it moved to."""
    ckpt = latest_checkpoint(run)
    if not (run / "config.json").is_file() or ckpt is None:
        raise UsageError(f"{run} is not a training run with a checkpoint (config.json + latest)")
    config = read_json(run / "config.json", f"{run} is not a readable training run")
    config["teacher"] = resolve_teacher(base) if base else config["teacher"]
    if config.get("teacher_fingerprint", "") not in ("", teacher_fingerprint(config["teacher"])):
        raise UsageError(f"the teacher {config['teacher']} is gone or is not the model {run} was trained with (its "
                         "fingerprint differs): pass where that model is now as --base-model")
    return config, ckpt


LORA_FILE = "pytorch_lora_weights.safetensors"


def model_source(model: Path, base: str = None):
    """What a `--model` folder is: 'pipeline', 'lora' or 'run', and {"teacher": the folder, the base model or the
    run's teacher, and a run's other settings}; refused before any loading."""
    if (model / "model_index.json").is_file():
        return "pipeline", {"teacher": str(model)}
    if (model / LORA_FILE).is_file():
        if not base:
            raise UsageError(f"{model} holds a LoRA: pass --base-model, the teacher it was distilled from")
        return "lora", {"teacher": resolve_teacher(base)}
    if not (model / "config.json").is_file() or latest_checkpoint(model) is None:
        raise UsageError(f"{model} is neither an exported pipeline (model_index.json), a LoRA ({LORA_FILE}) nor a "
                         "training run with a checkpoint (config.json + latest)")
    return "run", run_checkpoint(model, base)[0]


def load_run(run_dir, device="cpu", base: str = None) -> StableDiffusion:
    """A training run: its teacher, with sd.unet the student at gamma = 1: the EMA target with the gamma path
    dropped, or for a LoRA run the teacher + the trained adapters (no timestep_cond: gamma = 1). base: run_checkpoint."""
    config, ckpt = run_checkpoint(Path(run_dir), base)
    sd = load_sd(config["teacher"], device, vae=config.get("pretrained_vae"))
    student = add_gamma_path(sd.unet, config["gamma_features"])
    if config.get("lora_rank"):
        sd.unet = add_lora(student, config["lora_rank"], config["lora_alpha"])
        load_weights(sd.unet, ckpt / "student.safetensors", trainable_only=True)
    else:
        load_weights(student, ckpt / "target.safetensors")
        sd.unet = drop_gamma_path(student)
    sd.unet.requires_grad_(False).eval()
    return sd


def load_distilled(model_dir: str, device="cpu", base: str = None):
    """An exported pipeline, an exported LoRA on its base model (diffusers' load_lora_weights), or a training run.
    Returns (StableDiffusion with the distilled UNet, eps callable)."""
    kind, source = model_source(Path(model_dir), base)
    sd = load_run(model_dir, device, base) if kind == "run" else load_sd(source["teacher"], device)
    if kind == "lora":
        sd.pipe.load_lora_weights(model_dir)
    return sd, unet_eps(sd.unet, sd.sched, sd.prediction_type)


def generate_images(sd: StableDiffusion, eps, prompts, steps: int, seed: int, resolution=None):
    """Few-step images (N, 3, R, R) in [0, 1] from our sampler (Eq. 19 + multistep), one batch."""
    device = sd.sched.alpha.device
    res = resolution or sd.unet.config.sample_size * sd.pipe.vae_scale_factor
    g = torch.Generator(device).manual_seed(seed)
    x_T = torch.randn(latent_shape(sd, len(prompts), res), generator=g, device=device)   # as the pipeline
    cond = encode_prompts(sd, prompts, device, resolution=res)
    return decode_latents(sd, sample(eps, x_T, cond, sd.sched, lcm_timesteps(steps, sd.sched.T), g))


def check_output(out: Path, flag: str, overwrite=False, protect=None, ours=None, lock=False) -> Path:
    """A user's files are never lost: refuse a file, a non-empty folder unless `overwrite` (None: no such option) or
    it holds ours[0], the current folder or one containing it, a folder that cannot be written, and one that is, lies
    inside or contains one of `protect` ({what: path}: a run being read, its teacher, data). lock: hold_output."""
    out = Path(out).expanduser().resolve()
    for what, p in {"the current folder": Path.cwd(), **(protect or {})}.items():
        p = Path(p).expanduser().resolve()
        if out == p or out in p.parents or (what != "the current folder" and p in out.parents):
            rel = "is" if out == p else "contains" if out in p.parents else "is inside"
            raise UsageError(f"{flag} {out} {rel} {what} ({p}): choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is an existing file: choose a folder")
    if not os.access(here := next(p for p in (out, *out.parents) if p.exists()), os.W_OK):   # (a read-only mount)
        raise UsageError(f"{flag} {out} cannot be written ({here} is read-only): choose another folder")
    for held in (False, True)[:1 + lock]:
        if held:
            hold_output(out, flag)
        full = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())      # (only a lock file: empty)
        if full and not overwrite:
            raise UsageError(f"{flag} {out} is not empty: choose a new folder" +
                             (", or pass --overwrite to replace it" if overwrite is False else ""))
        if full and ours and not (out / ours[0]).is_file():
            raise UsageError(f"{flag} {out} is not empty and {ours[1]}: choose a new or empty folder")
    return out


LOCK_FILE = ".minisplam-lock"           # in a run, export or sample folder while a command writes it
_HELD = []                              # this process's (lock file, its descriptor, the folders made for it)


def hold_output(out: Path, flag: str):
    """Hold the folder `out` for this command: a lock on a file in it (POSIX's, which forked loader workers do not
    inherit), that the OS releases when the process ends, even by kill -9. Another command on it is refused."""
    import fcntl

    made, lock, fd = [p for p in (out, *out.parents) if not p.exists()], out / LOCK_FILE, None
    out.mkdir(parents=True, exist_ok=True)
    while fd is None or not (lock.exists() and os.path.samestat(os.fstat(fd), lock.stat())):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)         # (again if its last holder removed it meanwhile)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.read(fd, 20).decode().strip() or "?"
            os.close(fd)
            raise UsageError(f"{flag} {out} is in use by process {holder}: wait for it to end, or choose another "
                             "folder") from None
    _HELD.append((lock, fd, made))
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())


def release_outputs():
    """Let go of what hold_output took; a folder it made that stayed empty (a refused or failed command) goes too."""
    while _HELD:
        lock, fd, made = _HELD.pop()
        if lock.exists() and os.path.samestat(os.fstat(fd), lock.stat()):
            lock.unlink()
        os.close(fd)
        for p in made:                                     # deepest first
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()


def local_paths(config: dict) -> dict:
    """The folders a run reads (its teacher, data, VAE) that exist on this machine: what no output may touch."""
    keys = {"teacher": "its teacher", "data": "its data", "pretrained_vae": "its VAE"}
    return {what: config[k] for k, what in keys.items() if config.get(k) and Path(config[k]).expanduser().exists()}


def export(run_dir: str, out_dir: str, overwrite: bool = False, base: str = None):
    """A full run: the teacher's diffusers pipeline (SD or SDXL) with the EMA student's weights in the teacher's
    architecture and LCMScheduler. A LoRA run: pytorch_lora_weights.safetensors for the teacher's pipeline
    (`pipe.load_lora_weights(dir)`). Either is sampled with LCMScheduler at guidance_scale=1 (w is baked in).
    Written next to `out_dir` and renamed into place: a kill leaves it as it was. base: where the teacher moved to."""
    from diffusers import LCMScheduler

    run, out = Path(run_dir), Path(out_dir).expanduser().resolve()
    config = run_checkpoint(run, base)[0]                                  # a run at all? before touching --out
    if os.path.ismount(out):
        raise UsageError(f"--out {out} is a mount point, which export cannot replace: choose a folder inside it")
    check_output(out, "--out", overwrite, {"the run": run, **local_paths(config)}, lock=True)
    remove_own_tmpdirs(out.parent, f".tmp-export-{out.name}-*")                  # left by a killed export
    sd = load_run(run, base=base)
    tmp, old = (own_tmpdir(f".tmp-export-{out.name}-{s}", out.parent) for s in ("", "old-"))   # build, then rename
    try:
        if config.get("lora_rank"):
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(sd.unet)   # peft keys, as load_lora_weights reads them; gamma path: 0
            type(sd.pipe).save_lora_weights(tmp, unet_lora_layers=layers,
                                            unet_lora_adapter_metadata=sd.unet.peft_config["default"].to_dict())
        else:
            sd.pipe.unet = sd.unet
            import inspect

            known = inspect.signature(LCMScheduler.__init__).parameters  # not DDPM's variance_type, say: no warning
            sd.pipe.scheduler = LCMScheduler.from_config(
                {k: v for k, v in sd.pipe.scheduler.config.items() if k in known}, timestep_scaling=10.0,
                original_inference_steps=50, clip_sample=False)
            sd.pipe.save_pretrained(tmp)
        finish_tmpdir(tmp, out, old)     # an existing --out (the lock's, or the user's --overwrite) goes into `old`
    except BaseException as e:           # a full disk, Ctrl-C: --out as it was, no temporary folder
        if (old / "x").exists() and not out.exists():
            os.replace(old / "x", out)
        for d in (tmp, old):
            shutil.rmtree(d, ignore_errors=True)
        if isinstance(e, Exception):                     # (safetensors' errors are not OSErrors)
            raise OSError(f"could not export to {out} ({(str(e) or repr(e)).splitlines()[-1]}): it is as it was; "
                          "free some disk space and export again") from e
        raise
    shutil.rmtree(old)
    return str(out)


def sample_to_folder(args):
    """`sample`: images, a manifest.jsonl (index, prompt, seed, steps, file) and sample.json (the settings) in --out.
    Resumable: a rerun with the same settings skips the batches already written; other settings are refused."""
    from diffusers.utils import make_image_grid, numpy_to_pil
    from PIL import Image
    from tqdm.auto import tqdm

    prompts = list(args.prompt)
    if args.prompts_file:
        f = Path(args.prompts_file).expanduser()
        try:
            prompts += [l.strip() for l in f.read_text(encoding="utf-8-sig").splitlines() if l.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompts-file {f} cannot be read as a text file ({type(e).__name__}): give a file "
                             "with one prompt per line") from None
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts-file")
    model = Path(args.model).expanduser().resolve()
    source = model_source(model, args.base_model)[1]
    check_resolution(source["teacher"], args.resolution)
    reads = {"the model": model, **local_paths(source)}
    out = check_output(Path(args.out), "--out", overwrite=True, protect=reads, lock=True,
                       ours=("sample.json", "was not written by `sample`"))
    settings = {"model": str(model), "base_model": args.base_model, "steps": args.steps, "seed": args.seed, "resolution": args.resolution,
                "batch_size": args.batch_size}
    done = {}
    if any(p.name != LOCK_FILE for p in out.iterdir()):
        try:
            old = json.loads((out / "sample.json").read_text())
            manifest = out / "manifest.jsonl"                # (a torn last line, without its newline, is dropped)
            lines = manifest.read_text().rpartition("\n")[0].splitlines() if manifest.is_file() else []
            done = {row["index"]: row for row in map(json.loads, lines)}
        except (OSError, ValueError, TypeError, KeyError):
            raise UsageError(f"--out {out} is not empty and was not written by `sample`: choose a new folder") from None
        if old != settings:
            raise UsageError(f"--out {out} holds images from other settings ({old}): choose a new folder")
        clash = [i for i, row in done.items() if i >= len(prompts) or row["prompt"] != prompts[i]]
        if clash:
            raise UsageError(f"--out {out} holds images of other prompts (index {clash[0]}): choose a new folder")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sd, eps = load_distilled(str(model), dev, args.base_model)
    _write_atomic(out / "sample.json", json.dumps(settings))
    _write_atomic(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in done.values()))   # a torn line goes
    starts = range(0, len(prompts), args.batch_size)
    for b, i in enumerate(tqdm(starts, desc="sample", unit="batch")):
        idx = range(i, min(i + args.batch_size, len(prompts)))
        if all(j in done and (out / done[j]["file"]).is_file() for j in idx):
            continue
        batch = generate_images(sd, eps, prompts[i:i + args.batch_size], args.steps, args.seed + b,
                                args.resolution).cpu()
        rows = []
        for j, im in zip(idx, numpy_to_pil(batch.permute(0, 2, 3, 1).numpy())):
            _write_atomic(out / f"{j:05d}.png", im)
            rows.append({"index": j, "prompt": prompts[j], "seed": args.seed + b, "steps": args.steps,
                         "file": f"{j:05d}.png"})
        with (out / "manifest.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["index"] not in done)
    ims = [Image.open(out / f"{j:05d}.png") for j in range(min(len(prompts), 64))]   # an overview of the first 64:
    ncol, nrow = min(len(ims), 8), -(-len(ims) // 8)                                # rows of 8, blanks at the end
    blank = Image.new("RGB", ims[0].size, "white")
    _write_atomic(out / "grid.png", make_image_grid(ims + [blank] * (ncol * nrow - len(ims)), nrow, ncol))
    return out


# ----------------------------------------------------------------------------------------
# 13. Command line
# ----------------------------------------------------------------------------------------


def number_arg(kind, lo, hi=None, strict=False):
    """argparse type: a finite number in [lo, hi] (lo excluded if strict), refused with one line otherwise. An
    integer's default bound, 2^31 - 1, keeps seeds and step counts far from int64 overflow."""
    import argparse

    hi = (2**31 - 1 if kind is int else math.inf) if hi is None else hi

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if v < lo or (strict and v == lo) or v > hi:
            limit = f"{'>' if strict else '>='} {lo}" + (f" and <= {hi:g}" if math.isfinite(hi) else "")
            raise argparse.ArgumentTypeError(f"must be {limit}, got {text}")
        return v

    return parse


def path_arg(text):
    """argparse type of a path or hub id: anything but the empty string (which would mean the current folder) or a
    symlink loop."""
    import argparse
    import errno

    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    try:
        os.stat(os.path.expanduser(text))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise argparse.ArgumentTypeError(f"{text} is a symlink loop: give the real path") from None
    return text


def cli_parser(**kw):
    """argparse whose errors are one line, exit code 2, no usage dump, and whose help shows only real defaults
    (also for toy/tiny_sd.py and benchmarks/evaluate.py)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
            raise SystemExit(2)

    class Help(argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):
            shown = not (action.default is None or action.default is False or action.default == [])   # 0 is shown
            return super()._get_help_string(action) if shown else action.help

    return Parser(formatter_class=Help, **kw)


def build_parser():
    pos_int, nonneg_int, pos_float = number_arg(int, 1), number_arg(int, 0), number_arg(float, 0, strict=True)
    p = cli_parser(prog="minisplam.py", description="SPLAM distillation for Stable Diffusion.")
    fmt = dict(formatter_class=p.formatter_class)
    sub = p.add_subparsers(dest="cmd", parser_class=type(p), metavar="{train,sample,export}")
    verbose = dict(action="store_true", help="also show the libraries' warnings and progress bars")

    t = sub.add_parser("train", help="distil a teacher with SPLAD (Alg. 1)", **fmt)
    g = t.add_argument_group("data")
    g.add_argument("--data", type=path_arg, required=True, help="imagefolder dir with metadata.jsonl, or webdataset "
                                                                 "shards ('data/{00000..00099}.tar')")
    g.add_argument("--resolution", type=number_arg(int, 1, 16384), default=512,
                   help="training image size (a multiple of the VAE factor)")
    g.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    g.add_argument("--num-workers", type=number_arg(int, 0, 256), default=min(4, os.cpu_count() or 1),
                   help="data loader processes (default: %(default)s, the CPU cores up to 4)")
    g = t.add_argument_group("model")
    g.add_argument("--teacher", type=path_arg, required=True, help="hub id or local diffusers SD directory")
    g.add_argument("--pretrained-vae", type=path_arg, help="another VAE folder or hub id (e.g. an fp16-safe SDXL VAE)")
    g.add_argument("--lora-rank", type=number_arg(int, 0, 4096), default=0,
                   help="train a LoRA of this rank (LCM-LoRA: 64; its target is the online student, no EMA); 0: the "
                        "full UNet")
    g.add_argument("--lora-alpha", type=number_arg(float, 0, 1e4, strict=True),
                   help="LoRA alpha; default: the rank (scale 1)")
    g.add_argument("--gamma-features", default="authors", choices=sorted(GAMMA_FEATURES),
                   help="Fourier features of gamma fed as the UNet's timestep_cond (toy/study.py compares them)")
    g = t.add_argument_group("SPLAD (Alg. 1)")
    g.add_argument("--objective", default="splam", choices=sorted(OBJECTIVES), help="training points (Sec. 4, Table 3)")
    g.add_argument("--k", type=pos_int, default=100, help="skipping step k (100 with multiple estimation, or 20)")
    g.add_argument("--k-phi", type=pos_int, default=20, help="DDIM solver step k_phi")
    g.add_argument("--no-multiple-estimation", action="store_true", help="one teacher DDIM step of size k (Eq. 18 off)")
    g.add_argument("--w", type=number_arg(float, 1, 100), default=8.0,
                   help="guidance scale (paper: 3 or 8; LCM omega = w - 1)")
    g.add_argument("--gamma-one-share", type=number_arg(float, 0, 1), default=0.5,
                   help="share of gamma draws at exactly 1; the paper's U[0, 1] is 0 (toy/results/README.md: why 0.5)")
    g.add_argument("--loss", default="huber", choices=["huber", "l2"], help="distance of Eq. 17")
    g.add_argument("--huber-c", type=number_arg(float, 0, 10, strict=True), default=0.001, help="pseudo-Huber c")
    g.add_argument("--ema-mu", type=number_arg(float, 0, 0.999999), default=0.95, help="EMA rate of the target theta^-")
    g = t.add_argument_group("optimisation")
    g.add_argument("--lr", type=number_arg(float, 0, 1, strict=True), default=8e-6,
                   help="AdamW learning rate (may change on --resume)")
    g.add_argument("--weight-decay", type=number_arg(float, 0, 1), default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=pos_float, default=10.0, help="gradient clipping (Appendix A)")
    g.add_argument("--batch-size", type=number_arg(int, 1, 65536), default=8, help="images per step and process")
    g.add_argument("--max-steps", type=pos_int, default=6000, help="stop after this many steps (may change on --resume)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="data order, noise and crops")
    g = t.add_argument_group("checkpoints and logs")
    g.add_argument("--output-dir", type=path_arg, required=True,
                   help="the run folder (new or empty; or a run with --resume)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    g.add_argument("--checkpoint-every", type=pos_int, default=500, help="steps between checkpoints")
    g.add_argument("--validate-every", type=nonneg_int, default=500, help="steps between validation grids; 0: none")
    g.add_argument("--validation-prompts", nargs="*", help="prompts of the validation grid (default: a cat, a "
                                                            "lighthouse)")
    g = t.add_argument_group("hardware")
    g.add_argument("--mixed-precision", default="bf16" if torch.cuda.is_available() else "no",
                   choices=["no", "fp16", "bf16"], help="precision of the frozen teacher, VAE, text encoder and autocast")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    g.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes' AdamW8bit")
    g.add_argument("--verbose", **verbose)

    s = sub.add_parser("sample", help="few-step images from a run, an exported pipeline or a LoRA", **fmt)
    s.add_argument("--model", type=path_arg, required=True, help="a training run, an exported pipeline or LoRA folder")
    s.add_argument("--base-model", type=path_arg, help="a LoRA folder's teacher, or where a run's teacher moved to")
    s.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    s.add_argument("--prompts-file", type=path_arg, help="one prompt per line (e.g. 30k COCO captions)")
    s.add_argument("--steps", type=int, default=4, choices=[1, 2, 4, 8], help="sampling steps (Eq. 19 + multistep)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="batch i uses seed + i")
    s.add_argument("--resolution", type=number_arg(int, 1, 16384), help="image size; default: the model's")
    s.add_argument("--batch-size", type=number_arg(int, 1, 65536), default=8, help="prompts per batch")
    s.add_argument("--out", type=path_arg, default="samples", help="folder for the images, manifest.jsonl and sample.json")
    s.add_argument("--verbose", **verbose)

    e = sub.add_parser("export", help="a diffusers pipeline (LCMScheduler), or a LoRA run's LoRA weights", **fmt)
    e.add_argument("--run", type=path_arg, required=True, help="the training run")
    e.add_argument("--out", type=path_arg, required=True, help="a new or empty folder")
    e.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (never the run, its teacher or data, or the current folder)")
    e.add_argument("--base-model", type=path_arg, help="where the run's teacher moved to (checked by its fingerprint)")
    e.add_argument("--verbose", **verbose)
    return p


def quiet_libraries(verbose: bool = False):
    """Our progress bar and messages are a normal run's only output: the libraries' warnings and their loading and
    saving bars are off unless --verbose."""
    if verbose:
        return
    import warnings

    import diffusers
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    warnings.filterwarnings("ignore")
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    disable_progress_bars()


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.cmd is None:
        p.error("choose a command: train, sample or export")
    quiet_libraries(args.verbose)
    try:
        if args.cmd == "train":
            res = train(args)
            if res["rank"] == 0:
                print(f"trained to step {res['step']}; last checkpoint {res['checkpoint']}")
            return res
        if args.cmd == "sample":
            out = sample_to_folder(args)
            n = sum(1 for _ in (out / "manifest.jsonl").open())
            print(f"wrote {n} images, manifest.jsonl and grid.png ({'the first 64' if n > 64 else 'all'}) to {out}")
            return out
        print(f"exported to {export(args.run, args.out, args.overwrite, args.base_model)}")
        return args.out
    except (UsageError, FloatingPointError, OSError) as e:        # a bad input: 2; a diverged run, a full disk: 1
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, UsageError) else 1)
    finally:
        release_outputs()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                # Ctrl-C: one line, exit 130; what was half-written is already gone
        print("\ninterrupted: nothing half-written is left", file=sys.stderr)
        raise SystemExit(130)
