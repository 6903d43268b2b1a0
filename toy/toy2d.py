"""2D toy for SPLAM: every SPLAD objective on a Gaussian mixture whose PF-ODE is known exactly.

    python toy/toy2d.py            # default: one seed, ~2 minutes on 2 CPU cores
    python toy/toy2d.py --full     # 3 seeds, longer training, mean +- std

Data: 8 Gaussian modes on a circle; class 0 owns the even modes, class 1 the odd ones,
and the null class (label 2) is the whole mixture, so classifier-free guidance (w = 3)
is exercised as in Stable Diffusion. Under the VP forward process each class stays a
Gaussian mixture, so the teacher's eps (and so its PF-ODE) is closed form.

A small MLP is first trained as an ordinary eps-prediction diffusion model (the
"pre-trained checkpoint"), then distilled from the exact teacher with LCM, SPLAM and the
DL-ODE ablation at k = 20, and with LCM / SPLAM at k = 100 with and without multiple
estimation (Fig. 2a). Every method gets the same seeds and iteration budget.
Outputs in toy/out/: toy2d.json (every number), toy2d.png (samples, delta(t), curves).
All the method code is `minisplam`; this file only defines the toy problem and metrics.
"""

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

import minisplam as ms
from toy import measure

OUT = Path(__file__).resolve().parent / "out"
NULL = 2  # label of the unconditional (null) class

# ----------------------------------------------------------------------------------------
# The data and its exact teacher
# ----------------------------------------------------------------------------------------


class GMM:
    """8 isotropic modes of std `std` on a circle of radius `radius`; classes own alternate modes."""

    def __init__(self, n_modes: int = 8, radius: float = 1.0, std: float = 0.1):
        ang = 2 * math.pi * torch.arange(n_modes) / n_modes
        self.mu = radius * torch.stack([ang.cos(), ang.sin()], 1)          # (M, 2)
        self.std = std
        owner = torch.arange(n_modes) % 2
        # mask[c, m]: mode m belongs to class c; the null class owns all modes.
        self.mask = torch.stack([owner == 0, owner == 1, torch.ones(n_modes, dtype=torch.bool)])

    def sample(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        """Draw x0 for the given labels (0, 1 or NULL)."""
        probs = self.mask[labels].float()
        modes = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return self.mu[modes] + self.std * torch.randn(len(labels), 2, generator=generator)

    def eps(self, x, alpha, sigma, labels):
        """Exact eps(x_t) = -sigma * score of the noised class mixture (alpha, sigma: (B, 1))."""
        mu = self.mu.to(x.dtype)
        var = alpha**2 * self.std**2 + sigma**2                          # (B, 1)
        d2 = ((x[:, None, :] - alpha[:, :, None] * mu[None]) ** 2).sum(-1)   # (B, M)
        logits = (-d2 / (2 * var)).masked_fill(~self.mask[labels], -float("inf"))
        resp = torch.softmax(logits, dim=1)
        mean = alpha * (resp @ mu)                                        # E[alpha x0 | x_t]
        return sigma * (x - mean) / var


def exact_teacher(gmm: GMM, sched: ms.VPSchedule):
    """The teacher callable teacher(x, t, cond) -> eps of minisplam, in closed form."""

    def teacher(x, t, labels):
        alpha, sigma = ms.alpha_sigma(sched, t, x)
        return gmm.eps(x, alpha, sigma, labels)

    return teacher


# ----------------------------------------------------------------------------------------
# The student network: an MLP with timestep, class and gamma embeddings
# ----------------------------------------------------------------------------------------


class MLP(nn.Module):
    """eps_theta(x, t, c, gamma) for 2D points. Time and gamma go through diffusers' TimestepEmbedding exactly as
    in the SD UNet: gamma_features(gamma) enters the time MLP's input through its zero-initialised cond_proj."""

    def __init__(self, hidden: int = 128, blocks: int = 3, n_classes: int = 3, gamma_kind: str = "authors"):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        self.t_dim, self.gamma_kind = 64, gamma_kind
        self.time_embedding = ms.zero_gamma_path(
            TimestepEmbedding(self.t_dim, hidden, cond_proj_dim=ms.GAMMA_FEATURES[gamma_kind][1]))
        self.c_emb = nn.Embedding(n_classes, hidden)
        self.inp = nn.Linear(2, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)]) for _ in range(blocks))
        self.out = nn.Linear(hidden, 2)

    def forward(self, x, t, labels, gamma=None):
        from diffusers.models.embeddings import get_timestep_embedding   # here: the GMM alone needs no diffusers

        c = None if gamma is None else ms.gamma_features(gamma, self.gamma_kind)      # timestep_cond
        e = self.time_embedding(get_timestep_embedding(t.float(), self.t_dim, downscale_freq_shift=0), c) + self.c_emb(labels)
        h = self.inp(x)
        for lin1, lin2 in self.blocks:
            h = h + lin2(torch.nn.functional.silu(lin1(torch.nn.functional.silu(h)) + e))
        return self.out(torch.nn.functional.silu(h))


