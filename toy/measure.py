"""How close a few-step sampler comes to its teacher: the measurements the toys, the SD learning test and
benchmarks/learning_curve.py share. They call minisplam's sampler and teacher solver; none of them trains.

  ode_sample         the teacher's reference PF-ODE solution (many guided DDIM steps)
  few_step_errors    the coupled n-step error to the teacher's ODE from the same noise (the toys' Fig. 2b)
  consistency_delta  delta(t) of Fig. 2c: |F(x_t, t) - F(x_{t-k}, t-k)| on the ODE vs on same-noise pairs
  scheduler_sample   a training-free baseline: any diffusers scheduler (DDIM, DPM-Solver++, UniPC, ...)
"""

import torch

import minisplam as ms


@torch.no_grad()
def ode_sample(teacher, x_T, cond, uncond, w: float, sched: ms.VPSchedule, num_steps: int, t_start: int = None):
    """Reference PF-ODE solution: `num_steps` DDIM steps from t_start (default T-1) to 0, then x0_hat at t=0."""
    B, T = x_T.shape[0], sched.T
    grid = torch.linspace(T - 1 if t_start is None else t_start, 0, num_steps + 1).round().long()
    x = x_T
    for t_i, t_next in zip(grid[:-1], grid[1:]):
        t_b, s_b = t_i.repeat(B).to(x.device), t_next.repeat(B).to(x.device)
        eps = ms.guided_eps(teacher, x, t_b, cond, uncond, w)
        x = ms.ddim_step(x, eps, *ms.alpha_sigma(sched, t_b, x), *ms.alpha_sigma(sched, s_b, x))
    zero = torch.zeros(B, dtype=torch.long, device=x.device)
    return ms.x0_from_eps(x, ms.guided_eps(teacher, x, zero, cond, uncond, w), *ms.alpha_sigma(sched, zero, x))


@torch.no_grad()
def few_step_errors(model, x_T, cond, sched: ms.VPSchedule, ode, steps=(1, 2, 4), seed: int = 0):
    """The coupled error of the n-step sampler to the teacher, for each n: mean ||F(x, t) - ode(x, t)|| per sample,
    at the state (x, t) of the sampler's last step; ode(x, t) is the teacher's many-step guided ODE output from there.
    For n = 1 that state is x_T: the error to the teacher's output from the same noise, with no sampling floor.
    For n > 1 the sampler has re-noised (Eq. 19, multistep), so the sample is measured against the teacher's answer
    from where the sampler stood, not from x_T (which fresh noise has decoupled). Returns ({n: error}, {n: samples})."""
    errors, samples = {}, {}
    for n in steps:
        samples[n], x_last = few_step_sample(model, x_T, cond, sched, n, seed, last_input=True)
        errors[n] = (samples[n] - ode(x_last, ms.lcm_timesteps(n, sched.T)[-1])).flatten(1).norm(dim=1).mean().item()
    return errors, samples


def few_step_sample(model, x_T, cond, sched: ms.VPSchedule, n: int, seed: int = 0, last_input: bool = False):
    """The n-step sample (LCM timesteps, re-noising drawn from `seed`) that few_step_errors measures; with
    last_input, also the state the last step saw."""
    ts = ms.lcm_timesteps(n, sched.T)
    return ms.sample(model, x_T, cond, sched, ts, torch.Generator(x_T.device).manual_seed(seed), last_input)


@torch.no_grad()
def consistency_delta(model, teacher, x0, noise, cond, uncond, w: float, sched: ms.VPSchedule, t: int, k: int,
                      step: int = 1):
    """delta(t) of Fig. 2c: mean ||F(x_t, t) - F(x_{t-k}, t-k)|| with x_t = alpha_t x0 + sigma_t noise and x_{t-k}
    either the guided teacher ODE solved from x_t in DDIM steps of `step` ('ode') or the paper's simulation, the
    same x0 and noise ('same_noise')."""
    t_b = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    s_b = t_b - k
    (a_t, s_t), (a_s, s_s) = ms.alpha_sigma(sched, t_b, x0), ms.alpha_sigma(sched, s_b, x0)
    f = lambda x, tt, a, sg: ms.consistency_fn(x, model(x, tt, cond), tt, a, sg)
    x_t = a_t * x0 + s_t * noise
    f_t = f(x_t, t_b, a_t, s_t)
    x_ode = ms.teacher_solve(teacher, x_t, t_b, s_b, step, cond, uncond, w, sched)
    gap = lambda x_s: (f_t - f(x_s, s_b, a_s, s_s)).flatten(1).norm(dim=1).mean().item()
    return {"ode": gap(x_ode), "same_noise": gap(a_s * x0 + s_s * noise)}


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