def pretrain(gmm: GMM, sched: ms.VPSchedule, iters: int, seed: int, batch: int = 512, lr: float = 2e-3,
             hidden: int = 128, gamma_kind: str = "authors"):
    """Ordinary eps-prediction diffusion training with 10% label dropout (the 'checkpoint'). It never sees gamma:
    its cond_proj stays zero and `student_from` replaces it; `gamma_kind` only fixes the initialisation's RNG stream."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MLP(hidden, gamma_kind=gamma_kind)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    for _ in range(iters):
        labels = torch.randint(0, 2, (batch,), generator=g)
        x0 = gmm.sample(labels, g)
        labels = torch.where(torch.rand(batch, generator=g) < 0.1, NULL, labels)
        t = torch.randint(0, sched.T, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        alpha, sigma = ms.alpha_sigma(sched, t, x0)
        loss = ((net(alpha * x0 + sigma * noise, t, labels) - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
    return net


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 between two equal-size point clouds (fixed random directions)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.shape[1], n_proj, generator=g)
    d = d / d.norm(dim=0, keepdim=True)
    pa, pb = (a @ d).sort(0).values, (b @ d).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def class_sw2(x, ref, labels) -> float:
    """SW2 per class (x and ref share `labels`), averaged over the two classes. On a few thousand points it is
    dominated by how many points land in each far-apart mode, so it cannot tell modes from a ring through them
    (tests/test_toy2d.py): the toy's distribution metric is mode_scores."""
    return sum(sliced_w2(x[labels == c], ref[labels == c]) for c in (0, 1)) / 2


def mode_nll(x, labels, gmm: GMM) -> torch.Tensor:
    """-log p(x | class) under the class's TRUE mixture (equal weights over its modes), per point, in nats."""
    var = gmm.std**2
    d2 = ((x[:, None, :].double() - gmm.mu[None].double()) ** 2).sum(-1)            # (N, M)
    log_n = (-d2 / (2 * var) - math.log(2 * math.pi * var)).masked_fill(~gmm.mask[labels], -float("inf"))
    return -(torch.logsumexp(log_n, 1) - gmm.mask[labels].sum(1).double().log())


def mode_split(x, labels, gmm: GMM) -> float:
    """Coverage: the total-variation distance between the share of a class's samples nearest each of its modes and
    the modes' weights (1/4 each; the guided teacher keeps them equal by the mixture's symmetry), averaged over the
    two classes. 0: every mode gets its share; 0.25: one of the four modes is empty; 0.75: all in one mode."""
    d2 = ((x[:, None, :] - gmm.mu[None]) ** 2).sum(-1).masked_fill(~gmm.mask[labels], float("inf"))
    nearest = d2.argmin(1)
    tv = []
    for c in (0, 1):
        counts = torch.bincount(nearest[labels == c], minlength=len(gmm.mu))[gmm.mask[c]].double()
        tv.append(0.5 * (counts / counts.sum() - 1 / len(counts)).abs().sum().item())
    return sum(tv) / 2


def mode_split_floor(labels, gmm: GMM, draws: int = 2000, seed: int = 0) -> float:
    """mode_split's noise floor: its mean for samples that split over the modes exactly as the true weights say
    (multinomial counts of the same class sizes; Monte Carlo)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tv = 0.0
    for c in (0, 1):
        m, n = int(gmm.mask[c].sum()), int((labels == c).sum())
        share = rng.multinomial(n, [1 / m] * m, size=draws) / n                          # (draws, m)
        tv += 0.5 * np.abs(share - 1 / m).sum(1).mean() / 2
    return float(tv)


def student_eps(net):
    """The sampler's model: the student at gamma = 1 (= no gamma path at all)."""
    return lambda x, t, c: net(x, t, c, torch.ones(x.shape[0]))


def consistency_error(net, gmm, teacher, sched, w, n: int = 1000, seed: int = 0, k: int = 20, stride: int = 20):
    """delta(t) of Fig. 2c (toy.measure.consistency_delta) for t on the grid, t >= 100: 'ode' solves the exact guided
    teacher ODE from x_t to t-k (k steps of size 1); 'same_noise' is the paper's simulation."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x0 = gmm.sample(labels, g)
    noise = torch.randn(x0.shape, generator=g)
    uncond = torch.full_like(labels, NULL)
    out = {"t": [], "ode": [], "same_noise": []}
    for t in range(119, sched.T, stride):
        d = measure.consistency_delta(student_eps(net), teacher, x0, noise, labels, uncond, w, sched, t, k)
        out["t"].append(t)
        out["ode"].append(d["ode"])
        out["same_noise"].append(d["same_noise"])
    return out


# ----------------------------------------------------------------------------------------
# Distillation with minisplam.splad_step (Alg. 1)
# ----------------------------------------------------------------------------------------

METHODS = {  # name -> SPLADConfig overrides (Fig. 2a and Table 3 on the toy)
    "LCM k=20": dict(objective="lcm", k=20),
    "SPLAM k=20": dict(objective="splam", k=20),
    "DL k=20": dict(objective="dl", k=20),
    "LCM k=100 ME": dict(objective="lcm", k=100),
    "SPLAM k=100 ME": dict(objective="splam", k=100),
    "LCM k=100 noME": dict(objective="lcm", k=100, multiple_estimation=False),
    "SPLAM k=100 noME": dict(objective="splam", k=100, multiple_estimation=False),
}


class EvalSet:
    """Fixed noise, labels and reference ODE samples every method is measured on."""

    def __init__(self, gmm, teacher, sched, w, n: int, seed: int, ode_steps: int = 200):
        g = torch.Generator().manual_seed(10_000 + seed)
        self.labels = torch.arange(n) % 2
        uncond = torch.full_like(self.labels, NULL)
        self.x_T = torch.randn(n, 2, generator=g)
        x_T_b = torch.randn(n, 2, generator=g)
        with torch.no_grad():
            self.ref_a = measure.ode_sample(teacher, self.x_T, self.labels, uncond, w, sched, ode_steps)
            self.ref_b = measure.ode_sample(teacher, x_T_b, self.labels, uncond, w, sched, ode_steps)
        self.noise_floor = class_sw2(self.ref_a, self.ref_b, self.labels)
        self.gmm, self.teacher, self.sched, self.w, self.uncond, self.ode_steps = gmm, teacher, sched, w, uncond, ode_steps
        self.nll_teacher = mode_nll(self.ref_b, self.labels, gmm).mean().item()
        self.nll_floor, self.split_floor = self.floors()

    def floors(self, sub=slice(None)):
        """The noise floors of modes() on the points `sub`: for 'nll', the std of the difference of two independent
        teacher sets' mean NLL (from ref_a and ref_b); for 'split', mode_split_floor."""
        lab = self.labels[sub]
        nll_a, nll_b = mode_nll(self.ref_a[sub], lab, self.gmm), mode_nll(self.ref_b[sub], lab, self.gmm)
        return ((nll_a.var() + nll_b.var()) / len(lab)).sqrt().item(), mode_split_floor(lab, self.gmm)

    def sw2(self, x):
        """Against the *independent* reference set, so the floor is comparable."""
        return class_sw2(x, self.ref_b, self.labels)

    def modes(self, x, sub=slice(None)) -> dict:
        """The toy's distribution metric: 'nll', the mean NLL of x under its class's true mixture minus that of an
        independent teacher set (0: the teacher's quality; the floor is nll_floor), and 'split', mode_split
        (coverage; floor split_floor). On a subset `sub` the floors are floors(sub)."""
        lab = self.labels[sub]
        return {"nll": mode_nll(x, lab, self.gmm).mean().item() - mode_nll(self.ref_b[sub], lab, self.gmm).mean().item(),
                "split": mode_split(x, lab, self.gmm)}

    def ode(self, sub=slice(None)):
        """ode(x, t) for toy.measure.few_step_errors: the teacher's ODE output from x at t, on the grid of ref_a.
        From the evaluation noise itself (every 1-step error) that is ref_a, computed once."""
        T, n = self.sched.T, self.ode_steps

        def solve(x, t):
            if t == T - 1 and torch.equal(x, self.x_T[sub]):
                return self.ref_a[sub]
            return measure.ode_sample(self.teacher, x, self.labels[sub], self.uncond[sub], self.w, self.sched,
                                      max(1, round(n * (t + 1) / T)), t_start=t)

        return solve

    def one_step_error(self, x1):
        """||F(x_T) - ODE(x_T)|| from the same noise."""
        return (x1 - self.ref_a).norm(dim=1).mean().item()

    def fixed_point_error(self, step: int) -> float:
        """The 1-step error of the map distillation converges to, for a teacher solver step `step` (Eq. 18).
        The constraint F(x_t, t) = F(x_hat_s, s) on LCM's grid chains down to F(x, 0) = x (c_skip(0) = 1), so the
        ideal 1-step student is the teacher's DDIM chain from x_T in steps of `step`. At gamma = 1 SPLAM's target
        is LCM's (Alg. 1), so this floor is the same for both."""
        n = self.x_T.shape[0]
        T, zero = torch.full((n,), self.sched.T - 1), torch.zeros(n, dtype=torch.long)
        with torch.no_grad():
            x = ms.teacher_solve(self.teacher, self.x_T, T, zero, step, self.labels, self.uncond, self.w, self.sched)
        return self.one_step_error(x)


def student_from(pre: MLP, gamma_kind: str) -> MLP:
    """The student: the pre-trained MLP's weights with the gamma path of `gamma_kind` (cond_proj zero)."""
    net = MLP(pre.inp.out_features, len(pre.blocks), pre.c_emb.num_embeddings, gamma_kind)
    state = {k: v for k, v in pre.state_dict().items() if "cond_proj" not in k}
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    return net


def distill(name, pre, gmm, teacher, sched, ev: EvalSet, iters, seed, w, lr, batch, eval_every,
            n_curve=1000, cfg: ms.SPLADConfig = None, wrap=None, anneal: bool = False):
    """Alg. 1 with the method METHODS[name] (or an explicit `cfg`). `wrap(net)` turns the network into the student
    callable splad_loss sees (default: the network itself). anneal: cosine-decay the lr to 0 over `iters` (the
    study's convergence check). Returns the EMA target and its training curve."""
    cfg = cfg or ms.SPLADConfig(w=w, loss="l2", **METHODS[name])
    wrap = wrap or (lambda net: net)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = student_from(pre, cfg.gamma_features)
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters) if anneal else None
    uncond = torch.full((batch,), NULL)
    curve = {"iter": [], "train_s": [], "err_1": [], "sw2_1": [], "sw2_4": [], "nll_1": [], "nll_4": [], "split_4": []}
    train_s = 0.0

    def log(it):
        sub = slice(0, n_curve)
        lab = ev.labels[sub]
        err, x = measure.few_step_errors(student_eps(target), ev.x_T[sub], lab, sched, ev.ode(sub), (1,), seed)
        x[4] = few_step_samples(target, ev, sched, 4, seed, sub)
        for steps in (1, 4):
            curve[f"sw2_{steps}"].append(class_sw2(x[steps], ev.ref_b[sub], lab))
            m = ev.modes(x[steps], sub)
            curve[f"nll_{steps}"].append(m["nll"])
        curve["split_4"].append(m["split"])
        curve["err_1"].append(err[1])
        curve["iter"].append(it)
        curve["train_s"].append(train_s)

    log(0)
    for it in range(1, iters + 1):
        t0 = time.perf_counter()
        labels = torch.randint(0, 2, (batch,), generator=g)
        x0 = gmm.sample(labels, g)
        ms.splad_step(wrap(student), wrap(target), teacher, x0, labels, uncond, sched, cfg, opt, (target, student), g)
        if lr_sched:
            lr_sched.step()
        train_s += time.perf_counter() - t0
        if it % eval_every == 0 or it == iters:
            log(it)
    return target, curve


def few_step_samples(net, ev: EvalSet, sched, steps: int, seed: int, sub=slice(None)):
    """The student's `steps`-step samples from the evaluation noise, as toy.measure.few_step_errors draws them,
    without the teacher's ODE reference that only the error needs."""
    return measure.few_step_sample(student_eps(net), ev.x_T[sub], ev.labels[sub], sched, steps, seed)


def evaluate(net, ev: EvalSet, sched, seed):
    """The 1-step error to the teacher's ODE, and for 1, 2 and 4 steps the mode metric (nll_n, split_n: EvalSet.modes)
    and SW2 (sw2_n, kept for the older results)."""
    err, _ = measure.few_step_errors(student_eps(net), ev.x_T, ev.labels, sched, ev.ode(), (1,), seed)
    out = {"err_1step": err[1]}
    for n in (1, 2, 4):
        x = few_step_samples(net, ev, sched, n, seed)
        out.update({f"{m}_{n}": v for m, v in ev.modes(x).items()}, **{f"sw2_{n}": ev.sw2(x)})
    return out


def baselines(ev: EvalSet, sched):
    """Training-free solvers from diffusers at equal step counts (2 evals = 1 guided step)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=sched.T, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", timestep_spacing="trailing")
    makers = {
        "DDIM": lambda: DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True),
        "DPM-Solver++(2M)": lambda: DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++",
                                                                solver_order=2),
    }

    def eps_fn(x, t):
        return ms.guided_eps(ev.teacher, x, t, ev.labels, ev.uncond, ev.w)

    res = {}
    for name, make in makers.items():
        res[name] = {}
        for steps in (1, 2, 4):
            x = measure.scheduler_sample(make(), eps_fn, ev.x_T, steps)
            res[name][f"sw2_{steps}"] = ev.sw2(x)
            res[name].update({f"{m}_{steps}": v for m, v in ev.modes(x).items()})
            if steps == 1:
                res[name]["err_1step"] = ev.one_step_error(x)
    return res


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def mean_std(vals):
    t = torch.tensor(vals, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(vals) > 1 else 0.0)


def fmt(vals):
    m, s = mean_std(vals)
    return f"{m:.4f}" if len(vals) == 1 else f"{m:.4f}±{s:.4f}"


def table(runs, base, floors):
    """runs[name] -> list over seeds of evaluate()'s dict (+ train_s); floors: one (nll, split) floor per seed."""
    cols = ["nll_1", "nll_2", "nll_4", "split_1", "split_4", "err_1step"]
    lines = [f"{'method':<24}" + "".join(f"{c:>16}" for c in cols) + f"{'train s':>10}"]
    for name, per_seed in {**base, **runs}.items():
        row = f"{name:<24}" + "".join(f"{fmt([r[c] for r in per_seed]):>16}" for c in cols)
        ts = [r["train_s"] for r in per_seed if "train_s" in r]
        lines.append(row + (f"{mean_std(ts)[0]:>10.1f}" if ts else f"{'-':>10}"))
    lines.append(f"{'noise floor':<24}" + f"{fmt([f[0] for f in floors]):>16}" * 3 + f"{fmt([f[1] for f in floors]):>16}" * 2
                 + "   (NLL: std of two teacher sets' difference; split: a perfect split's sampling noise)")
    return "\n".join(lines)


def verdict(runs, floors):
    """Plain statement per k and step count: SPLAM vs LCM by the NLL excess (EvalSet.modes), a tie when the two are
    closer than twice the NLL floor."""
    out = []
    floor = max(f[0] for f in floors)
    for k in ("k=20", "k=100 ME", "k=100 noME"):
        for steps in (1, 2, 4):
            c = f"nll_{steps}"
            s, l = mean_std([r[c] for r in runs[f"SPLAM {k}"]])[0], mean_std([r[c] for r in runs[f"LCM {k}"]])[0]
            word = "ties with" if abs(s - l) < 2 * floor else ("beats" if s < l else "does NOT beat")
            out.append(f"SPLAM {k} {word} LCM {k} at {steps} step(s): NLL excess {s:.3f} vs {l:.3f} (floor {floor:.3f})")
    return out


def plot(path, ev, finals, curves, deltas, sched, seed, dpi: int = 100):
    """The demo figure. Top: the teacher's ODE samples and each method's 1-step samples (over the teacher's, grey).
    Bottom: delta(t) (Fig. 2c) and the NLL excess over the teacher (EvalSet.modes) at 1 and 4 steps over training,
    with the teacher's noise floor. Colours and line styles: toy.palette."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from toy import palette

    names = list(finals)
    n_top = len(names) + 1
    cols = n_top if n_top <= 4 else math.ceil(n_top / 2)
    rows = math.ceil(n_top / cols)
    fig = plt.figure(figsize=(14, 4.2 * rows + 4.4))
    outer = fig.add_gridspec(2, 1, height_ratios=[4.2 * rows, 4.4], hspace=0.2)
    top = outer[0].subgridspec(rows, cols, hspace=0.4, wspace=0.2)
    panels = [("teacher ODE, 200 steps", "teacher", ev.ref_a)]
    panels += [(f"{name}, 1 step", name, few_step_samples(finals[name], ev, sched, 1, seed)) for name in names]
    for i, (title, name, x) in enumerate(panels):
        r, c = divmod(i, cols)
        a = fig.add_subplot(top[r, c])
        if name != "teacher":
            a.scatter(*ev.ref_a.T, s=0.4, c="#c8c8c8", rasterized=True)
            title += f"\nNLL excess {ev.modes(x)['nll']:.2f} nats"
        a.scatter(*x.T, s=0.4, c=palette.color(name), alpha=1 if name == "teacher" else 0.5, rasterized=True)
        a.set_title(title, fontsize=10)
        a.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), xticks=[-1, 0, 1], yticks=[-1, 0, 1], aspect="equal")
        a.tick_params(labelsize=9)
        a.set_xlabel("x₁ (data units)", fontsize=9)
        if c == 0:
            a.set_ylabel("x₂ (data units)", fontsize=9)
    bottom = outer[1].subgridspec(1, 3, wspace=0.3)
    a_delta, a_1, a_4 = (fig.add_subplot(bottom[0, i]) for i in range(3))
    for name in names:
        if name in deltas:
            a_delta.plot(deltas[name]["t"], deltas[name]["ode"], lw=1.3, **palette.style(name))
    a_delta.set_xlabel("timestep t (of 1000)", fontsize=10)
    a_delta.set_ylabel("δ(t), RMS (data units)", fontsize=10)
    a_delta.set_title("consistency error δ(t), Fig. 2c. One seed, a short\nrun, far from converged: it ranks nothing",
                      fontsize=10)
    # the curves are measured on the first min(n, 1000) evaluation points (distill's n_curve): the floor at that size
    m = min(len(ev.labels), 1000)
    nll_a, nll_b = (mode_nll(ref[:m], ev.labels[:m], ev.gmm) for ref in (ev.ref_a, ev.ref_b))
    floor = ((nll_a.var() + nll_b.var()) / m).sqrt().item()
    for steps, a in ((1, a_1), (4, a_4)):
        for name in names:
            a.plot(curves[name]["iter"], curves[name][f"nll_{steps}"], lw=1.5, **palette.style(name))
        a.set_yscale("symlog", linthresh=floor, linscale=0.5)          # log above the floor, linear within it
        a.axhspan(-floor, floor, color="0.85", lw=0)
        vals = [v for name in names for v in curves[name][f"nll_{steps}"]]
        a.set_ylim(min([-1.5 * floor, *(1.2 * v for v in vals)]), None)
        ticks = [0] + [10.0**e for e in range(-1, 4) if 10.0**e <= 1.5 * max(vals + [0.1])]
        a.set_yticks(ticks, [f"{t:g}" for t in ticks])
        a.set_xlabel("distillation iteration", fontsize=10)
        a.set_ylabel("NLL excess over the teacher (nats)", fontsize=10)
        a.set_title(f"{steps}-step samples, {m} points", fontsize=10)
    for a in (a_delta, a_1, a_4):
        a.tick_params(labelsize=9)
    handles = [plt.Line2D([], [], lw=1.5, label=name, **palette.style(name)) for name in names]
    handles.append(Patch(color="0.85", label=f"teacher's noise floor (± {floor:.3f} nats)"))
    a_4.legend(handles=handles, fontsize=9, loc="upper left", bbox_to_anchor=(1.03, 1), frameon=False)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="3 seeds, 3x the iterations, mean +- std")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="distillation iterations per method")
    p.add_argument("--pretrain-iters", type=int, default=None)
    p.add_argument("--w", type=float, default=3.0, help="guidance scale (paper's w; LCM omega = w-1)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=4000)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    seeds = a.seeds or (3 if a.full else 1)
    iters = a.iters or (2400 if a.full else 600)
    pre_iters = a.pretrain_iters or (6000 if a.full else 1000)
    names = [n.strip() for n in a.methods.split(",") if n.strip()]
    unknown = set(names) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    sched = ms.sd_schedule()
    gmm = GMM()
    teacher = exact_teacher(gmm, sched)
    runs = {n: [] for n in names}
    base, floors, curves0, deltas0, finals0, ev0 = {}, [], {}, {}, {}, None
    for seed in range(seeds):
        ev = EvalSet(gmm, teacher, sched, a.w, a.n_eval, seed)
        floors.append((ev.nll_floor, ev.split_floor))
        for bname, r in baselines(ev, sched).items():
            base.setdefault(bname, []).append(r)
        t0 = time.perf_counter()
        pre = pretrain(gmm, sched, pre_iters, seed)
        print(f"[seed {seed}] pre-trained the MLP in {time.perf_counter() - t0:.1f}s", flush=True)
        for bname, r in {"pre-trained (no distil)": evaluate(pre, ev, sched, seed)}.items():
            base.setdefault(bname, []).append(r)
        for name in names:
            net, curve = distill(name, pre, gmm, teacher, sched, ev, iters, seed, a.w, a.lr, a.batch,
                                 eval_every=max(iters // 8, 1))
            r = evaluate(net, ev, sched, seed)
            r["train_s"] = curve["train_s"][-1]
            runs[name].append(r)
            print(f"[seed {seed}] {name:<18} NLL excess 1/2/4 = {r['nll_1']:.3f} {r['nll_2']:.3f} {r['nll_4']:.3f}"
                  f"   ({r['train_s']:.1f}s)", flush=True)
            if seed == 0:
                curves0[name], finals0[name] = curve, net
                deltas0[name] = consistency_error(net, gmm, teacher, sched, a.w, n=min(a.n_eval, 1000))
        ev0 = ev0 or ev

    tab = table(runs, base, floors)
    words = verdict(runs, floors) if all(f"{m} {k}" in runs for m in ("SPLAM", "LCM")
                                 for k in ("k=20", "k=100 ME", "k=100 noME")) else []
    report = {
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                     "seeds": seeds, "iters": iters, "pretrain_iters": pre_iters},
        "noise_floor": {"nll": [f[0] for f in floors], "split": [f[1] for f in floors]}, "baselines": base, "runs": runs,
        "curves_seed0": curves0, "delta_seed0": deltas0, "verdict": words,
        "wall_s": time.perf_counter() - t_start,
    }
    (a.out / "toy2d.json").write_text(json.dumps(report, indent=1))
    plot(a.out / "toy2d.png", ev0, finals0, curves0, deltas0, sched, 0)
    print("\nNLL excess (nats over the teacher's own samples, under the true class mixture) at 1/2/4 steps, mode split "
          "(0 = every mode its share), 1-step error to the teacher's ODE; lower is better, "
          f"w={a.w}, {iters} iterations, {seeds} seed(s); baselines count one guided step per step:\n")
    print(tab)
    print("\n" + "\n".join(words))
    print(f"\nwrote {a.out / 'toy2d.json'} and {a.out / 'toy2d.png'} in {report['wall_s']:.0f}s")
    return report


if __name__ == "__main__":
    main()
